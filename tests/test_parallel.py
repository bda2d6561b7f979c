"""parallel.py: the shard_map step equals pmap on four devices, every device draws its own key,
and jax.distributed start-up follows the environment."""

import jax
import pytest
from conftest import run_python

from diffusion import parallel

PMAP_VS_SHARD_MAP = r"""
import jax, jax.numpy as jnp, numpy as np
from conftest import tiny_config
from diffusion import data, parallel, train
from diffusion.model import Diffusion
assert jax.device_count() == 4
c = tiny_config(batch_size=16, grad_accum=2, warmup_steps=0)  # lr > 0 from the first step
# A one-level network keeps the three compilations short; the step's parallel semantics are
# what is tested.
c.model.update(dropout=0.1, channel_mult=(1,), attn_resolutions=(), base_channels=8, num_groups=4)
diffusion, opt = Diffusion.from_config(c), train.optimizer(c.train)
state = train.initial_state(diffusion, opt, c.seed)
ds = data.load(data.DataSpec(**c.data.to_dict()))
local = [data.batch_at(ds, 0, global_batch=16, seed=0, local_devices=4)]
per_device = train.make_per_device_step(diffusion, opt, grad_accum=2)
mesh = parallel.make_mesh()
step = parallel.compile_step(per_device, mesh)
s1, m1 = step(parallel.replicate(state, mesh), parallel.global_batches(local, mesh))
pm = jax.pmap(parallel.unrolled(per_device), axis_name="data")
stack = lambda x: jnp.stack([x] * 4)
batches = {k: np.stack([b[k] for b in local], 1) for k in local[0]}  # (devices, k, b, ...)
s2, m2 = pm(jax.tree.map(stack, state), batches)
d = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b[0]))), s1, s2)
worst = max(jax.tree.leaves(d))
print("max abs diff", worst, "loss", np.asarray(m1["loss"]), np.asarray(m2["loss"][0]))
assert worst < 1e-6, worst
assert np.allclose(np.asarray(m1["loss"]), np.asarray(m2["loss"][0]), atol=1e-6)
assert int(s1.step) == 1
moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, state.params)
assert max(jax.tree.leaves(moved)) > 1e-5  # training changed the parameters
# Keys per device: with the same per-device batch on all four devices, the mean loss differs from
# device 0's alone (a key copied to every device would make all four losses equal).
same = [{k: np.stack([v[0]] * 4) for k, v in b.items()} for b in local]  # (4, b, ...)
_, m4 = step(parallel.replicate(state, mesh), parallel.global_batches(same, mesh))
one = jax.pmap(parallel.unrolled(per_device), axis_name="data", devices=jax.devices()[:1])
_, m1 = one(jax.tree.map(lambda x: x[None], state),
            {k: np.stack([b[k][:1] for b in same], 1) for k in same[0]})  # (1, k, b, ...)
print("four devices", np.asarray(m4["loss"]), "device 0", np.asarray(m1["loss"][0]))
assert np.all(np.abs(np.asarray(m4["loss"]) - np.asarray(m1["loss"][0])) > 1e-4)
print("OK")
"""


def test_shard_map_step_equals_pmap_on_four_devices():
  """One step with gradient accumulation (2 micro-batches) and dropout: the jit(shard_map) step
  equals jax.pmap of the same per-device function, and each device draws its own key."""
  r = run_python(["-c", "import sys; sys.path.insert(0, 'tests')\n" + PMAP_VS_SHARD_MAP], devices=4)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize(
  "env, mode, expected",
  [
    ({}, "auto", None),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "auto", None),  # an sbatch script itself
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, "auto", {}),  # srun: 4 tasks
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "auto", {}),
    ({"TPU_WORKER_HOSTNAMES": "a"}, "auto", None),  # one TPU host
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "auto", {}),
    ({}, "on", {}),
    ({"SLURM_STEP_NUM_TASKS": "4"}, "off", None),
  ],
)
def test_distributed_initialisation_follows_the_environment(monkeypatch, env, mode, expected):
  for var in (
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's CPU alone
  assert parallel.initialize_distributed(mode=mode) == (expected is not None)
  assert calls == ([] if expected is None else [expected])


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
