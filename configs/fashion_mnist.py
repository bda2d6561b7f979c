"""Fashion-MNIST (28x28 grayscale clothes), class-conditional: the MNIST settings on harder data.

Run:  python launch.py --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
      (prepare once with internet: `tfds build fashion_mnist --data_dir DIR --file_format
      array_record`, then add --config.data.data_dir=DIR)
Produces: a clothing model whose sample grids show one row per class (guidance scale 2).
"""

import ml_collections

from configs import mnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` is unused."""
  c = mnist.get_config(arg)
  c.data.update(name="fashion_mnist", random_flip=True)  # clothes are left-right symmetric
  c.train.num_steps = 60_000
  return c
