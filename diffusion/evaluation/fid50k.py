"""The fid50k protocol's machinery (config.eval.protocol = "fid50k"; the eval mode,
diffusion/modes/evaluate.py, reads the config, picks the directories and writes the results).

The papers' protocol (DDPM, ADM, EDM): N samples per sampler against the statistics of the WHOLE
training split: FID, KID, Inception Score and precision/recall (Kynkaanniemi et al. 2019, k =
PR_K), in the features of an `Extractor` (the FID Inception, or the in-house feature net).

Samples are drawn and their features extracted in one compiled call per batch, data-parallel over
every device of every process (image i keyed by fold_in(PRNGKey(seed), i), so the device and
process counts change nothing; diffusion/generate.py). Each process accumulates its own images'
statistics (`Accumulator`) and saves them every `Protocol.chunk_images` images (atomically); a
rerun resumes from the newest state every process saved, giving the same numbers; process 0
merges the states through files (the directories must be shared, as for checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from diffusion import data, generate, parallel
from diffusion.metrics import distances, feature_net, inception
from diffusion.metrics.reference import FeatureMoments, load_npz, save_npz, savez_atomic
from diffusion.model import Diffusion, SampleSettings
from diffusion.parallel import AXIS

PR_K = 3  # precision/recall neighbourhoods (Kynkaanniemi et al. 2019)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The settings of a fid50k evaluation (config.eval's fields of the same names)."""

  num_samples: int  # samples per sampler
  batch_size: int  # global batch, a multiple of the device count
  seed: int  # image i of a sample set is keyed by fold_in(PRNGKey(seed), i)
  kid_pr_samples: int  # the first samples (and as many random training images) for KID and P/R
  is_splits: int  # Inception Score splits
  chunk_images: int  # each process saves its state every this many images


@dataclasses.dataclass(frozen=True, eq=False)
class Extractor:
  """The network whose features the fid50k protocol compares, as a traceable function of its
  variables (run inside the sampling step on every device)."""

  name: str  # "inception" (TF FID Inception v3 pool3, 2048-d) | "feature_net" (trained here)
  variables: Any
  apply: generate.Extract  # (variables, uint8 (B, H, W, C)) -> {"features", "logits"}
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
  parallel.barrier(f"eval-state-{done}")
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
  protocol: Protocol,
  diffusion: Diffusion,
  params: Any,
  settings: SampleSettings,
  ext: Extractor,
  mesh: Mesh,
  directory: str,
  *,
  labels: np.ndarray | None = None,
  progress: bool = True,
  first_batch: Callable[[np.ndarray], None] | None = None,
) -> Accumulator | None:
  """The statistics of protocol.num_samples images drawn with `settings` from host `params`,
  resumable: every process accumulates the images of its devices and saves its state in
  `directory` every protocol.chunk_images images; a rerun continues from the newest state every
  process saved (process 0 takes it over). Returns the merged statistics on process 0, None on
  the others. labels: int32 (num_samples,) for conditional models. `first_batch`: process 0
  calls it with its images of the batch holding image 0 (uint8 (b, H, W, C)), e.g. for a grid."""
  e = protocol
  n, batch = e.num_samples, e.batch_size
  dims, classes = _output_dims(ext, diffusion)
  fresh = lambda: Accumulator(
    dims, classes if ext.class_logits else 0, n, e.kid_pr_samples, e.is_splits
  )
  lead = jax.process_index() == 0
  os.makedirs(directory, exist_ok=True)
  done, files = _complete(directory) if lead else (0, [])
  done = parallel.broadcast(done)
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
  fn = generate.compile_pipeline(diffusion, settings, mesh, ext.apply)
  every = max(1, e.chunk_images // batch)
  batches = generate.draw(
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
    if first_batch is not None and lead and index.size and index[0] == 0:
      first_batch(rows["images"])
    acc.add(index, rows["features"].astype(np.float64) / ext.scale, rows["logits"])
    if (i + 1) % every == 0 or end == n:
      _save_state(directory, end, acc)
  parallel.barrier("eval-statistics")
  if not lead:
    return None
  done, files = _complete(directory)
  assert done == n, (done, n)
  return _merged(files, fresh)


def _output_dims(ext: Extractor, diffusion: Diffusion) -> tuple[int, int]:
  """(feature dims, logits) of `ext` on this model's images, from shapes alone."""
  shape = getattr(diffusion, "pixel_shape", diffusion.image_shape)  # a latent run's: decoded
  x = jax.ShapeDtypeStruct((1, *shape), jnp.uint8)
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
    got, out = generate.local_rows({"images": images, **fn(variables, images)}, first)
    sel = got < len(index)
    feats = out["features"][sel].astype(np.float64) / ext.scale
    moments = (moments or FeatureMoments.zeros(feats.shape[1])).add(feats)
    mask = np.isin(index[got[sel]], keep)
    kept_index.append(index[got[sel]][mask])
    kept.append(feats[mask])
  return moments, np.concatenate(kept_index), np.concatenate(kept)


def reference_statistics(
  protocol: Protocol,
  train: Any,
  ext: Extractor,
  mesh: Mesh,
  *,
  fingerprint: str,
  cache_dir: str,
  parts_dir: str,
  reference: str = "",
  progress: bool = True,
) -> dict[str, Any] | None:
  """The reference of the fid50k protocol, on process 0 (None on the others): {"mu", "sigma",
  "features" (the protocol.kid_pr_samples random training images' features, for KID and
  precision/recall), "about": where it comes from}. mu and sigma are those of the WHOLE training
  split `train` (data.Dataset or a streamed ShardDataset, whose data_fingerprint is
  `fingerprint`), computed once per data fingerprint and feature network and cached in
  `cache_dir`, or `reference`'s (config.eval.reference: an .npz with mu and sigma, the
  guided-diffusion/EDM format). Every process computes its devices' share; process 0 merges them
  through files in `parts_dir` (which every process must see)."""
  e = protocol
  lead = jax.process_index() == 0
  pick = np.random.default_rng(e.seed).permutation(len(train))[: e.kid_pr_samples]
  about = {"data_fingerprint": fingerprint, "split": "train", "training_images": len(train)}
  path = os.path.join(cache_dir, f"{fingerprint}-{ext.name}-{ext.ident}-{e.seed}.npz")
  if reference:
    about.update(source="file", path=os.path.abspath(reference))
    index = np.sort(pick)
  else:
    about.update(source="cache", path=path)
    hit = parallel.broadcast(int(lead and os.path.exists(path)))
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
  parts = _gather(parts_dir, moments, {"index": kept_index, "features": kept})
  if not lead:
    return None
  for m, _ in parts[1:]:
    moments = moments.merge(m)
  kept_index = np.concatenate([a["index"] for _, a in parts])
  kept = np.concatenate([a["features"] for _, a in parts])[np.argsort(kept_index)]
  if reference:
    mu, sigma = load_npz(reference)
    if mu.shape != (kept.shape[1],):
      raise ValueError(
        f"config.eval.reference={reference!r} has {mu.shape[0]}-d statistics, but the "
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
  every process must see: in the workdir); [(moments, arrays)] of this process alone otherwise."""
  if jax.process_count() == 1:
    return [(moments, arrays)]
  os.makedirs(directory, exist_ok=True)
  mine = os.path.join(directory, f"p{jax.process_index()}.npz")
  moments.save(f"{mine}.moments.npz")
  savez_atomic(mine, arrays)
  parallel.barrier("eval-gather")
  out = [(moments, arrays)]
  if jax.process_index() == 0:
    for i in range(1, jax.process_count()):
      path = os.path.join(directory, f"p{i}.npz")
      with np.load(path, allow_pickle=False) as z:
        out.append((FeatureMoments.load(f"{path}.moments.npz"), {k: z[k] for k in z.files}))
  parallel.barrier("eval-gathered")
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
  generate.check_batch(batch_size, "eval.batch_size")
  fn = generate.compile_pipeline(diffusion, settings, mesh, ext.apply)
  p, v = parallel.replicate(params, mesh), parallel.replicate(ext.variables, mesh)

  def call(first: int) -> dict[str, np.ndarray]:
    ((_, _, rows),) = generate.draw(
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
