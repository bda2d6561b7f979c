"""Data parallelism: the mesh, placement, global batches, step compilation and multi-host start-up.

A step is written per device, the pmap way: it sees its own batch and averages over the batch
axes of a `sharding.Layout`. `compile_step` compiles it as `jax.jit(jax.shard_map(...))` over the
(`data`, `fsdp`) mesh of every device of every process, with the state placed by the layout
(replicated, or split over `fsdp`: diffusion/sharding.py) and donated.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion.sharding import DATA, FSDP, Layout

AXIS = DATA
BATCH = (DATA, FSDP)  # the batch is split over both mesh axes, data-major
_BARRIERS = itertools.count()  # coordination-service keys: unique, the same order everywhere


def fsdp_size(fsdp: int, devices: int | None = None) -> int:
  """config.parallel.fsdp resolved: -1 = every local device (HSDP across hosts); ValueError
  (one line, the fix) unless it divides the device count."""
  n = jax.device_count() if devices is None else devices
  size = jax.local_device_count() if fsdp == -1 else fsdp
  if not isinstance(size, int) or size < 1 or n % size:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(
      f"config.parallel.fsdp={fsdp} does not divide the {n} devices; set it to one of "
      f"{', '.join(map(str, divisors))} or -1 (all local devices)."
    )
  return size


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
  """Mesh (`data`, `fsdp`) = (N / fsdp, fsdp) over `devices` (default: every device of every
  process, in process order, so that a host's devices share rows when fsdp <= local devices)."""
  devs = jax.devices() if devices is None else list(devices)
  size = fsdp_size(fsdp, len(devs))
  return Mesh(np.asarray(devs).reshape(len(devs) // size, size), (DATA, FSDP))


def layout(mesh: Mesh, min_size: int = Layout.min_size) -> Layout:
  """The per-device step's view of a (`data`, `fsdp`) mesh."""
  return Layout(batch_axes=BATCH, fsdp=mesh.shape[FSDP], min_size=min_size)


def place(tree: Any, mesh: Mesh, lay: Layout) -> Any:
  """Host values, the same on every process, placed on the mesh per `lay` (each device its
  shard)."""
  return jax.tree.map(
    lambda x, spec: jax.make_array_from_callback(
      np.shape(x), NamedSharding(mesh, spec), lambda idx: np.asarray(x)[idx]
    ),
    tree,
    lay.specs(tree),
  )


def shardings(tree: Any, mesh: Mesh, lay: Layout) -> Any:
  """NamedShardings of every leaf of `tree` (arrays or ShapeDtypeStructs) per `lay`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), lay.specs(tree))


def local_devices(mesh: Mesh) -> int:
  """Devices of the mesh on this process."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places host values on every device of the mesh (identical copies)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
    tree,
  )


def global_batches(local: list[dict], mesh: Mesh) -> dict:
  """Stacks k host-local batches {"image": (local_devices, b, ...)} into global arrays
  (k, global_batch, ...) sharded over the mesh's batch axes."""
  sharding = NamedSharding(mesh, P(None, _batch_axes(mesh)))
  out = {}
  for name in local[0]:
    stacked = np.stack([b[name].reshape(-1, *b[name].shape[2:]) for b in local])
    out[name] = jax.make_array_from_process_local_data(sharding, stacked)
  return out


def unrolled(step_fn: Callable) -> Callable:
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


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH if a in mesh.axis_names)


def compile_step(per_device: Callable, mesh: Mesh) -> Callable:
  """jit(shard_map(per_device)) for k steps per call: state placed per `per_device.layout` (a
  sharding.Layout of this mesh's axes; train.make_per_device_step sets it) and donated;
  batches {"image": (k, global_batch, H, W, C), "label": (k, global_batch)} split over the batch
  axes. Metrics come back replicated.

  Compiled ahead of the first call of each batch shape, then every process waits at a barrier:
  one process may compile for minutes longer than another (a cache miss, a loaded machine), and
  the first collective would then time out connecting (gloo's connect timeout on CPUs)."""
  lay = getattr(per_device, "layout", None) or Layout(batch_axes=_batch_axes(mesh))
  compiled: dict[tuple, Any] = {}

  def jitted(state) -> Callable:
    specs = lay.specs(state)
    return jax.jit(
      jax.shard_map(
        unrolled(per_device),
        mesh=mesh,
        in_specs=(specs, P(None, lay.batch_axes)),
        out_specs=(specs, P()),
      ),
      donate_argnums=0,
    )

  def executable(state, batches) -> Any:
    """The compiled program for these shapes (`cost_analysis()`, `memory_analysis()` etc.)."""
    key = tuple((a.shape, a.dtype) for a in jax.tree.leaves((state, batches)))
    if key not in compiled:
      start = time.perf_counter()
      compiled[key] = jitted(state).lower(state, batches).compile()
      if jax.process_index() == 0:
        logging.info("training step compiled in %.1f s", time.perf_counter() - start)
      barrier("step compiled")
    return compiled[key]

  def step(state, batches):
    return executable(state, batches)(state, batches)

  step.executable = executable  # type: ignore[attr-defined]
  return step


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process arrives (the jax.distributed coordination service, not a device
  collective, so nothing is compiled and no collective can time out). One process: returns."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed

  distributed.global_state.client.wait_at_barrier(
    f"diffusion: {name} {next(_BARRIERS)}", int(timeout_s * 1000)
  )


def broadcast(value: int, timeout_s: float = 3600.0) -> int:
  """Process 0's integer on every process, through the coordination service's key-value store
  (like `barrier`, no device collective). Every process must call it, in the same order."""
  if jax.process_count() == 1:
    return value
  from jax._src import distributed

  client, key = distributed.global_state.client, f"diffusion: broadcast {next(_BARRIERS)}"
  if jax.process_index() == 0:
    client.key_value_set(key, str(int(value)))
  return int(client.blocking_key_value_get(key, int(timeout_s * 1000)))


DISTRIBUTED_MODES = ("auto", "on", "off")


def _tasks_on_node(env: Mapping[str, str]) -> int | None:
  """Tasks of this SLURM step on this node, from SLURM_STEP_TASKS_PER_NODE ("2(x3),1")."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
  counts: list[int] = []
  try:
    for part in filter(None, spec.split(",")):
      n, _, repeat = part.partition("(x")
      counts += [int(n)] * int(repeat.rstrip(")") or 1)
    return counts[int(env.get("SLURM_NODEID", "0"))]
  except (ValueError, IndexError):
    return None


def slurm_local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The GPUs (CUDA ordinals among those this process sees) that this SLURM task drives.

  The job asks --gpus-per-node and every task of a node sees all its GPUs: the node's GPUs are
  split evenly, so one task per GPU drives GPU SLURM_LOCALID (what jax's own SLURM detection
  assumes). If they do not split evenly, the site bound GPUs to tasks itself (--gpus-per-task,
  a default --gpu-bind): the task drives every GPU it sees, where jax's [SLURM_LOCALID] would be
  an invalid device (jax-ml/jax#23452, #28194). None (leave it to jax): no CUDA_VISIBLE_DEVICES,
  JAX_LOCAL_DEVICE_IDS set, or SLURM's task layout unknown.
  """
  env = os.environ if env is None else env
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  per_node = _tasks_on_node(env)
  if not visible or "JAX_LOCAL_DEVICE_IDS" in env or not per_node or "SLURM_LOCALID" not in env:
    return None
  if len(visible) % per_node:
    return list(range(len(visible)))
  k, local = len(visible) // per_node, int(env["SLURM_LOCALID"])
  return list(range(local * k, (local + 1) * k))


def _tpu_slice() -> str | None:
  """jax's own Cloud TPU detection when it finds several workers: "gcetpu" (a TPU VM; GCE
  metadata: agent-worker-number, worker-network-endpoints) or "gketpu" (GKE:
  TPU_WORKER_HOSTNAMES). Off a TPU VM (no TPU chips on the PCI bus) nothing is queried."""
  from jax._src.clusters import cloud_tpu_cluster as tpu  # private API: tests pin its use

  for env in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env.name
    except (OSError, RuntimeError, ValueError) as e:  # metadata server unreachable or odd
      logging.warning(
        "TPU VM detection failed (%s); one process. DIFFUSION_DISTRIBUTED=on forces "
        "jax.distributed.initialize().",
        e,
      )
  return None


def detect_cluster() -> str | None:
  """The multi-process job this process belongs to, as jax's cluster_detection_method name:
  "slurm" (an srun step with several tasks; a batch script's own step is one task even when the
  job has several), "gcetpu"/"gketpu" (a TPU slice with several workers), or None."""
  if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
    return "slurm"
  return _tpu_slice()


def initialize_distributed(
  *, mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1
) -> bool:
  """Calls jax.distributed.initialize() when asked. `mode` (config.train.distributed; when
  "auto", $DIFFUSION_DISTRIBUTED may override it): "off" never; "on" always (jax detects the
  cluster); "auto" with an explicit coordinator (argument or $JAX_COORDINATOR_ADDRESS) or when
  `detect_cluster()` finds one. Returns whether it did. Call before anything touches a backend."""
  if mode == "auto":
    mode = os.environ.get("DIFFUSION_DISTRIBUTED", "auto")
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(
      f"config.train.distributed (or $DIFFUSION_DISTRIBUTED) must be auto, on or off, got {mode!r}."
    )
  explicit = bool(coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"))
  cluster = None if mode == "off" or explicit else detect_cluster()
  if mode == "off" or (mode == "auto" and not (explicit or cluster)):
    return False
  # CPU collectives across processes (tests, CPU clusters); GPU/TPU collectives are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = {}
  if coordinator_address:
    kwargs = dict(
      coordinator_address=coordinator_address,
      num_processes=num_processes or None,
      process_id=None if process_id < 0 else process_id,
    )
  elif cluster:
    kwargs = dict(cluster_detection_method=cluster)
    if cluster == "slurm" and (ids := slurm_local_device_ids()) is not None:
      kwargs["local_device_ids"] = ids
  jax.distributed.initialize(**kwargs)
  return True
