"""Training: the per-device step and the loop.

The step is written per device, the pmap way: it sees its own (b, H, W, C) batch and averages
gradients over the devices (diffusion/sharding.py: with FSDP it holds its shards of the state
and gathers the parameters); `parallel.compile_step` compiles it over the (`data`, `fsdp`) mesh
of every device of every process. Keys: one base key in the state; global example g of step s
uses fold_in(fold_in(base, s), g), whatever the mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import (
  autoencoding,
  checkpoints,
  data,
  parallel,
  posthoc_ema,
  rundir,
  runlog,
  storage,
  visualize,
)
from diffusion.model import Diffusion, SampleSettings, sample_labels
from diffusion.nets import unet
from diffusion.sharding import Layout
from diffusion.train_state import Optimizer, TrainState, init_state


def optimizer(train: ml_collections.ConfigDict) -> Optimizer:
  """config.train's optimiser fields, checked."""
  return Optimizer(**{f.name: train[f.name] for f in dataclasses.fields(Optimizer)})


def example_loss(
  model: Any, params: Any, images: jax.Array, labels: jax.Array, keys: jax.Array, **extra: Any
):
  """`model.loss` of each example alone with its own key: images uint8 (B, H, W, C), labels
  (B,), keys (B, 2) -> per-example outputs (B,). Example i's randomness (noise level, noise,
  label dropout, network dropout) depends on keys[i] alone, whatever else is in the batch (the
  networks normalise per example). `extra`: keyword arguments of the loss, shared."""

  if getattr(model, "batched_example_keys", lambda: False)():  # one batched network call
    return model.loss(params, images, labels, keys, **extra)

  def one(image, label, key):
    out = model.loss(params, image[None], label[None], key, **extra)
    return jax.tree.map(lambda v: v[0], out)

  return jax.vmap(one)(images, labels, keys)


def make_per_device_step(
  diffusion: Diffusion, opt: Optimizer, *, grad_accum: int = 1, layout: Layout | None = None
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """(state, batch) -> (state, metrics) on one device; batch {"image": uint8 (b, H, W, C),
  "label": int32 (b,)}, the state this device's shards per `layout` (default: replicated, data
  parallel over axis "data", what `jax.pmap(axis_name="data")` runs). `grad_accum`
  micro-batches per step are summed in a scan (same maths, 1/k of the activations).

  Example j of device d is global example g = d * b + j; its noise, noise level, label dropout
  and network dropout come from fold_in(fold_in(state.key, step), g) alone (t_sampling uniform;
  antithetic and stratified couple the examples of a micro-batch, keyed by its first g), so the
  devices, the FSDP split and grad_accum leave the numbers unchanged up to float rounding.
  Consistency distillation's teacher and target (state.distill) stay whole on every device."""
  lay = layout or Layout()
  tx, lr = opt.transform(lambda g: lay.sum_squares(g, dims)), opt.schedule()
  dims = lay.dims(jax.eval_shape(diffusion.init_params, jax.random.PRNGKey(0)))
  per_example = getattr(diffusion, "t_sampling", "uniform") == "uniform"

  def loss_fn(params, images, labels, key, first, distill):
    extra = {} if distill is None else {"distill": distill}  # consistency distillation only
    index = first + jnp.arange(images.shape[0], dtype=jnp.int32)
    if per_example:
      keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(index)
      out = example_loss(diffusion, params, images, labels, keys, **extra)
    else:
      out = diffusion.loss(params, images, labels, jax.random.fold_in(key, first), **extra)
    return out.loss.mean(), out.mse.mean()

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.key, state.step)
    images, labels = batch["image"], batch["label"]
    first = lay.device_index() * images.shape[0]
    # Per-device copies of the whole parameters: the gradient of replicated params would already
    # be summed over devices (the transpose of the implicit broadcast); `reduce` averages.
    params = lay.gather(state.params, dims)
    if grad_accum > 1:
      m = images.shape[0] // grad_accum
      split = lambda a: a.reshape(grad_accum, m, *a.shape[1:])
      ims, lbs = split(images), split(labels)

      def micro(acc, inp):
        i, im, lb = inp
        (loss, mse), g = grad_fn(params, im, lb, key, first + i * m, state.distill)
        return jax.tree.map(jnp.add, acc, (loss, mse, g)), None

      # The first micro-batch seeds the carry, so it has the per-device type from the start.
      (loss, mse), grads = grad_fn(params, ims[0], lbs[0], key, first, state.distill)
      (loss, mse, grads), _ = jax.lax.scan(
        micro, (loss, mse, grads), (jnp.arange(1, grad_accum), ims[1:], lbs[1:])
      )
      loss, mse, grads = jax.tree.map(lambda v: v / grad_accum, (loss, mse, grads))
    else:
      (loss, mse), grads = grad_fn(params, images, labels, key, first, state.distill)
    grads = lay.reduce(grads, dims)
    loss, mse = lay.mean((loss, mse))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = opt.ema(state.ema_params, params, state.step)
    phema = (
      None
      if state.phema is None  # after update step + 1 (posthoc_ema's step counting)
      else posthoc_ema.update(state.phema, params, state.step + 1)
    )
    distill = state.distill
    if distill is not None:  # the target network of consistency distillation: an EMA
      mu = diffusion.distill.target_ema
      whole = lay.full(params, dims)
      target = jax.tree.map(lambda e, p: mu * e + (1.0 - mu) * p, distill["target"], whole)
      distill = {**distill, "target": target}
    metrics = {
      "loss": loss,
      "mse": mse,
      "grad_norm": jnp.sqrt(lay.sum_squares(grads, dims)),
      "learning_rate": lr(state.step),
      "finite": jnp.isfinite(loss) & lay.all_finite(params),
    }
    if "stop" in batch:  # a signal reached some process: every one learns it in this collective
      metrics["stop"] = jax.lax.pmax(batch["stop"][0], lay.batch_axes)
    new = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=ema,
      opt_state=opt_state,
      phema=phema,
      distill=distill,
    )
    return new, metrics

  step_fn.layout = lay  # type: ignore[attr-defined]  (parallel.compile_step places the state by it)
  return step_fn


def initial_state(
  diffusion: Diffusion,
  opt: Optimizer,
  seed: int,
  posthoc_sigma_rels: tuple[float, ...] = (),
  *,
  shardings: Callable[[Any], Any] | None = None,
  shapes_only: bool = False,
) -> TrainState:
  """Fresh state from `seed`, in one compiled call (leaf by leaf, the copies and optimiser zeros
  would be a few hundred tiny compilations, ~5 s on a CPU). `shardings`: a function from the
  state's ShapeDtypeStructs to the NamedShardings to create it with (each device computes only
  its shards; the values do not depend on them); default: on the default device (host-side,
  place it with `parallel.replicate`). `shapes_only`: the state as ShapeDtypeStructs (with those
  shardings), nothing computed: the target a checkpoint is restored into."""
  sigma_rels = tuple(float(s) for s in posthoc_sigma_rels)
  pretrained = None if shapes_only else diffusion.pretrained_params()  # config.model.init_from

  def make(key: jax.Array, pretrained: Any) -> TrainState:
    k_init, k_base = jax.random.split(key)
    params = diffusion.init_params(k_init) if pretrained is None else pretrained
    return init_state(params, opt.transform(), k_base, sigma_rels)

  key = jax.random.PRNGKey(seed)
  shapes = jax.eval_shape(make, key, pretrained)
  if shapes_only:
    if shardings is None:
      return shapes
    with_sharding = lambda s, o: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=o)
    return jax.tree.map(with_sharding, shapes, shardings(shapes))
  if shardings is None:
    return jax.jit(make)(key, pretrained)
  return jax.jit(make, out_shardings=shardings(shapes))(key, pretrained)


class NonFiniteLossError(FloatingPointError):
  pass


class StoppedBySignal(Exception):  # noqa: N818 (not an error: the run saved and stopped)
  """SIGTERM or SIGINT stopped the run after saving a checkpoint at `step`; relaunch to resume."""

  EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; SLURM requeue and the sweep runner resume

  def __init__(self, step: int):
    super().__init__(
      f"stopped by a signal at step {step}; checkpoint saved. Relaunch with the "
      "same --workdir to resume."
    )
    self.step = step


def _install_signal_handlers(stop: list[bool]) -> dict:
  old = {}

  def handler(signum, frame):
    stop[0] = True
    logging.warning(
      "signal %d: saving a checkpoint and stopping after this step (several "
      "processes: at the next log step).",
      signum,
    )

  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      old[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread
      pass
  return old


def _close_all(closers: list[Callable[[], None]], *, keep_error: bool) -> None:
  """Calls every closer. With `keep_error` (an exception is on its way out) their errors are
  logged, not raised, so that the original error is the one reported; else the first is raised
  after all ran."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:
      if keep_error:
        logging.warning("while stopping after an error: %s: %s", type(e).__name__, e)
      elif first is None:
        first = e
  if first is not None:
    raise first


def _crossed(step: int, k: int, every: int) -> bool:
  """Whether a call of k steps ending at `step` crossed a multiple of `every` (0: never)."""
  return bool(every) and step // every > (step - k) // every


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  dataset: data.Dataset | data.ShardDataset | None = None,
  on_start: Callable[[], None] | None = None,
  initial: TrainState | None = None,
  mesh: Mesh | None = None,
) -> TrainState:
  """Trains per `config`, resuming from `workdir`'s newest checkpoint if there is one.

  Writes (process 0): metrics.jsonl, tensorboard/, samples/step_N.png. All processes:
  checkpoints/. Returns the final state (replicated arrays). Raises StoppedBySignal after saving
  when SIGTERM or SIGINT asked it to stop, checkpoints.CheckpointSaveError at the first log step
  after a save failed (the earlier checkpoints kept). `dataset`: the training split, when
  already loaded; `on_start`: called once the newest checkpoint is restored into this config's
  state (launch.py writes config.json there), before the first step. `initial`: the host state to
  start from when there is no checkpoint (default: fresh parameters from config.seed; --mode
  distill passes the teacher's). `mesh`: the devices to train on (default: every device of every
  process, split per config.parallel; parallel.make_mesh).
  """
  t = config.train
  lead = jax.process_index() == 0
  runlog.quiet_library_logs()
  opt = optimizer(t)
  grid_settings = SampleSettings.from_config(config.sample)
  par = config.get("parallel") or {}
  mesh = mesh or parallel.make_mesh(par.get("fsdp", 1))
  lay = parallel.layout(mesh, par.get("fsdp_min_size", Layout.min_size))
  n_dev, n_local = mesh.size, parallel.local_devices(mesh)
  data.check_batch(t.batch_size, n_local, jax.process_count())
  if t.grad_accum > 1 and (t.batch_size // n_dev) % t.grad_accum:
    raise ValueError(
      f"per-device batch {t.batch_size // n_dev} does not split into "
      f"config.train.grad_accum={t.grad_accum} micro-batches; make the batch "
      f"size a multiple of {n_dev * t.grad_accum}."
    )
  if dataset is None:
    dataset = data.load(data.DataSpec(**config.data.to_dict()), split="train", stream=True)
  diffusion = autoencoding.build(config, dataset)  # a Diffusion, or an autoencoder to train
  if diffusion.num_classes and dataset.num_classes > diffusion.num_classes:
    raise ValueError(
      f"the data has {dataset.num_classes} classes but config.model.num_classes "
      f"is {diffusion.num_classes}; set it to {dataset.num_classes}."
    )
  storage.makedirs(workdir)  # a gs:// URL too (diffusion/storage.py)

  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, keep_every=t.keep_every
  )
  resuming = ckpt.latest_step() is not None
  if initial is None:
    # Resuming: the checkpoint is read straight into the state's shapes and shardings; nothing
    # is initialised (no second copy of the state in memory, no initialisation to compile).
    state = initial_state(
      diffusion,
      opt,
      config.seed,
      t.posthoc_ema,
      shardings=lambda tree: parallel.shardings(tree, mesh, lay),
      shapes_only=resuming,
    )
  else:
    state = parallel.place(initial, mesh, lay)
  lay.log_unsplit(state)
  # Power-EMA snapshots for --mode posthoc: every one is kept (the reconstruction needs them all).
  snapshots = (
    None
    if state.phema is None
    else checkpoints.Checkpointer(os.path.join(workdir, rundir.PHEMA), keep=None)
  )
  snapshot_every = t.posthoc_every or t.checkpoint_every
  if resuming:
    state = ckpt.restore(state)  # the newest intact checkpoint; damaged newer ones set aside
    if lead:
      logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
  start = int(state.step)
  if on_start is not None:
    on_start()
  if lead and start >= t.num_steps:
    logging.warning(
      "the newest checkpoint is step %d, at or past config.train.num_steps=%d: nothing to "
      "train (raise num_steps to train on).",
      start,
      t.num_steps,
    )
  if lead:
    logging.info(
      "model: %s parameters; %d devices (fsdp %d), %d processes; steps %d -> %d",
      f"{unet.count_params(state.params):,}",
      n_dev,
      lay.fsdp,
      jax.process_count(),
      start,
      t.num_steps,
    )

  step_fn = parallel.compile_step(
    make_per_device_step(diffusion, opt, grad_accum=t.grad_accum, layout=lay), mesh
  )
  sample_fn = diffusion.sample_fn(grid_settings)
  writer = runlog.Writer(workdir, lead, start_step=start)
  batches = data.train_iterator(
    dataset,
    global_batch=t.batch_size,
    seed=config.seed,
    start_step=start,
    local_devices=n_local,
    random_flip=config.data.random_flip,
    prefetch=config.data.prefetch,
  )

  gather = jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))

  def write_samples(step: int) -> None:
    n = config.sample.num_images
    if n <= 0:
      return
    # Whole parameters on every device (gathered when split over fsdp: one float32 copy each).
    params = gather(state.ema_params if config.sample.use_ema else state.params)
    imgs = sample_fn(
      params,
      jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20),
      jnp.asarray(sample_labels(diffusion.num_classes, n)),
      n,
    )
    if lead:
      visualize.save_grid(
        os.path.join(workdir, "samples", f"step_{step}.png"),
        data.to_uint8(jax.device_get(imgs)),
        ncol=max(diffusion.num_classes, int(math.ceil(math.sqrt(n)))),
      )

  def check_finite(first: int, flags: jax.Array) -> None:
    """Raises if a call that started after step `first` produced a non-finite loss or state.
    Every process sees the same flags (pmean)."""
    finite = np.asarray(jax.device_get(flags))
    if not np.all(finite):
      bad = first + int(np.argmin(finite)) + 1  # 1-based, like `step`
      raise NonFiniteLossError(
        f"non-finite loss or parameters at step {bad}; stopped without saving this state. "
        + (
          f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. "
          if ckpt.latest_step() is not None
          else "There is no checkpoint yet. "
        )
        + "Lower config.train.learning_rate or check the data."
      )

  step, last_log, t_log = start, start, time.time()
  pending: tuple[int, jax.Array] | None = None  # the flags of a call not yet checked
  stopping, failed = False, True
  stop = [False]
  old_handlers = _install_signal_handlers(stop)  # restored by the `finally` below, whatever raises
  try:
    while step < t.num_steps and not stopping:
      k = min(t.steps_per_call, t.num_steps - step)
      flag = np.full((n_local, 1), stop[0], np.int32)
      local = [dict(next(batches), stop=flag) for _ in range(k)]
      state, metrics = step_fn(state, parallel.global_batches(local, mesh))
      step += k
      # Check the previous call's flags while this one runs (no host sync per step), and this
      # call's before anything is logged or saved.
      if pending:
        check_finite(*pending)
      pending = (step - k, metrics.pop("finite"))
      any_stop = metrics.pop("stop")
      log = _crossed(step, k, t.log_every) or step == t.num_steps
      save, draw = _crossed(step, k, t.checkpoint_every), _crossed(step, k, t.sample_every)
      if log or save or draw:
        check_finite(*pending)
        pending = None
      if log:
        ckpt.check()  # a failed asynchronous save stops the run here, not at the next save
        now = time.time()
        rate = (step - last_log) * t.batch_size / max(now - t_log, 1e-9)
        eta = (t.num_steps - step) * t.batch_size / max(rate, 1e-9)
        scalars = {k_: float(np.asarray(jax.device_get(v))[-1]) for k_, v in metrics.items()}
        scalars["images_per_sec"] = rate
        writer.write(step, scalars)
        if lead:
          logging.info(
            "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f img/s ETA %s",
            step,
            t.num_steps,
            scalars["loss"],
            scalars["learning_rate"],
            scalars["grad_norm"],
            rate,
            runlog.duration(eta),
          )
        last_log, t_log = step, time.time()
      # Every process must stop at the same step (saves and steps are collective): the step's
      # "stop" is the flag of any process, read where the metrics reach the host anyway.
      if jax.process_count() == 1:
        stopping = stop[0]
      elif log:
        stopping = bool(np.asarray(jax.device_get(any_stop))[-1])
      if save:
        ckpt.save(step, state)
      if snapshots and _crossed(step, k, snapshot_every):
        snapshots.save(step, state.phema)
      if draw:
        write_samples(step)
    if pending:
      check_finite(*pending)
    ckpt.save(step, state)
    if snapshots:
      snapshots.save(step, state.phema)
    if step >= t.num_steps and not stopping:
      write_samples(step)
    ckpt.wait()  # the final save is written (or CheckpointSaveError) before the run ends
    failed = False
  finally:
    closers = [batches.close, ckpt.close, *([snapshots.close] if snapshots else []), writer.close]
    try:  # under this loop's handler: a signal now does not cut the final save short
      _close_all(closers, keep_error=failed)
    finally:
      for sig, h in old_handlers.items():
        signal.signal(sig, h)
  if stopping:
    raise StoppedBySignal(step)
  return state
