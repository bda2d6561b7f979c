"""The default job: a small U-Net on the built-in 16x16 RGB sprites, sized for a 2-core CPU.

Run:  python launch.py --config configs/sprites.py --workdir workdirs/sprites
Produces: an unconditional sprite model (checkpoints, metrics.jsonl, sample grids of 16x16
sprites) in the workdir. Variant `configs/sprites.py:peer` uses the 3.94M-parameter network of the
PyTorch peer benchmark (diffusers UNet2DModel, peer-bench `sprites16s`) for speed comparisons;
`configs/sprites.py:edm` and `configs/sprites.py:fm` train the same network with the EDM recipe
and with rectified flow (configs/default.py `recipe`); `configs/sprites.py:dit` trains a small
DiT (patch 2: 64 tokens of width 128, 6 blocks, 4 heads; 1.9M parameters) instead of the U-Net.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "" (default), "peer" (the peer benchmark's network shape), "edm", "fm", "dit" (a
  small DiT) or "latent" (diffusion on the latents of an autoencoder trained on 32x32 sprites)."""
  c = default.get_config()
  c.data.update(source="sprites", image_size=16, channels=3)
  # Channels 32/64/64 at 16/8/4 pixels, one block per level, attention at 4x4: ~1.2M parameters.
  c.model.update(
    base_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    num_heads=4,
    dropout=0.0,
  )
  # 4,000 steps of 64 (256k images); its time on a 2-core CPU: docs/performance.md.
  # v-prediction: with eps the cosine schedule's last step (alpha-bar 2e-9) turns a
  # small eps error into a huge x0 (measured: |x0| ~ 1000 unclipped after 2,500 steps).
  c.diffusion.update(schedule="cosine", prediction="v")
  c.train.update(
    batch_size=64,
    num_steps=4000,
    learning_rate=1e-3,
    warmup_steps=200,
    ema_decay=0.999,
    log_every=100,
    checkpoint_every=1000,
    sample_every=1000,
  )
  c.sample.update(sampler="dpm_solver++", num_steps=25, spacing="logsnr", num_images=64)
  if arg == "peer":  # diffusers sprites16s: 32/64/128, 2 blocks, 1-head attention at 4x4, additive
    c.model.update(channel_mult=(1, 2, 4), num_res_blocks=2, num_heads=1, dropout=0.1, film=False)
  elif (
    arg == "latent"
  ):  # 32x32 sprites as 8x8x4 latents of configs/autoencoder.py (docs/latents.md)
    c.autoencoder = ml_collections.ConfigDict({"path": "workdirs/ae_sprites32"})
    c.data.update(source="latents", path="data/sprites32_latents", image_size=8, channels=4)
    c.model.update(channel_mult=(1, 2), attn_resolutions=(4,))
    c.sample.update(clip_x0="none")  # latents are not confined to [-1, 1]
  elif arg in ("edm", "fm"):
    default.recipe(c, arg)
  elif arg == "dit":
    c.model.update(arch="dit", patch_size=2, hidden_size=128, depth=6, num_heads=4)
    c.train.update(learning_rate=5e-4)  # transformers want a lower rate than the U-Net's 1e-3
  elif arg:
    raise ValueError(
      f"unknown sprites config variant {arg!r}; use '', 'peer', 'edm', 'fm', 'dit' or 'latent'."
    )
  return c


def tiny_network(c: ml_collections.ConfigDict) -> None:
  """The ablations' `:tiny` arms: a 45k-parameter U-Net (8/16 channels at 16/8 pixels, no
  attention) on 4,096 sprites, trained at learning rate 2e-3 with a short EMA, one checkpoint
  kept. The caller sets the batch size and the steps."""
  c.data.num_sprites = 4096
  c.model.update(
    base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_groups=4
  )
  c.train.update(learning_rate=2e-3, ema_decay=0.99, keep_checkpoints=1)
