"""MNIST digits (28x28 grayscale), class-conditional with classifier-free guidance.

Run:  python launch.py --config configs/mnist.py --workdir workdirs/mnist
      (the data must be prepared once where there is internet: `tfds build mnist --data_dir DIR
      --file_format array_record`, then add --config.data.data_dir=DIR)
Produces: a digit model whose sample grids show one row per class (guidance scale 2).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is unused."""
  c = default.get_config(arg)
  c.data.update(
    source="tfds", name="mnist", image_size=28, channels=1, eval_split="test", random_flip=False
  )  # flipped digits are not digits
  c.diffusion.update(schedule="cosine", prediction="eps")
  # 28 -> 14 -> 7: channels 64/128/128, attention at 7x7, 10 classes + the null class.
  c.model.update(
    base_channels=64,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(7,),
    dropout=0.1,
    num_classes=10,
  )
  c.train.update(
    batch_size=128,
    num_steps=30_000,
    learning_rate=2e-4,
    warmup_steps=1000,
    ema_decay=0.999,
    label_dropout=0.1,
    checkpoint_every=2000,
    sample_every=5000,
  )
  c.sample.update(
    sampler="dpm_solver++", num_steps=25, spacing="logsnr", guidance_scale=2.0, num_images=100
  )
  return c
