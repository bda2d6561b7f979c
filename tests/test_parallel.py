"""parallel.py: the shard_map step equals pmap on four devices, every example draws its own key,
and jax.distributed start-up follows the environment."""

import jax
import pytest
from conftest import run_python

from diffusion import parallel

PMAP_VS_SHARD_MAP = r"""
import jax, numpy as np
# Host arrays for stacking and comparing: jnp there would compile a small program per leaf shape.
from conftest import TINY_DIT, tiny_config
from diffusion import data, parallel, train
from diffusion.model import Diffusion
assert jax.device_count() == 4
c = tiny_config(batch_size=16, grad_accum=2, warmup_steps=0)  # lr > 0 from the first step
# A one-block DiT keeps the three compilations short (a U-Net's are several times longer); the
# step's parallel semantics are what is tested, and test_fsdp.py runs the U-Net (with dropout) on
# 1 and 8 devices.
c.model.update(TINY_DIT, depth=1)
diffusion, opt = Diffusion.from_config(c), train.optimizer(c.train)
state = train.initial_state(diffusion, opt, c.seed)
ds = data.load(data.DataSpec(**c.data.to_dict()))
local = [data.batch_at(ds, 0, global_batch=16, seed=0, local_devices=4)]
mesh = parallel.make_mesh()  # (data, fsdp) = (4, 1)
sharded = train.make_per_device_step(diffusion, opt, grad_accum=2, layout=parallel.layout(mesh))
step = parallel.compile_step(sharded, mesh)
per_device = train.make_per_device_step(diffusion, opt, grad_accum=2)  # axis "data" alone
s1, m1 = step(parallel.replicate(state, mesh), parallel.global_batches(local, mesh))
pm = jax.pmap(parallel.unrolled(per_device), axis_name="data")
stack = lambda x: np.stack([np.asarray(x)] * 4)
batches = {k: np.stack([b[k] for b in local], 1) for k in local[0]}  # (devices, k, b, ...)
s2, m2 = pm(jax.tree.map(stack, state), batches)
host = jax.device_get
d = jax.tree.map(lambda a, b: float(np.max(np.abs(host(a) - host(b)[0]))), s1, s2)
worst = max(jax.tree.leaves(d))
print("max abs diff", worst, "loss", np.asarray(m1["loss"]), np.asarray(m2["loss"][0]))
assert worst < 1e-6, worst
assert np.allclose(np.asarray(m1["loss"]), np.asarray(m2["loss"][0]), atol=1e-6)
assert int(s1.step) == 1
# Gradient accumulation: one micro-batch of the same examples (same global indices, same keys)
# trains the same step.
whole = train.make_per_device_step(diffusion, opt, grad_accum=1, layout=parallel.layout(mesh))
s3, m3 = parallel.compile_step(whole, mesh)(
  parallel.replicate(state, mesh), parallel.global_batches(local, mesh)
)
diff = lambda a, b: float(np.max(np.abs(host(a) - host(b))))
d3 = max(jax.tree.leaves(jax.tree.map(diff, s3, s1)))
print("grad_accum 1 vs 2: max abs diff", d3, {k: (m3[k], m1[k]) for k in ("loss", "grad_norm")})
assert d3 < 1e-6, d3
for k in ("loss", "grad_norm"):  # the norm: Adam's first step alone hides a gradient's scale
  np.testing.assert_allclose(np.asarray(m3[k]), np.asarray(m1[k]), rtol=1e-5, err_msg=k)
moved = jax.tree.map(lambda a, b: float(np.max(np.abs(host(a) - host(b)))), s1.params, state.params)
assert max(jax.tree.leaves(moved)) > 1e-5  # training changed the parameters
# Keys per example: with the same per-device batch on all four devices, the mean loss differs
# from device 0's alone (a key copied to every device would make all four losses equal).
same = [{k: np.stack([v[0]] * 4) for k, v in b.items()} for b in local]  # (4, b, ...)
_, m4 = step(parallel.replicate(state, mesh), parallel.global_batches(same, mesh))
one = jax.pmap(parallel.unrolled(per_device), axis_name="data", devices=jax.devices()[:1])
_, m1 = one(jax.tree.map(lambda x: np.asarray(x)[None], state),
            {k: np.stack([b[k][:1] for b in same], 1) for k in same[0]})  # (1, k, b, ...)
print("four devices", np.asarray(m4["loss"]), "device 0", np.asarray(m1["loss"][0]))
assert np.all(np.abs(np.asarray(m4["loss"]) - np.asarray(m1["loss"][0])) > 1e-4)
print("OK")
"""


def test_shard_map_step_equals_pmap_on_four_devices():
  """One step with gradient accumulation (2 micro-batches): the jit(shard_map) step equals
  jax.pmap of the same per-device function and the step without accumulation, and each device's
  examples draw their own keys."""
  script = "import sys; sys.path.insert(0, 'tests')\n" + PMAP_VS_SHARD_MAP
  r = run_python(["-c", script], devices=4)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


CLUSTER_ENV = (
  "SLURM_NTASKS",
  "SLURM_STEP_NUM_TASKS",
  "SLURM_STEP_TASKS_PER_NODE",
  "SLURM_TASKS_PER_NODE",
  "SLURM_NODEID",
  "SLURM_LOCALID",
  "CUDA_VISIBLE_DEVICES",
  "JAX_LOCAL_DEVICE_IDS",
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "TPU_WORKER_ID",
  "TPU_SKIP_MDS_QUERY",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "MEGASCALE_NUM_SLICES",
  "JAX_COORDINATOR_ADDRESS",
  "DIFFUSION_DISTRIBUTED",
)


@pytest.fixture
def cluster_env(monkeypatch):
  """No cluster variables; jax.distributed.initialize records its arguments instead."""
  for var in CLUSTER_ENV:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's CPU alone
  return calls


def tpu_vm(monkeypatch, workers: int, worker: int = 0) -> list[str]:
  """This machine as a Cloud TPU VM: jax's TPU-VM flag set and its GCE metadata query answered
  from a table (no network). Returns the keys queried."""
  from jax._src.clusters import cloud_tpu_cluster, cluster

  endpoints = ",".join(f"w{i}:{i}:10.130.0.{i + 2}" for i in range(workers))  # name:id:ip
  table = {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints, "tpu-env": ""}
  asked = []

  def get_metadata(key):
    asked.append(key)
    return table[key], 200

  for module in (cloud_tpu_cluster, cluster):
    monkeypatch.setattr(module, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)
  return asked


@pytest.mark.parametrize(
  "env, mode, expected",
  [
    ({}, "auto", None),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "auto", None),  # an sbatch script itself
    (
      {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"},
      "auto",
      {"cluster_detection_method": "slurm"},
    ),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "auto", None),  # GKE's variable, but no TPU here
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "auto", {}),
    ({}, "on", {}),
    ({"SLURM_STEP_NUM_TASKS": "4"}, "off", None),
    ({"SLURM_STEP_NUM_TASKS": "4", "DIFFUSION_DISTRIBUTED": "off"}, "auto", None),
    ({"DIFFUSION_DISTRIBUTED": "on"}, "auto", {}),
    ({"DIFFUSION_DISTRIBUTED": "off"}, "on", {}),  # the config's explicit choice wins
  ],
)
def test_distributed_initialisation_follows_the_environment(
  monkeypatch, cluster_env, env, mode, expected
):
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  assert parallel.initialize_distributed(mode=mode) == (expected is not None)
  assert cluster_env == ([] if expected is None else [expected])


EIGHT = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize(
  "visible, tasks_per_node, local, expected",
  [
    (EIGHT, "8", 3, [3]),  # --gpus-per-node=8, 8 tasks: every task sees all, drives its own
    ("5", "8", 3, [0]),  # the site bound one GPU per task anyway (jax alone would use [3])
    (EIGHT, "2", 1, [4, 5, 6, 7]),  # 2 tasks on an 8-GPU node: 4 GPUs each
    ("0,1", "4(x2),2", 1, [1]),  # uneven nodes: this one (SLURM_NODEID=2) runs 2 tasks
    ("", "8", 3, None),  # no GPUs named: jax's default
  ],
)
def test_slurm_tasks_drive_the_gpus_they_own(visible, tasks_per_node, local, expected):
  env = {
    "CUDA_VISIBLE_DEVICES": visible,
    "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
    "SLURM_LOCALID": str(local),
    "SLURM_NODEID": "2" if "(x2)" in tasks_per_node else "0",
  }
  assert parallel.slurm_local_device_ids(env) == expected
  assert parallel.slurm_local_device_ids({**env, "JAX_LOCAL_DEVICE_IDS": "0"}) is None  # user's


def test_slurm_step_passes_its_gpus_to_jax(monkeypatch, cluster_env):
  """A per-task GPU binding: jax's own SLURM detection would pick GPU [SLURM_LOCALID] = [1], an
  invalid device where the task sees one GPU; initialisation passes [0], and jax keeps it."""
  from jax._src.clusters import ClusterEnv

  slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "16"}
  slurm |= {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
  slurm |= {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
  for var, value in {**slurm, "CUDA_VISIBLE_DEVICES": "6"}.items():
    monkeypatch.setenv(var, value)
  assert parallel.initialize_distributed()
  assert cluster_env == [dict(cluster_detection_method="slurm", local_device_ids=[0])]
  got = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, [0], "slurm", 10)
  assert got == ("gpu07:61586", 16, 9, [0])  # jax's port: 61440 + job id % 4096
  assert ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, "slurm", 10)[
    3
  ] == [1]  # what jax alone would have used


def test_tpu_vm_slice_is_detected_from_gce_metadata(monkeypatch, cluster_env):
  """A v4-32 slice (4 workers) with GKE's variable unset: jax's GCE-metadata detection finds it,
  and jax derives worker 3's coordinator, process count and id from the same metadata."""
  from jax._src.clusters import ClusterEnv

  asked = tpu_vm(monkeypatch, workers=4, worker=3)
  assert parallel.detect_cluster() == "gcetpu" and "agent-worker-number" in asked
  assert parallel.initialize_distributed()
  assert cluster_env == [dict(cluster_detection_method="gcetpu")]
  got = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, "gcetpu", 10)
  assert got == ("10.130.0.2:8482", 4, 3, None)  # worker 0's address; no device restriction


def test_single_tpu_vm_is_one_process_unless_asked(monkeypatch, cluster_env):
  tpu_vm(monkeypatch, workers=1)
  assert not parallel.initialize_distributed() and cluster_env == []
  monkeypatch.setenv("DIFFUSION_DISTRIBUTED", "on")  # the override: jax detects what it can
  assert parallel.initialize_distributed() and cluster_env == [{}]


def test_gke_tpu_slice_and_no_metadata_query_off_a_tpu_vm(monkeypatch, cluster_env):
  from jax._src.clusters import cloud_tpu_cluster

  def no_network(key):
    raise AssertionError(f"metadata queried for {key} off a TPU VM")

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_network)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  assert parallel.detect_cluster() is None  # not a TPU VM: nothing asked
  tpu_vm(monkeypatch, workers=2)
  assert parallel.detect_cluster() == "gketpu"  # GKE's variable on a TPU VM wins, as in jax
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")

  def unreachable(key):
    raise ConnectionError("metadata.google.internal: connection refused")

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", unreachable)
  assert parallel.detect_cluster() is None  # a warning, one process; not a crash


def test_explicit_coordinator_is_passed_on(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  assert parallel.initialize_distributed(
    coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1
  )
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
  with pytest.raises(ValueError, match="auto, on or off"):
    parallel.initialize_distributed(mode="yes")
  monkeypatch.setenv("DIFFUSION_DISTRIBUTED", "always")
  with pytest.raises(ValueError, match=r"\$DIFFUSION_DISTRIBUTED\) must be auto, on or off"):
    parallel.initialize_distributed()
