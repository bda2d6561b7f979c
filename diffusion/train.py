"""Training: the train state, the data-parallel step and the loop.

The step is written per device, the pmap way: it sees its own (b, H, W, C) batch and averages
gradients with `lax.pmean(..., "data")`. It is compiled with `jax.jit(jax.shard_map(...))` over a
one-axis mesh of every device of every process, with the state donated. Keys: one base key in the
state; step s on device d uses fold_in(fold_in(base, s), d).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import checkpoints, data, losses, samplers, schedules, unet, visualize

AXIS = "data"


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array  # base PRNG key (uint32[2]); never split in place


# ---- pieces built from the config --------------------------------------------------------------


def make_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  f = config.diffusion
  return schedules.make(f.schedule, f.num_timesteps, **f.schedule_params.to_dict())


def make_model(config: ml_collections.ConfigDict) -> unet.UNet:
  c = config.data.channels
  out = 2 * c if config.diffusion.variance == "learned_range" else c
  return unet.create_model(config.model, image_size=config.data.image_size, channels=c,
                           out_channels=out)


def learning_rate(train: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to the peak, then constant or cosine decay to 0 at num_steps."""
  warm = optax.linear_schedule(0.0, train.learning_rate, max(train.warmup_steps, 1))
  if train.lr_schedule == "constant":
    after = optax.constant_schedule(train.learning_rate)
  elif train.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(train.learning_rate,
                                        max(train.num_steps - train.warmup_steps, 1))
  else:
    raise ValueError(f"unknown lr_schedule {train.lr_schedule!r}; known: constant, cosine.")
  return optax.join_schedules([warm, after], [train.warmup_steps])


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate(train), b1=train.b1, b2=train.b2,
                           weight_decay=train.weight_decay))
  return optax.chain(*chain)


def time_input(config: ml_collections.ConfigDict) -> str:
  """The network is conditioned on log-SNR in continuous time, on t otherwise."""
  return "log_snr" if config.diffusion.continuous_time else "t"


def null_label(config: ml_collections.ConfigDict) -> int:
  return config.model.num_classes  # the extra class the U-Net reserves for "no label"


def init_state(config: ml_collections.ConfigDict, model: unet.UNet,
               tx: optax.GradientTransformation) -> TrainState:
  """Fresh state from config.seed (host-side; replicate with `replicate`)."""
  key = jax.random.PRNGKey(config.seed)
  k_init, k_base = jax.random.split(key)
  s, c = config.data.image_size, config.data.channels
  labels = jnp.zeros((1,), jnp.int32) if config.model.num_classes else None
  params = jax.jit(lambda k: model.init(k, jnp.zeros((1, s, s, c)), jnp.zeros((1,)), labels,
                                        train=False))(k_init)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    key=k_base)


# ---- the per-device step -----------------------------------------------------------------------


def make_per_device_step(config: ml_collections.ConfigDict, model: unet.UNet,
                         tx: optax.GradientTransformation, schedule: schedules.Schedule,
                         ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """(state, batch) -> (state, metrics) on one device; batch {"image": uint8 (b, H, W, C),
  "label": int32 (b,)}. Collective: pmean over axis "data"."""
  f, t = config.diffusion, config.train
  conditional = config.model.num_classes > 0

  def loss_fn(params, images, labels, key):
    k_loss, k_drop = jax.random.split(key)
    x0 = data.normalize(images)
    apply = lambda x, cond, y: model.apply(params, x, cond, y, train=True,
                                           rngs={"dropout": k_drop})
    out = losses.denoising_loss(
      apply, schedule, x0, k_loss, labels=labels if conditional else None,
      prediction=f.prediction, weighting=f.weighting, min_snr_gamma=f.min_snr_gamma,
      variance=f.variance, vlb_weight=f.vlb_weight, continuous_time=f.continuous_time,
      t_sampling=f.t_sampling, time_input=time_input(config), label_dropout=t.label_dropout,
      null_label=null_label(config))
    return out.loss.mean(), out.mse.mean()

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), jax.lax.axis_index(AXIS))
    images, labels = batch["image"], batch["label"]
    # Differentiate per-device copies: the gradient of replicated params would already be summed
    # over devices (the transpose of the implicit broadcast), and pmean below does the averaging.
    params = jax.lax.pcast(state.params, AXIS, to="varying")
    if t.grad_accum > 1:  # same maths, micro-batches summed in a scan
      split = lambda a: a.reshape(t.grad_accum, a.shape[0] // t.grad_accum, *a.shape[1:])
      ims, lbs = split(images), split(labels)

      def micro(acc, inp):
        i, im, lb = inp
        (loss, mse), g = grad_fn(params, im, lb, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, acc, (loss, mse, g)), None

      # The first micro-batch seeds the carry, so it has the per-device type from the start.
      (loss, mse), grads = grad_fn(params, ims[0], lbs[0], jax.random.fold_in(key, 0))
      (loss, mse, grads), _ = jax.lax.scan(
        micro, (loss, mse, grads), (jnp.arange(1, t.grad_accum), ims[1:], lbs[1:]))
      loss, mse, grads = jax.tree.map(lambda v: v / t.grad_accum, (loss, mse, grads))
    else:
      (loss, mse), grads = grad_fn(params, images, labels, key)
    grads, loss, mse = jax.lax.pmean((grads, loss, mse), AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.float32(t.ema_decay)
    if t.ema_warmup:
      n = state.step.astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    finite = jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {"loss": loss, "mse": mse, "grad_norm": optax.global_norm(grads),
               "learning_rate": learning_rate(t)(state.step), "finite": finite}
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, metrics

  return step_fn


def scan_steps(step_fn):
  """Per-device function running k steps over batches with a leading axis k (k static).

  A Python loop, not `lax.scan`: XLA:CPU runs a backward pass inside a while loop far slower than
  straight-line code, and `lax.scan(..., unroll=True)` still leaves one (measured with
  experiments/benchmark.py, sprites peer network, batch 64: 4.2 images/s as a scan of length 1,
  184 as straight-line code). k steps cost k times the compile time instead.
  """

  def run(state, batches):
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
      state, m = step_fn(state, jax.tree.map(lambda a, i=i: a[i], batches))
      metrics.append(m)
    return state, jax.tree.map(lambda *v: jnp.stack(v), *metrics)

  return run


def make_mesh() -> Mesh:
  """One axis "data" over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def compile_step(per_device: Callable, mesh: Mesh) -> Callable:
  """jit(shard_map(per_device)) for k steps per call: state replicated and donated; batches
  {"image": (k, global_batch, H, W, C), "label": (k, global_batch)} split on the batch axis."""
  fn = jax.shard_map(scan_steps(per_device), mesh=mesh, in_specs=(P(), P(None, AXIS)),
                     out_specs=(P(), P()))
  return jax.jit(fn, donate_argnums=0)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places host values on every device of the mesh (identical copies)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
    np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree)


def global_batches(local: list[dict], mesh: Mesh) -> dict:
  """Stacks k host-local batches {"image": (local_devices, b, ...)} into global arrays
  (k, global_batch, ...) sharded over the mesh's batch axis."""
  sharding = NamedSharding(mesh, P(None, AXIS))
  out = {}
  for name in local[0]:
    stacked = np.stack([b[name].reshape(-1, *b[name].shape[2:]) for b in local])
    out[name] = jax.make_array_from_process_local_data(sharding, stacked)
  return out


# ---- multi-host --------------------------------------------------------------------------------


def maybe_initialize_distributed(train: ml_collections.ConfigDict) -> bool:
  """Calls jax.distributed.initialize() when asked: `distributed="on"`, an explicit coordinator
  (config or $JAX_COORDINATOR_ADDRESS), or (auto) a multi-task SLURM job step (srun; a batch
  script's own step is one task even when the job has several) or a multi-worker TPU pod.
  Returns whether it did."""
  env = os.environ
  slurm = int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
  explicit = bool(train.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"))
  mode = train.distributed
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"config.train.distributed must be auto, on or off, got {mode!r}.")
  if mode == "off" or (mode == "auto" and not (explicit or slurm or tpu_pod)):
    return False
  # CPU collectives across processes (tests, CPU clusters); GPU/TPU collectives are unaffected.
  # Touch no backend before initialize(): that would make it fail.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if train.coordinator_address:
    kwargs = dict(coordinator_address=train.coordinator_address,
                  num_processes=train.num_processes or None,
                  process_id=None if train.process_id < 0 else train.process_id)
  jax.distributed.initialize(**kwargs)
  return True


# ---- logging -----------------------------------------------------------------------------------


class MetricsWriter:
  """metrics.jsonl plus TensorBoard events (tensorboardX, no TensorFlow), process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter

      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class NonFiniteLossError(FloatingPointError):
  pass


class _QuietLibraries:
  """Drops INFO records from orbax's modules (dozens per save), keeping warnings and errors."""

  def filter(self, record) -> bool:
    return record.levelno > 20 or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


# ---- sampling for grids during training --------------------------------------------------------


def make_sample_fn(config: ml_collections.ConfigDict, model: unet.UNet,
                   schedule: schedules.Schedule, *, sampler: str | None = None,
                   num_steps: int | None = None, return_trajectory: bool = False) -> Callable:
  """jit-compiled (params, key, labels) -> images in [-1, 1] (n, H, W, C), with config.sample's
  sampler, steps, spacing, eta, guidance and clipping. With `return_trajectory`: (images, states
  (steps + 1, n, H, W, C)), the states from x_T to the last step."""
  s = config.sample
  size, c = config.data.image_size, config.data.channels
  conditional = config.model.num_classes > 0

  @functools.partial(jax.jit, static_argnames="n")
  def sample_fn(params, key, labels, n: int):
    k_noise, k_run = jax.random.split(key)
    x_t = jax.random.normal(k_noise, (n, size, size, c))
    apply = lambda x, cond, y: model.apply(params, x, cond, y, train=False)
    out = samplers.sample(
      sampler or s.sampler, apply, schedule, x_t, k_run, num_steps=num_steps or s.num_steps,
      spacing=s.spacing, prediction=config.diffusion.prediction,
      variance=config.diffusion.variance, eta=s.eta, time_input=time_input(config),
      labels=labels if conditional else None, guidance_scale=s.guidance_scale,
      null_label=null_label(config), clip_x0=s.clip_x0, return_trajectory=return_trajectory)
    return (out[0], jnp.concatenate([x_t[None], out[1]])) if return_trajectory else out

  return sample_fn


def sample_labels(config: ml_collections.ConfigDict, n: int) -> jax.Array:
  """Labels cycling through the classes (one row per class in a grid), or zeros."""
  k = max(config.model.num_classes, 1)
  return jnp.arange(n, dtype=jnp.int32) % k


# ---- the loop ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stop:
  requested: bool = False


def _duration(seconds: float) -> str:
  """'H:MM:SS', with days in front past 24 hours ('2d 03:04:05')."""
  days, rest = divmod(int(seconds), 86400)
  return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


def _install_signal_handlers(stop: _Stop) -> dict:
  old = {}

  def handler(signum, frame):
    stop.requested = True
    logging.warning("signal %d: saving a checkpoint and stopping after this step (several "
                    "processes: at the next log step).", signum)

  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      old[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread
      pass
  return old


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains per `config`, resuming from `workdir`'s newest checkpoint if there is one.

  Writes (process 0): config.json, metrics.jsonl, tensorboard/, samples/step_N.png.
  All processes: checkpoints/. Returns the final state (replicated arrays).
  """
  t = config.train
  lead = jax.process_index() == 0
  quiet_library_logs()
  os.makedirs(workdir, exist_ok=True)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json(sort_keys=True, indent=2))

  schedule, model, tx = make_schedule(config), make_model(config), make_optimizer(t)
  mesh = make_mesh()
  n_dev = mesh.size
  data.check_batch(t.batch_size, jax.local_device_count(), jax.process_count())
  if t.grad_accum > 1 and (t.batch_size // n_dev) % t.grad_accum:
    raise ValueError(f"per-device batch {t.batch_size // n_dev} does not split into "
                     f"config.train.grad_accum={t.grad_accum} micro-batches; make the batch "
                     f"size a multiple of {n_dev * t.grad_accum}.")
  dataset = data.load(config.data, split="train")
  if config.model.num_classes and dataset.num_classes > config.model.num_classes:
    raise ValueError(f"the data has {dataset.num_classes} classes but config.model.num_classes "
                     f"is {config.model.num_classes}; set it to {dataset.num_classes}.")

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                  keep_every=t.keep_every)
  state = replicate(init_state(config, model, tx), mesh)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    if lead:
      logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
  start = int(state.step)
  if lead:
    logging.info("model: %s parameters; %d devices, %d processes; steps %d -> %d",
                 f"{unet.count_params(state.params):,}", n_dev, jax.process_count(), start,
                 t.num_steps)

  step_fn = compile_step(make_per_device_step(config, model, tx, schedule), mesh)
  sample_fn = make_sample_fn(config, model, schedule)
  writer = MetricsWriter(workdir, lead)
  stop = _Stop()
  old_handlers = _install_signal_handlers(stop)
  batches = data.train_iterator(dataset, global_batch=t.batch_size, seed=config.seed,
                                start_step=start, local_devices=jax.local_device_count(),
                                random_flip=config.data.random_flip, prefetch=config.data.prefetch)

  def write_samples(step: int) -> None:
    if config.sample.num_images <= 0:
      return
    n = config.sample.num_images
    imgs = sample_fn(state.ema_params if config.sample.use_ema else state.params,
                     jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20),
                     sample_labels(config, n), n)
    if lead:
      visualize.save_grid(os.path.join(workdir, "samples", f"step_{step}.png"),
                          data.to_uint8(jax.device_get(imgs)),
                          ncol=max(config.model.num_classes, int(math.ceil(math.sqrt(n)))))

  def check_finite(first: int, flags: jax.Array) -> None:
    """Raises if a call that started after step `first` produced a non-finite loss or state.
    Every process sees the same flags (pmean)."""
    finite = np.asarray(jax.device_get(flags))
    if not np.all(finite):
      bad = first + int(np.argmin(finite)) + 1  # 1-based, like `step`
      raise NonFiniteLossError(
        f"non-finite loss or parameters at step {bad}; stopped without saving this state. "
        + (f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. "
           if ckpt.latest_step() is not None else "There is no checkpoint yet. ")
        + "Lower config.train.learning_rate or check the data.")

  def agreed_stop() -> bool:
    """Whether any process was signalled. Every process must stop at the same step (the saves
    and the steps are collective), so several processes agree at log steps only."""
    if jax.process_count() == 1:
      return stop.requested
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(stop.requested))))

  step, last_log, t_log = start, start, time.time()
  pending: tuple[int, jax.Array] | None = None  # the flags of a call not yet checked
  stopping = False
  try:
    while step < t.num_steps and not stopping:
      k = min(t.steps_per_call, t.num_steps - step)
      local = [next(batches) for _ in range(k)]
      state, metrics = step_fn(state, global_batches(local, mesh))
      step += k
      # Check the previous call's flags while this one runs (no host sync per step), and this
      # call's before anything is logged or saved.
      if pending:
        check_finite(*pending)
      pending = (step - k, metrics.pop("finite"))
      log = step // t.log_every > (step - k) // t.log_every or step == t.num_steps
      save = t.checkpoint_every and step // t.checkpoint_every > (step - k) // t.checkpoint_every
      draw = t.sample_every and step // t.sample_every > (step - k) // t.sample_every
      if log or save or draw:
        check_finite(*pending)
        pending = None
      if log:
        now = time.time()
        rate = (step - last_log) * t.batch_size / max(now - t_log, 1e-9)
        eta = (t.num_steps - step) * t.batch_size / max(rate, 1e-9)
        scalars = {k_: float(np.asarray(jax.device_get(v))[-1]) for k_, v in metrics.items()}
        scalars["images_per_sec"] = rate
        writer.write(step, scalars)
        if lead:
          logging.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f %.1f img/s ETA %s", step,
                       t.num_steps, scalars["loss"], scalars["learning_rate"],
                       scalars["grad_norm"], rate, _duration(eta))
        last_log, t_log = step, time.time()
      if log or jax.process_count() == 1:
        stopping = agreed_stop()
      if save:
        ckpt.save(step, state)
      if draw:
        write_samples(step)
    if pending:
      check_finite(*pending)
    ckpt.save(step, state)
    if step >= t.num_steps and not stopping:
      write_samples(step)
  finally:
    batches.close()
    ckpt.close()
    writer.close()
    for sig, h in old_handlers.items():
      signal.signal(sig, h)
  if stopping and lead:
    logging.warning("stopped by a signal at step %d; checkpoint saved. Relaunch with the same "
                    "--workdir to resume.", step)
  return state
