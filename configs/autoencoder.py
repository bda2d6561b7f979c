"""An AutoencoderKL trained on a collection (diffusion/autoencoding.py), for latent diffusion
where no published autoencoder fits or the machine is offline.

Run:  python launch.py --config configs/autoencoder.py --workdir workdirs/ae_sprites32
      python launch.py --config configs/autoencoder.py:tiny --workdir /tmp/ae_tiny  (tests)
Produces: checkpoints (the workdir serves as `prepare --encode` and config.autoencoder.path),
metrics.jsonl (loss, mse = reconstruction MSE in [-1, 1]) and samples/step_N.png (training images
in the top half, their reconstructions from the posterior mean beneath).

Default: 32x32 RGB sprites -> 8x8x4 latents (channels 32/64/64, downsampling factor 4).
Loss: L1 reconstruction + kl_weight * KL (the module docstring gives the scales); no perceptual
or adversarial term (no pretrained LPIPS weights offline).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "" (sprites 32x32 -> 8x8x4) or "tiny" (8x8 -> 4x4x4, for tests)."""
  c = default.get_config()
  c.task = "autoencoder"  # train.train optimises an AutoencoderKL, not a diffusion model
  c.autoencoder = a = ml_collections.ConfigDict()
  a.block_out_channels = (32, 64, 64)  # width per level; len - 1 downsamplings by 2
  a.layers_per_block = 1  # ResNet blocks per encoder level (decoder: + 1)
  a.latent_channels = 4  # latent channels (SD: 4, SD3/FLUX: 16)
  a.norm_num_groups = 32  # GroupNorm groups (must divide every width)
  a.mid_block_add_attention = True  # self-attention in the middle blocks
  a.scaling_factor = 0.0  # latent scale; 0 = 1 / std of the latents, set by prepare --encode
  a.shift_factor = 0.0  # latent shift, subtracted before scaling
  a.recon = "l1"  # reconstruction term: l1 | l2
  a.kl_weight = 1e-6  # weight of the KL term (LDM's scale)
  c.data.update(source="sprites", image_size=32, channels=3)
  c.train.update(
    batch_size=32,
    num_steps=3000,
    learning_rate=5e-4,
    warmup_steps=100,
    ema_decay=0.999,
    log_every=100,
    checkpoint_every=1000,
    sample_every=1000,
  )
  c.sample.update(num_images=72)  # 4 rows of 9 training images over their reconstructions
  if arg == "tiny":
    a.update(block_out_channels=(8, 16), norm_num_groups=4)
    c.data.update(image_size=8, num_sprites=256, prefetch=0)
    c.train.update(batch_size=8, num_steps=4, log_every=2, warmup_steps=2, sample_every=0)
    c.sample.update(num_images=8)
  elif arg:
    raise ValueError(f"unknown autoencoder config variant {arg!r}; use '' or 'tiny'.")
  return c
