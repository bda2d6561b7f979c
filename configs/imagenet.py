"""Class-conditional ImageNet 256x256 in latent space: DiT-XL/2 as in the DiT paper.

Run:  python launch.py --config configs/imagenet.py:dit_xl2 --workdir workdirs/dit_xl2
Produces: a DiT-XL/2 trained on 32x32x4 latents of the Stable Diffusion autoencoder (256 / 8 per
side), prepared once with `python -m diffusion.data.prepare --encode` (docs/latents.md gives the
four commands); without them, launching stops with one line saying which is missing.
Paper settings (Peebles & Xie 2023): 1,000 classes with a null class for guidance (labels dropped
10% of the time), learned variances (the hybrid loss of improved DDPM, linear schedule, T=1000),
AdamW at 1e-4 constant, no weight decay, batch 256, EMA 0.9999; FID-50K 2.27 with 250 DDPM
steps and guidance 1.5. Published weights: `python -m diffusion.nets.convert dit ...`, then
`--config.model.init_from=OUT` (docs/nets.md).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "dit_xl2"."""
  if arg != "dit_xl2":
    raise ValueError(f"unknown imagenet config variant {arg!r}; use 'dit_xl2'.")
  c = default.get_config()
  # 256x256 images as 32x32x4 latents of sd-vae-ft-ema, the autoencoder DiT used
  c.data.update(
    source="latents", path="data/imagenet256-sdvae", image_size=32, channels=4, random_flip=True
  )
  c.autoencoder = ml_collections.ConfigDict({"path": "weights/sd-vae-ft-ema"})
  c.diffusion.update(
    process="vp",
    schedule="linear",
    num_timesteps=1000,
    prediction="eps",
    variance="learned_range",
    vlb_weight=0.001,
  )
  c.model.update(arch="dit", preset="DiT-XL/2", num_classes=1000, time_freq_shift=0.0)
  c.train.update(
    batch_size=256,
    num_steps=400_000,
    learning_rate=1e-4,
    warmup_steps=0,
    lr_schedule="constant",
    weight_decay=0.0,
    grad_clip=0.0,
    ema_decay=0.9999,
    ema_warmup=False,
    label_dropout=0.1,
    checkpoint_every=50_000,
    sample_every=50_000,
  )
  c.sample.update(sampler="ddpm", num_steps=250, guidance_scale=1.5, clip_x0="none")
  return c
