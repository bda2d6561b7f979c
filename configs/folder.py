"""Any folder of images (PNG, JPEG, GIF, BMP, WebP; searched recursively).

Run:  python launch.py --config configs/folder.py --config.data.path=/path/to/images \
        --workdir workdirs/my_images
      `configs/folder.py:64` sets the image size (default 32); class labels come from the first
      level of subfolders when there are several (set --config.model.num_classes to their count
      for a class-conditional model).
Produces: a model of the folder's images, with sample grids in the workdir.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: the image size in pixels (a multiple of 8), default 32."""
  size = int(arg) if arg else 32
  c = default.get_config()
  c.data.update(source="folder", path="", image_size=size, channels=3, resize="antialias")
  c.diffusion.update(schedule="cosine", prediction="v", weighting="min_snr")
  c.model.update(
    base_channels=64,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(max(size // 4, 4),),
    dropout=0.1,
  )
  c.train.update(batch_size=64, num_steps=100_000, checkpoint_every=5000, sample_every=5000)
  c.sample.update(sampler="dpm_solver++", num_steps=25, spacing="logsnr")
  return c
