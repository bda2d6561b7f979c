"""`--mode eval`: sample quality (and bits/dim) of a checkpoint by one of two protocols.

config.eval.protocol:
  heldout   (the default) bits/dim of config.eval.bpd_images held-out images (metrics/bpd.py),
            and for every config.eval.samplers entry and, as the floor, for held-out real images:
            fd, kid (feature net trained here on the data, cached in eval/feature_net.npz), swd,
            and fid, inception_kid with config.eval.inception_weights, against
            config.eval.reference_images random training images (metrics/quality.py), every set
            at one size (at most the held-out split's). A quick, size-matched comparison of runs
            of this codebase; not comparable with published FIDs.
  fid50k    the papers' protocol (DDPM, ADM, EDM): config.eval.num_samples (50,000) samples per
            sampler against the statistics of the WHOLE training split (computed once per data
            fingerprint and feature network, cached in config.eval.reference_dir; or
            config.eval.reference, an .npz of mu and sigma such as guided-diffusion's and EDM's):
            FID, KID, Inception Score (config.eval.is_splits splits) and precision/recall
            (Kynkaanniemi et al. 2019, k = 3), in the FID Inception's features when
            config.eval.inception_weights is set, else (labelled "feature_net") the in-house net's.
            KID and precision/recall use the first config.eval.kid_pr_samples samples and as many
            random training images (the moments for FID use every image).

fid50k samples and extracts features in one compiled call per batch, data-parallel over every
device of every process (image i keyed by fold_in(PRNGKey(config.eval.seed), i), so the device
and process counts change nothing). Each process accumulates its own images' statistics and saves
them in <workdir>/eval/fid50k/step<N>/<sampler><steps>-<hash>/ every config.eval.chunk_images
images (atomically); a rerun resumes from the newest state every process saved, giving the same
numbers; process 0 merges the states (the workdir must be shared, as for checkpoints).
config.eval.watch scores each new checkpoint of a training run as it appears.

Writes <workdir>/eval/metrics.json (the newest result), per checkpoint eval/metrics_step<N>.json
(heldout) or eval/fid50k/metrics_step<N>.json, sample grids, and one metrics.jsonl row per sampler
(through runlog.append_rows) with the protocol, the number of samples, the reference and the
sampler settings beside the numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from configs.common import data_fingerprint
from diffusion import checkpoints, data, parallel, runlog, visualize
from diffusion.metrics import bpd, distances, feature_net, inception
from diffusion.metrics.quality import Reference, quality
from diffusion.metrics.reference import FeatureMoments, load_npz, save_npz, savez_atomic
from diffusion.model import Diffusion, SampleSettings
from diffusion.modes import sample as sample_lib
from diffusion.parallel import AXIS

PROTOCOLS = ("heldout", "fid50k")
PR_K = 3  # precision/recall neighbourhoods (Kynkaanniemi et al. 2019)

SAMPLE_FIELDS = ("spacing", "eta", "guidance_scale", "clip_x0", "use_ema", "ema", "labels")
GRID_IMAGES = 64  # samples shown in each samples_<sampler><steps>.png


def parse_samplers(spec: str, sample: ml_collections.ConfigDict) -> list[SampleSettings]:
  """ "ddim:10,dpm_solver++:20" -> config.sample's settings with each sampler and step count,
  checked (a sigma-grid spacing takes the sigma-space samplers' names)."""
  out = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    name, sep, steps = item.rpartition(":")
    if not sep or not steps.strip().isdigit() or int(steps) < 1:
      raise ValueError(f"config.eval.samplers entry {item!r}: write sampler:steps, e.g. ddim:50.")
    out.append(SampleSettings.from_config(sample, sampler=name.strip(), num_steps=int(steps)))
  if not out:
    raise ValueError("config.eval.samplers is empty; e.g. 'ddim:10,ddim:50,dpm_solver++:20'.")
  return out


def _check_counts(e: ml_collections.ConfigDict) -> None:
  """config.eval's image counts and batch sizes: FD and KID need two images per set."""
  for field, least in (
    ("num_images", 2),
    ("reference_images", 2),
    ("batch_size", 1),
    ("bpd_images", 0),
    ("bpd_batch_size", 1),
    ("feature_steps", 1),
  ):
    if e[field] < least:
      raise ValueError(f"config.eval.{field} must be >= {least}, got {e[field]}.")


def feature_network(
  config: ml_collections.ConfigDict,
  workdir: str,
  train_set: data.Dataset,
  held_out: data.Dataset | None = None,
) -> feature_net.FeatureNetwork:
  """The workdir's feature net (eval/feature_net.npz), trained on `train_set` first if missing or
  made for other data, another config.eval.feature_steps or another version. Its accuracy on
  `held_out` is in `meta["accuracy"]`."""
  path = os.path.join(workdir, "eval", "feature_net.npz")
  want = {
    "version": feature_net.VERSION,
    "steps": int(config.eval.feature_steps),
    "data": data_fingerprint(config.data),
  }
  if os.path.exists(path):
    net = feature_net.load(path)
    if all(net.meta.get(k) == v for k, v in want.items()):
      logging.info(
        "feature net: %s (%s, held-out accuracy %.3f)",
        path,
        net.meta["kind"],
        net.meta.get("accuracy", float("nan")),
      )
      return net
    logging.info("feature net in %s was made for other data or settings: retraining.", path)
  net = feature_net.train(
    train_set.images,
    train_set.labels,
    train_set.num_classes,
    steps=want["steps"],
    seed=config.eval.seed,
  )
  net.meta.update(want)
  if held_out is not None and len(held_out):
    net.meta["accuracy"] = feature_net.accuracy(net, held_out.images, held_out.labels)
    logging.info("feature net held-out accuracy (%s): %.3f", net.meta["kind"], net.meta["accuracy"])
  if jax.process_index() == 0:  # every process trains the same net; one writes it
    feature_net.save(path, net)
  return net


def _bits_per_dim(
  config: ml_collections.ConfigDict,
  diffusion: Diffusion,
  params: Any,
  held: data.Dataset,
  spec: data.DataSpec,
  progress: bool,
) -> tuple[float | None, dict[str, Any]]:
  """(bpd, the protocol with the results) on the first config.eval.bpd_images held-out images."""
  e = config.eval
  if e.bpd_images <= 0:
    return None, {"skipped": "config.eval.bpd_images = 0"}
  if not getattr(diffusion, "discrete", True):
    return None, {"skipped": "bits/dim is the discrete vp process's variational bound"}
  n = min(e.bpd_images, len(held))
  labels = None if held.labels is None else held.labels[:n]
  res = bpd.bits_per_dim(
    diffusion.bpd_fn(),
    params,
    held.images[:n],
    labels,
    batch_size=e.bpd_batch_size,
    seed=e.seed,
    progress=progress,
  )
  split = (
    spec.eval_split
    if spec.source == "tfds" and spec.eval_split
    else f"held-out {spec.eval_fraction}"
  )
  protocol = bpd.protocol(
    split=split,
    num_images=n,
    num_timesteps=diffusion.schedule.num_timesteps,
    conditional=diffusion.conditional,
    ema=config.sample.use_ema,
    seed=e.seed,
  )
  logging.info("bits/dim %.4f +- %.4f on %d held-out images", res["bpd"], res["bpd_stderr"], n)
  return res["bpd"], {**protocol, **res}


def _write_json(path: str, obj: Any) -> None:
  """JSON to `path` through a temporary file renamed over it (a failed write keeps the old)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=2)
  os.replace(tmp, path)


def _heldout(
  config: ml_collections.ConfigDict,
  workdir: str,
  diffusion: Diffusion,
  todo: list[SampleSettings],
  step: int,
  progress: bool,
) -> dict:
  """The heldout protocol: bits/dim, and samples and held-out images scored against a random
  subset of training images at one size (see the module docstring)."""
  e, s = config.eval, config.sample
  all_labels = sample_lib.resolve_labels(diffusion.num_classes, s.labels, e.num_images)
  weights = inception.load_weights(e.inception_weights) if e.inception_weights else None
  if weights is None:
    logging.warning(
      "Inception FID/KID skipped: config.eval.inception_weights is empty. %s", inception.HELP
    )
  step, params = sample_lib.load_params(diffusion, workdir, step=step, use_ema=s.use_ema, ema=s.ema)
  spec = data.DataSpec(**config.data.to_dict())
  train_set, held = data.load(spec, split="train"), data.load(spec, split="eval")
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)

  bpd_value, protocol = _bits_per_dim(config, diffusion, params, held, spec, progress)
  net = feature_network(config, workdir, train_set, held)
  rng = np.random.default_rng(e.seed)
  pick = np.sort(rng.choice(len(train_set), min(e.reference_images, len(train_set)), replace=False))
  inception_fn = None if weights is None else inception.feature_fn(weights)
  ref = Reference.build(
    train_set.images[pick],
    net,
    inception_fn=inception_fn,
    batch_size=e.batch_size,
    progress=progress,
  )
  measure = lambda images: quality(
    images, ref, net, inception_fn=inception_fn, batch_size=e.batch_size, seed=e.seed
  )
  # Every set is scored at the same size: FD and SWD are biased by the number of images.
  num_images = min(e.num_images, len(held))
  if num_images < e.num_images:
    logging.warning(
      "the held-out split has %d images: scoring %d samples per sampler, not "
      "config.eval.num_images=%d, so that samples and the floor are comparable.",
      len(held),
      num_images,
      e.num_images,
    )
  floor = {**measure(held.images[:num_images]), "num_images": num_images}
  logging.info(
    "floor (%d held-out vs %d training images): fd %.4g kid %.4g swd %.4g",
    num_images,
    len(pick),
    floor["fd"],
    floor["kid"],
    floor["swd"],
  )

  labels = None if all_labels is None else all_labels[:num_images]
  results = []
  for st in todo:
    start = time.time()
    images = sample_lib.generate(
      diffusion,
      params,
      st,
      num_images=num_images,
      batch_size=e.batch_size,
      seed=e.seed,
      labels=labels,
      progress=progress,
      desc=f"{st.sampler}:{st.num_steps}",
    )
    seconds = time.time() - start
    q = measure(images)
    results.append(
      {
        "sampler": st.sampler,
        "num_steps": st.num_steps,
        "nfe": st.nfe,
        **q,
        "sampling_seconds": round(seconds, 2),
      }
    )
    visualize.save_grid(
      os.path.join(out_dir, f"samples_{st.sampler}{st.num_steps}.png"),
      images[:GRID_IMAGES],
      ncol=diffusion.num_classes if labels is not None else None,
    )
    logging.info(
      "%s:%d (NFE %d): fd %.4g kid %.4g swd %.4g%s",
      st.sampler,
      st.num_steps,
      st.nfe,
      q["fd"],
      q["kid"],
      q["swd"],
      "" if q["fid"] is None else f" fid {q['fid']:.4g}",
    )

  sample_settings = {k: s[k] for k in SAMPLE_FIELDS}
  metrics = {
    "protocol": "heldout",
    "step": step,
    "bpd": bpd_value,
    "bpd_protocol": protocol,
    "floor": floor,
    "results": results,
    "num_images": num_images,
    "reference_images": len(pick),
    "feature_net": net.meta,
    "sample_settings": sample_settings,
  }
  if jax.process_index() > 0:  # process 0 writes
    return metrics
  for name in ("metrics.json", f"metrics_step{step}.json"):  # the newest, and one per checkpoint
    _write_json(os.path.join(out_dir, name), metrics)
  rows = [
    {
      "step": step,
      "mode": "eval",
      "protocol": "heldout",
      "sampler": r["sampler"],
      "num_steps": r["num_steps"],
      "nfe": r["nfe"],
      "fd": r["fd"],
      "kid": r["kid"],
      "swd": r["swd"],
      "bpd": bpd_value,
      "fid": r["fid"],
      "inception_kid": r["inception_kid"],
      **sample_settings,
      "num_images": num_images,
      "floor_fd": floor["fd"],
      "floor_swd": floor["swd"],
    }
    for r in results
  ]
  runlog.append_rows(workdir, rows)
  visualize.save_image(
    os.path.join(out_dir, "quality.png"), visualize.quality_plot(results, floor=floor["fd"])
  )
  return metrics


# ---- the fid50k protocol ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Extractor:
  """The network whose features the fid50k protocol compares, as a traceable function of its
  variables (run inside the sampling step on every device)."""

  name: str  # "inception" (TF FID Inception v3 pool3, 2048-d) | "feature_net" (trained here)
  variables: Any
  apply: sample_lib.Extract  # (variables, uint8 (B, H, W, C)) -> {"features", "logits"}
  ident: str  # 16 hex digits of the weights: keys the reference cache and the resume state
  scale: float = 1.0  # host features are divided by it (the feature net's RMS feature)
  class_logits: bool = True  # whether the logits are classes (the Inception Score needs them)
  official: bool = False  # the official Inception weights (checksum verified)

  def describe(self) -> dict[str, Any]:
    return {"network": self.name, "weights": self.ident, "official_weights": self.official}


def inception_extractor(weights: str | dict[str, Any]) -> Extractor:
  """The FID Inception of the .npz at `weights` (inception.load_weights: checked, never a pickle),
  or of Flax variables (e.g. random ones, for timing): pool3 features and the unbiased 1008
  logits, at inception.SIZE."""
  path = weights if isinstance(weights, str) else ""
  variables = inception.load_weights(path) if path else weights
  net, size = inception.InceptionV3(logits=True), inception.SIZE

  def apply(v: Any, images: jax.Array) -> dict[str, jax.Array]:
    pool3, logits = net.apply(v, inception.preprocess(images, size))
    return {"features": pool3, "logits": logits}

  if path:
    ident, official = inception.file_sha256(path)[:16], inception.is_official(path)
  else:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(variables):
      digest.update(np.ascontiguousarray(leaf).tobytes())
    ident, official = digest.hexdigest()[:16], False
  return Extractor("inception", variables, apply, ident, official=official)


def feature_net_extractor(net: feature_net.FeatureNetwork) -> Extractor:
  """The in-house feature net: its 128-d features (divided by its RMS feature, as
  FeatureNetwork.features) and its logits (classes, or the 4 rotations: no Inception Score)."""
  module = feature_net.FeatureNet(net.meta["num_outputs"])

  def apply(v: Any, images: jax.Array) -> dict[str, jax.Array]:
    features, logits = module.apply(v, data.normalize(images))
    return {"features": features, "logits": logits}

  digest = hashlib.sha256(json.dumps(net.meta, sort_keys=True, default=str).encode())
  for leaf in jax.tree.leaves(net.params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  scale = float(net.meta.get("feature_scale", 1.0))
  return Extractor(
    "feature_net",
    net.params,
    apply,
    digest.hexdigest()[:16],
    scale,
    net.meta.get("kind") == "classifier",
  )


def _sync(name: str) -> None:
  """A barrier of every process (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _broadcast(value: int) -> int:
  """Process 0's integer, on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class Accumulator:
  """One process's running statistics of a sample set: float64 feature moments (FeatureMoments),
  the features of the images with index < `keep` (KID, precision/recall), and per split of the
  Inception Score (split s: images [s N // splits, (s + 1) N // splits), Salimans et al.'s
  slices) the sums of p(y|x) and of sum_y p log p. Every part is a sum over images, so
  accumulators of disjoint images merge by adding: across processes and across a resume."""

  def __init__(self, dims: int, classes: int, num_images: int, keep: int, splits: int):
    self.moments = FeatureMoments.zeros(dims)
    self.num_images, self.keep = num_images, keep
    self.bounds = np.arange(splits) * num_images // splits
    self.index = np.zeros((0,), np.int64)
    self.kept = np.zeros((0, dims), np.float64)
    self.p_sum = np.zeros((splits, classes), np.float64)
    self.plogp_sum = np.zeros((splits,), np.float64)
    self.count = np.zeros((splits,), np.int64)

  def add(self, index: np.ndarray, features: np.ndarray, logits: np.ndarray | None) -> None:
    """index int (n,), features float64 (n, D), logits (n, K) of n new images."""
    self.moments = self.moments.add(features)
    sel = index < self.keep
    self.index = np.concatenate([self.index, index[sel]])
    self.kept = np.concatenate([self.kept, features[sel]])
    if logits is not None and self.p_sum.shape[1]:
      z = np.asarray(logits, np.float64)
      z = z - z.max(1, keepdims=True)
      logp = z - np.log(np.exp(z).sum(1, keepdims=True))
      p, split = np.exp(logp), np.searchsorted(self.bounds, index, side="right") - 1
      np.add.at(self.p_sum, split, p)
      np.add.at(self.plogp_sum, split, (p * logp).sum(1))
      np.add.at(self.count, split, 1)

  def merge(self, other: Accumulator) -> None:
    self.moments = self.moments.merge(other.moments)
    order = np.argsort(np.concatenate([self.index, other.index]), kind="stable")
    self.index = np.concatenate([self.index, other.index])[order]
    self.kept = np.concatenate([self.kept, other.kept])[order]
    self.p_sum += other.p_sum
    self.plogp_sum += other.plogp_sum
    self.count += other.count

  def save(self, path: str) -> None:
    """Two files, the moments' first: `path` (written last) marks the state complete."""
    self.moments.save(f"{path}.moments.npz")
    savez_atomic(
      path, {k: getattr(self, k) for k in ("index", "kept", "p_sum", "plogp_sum", "count")}
    )

  def load(self, path: str) -> Accumulator:
    """This accumulator's settings with the state saved at `path`."""
    self.moments = FeatureMoments.load(f"{path}.moments.npz")
    with np.load(path, allow_pickle=False) as z:
      for k in ("index", "kept", "p_sum", "plogp_sum", "count"):
        setattr(self, k, z[k])
    return self

  def inception_score(self) -> tuple[float | None, float | None]:
    """(mean, std) over the splits of exp(E_x KL(p(y|x) || p_split(y))), or Nones."""
    if not self.p_sum.shape[1] or self.count.sum() == 0:
      return None, None
    n = np.maximum(self.count, 1)[:, None]
    p_bar = self.p_sum / n
    kl = self.plogp_sum / n[:, 0] - (p_bar * np.log(np.maximum(p_bar, 1e-300))).sum(1)
    scores = np.exp(kl)
    return float(scores.mean()), float(scores.std())


def _state_files(directory: str) -> dict[int, dict[int, list[str]]]:
  """{images done: {process count: [files]}} of the saved states n<done>.p<i>of<P>.npz."""
  out: dict[int, dict[int, list[str]]] = {}
  for name in os.listdir(directory) if os.path.isdir(directory) else []:
    m = re.fullmatch(r"n(\d+)\.p(\d+)of(\d+)\.npz", name)
    if m:
      done, _, count = (int(g) for g in m.groups())
      out.setdefault(done, {}).setdefault(count, []).append(os.path.join(directory, name))
  return out


def _complete(directory: str) -> tuple[int, list[str]]:
  """(images done, the files of every process) of the newest state that all processes of its
  run saved; (0, []) when there is none."""
  for done, by_count in sorted(_state_files(directory).items(), reverse=True):
    for count, files in by_count.items():
      if len(files) == count:
        return done, sorted(files)
  return 0, []


def _save_state(directory: str, done: int, acc: Accumulator) -> None:
  """Every process saves its accumulator for `done` images; after all have, process 0 deletes
  the older states (a kill at any time leaves a complete state to resume from)."""
  acc.save(
    os.path.join(directory, f"n{done:08d}.p{jax.process_index()}of{jax.process_count()}.npz")
  )
  _sync(f"eval-state-{done}")
  if jax.process_index() == 0:
    for old, by_count in _state_files(directory).items():
      for path in (p for files in by_count.values() for p in files if old < done):
        for f in (path, f"{path}.moments.npz"):
          if os.path.exists(f):
            os.remove(f)


def _merged(files: list[str], fresh: Callable[[], Accumulator]) -> Accumulator:
  acc = fresh()
  for path in files:
    acc.merge(fresh().load(path))
  return acc


def sample_statistics(
  config: ml_collections.ConfigDict,
  diffusion: Diffusion,
  params: Any,
  settings: SampleSettings,
  ext: Extractor,
  mesh: Mesh,
  directory: str,
  *,
  progress: bool = True,
  grid_path: str = "",
) -> Accumulator | None:
  """The statistics of config.eval.num_samples images drawn with `settings`, resumable: every
  process accumulates the images of its devices and saves its state in `directory` every
  config.eval.chunk_images images; a rerun continues from the newest state every process saved
  (process 0 takes it over). Returns the merged statistics on process 0, None on the others.
  `grid_path`: process 0 saves its first (up to) GRID_IMAGES images there."""
  e = config.eval
  n, batch = e.num_samples, e.batch_size
  dims, classes = _output_dims(ext, diffusion)
  fresh = lambda: Accumulator(
    dims, classes if ext.class_logits else 0, n, e.kid_pr_samples, e.is_splits
  )
  lead = jax.process_index() == 0
  os.makedirs(directory, exist_ok=True)
  done, files = _complete(directory) if lead else (0, [])
  done = _broadcast(done)
  acc = _merged(files, fresh) if lead else fresh()
  if done:
    logging.info(
      "resuming %s:%d at image %d of %d (%s)",
      settings.sampler,
      settings.num_steps,
      done,
      n,
      directory,
    )
  labels = sample_lib.resolve_labels(diffusion.num_classes, config.sample.labels, n)
  fn = sample_lib.compile_pipeline(diffusion, settings, mesh, ext.apply)
  every = max(1, e.chunk_images // batch)
  batches = sample_lib.draw(
    fn,
    parallel.replicate(params, mesh),
    parallel.replicate(ext.variables, mesh),
    mesh,
    seed=e.seed,
    start=done,
    stop=n,
    batch_size=batch,
    labels=labels,
    progress=progress,
    desc=f"{settings.sampler}:{settings.num_steps}",
  )
  for i, (end, index, rows) in enumerate(batches):
    if grid_path and lead and index.size and index[0] == 0:
      visualize.save_grid(grid_path, rows["images"][:GRID_IMAGES])
    acc.add(index, rows["features"].astype(np.float64) / ext.scale, rows["logits"])
    if (i + 1) % every == 0 or end == n:
      _save_state(directory, end, acc)
  _sync("eval-statistics")
  if not lead:
    return None
  done, files = _complete(directory)
  assert done == n, (done, n)
  return _merged(files, fresh)


def _output_dims(ext: Extractor, diffusion: Diffusion) -> tuple[int, int]:
  """(feature dims, logits) of `ext` on this model's images, from shapes alone."""
  x = jax.ShapeDtypeStruct((1, *diffusion.image_shape), jnp.uint8)
  out = jax.eval_shape(ext.apply, ext.variables, x)
  return out["features"].shape[-1], out["logits"].shape[-1]


def _extract_fn(ext: Extractor, mesh: Mesh) -> Callable:
  """jit(shard_map): (variables, uint8 images (B, H, W, C) split over the mesh) -> ext's arrays."""
  fn = jax.shard_map(ext.apply, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS))
  return jax.jit(fn)


def real_features(
  ext: Extractor,
  dataset: Any,
  index: np.ndarray,
  mesh: Mesh,
  *,
  batch_size: int,
  keep: np.ndarray,
  progress: bool = False,
) -> tuple[Any, np.ndarray, np.ndarray]:
  """(this process's FeatureMoments of the images dataset[index], the indices and float64
  features of those of them in `keep`): data-parallel over `mesh`, each process reading only
  the rows of its own devices (dataset: data.Dataset or a streamed ShardDataset)."""
  fn, variables = _extract_fn(ext, mesh), parallel.replicate(ext.variables, mesh)
  sharding = NamedSharding(mesh, P(AXIS))
  shape = (batch_size, *dataset.read(index[:1])[0].shape[1:])
  moments, kept_index, kept = None, [], []
  starts = range(0, len(index), batch_size)
  for first in tqdm(starts, desc="reference", unit="batch", disable=not progress):
    rows = index[np.minimum(np.arange(first, first + batch_size), len(index) - 1)]
    images = jax.make_array_from_callback(
      shape, sharding, lambda i, r=rows: dataset.read(r[i[0]])[0]
    )
    got, out = sample_lib.local_rows({"images": images, **fn(variables, images)}, first)
    sel = got < len(index)
    feats = out["features"][sel].astype(np.float64) / ext.scale
    moments = (moments or FeatureMoments.zeros(feats.shape[1])).add(feats)
    mask = np.isin(index[got[sel]], keep)
    kept_index.append(index[got[sel]][mask])
    kept.append(feats[mask])
  return moments, np.concatenate(kept_index), np.concatenate(kept)


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """config.eval.reference_dir, else $XDG_CACHE_HOME (~/.cache)/diffusion/fid_reference."""
  if config.eval.reference_dir:
    return os.path.expanduser(config.eval.reference_dir)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "diffusion", "fid_reference")


def reference_statistics(
  config: ml_collections.ConfigDict,
  workdir: str,
  ext: Extractor,
  mesh: Mesh,
  *,
  progress: bool = True,
) -> dict[str, Any] | None:
  """The reference of the fid50k protocol, on process 0 (None on the others): {"mu", "sigma",
  "features" (the config.eval.kid_pr_samples random training images' features, for KID and
  precision/recall), "about": where it comes from}. mu and sigma are those of the WHOLE training
  split, computed once per data fingerprint and feature network and cached in `cache_dir`, or
  config.eval.reference's (an .npz with mu and sigma, the guided-diffusion/EDM format)."""
  e = config.eval
  lead = jax.process_index() == 0
  fingerprint = data_fingerprint(config.data)
  spec = data.DataSpec(**config.data.to_dict())
  train = data.load(spec, split="train", stream=True)
  pick = np.random.default_rng(e.seed).permutation(len(train))[: e.kid_pr_samples]
  about = {"data_fingerprint": fingerprint, "split": "train", "training_images": len(train)}
  path = os.path.join(cache_dir(config), f"{fingerprint}-{ext.name}-{ext.ident}-{e.seed}.npz")
  if e.reference:
    about.update(source="file", path=os.path.abspath(e.reference))
    index = np.sort(pick)
  else:
    about.update(source="cache", path=path)
    hit = _broadcast(int(lead and os.path.exists(path)))
    if hit:
      if not lead:
        return None
      mu, sigma = load_npz(path)
      with np.load(path, allow_pickle=False) as z:
        features = z["features"]
      logging.info("reference statistics: %s (cached)", path)
      return {"mu": mu, "sigma": sigma, "features": features, "about": about}
    index = np.arange(len(train))
  batch = e.batch_size
  moments, kept_index, kept = real_features(
    ext, train, index, mesh, batch_size=batch, keep=pick, progress=progress
  )
  parts = _gather(
    os.path.join(workdir, "eval", e.protocol, "reference_parts"),
    moments,
    {"index": kept_index, "features": kept},
  )
  if not lead:
    return None
  for m, _ in parts[1:]:
    moments = moments.merge(m)
  kept_index = np.concatenate([a["index"] for _, a in parts])
  kept = np.concatenate([a["features"] for _, a in parts])[np.argsort(kept_index)]
  if e.reference:
    mu, sigma = load_npz(e.reference)
    if mu.shape != (kept.shape[1],):
      raise ValueError(
        f"config.eval.reference={e.reference!r} has {mu.shape[0]}-d statistics, but the "
        f"{ext.name} features are {kept.shape[1]}-d."
      )
    return {"mu": mu, "sigma": sigma, "features": kept, "about": about}
  mu, sigma = moments.mean_cov()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_npz(
    path, mu, sigma, features=kept, **{f"about_{k}": np.asarray(str(v)) for k, v in about.items()}
  )
  about["source"] = "computed"
  logging.info("reference statistics of %d training images cached in %s", len(index), path)
  return {"mu": mu, "sigma": sigma, "features": kept, "about": about}


def _gather(directory: str, moments: Any, arrays: dict[str, np.ndarray]) -> list[tuple]:
  """[(moments, arrays)] of every process, on process 0 (through files in `directory`, which
  every process must see: the workdir); [(moments, arrays)] of this process alone otherwise."""
  if jax.process_count() == 1:
    return [(moments, arrays)]
  os.makedirs(directory, exist_ok=True)
  mine = os.path.join(directory, f"p{jax.process_index()}.npz")
  moments.save(f"{mine}.moments.npz")
  savez_atomic(mine, arrays)
  _sync("eval-gather")
  out = [(moments, arrays)]
  if jax.process_index() == 0:
    for i in range(1, jax.process_count()):
      path = os.path.join(directory, f"p{i}.npz")
      with np.load(path, allow_pickle=False) as z:
        out.append((FeatureMoments.load(f"{path}.moments.npz"), {k: z[k] for k in z.files}))
  _sync("eval-gathered")
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
  return out


def score(acc: Accumulator, ref: dict[str, Any], seed: int) -> dict[str, Any]:
  """FID, KID, Inception Score and precision/recall (k = PR_K) of a sample set's statistics
  against the reference's."""
  mu, sigma = acc.moments.mean_cov()
  is_mean, is_std = acc.inception_score()
  out = {
    "fid": distances.frechet_distance((mu, sigma), (ref["mu"], ref["sigma"])),
    "kid": None,
    "precision": None,
    "recall": None,
    "inception_score": is_mean,
    "inception_score_std": is_std,
  }
  if len(acc.kept) >= 2 and len(ref["features"]) >= 2:
    out["kid"] = distances.kernel_distance(acc.kept, ref["features"], seed=seed)
    if len(acc.kept) > PR_K and len(ref["features"]) > PR_K:
      precision, recall = distances.precision_recall(ref["features"], acc.kept, k=PR_K)
      out.update(precision=float(precision), recall=float(recall))
  return out


def extractor(config: ml_collections.ConfigDict, workdir: str) -> Extractor:
  """The FID Inception with config.eval.inception_weights, else the workdir's feature net."""
  e = config.eval
  if e.inception_weights:
    return inception_extractor(e.inception_weights)
  spec = data.DataSpec(**config.data.to_dict())
  net = feature_network(config, workdir, data.load(spec, split="train"), None)
  return feature_net_extractor(net)


def _signature(
  config: ml_collections.ConfigDict, step: int, st: SampleSettings, ext: Extractor
) -> str:
  """8 hex digits of everything a sample set's statistics depend on (not the batch size or the
  device count): a resume continues only the same computation."""
  e, s = config.eval, config.sample
  what = {
    "step": step,
    "parameters": s.ema or ("ema" if s.use_ema else "raw"),
    "labels": s.labels,
    "settings": dataclasses.asdict(st),
    "num_samples": e.num_samples,
    "seed": e.seed,
    "kid_pr_samples": e.kid_pr_samples,
    "is_splits": e.is_splits,
    "features": ext.ident,
  }
  return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _fid50k(
  config: ml_collections.ConfigDict,
  workdir: str,
  diffusion: Diffusion,
  todo: list[SampleSettings],
  step: int,
  progress: bool,
) -> dict:
  """The fid50k protocol (see the module docstring)."""
  e, s = config.eval, config.sample
  lead = jax.process_index() == 0
  mesh = parallel.make_mesh()
  ext = extractor(config, workdir)
  if ext.name != "inception":
    logging.warning(
      "fid50k with the in-house feature net (config.eval.inception_weights is "
      "empty): its numbers are NOT comparable with published FIDs."
    )
  step, params = sample_lib.load_params(diffusion, workdir, step=step, use_ema=s.use_ema, ema=s.ema)
  ref = reference_statistics(config, workdir, ext, mesh, progress=progress)
  out_dir = os.path.join(workdir, "eval", e.protocol)
  results = []
  for st in todo:
    name = f"{st.sampler}{st.num_steps}"
    directory = os.path.join(out_dir, f"step{step}", f"{name}-{_signature(config, step, st, ext)}")
    start = time.time()
    acc = sample_statistics(
      config,
      diffusion,
      params,
      st,
      ext,
      mesh,
      directory,
      progress=progress,
      grid_path=os.path.join(out_dir, f"samples_{name}.png"),
    )
    if lead:
      q = score(acc, ref, e.seed)
      results.append(
        {
          "sampler": st.sampler,
          "num_steps": st.num_steps,
          "nfe": st.nfe,
          **q,
          "seconds": round(time.time() - start, 2),
        }
      )
      logging.info(
        "fid50k %s:%d (NFE %d, %d samples, %s features): fid %.4g kid %s is %s "
        "precision %s recall %s",
        st.sampler,
        st.num_steps,
        st.nfe,
        e.num_samples,
        ext.name,
        q["fid"],
        q["kid"],
        q["inception_score"],
        q["precision"],
        q["recall"],
      )
  if not lead:
    return {}
  sample_settings = {k: s[k] for k in SAMPLE_FIELDS}
  comparable = ext.official and e.num_samples == 50_000
  metrics = {
    "protocol": e.protocol,
    "step": step,
    "num_samples": e.num_samples,
    "features": ext.describe(),
    "reference": ref["about"],
    "kid_pr_samples": min(e.kid_pr_samples, e.num_samples),
    "pr_k": PR_K,
    "is_splits": e.is_splits,
    "seed": e.seed,
    "paper_comparable": comparable,
    "results": results,
    "sample_settings": sample_settings,
  }
  _write_json(os.path.join(workdir, "eval", "metrics.json"), metrics)
  _write_json(result_path(workdir, e.protocol, step), metrics)
  rows = [
    {
      "step": step,
      "mode": "eval",
      "protocol": e.protocol,
      **{
        k: r[k]
        for k in (
          "sampler",
          "num_steps",
          "nfe",
          "fid",
          "kid",
          "inception_score",
          "inception_score_std",
          "precision",
          "recall",
        )
      },
      "features": ext.name,
      "num_samples": e.num_samples,
      "reference": ref["about"]["path"],
      "data_fingerprint": ref["about"]["data_fingerprint"],
      **sample_settings,
    }
    for r in results
  ]
  runlog.append_rows(workdir, rows)
  shutil.rmtree(os.path.join(out_dir, f"step{step}"), ignore_errors=True)  # resume states
  return metrics


def pipeline_fn(
  diffusion: Diffusion,
  params: Any,
  settings: SampleSettings,
  ext: Extractor,
  *,
  batch_size: int,
  seed: int = 0,
  mesh: Mesh | None = None,
) -> Callable[[int], dict[str, np.ndarray]]:
  """The fid50k pipeline as one callable, for timing (experiments/benchmark.py): call(first)
  samples images [first, first + batch_size) and extracts their features in one compiled call
  over `mesh` (default: every device), and returns this process's rows {"images", "features",
  "logits"} (so it has waited for the device). Time calls after the first (which compiles):
  samples/s = batch_size / seconds per call."""
  mesh = mesh or parallel.make_mesh()
  sample_lib.check_batch(batch_size, "eval.batch_size")
  fn = sample_lib.compile_pipeline(diffusion, settings, mesh, ext.apply)
  p, v = parallel.replicate(params, mesh), parallel.replicate(ext.variables, mesh)

  def call(first: int) -> dict[str, np.ndarray]:
    ((_, _, rows),) = sample_lib.draw(
      fn,
      p,
      v,
      mesh,
      seed=seed,
      start=first,
      stop=first + batch_size,
      batch_size=batch_size,
      progress=False,
    )
    return rows

  return call


# ---- the mode -----------------------------------------------------------------------------------


def result_path(workdir: str, protocol: str, step: int) -> str:
  """The metrics file of `protocol` at checkpoint `step` (its presence: scored)."""
  if protocol == "heldout":
    return os.path.join(workdir, "eval", f"metrics_step{step}.json")
  return os.path.join(workdir, "eval", protocol, f"metrics_step{step}.json")


def check(config: ml_collections.ConfigDict) -> None:
  """config.eval, checked without loading, compiling or writing anything."""
  e, s = config.eval, config.sample
  if e.protocol not in PROTOCOLS:
    raise ValueError(
      f"config.eval.protocol={e.protocol!r} is unknown; use one of: {', '.join(PROTOCOLS)}."
    )
  _check_counts(e)
  parse_samplers(e.samplers, s)
  if e.protocol == "fid50k":
    for field, least in (
      ("num_samples", 2),
      ("kid_pr_samples", 0),
      ("is_splits", 1),
      ("chunk_images", 1),
    ):
      if e[field] < least:
        raise ValueError(f"config.eval.{field} must be >= {least}, got {e[field]}.")
    if e.is_splits > e.num_samples:
      raise ValueError(
        f"config.eval.is_splits={e.is_splits} exceeds config.eval.num_samples={e.num_samples}."
      )
    if e.reference:
      if not e.reference.endswith(".npz"):
        raise ValueError(
          f"config.eval.reference={e.reference!r}: use an .npz with mu and sigma (the "
          "guided-diffusion / EDM reference format)."
        )
      if not os.path.isfile(e.reference):
        raise FileNotFoundError(f"config.eval.reference={e.reference!r} does not exist.")
      if not e.inception_weights:
        raise ValueError(
          "config.eval.reference holds Inception statistics: set config.eval.inception_weights "
          "too (without them the features are the in-house net's)."
        )
  if e.watch:
    if e.poll_seconds <= 0 or e.watch_timeout < 0:
      raise ValueError(
        "config.eval.poll_seconds must be > 0 and config.eval.watch_timeout >= 0, got "
        f"{e.poll_seconds} and {e.watch_timeout}."
      )
    if s.ema or e.checkpoint >= 0:
      raise ValueError(
        "config.eval.watch scores every checkpoint as it appears: leave config.eval.checkpoint "
        "at -1 and config.sample.ema empty."
      )


def evaluate(
  config: ml_collections.ConfigDict, workdir: str, step: int, *, progress: bool = True
) -> dict:
  """Scores the checkpoint at `step` (-1: the newest) with config.eval.protocol; returns the
  metrics.json dict (empty on processes other than 0 for fid50k)."""
  e, s = config.eval, config.sample
  diffusion = Diffusion.from_config(config)
  todo = parse_samplers(e.samplers, s)
  sample_lib.resolve_labels(diffusion.num_classes, s.labels, 1)  # a bad spec fails here
  if e.protocol == "heldout":
    return _heldout(config, workdir, diffusion, todo, step, progress)
  return _fid50k(config, workdir, diffusion, todo, step, progress)


def _checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoints' steps in <workdir>/checkpoints, ascending ([] if none)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    return sorted(ckpt.all_steps())
  finally:
    ckpt.close()


def watch(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> list[int]:
  """Scores every checkpoint of a training workdir as it appears (oldest first, skipping those
  already scored), polling every config.eval.poll_seconds, until the final step
  (config.train.num_steps) is scored, or until no new checkpoint came for config.eval.
  watch_timeout seconds (0: wait forever). Returns the steps scored now."""
  e, final = config.eval, config.train.num_steps
  scored, seen, last_new = [], set(), time.time()  # seen: scored or skipped by this watch
  while True:
    steps = _checkpoint_steps(workdir) if jax.process_index() == 0 else []
    new = [
      s for s in steps if s not in seen and not os.path.exists(result_path(workdir, e.protocol, s))
    ]
    done = any(s >= final and s not in new for s in steps)
    # -1: nothing to do yet; -2: finished or timed out; else the step to score, on every process
    waited = e.watch_timeout and time.time() - last_new > e.watch_timeout
    step = _broadcast(new[0] if new else -2 if done or waited else -1)
    if step == -2:
      if not done:
        logging.warning(
          "watch: no new checkpoint in %s for %gs; stopping (final step %d not scored).",
          workdir,
          e.watch_timeout,
          final,
        )
      return scored
    if step == -1:
      time.sleep(e.poll_seconds)
      continue
    logging.info("watch: scoring step %d of %s", step, workdir)
    seen.add(step)
    try:
      evaluate(config, workdir, step, progress=progress)
      scored.append(step)
    except ValueError as err:  # deleted by the keep policy before it was read
      if step in _checkpoint_steps(workdir):
        raise
      logging.warning("watch: step %d was deleted before it was scored (%s)", step, err)
    last_new = time.time()


def run(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
  """The eval mode: config.eval.protocol on `workdir`'s checkpoint (config.eval.checkpoint), or
  with config.eval.watch on every checkpoint as training writes it. Every setting is checked
  before anything is loaded, compiled or written. Returns the metrics.json dict ({"scored":
  [steps]} when watching)."""
  check(config)
  sample_lib.check_batch(config.eval.batch_size, "eval.batch_size")
  if config.eval.watch:
    return {"scored": watch(config, workdir, progress=progress)}
  return evaluate(config, workdir, config.eval.checkpoint, progress=progress)
