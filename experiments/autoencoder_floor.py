"""What a latent run's autoencoder alone costs: held-out images encoded (posterior mean) and
decoded, scored like samples by the heldout protocol (FD, SWD against the same training images,
in the run's feature net), with their MSE and PSNR.

Run (after `--mode eval` of the latent run, which writes its eval/feature_net.npz):
  python experiments/autoencoder_floor.py --config configs/sprites.py:latent --workdir RUN \
    --config.autoencoder.path=AE --config.data.path=LATENTS
Prints one JSON line: fd, swd and kid of the reconstructions, of the held-out images (the floor),
mse (images in [-1, 1]) and psnr (dB, peak-to-peak 2).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffusion import autoencoding  # noqa: E402
from diffusion.evaluation import heldout, pixels  # noqa: E402
from diffusion.metrics.quality import Reference, quality  # noqa: E402

config_flags.DEFINE_config_file("config", None, "the latent run's config")
flags.DEFINE_string("workdir", None, "the latent run's workdir (its eval/feature_net.npz)")


def main(_: list[str]) -> None:
  config, e = flags.FLAGS.config, flags.FLAGS.config.eval
  module, ae_params, _ = autoencoding.run_autoencoder(config)
  model = autoencoding.build(config)
  train_set, held, _ = pixels.real_images(config, model)
  net = heldout.feature_network(config, flags.FLAGS.workdir, train_set, held)
  pick = np.sort(
    np.random.default_rng(e.seed).choice(len(train_set), e.reference_images, replace=False)
  )
  ref = Reference.build(train_set.images[pick], net, batch_size=e.batch_size)
  images = held.images[: e.num_images]
  code = jax.jit(lambda x: module.apply(ae_params, x, method=module.encode)[0])
  back = jax.jit(lambda z: module.apply(ae_params, z, method=module.decode))
  x = images.astype(np.float32) / 127.5 - 1.0
  recon = np.concatenate(
    [np.clip(np.asarray(back(code(x[i : i + 250]))), -1, 1) for i in range(0, len(x), 250)]
  )
  as_uint8 = np.round((recon + 1.0) * 127.5).astype(np.uint8)
  mse = float(np.mean((recon - x) ** 2))
  score = lambda im: quality(im, ref, net, batch_size=e.batch_size, seed=e.seed)
  rec, floor = score(as_uint8), score(images)
  keys = ("fd", "swd", "kid")
  print(
    json.dumps(
      {
        "reconstructions": {k: rec[k] for k in keys},
        "floor": {k: floor[k] for k in keys},
        "mse": mse,
        "psnr": 10 * np.log10(4.0 / mse),
        "images": len(images),
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
