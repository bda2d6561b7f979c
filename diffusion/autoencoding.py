"""Training an `AutoencoderKL` with the diffusion training loop, and loading an autoencoder.

A config with `config.task = "autoencoder"` (configs/autoencoder.py) trains the network described
by `config.autoencoder` through `train.train`: the same workdir, lock, resume, checkpoints, EMA,
signals and metrics; `build(config, dataset)` gives the loop this module's `AutoencoderTask`
instead of a `Diffusion` (the same four members: init_params, loss, sample_fn, num_classes).

Loss per example, x in [-1, 1] of H x W x C values, posterior N(mean, exp(logvar)) of d values,
z = mean + exp(logvar / 2) * noise:

  loss = rec(x, decode(z)) + kl_weight * KL(N(mean, exp(logvar)) || N(0, I)) / (H W C)
  rec  = mean |x - x_hat| (recon "l1") or mean (x - x_hat)^2 ("l2")
  KL   = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar)

This is LDM's pixel term and KL term divided by the pixel count, so `kl_weight` has LDM's scale
(1e-6 in Stable Diffusion's autoencoders). No perceptual (LPIPS) or adversarial term: LPIPS needs
pretrained VGG weights that an offline machine cannot fetch, and a patch discriminator doubles
the cost and adds a second optimiser the shared loop does not have. Reconstructions are
therefore blurrier than a published autoencoder's at the same compression.

`load(path)` reads either a converted-weights folder (nets/convert_autoencoder.py) or the
workdir of a run of this module (its newest intact checkpoint's EMA parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import checkpoints, losses, storage
from diffusion.data import normalize
from diffusion.nets import convert_autoencoder as convert
from diffusion.nets.autoencoder import AutoencoderKL

RECONSTRUCTIONS = ("l1", "l2")
ARCH_FIELDS = (
  "block_out_channels",
  "layers_per_block",
  "latent_channels",
  "norm_num_groups",
  "mid_block_add_attention",
  "scaling_factor",
  "shift_factor",
)


def is_autoencoder_run(config: ml_collections.ConfigDict | dict) -> bool:
  return config.get("task", "diffusion") == "autoencoder"


def module_from_config(config: ml_collections.ConfigDict | dict) -> AutoencoderKL:
  """config.autoencoder's architecture fields (+ the data's channels) -> the module."""
  ae, channels = config["autoencoder"], int(config["data"]["channels"])
  kw = {k: ae[k] for k in ARCH_FIELDS}
  kw["block_out_channels"] = tuple(int(c) for c in kw["block_out_channels"])
  groups = int(kw["norm_num_groups"])
  if any(c % groups for c in kw["block_out_channels"]):
    raise ValueError(
      f"config.autoencoder.block_out_channels {kw['block_out_channels']} must all be multiples "
      f"of config.autoencoder.norm_num_groups={groups}."
    )
  return AutoencoderKL(**kw, in_channels=channels, out_channels=channels)


@dataclasses.dataclass(frozen=True, eq=False)
class AutoencoderTask:
  """What train.train needs of a model, for an autoencoder. `grid_images`: uint8 (n, H, W, C)
  training images whose reconstructions the sample grids show beneath them."""

  module: AutoencoderKL
  image_size: int
  channels: int
  recon: str = "l1"
  kl_weight: float = 1e-6
  grid_images: np.ndarray | None = None
  num_classes: int = 0

  def pretrained_params(self) -> None:
    """An autoencoder run always starts from fresh parameters (train.initial_state asks)."""
    return None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dataset: Any = None) -> AutoencoderTask:
    ae = config.autoencoder
    if ae.recon not in RECONSTRUCTIONS:
      raise ValueError(
        f"unknown config.autoencoder.recon {ae.recon!r}; set it to one of: "
        f"{', '.join(RECONSTRUCTIONS)}."
      )
    if ae.kl_weight < 0:
      raise ValueError(f"config.autoencoder.kl_weight must be >= 0, got {ae.kl_weight}.")
    module = module_from_config(config)
    size = int(config.data.image_size)
    if size % module.downsample_factor:
      raise ValueError(
        f"config.data.image_size={size} is not divisible by the autoencoder's downsampling "
        f"factor {module.downsample_factor}; change one of them."
      )
    grid = None
    n = (int(config.sample.num_images) + 1) // 2
    if dataset is not None and n > 0:
      grid = dataset.read(np.arange(min(n, len(dataset))))[0]
    return cls(module, size, int(config.data.channels), ae.recon, float(ae.kl_weight), grid)

  def init_params(self, key: jax.Array) -> Any:
    x = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
    return self.module.init(key, x)

  def loss(
    self, params: Any, images: jax.Array, labels: jax.Array | None, key: jax.Array
  ) -> losses.LossOutput:
    """Per-example (B,) loss (module docstring) and reconstruction MSE; images uint8."""
    del labels
    x = normalize(images)
    mean, logvar = self.module.apply(params, x, method=self.module.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    x_hat = self.module.apply(params, z, method=self.module.decode)
    err = x_hat - x
    rec = losses.mean_flat(jnp.abs(err) if self.recon == "l1" else jnp.square(err))
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    mse = losses.mean_flat(jnp.square(err))
    zeros = jnp.zeros_like(mse)
    total = rec + self.kl_weight * kl / math.prod(x.shape[1:])
    return losses.LossOutput(loss=total, mse=mse, vlb=zeros, log_snr=zeros)

  def sample_fn(self, settings: Any = None) -> Callable[..., jax.Array]:
    """(params, key, labels, n) -> (n, H, W, C) in [-1, 1]: the grid images in the top half,
    their reconstructions from the posterior mean beneath (for the training sample grids)."""
    del settings
    grid = self.grid_images

    @jax.jit
    def reconstruct(params, x_u8):
      x = normalize(x_u8)
      return self.module.apply(
        params,
        self.module.apply(params, x, method=self.module.encode)[0],
        method=self.module.decode,
      )

    def fn(params, key, labels, n):
      del key, labels
      if grid is None:
        raise ValueError("no images to reconstruct for the sample grid.")
      x = normalize(grid)
      return jnp.concatenate([x, jnp.clip(reconstruct(params, grid), -1, 1)])[:n]

    return fn


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
  """A `Diffusion` on normalised latents whose samples come out as pixels: `sample` and
  `sample_fn` return (n, H, W, C) in [-1, 1] (trajectories decoded state by state), so
  generate.py, the sample mode and the training grids draw pixels; everything else (loss,
  params, image_shape = the latent shape) is the wrapped Diffusion's. `module` carries the
  latents' normalisation (`run_autoencoder`)."""

  diffusion: Any
  module: AutoencoderKL
  ae_params: Any
  fingerprint: str
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)  # generate.py's, not inner

  def __getattr__(self, name: str) -> Any:
    return getattr(self.diffusion, name)

  @property
  def pixel_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the decoded samples."""
    h, w, _ = self.diffusion.image_shape
    f = self.module.downsample_factor
    return (h * f, w * f, self.module.out_channels)

  def decode(self, z: jax.Array, ae_params: Any = None) -> jax.Array:
    """Traceable: normalised latents (..., h, w, c) -> pixels (..., H, W, C) in [-1, 1], with
    `ae_params` (default: the autoencoder's own, then constants of the traced program)."""
    m, lead = self.module, z.shape[:-3]
    z = z.reshape(-1, *z.shape[-3:])
    p = self.ae_params if ae_params is None else ae_params
    x = m.apply(p, m.denormalize(z), method=m.decode)
    return jnp.clip(x, -1.0, 1.0).reshape(*lead, *x.shape[1:])

  def sample(self, *args: Any, return_trajectory: bool = False, **kw: Any) -> Any:
    out = self.diffusion.sample(*args, return_trajectory=return_trajectory, **kw)
    if return_trajectory:
      return self.decode(out[0]), self.decode(out[1])
    return self.decode(out)

  def sample_fn(self, settings: Any, **kw: Any) -> Callable[..., jax.Array]:
    sample = self.diffusion.sample_fn(settings, **kw)
    decode = jax.jit(lambda z, p: self.decode(z, p))  # the weights an argument, not constants
    return lambda *a, **k: decode(sample(*a, **k), self.ae_params)


def latent_samples(
  model: LatentDiffusion,
  params: Any,
  settings: Any,
  *,
  num_images: int,
  batch_size: int,
  seed: int,
  labels: np.ndarray | None = None,
) -> np.ndarray:
  """The normalised latents, float32 (num_images, h, w, c), whose decodings are
  generate.generate(model, ...)'s images: image i from fold_in(PRNGKey(seed), i), on the
  default device."""
  from diffusion import generate

  fn = jax.jit(generate.per_image(model.diffusion, settings))
  base, out = jax.random.PRNGKey(seed), []
  for first in range(0, num_images, batch_size):
    index = np.arange(first, min(first + batch_size, num_images), dtype=np.int32)
    keys = generate.image_keys(base, jnp.asarray(index))
    out.append(np.asarray(fn(params, keys, jnp.asarray(generate.labels_of(labels, index)))))
  return np.concatenate(out).astype(np.float32)


def run_autoencoder(config: ml_collections.ConfigDict) -> tuple[AutoencoderKL, Any, str]:
  """A latent run's autoencoder (module with the shards' normalisation, params, fingerprint),
  checked: config.autoencoder.path set and loadable, config.data.path a latent folder encoded by
  that very autoencoder. One-line ValueError / FileNotFoundError otherwise."""
  from diffusion.data import latents

  path = config.get("autoencoder", {}).get("path", "")
  if not path:
    raise ValueError(
      "config.data.source='latents' needs the autoencoder that decodes them: set "
      "config.autoencoder.path to the folder or workdir the latents were encoded with."
    )
  _, manifest = latents.read_manifest(config.data.path)
  module, params, fp = load(path)
  want = manifest.autoencoder.get("fingerprint")
  if fp != want:
    raise ValueError(
      f"the latents in {config.data.path} were encoded by autoencoder {want} "
      f"({manifest.autoencoder.get('path')}) but config.autoencoder.path={path} is {fp}; "
      "encode the data with this autoencoder or point config.autoencoder.path at that one."
    )
  scale, shift = manifest.scale_shift
  return module.clone(scaling_factor=scale, shift_factor=shift), params, fp


def build(config: ml_collections.ConfigDict, dataset: Any = None) -> Any:
  """The model train.train optimises: an `AutoencoderTask` for an autoencoder run, a
  `LatentDiffusion` for a run on latents, otherwise the run's `Diffusion`."""
  if is_autoencoder_run(config):
    return AutoencoderTask.from_config(config, dataset)
  from diffusion.model import Diffusion

  diffusion = Diffusion.from_config(config)
  if config.data.source == "latents":
    return LatentDiffusion(diffusion, *run_autoencoder(config))
  return diffusion


def _load_workdir(workdir: str) -> tuple[AutoencoderKL, Any, str]:
  fix = f"train it with python launch.py --config configs/autoencoder.py --workdir {workdir}"
  try:
    config = json.loads(storage.read_text(os.path.join(workdir, "config.json")))
  except (OSError, ValueError) as e:
    raise ValueError(f"{workdir}: no readable config.json ({e}); {fix}.") from None
  if not is_autoencoder_run(config):
    raise ValueError(
      f"{workdir} is a diffusion run, not an autoencoder; pass an autoencoder workdir or a "
      "converted weights folder."
    )
  module = module_from_config(config)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    if not ckpt.all_steps():
      raise ValueError(f"{workdir}: no complete checkpoint; {fix}.")
    params = ckpt.restore_host()["ema_params"]
  except checkpoints.DamagedCheckpointError as e:
    raise ValueError(f"{workdir}: {e}") from None
  finally:
    ckpt.close()
  fields = {f: getattr(module, f) for f in convert.FIELDS}
  return module, params, convert.fingerprint(fields, params)


def load(path: str) -> tuple[AutoencoderKL, Any, str]:
  """An autoencoder folder -> (module, {'params': ...} host arrays, fingerprint). `path`: a
  converted-weights folder (autoencoder.json) or an autoencoder run's workdir (config.json).
  Raises ValueError (one line) when it is neither, or damaged."""
  if storage.exists(os.path.join(path, convert.CONFIG_FILE)):
    return convert.load(path)
  if storage.exists(os.path.join(path, "config.json")):
    return _load_workdir(path)
  raise ValueError(
    f"{path} is not an autoencoder: expected a converted weights folder (python -m "
    "diffusion.nets.convert autoencoder IN OUT) or an autoencoder run's workdir."
  )
