"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's 35.7M-parameter U-Net and training settings.

Run:  python launch.py --config configs/cifar10.py --workdir workdirs/cifar10
Produces: an unconditional 32x32 CIFAR-10 model (eps prediction, linear schedule, T=1000) with
checkpoints, metrics.jsonl and sample grids in the workdir. The paper trains 800k steps at batch
128 (10.6 h on a TPU v3-8) and reports FID 3.17, IS 9.46 with 1000-step ancestral sampling.
`configs/cifar10.py:edm` trains the same network with the EDM recipe (process, preconditioning,
Heun at 35 network evaluations; EDM reports FID 1.97 with its own DDPM++ network),
`configs/cifar10.py:fm` with rectified flow. `configs/cifar10.py:dit` replaces the U-Net by
DiT-B/2 in pixel space (256 tokens of 2x2x3 pixels, 130M parameters) with the DiT paper's
optimiser (AdamW, learning rate 1e-4, no warm-up or weight decay) and the same diffusion.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """DDPM CIFAR-10; `arg`: "" (DDPM), "edm" or "fm" (default.recipe), or "dit"."""
  c = default.get_config()
  c.data.update(
    source="tfds", name="cifar10", image_size=32, channels=3, eval_split="test", random_flip=True
  )
  c.diffusion.update(
    schedule="linear",
    num_timesteps=1000,
    prediction="eps",
    weighting="simple",
    variance="fixed_large",
  )
  # base 128, mults (1, 2, 2, 2), 2 blocks, single-head attention at 16x16, DDPM's additive
  # conditioning (no FiLM): 35,746,307 parameters.
  c.model.update(
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    num_heads=1,
    head_dim=-1,
    dropout=0.1,
    resblock_updown=False,
    num_groups=32,
    num_classes=0,
    film=False,
  )
  c.train.update(
    batch_size=128,
    num_steps=800_000,
    learning_rate=2e-4,
    warmup_steps=5000,
    lr_schedule="constant",
    weight_decay=0.0,
    grad_clip=1.0,
    ema_decay=0.9999,
    ema_warmup=False,
    checkpoint_every=10_000,
    sample_every=50_000,
  )
  c.sample.update(sampler="ddpm", num_steps=1000)
  if arg == "dit":
    c.model.update(arch="dit", preset="DiT-B/2")
    c.train.update(learning_rate=1e-4, warmup_steps=0)
  else:
    default.recipe(c, arg or "")
  return c
