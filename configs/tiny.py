"""The one tiny config: a one-level U-Net (12,203 parameters) on 8x8 sprites, for tests and
quick checks: it traces and compiles in a few seconds on a CPU.

Run:  python launch.py --config configs/tiny.py --workdir /tmp/tiny
Produces: a few seconds of training per step count on a CPU (mostly compiling): checkpoints and
metrics.jsonl in the workdir; no sample grids unless --config.sample.num_images is set.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is unused."""
  del arg
  c = default.get_config()
  c.data.update(image_size=8, num_sprites=512, prefetch=0)
  c.model.update(
    base_channels=8, channel_mult=(1,), attn_resolutions=(), num_groups=4, num_res_blocks=1
  )
  c.train.update(batch_size=8, log_every=2, warmup_steps=2, sample_every=0)
  c.sample.update(num_images=0, num_steps=3)  # no sample grids unless asked
  return c
