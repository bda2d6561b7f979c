"""FSDP: every mesh trains the same numbers (1 device; 8 devices with fsdp 8, and data 4 x fsdp 2
from a checkpoint), the state is split over fsdp, checkpoints resume on another mesh, sampling
takes sharded parameters, and a bad mesh is a one-line error. fsdp spanning two processes, with a
preemption and a resume: test_slurm_real.py."""

import os

import jax
import numpy as np
import pytest
from conftest import launch, run_python

from diffusion import parallel, sharding

# Dropout, gradient accumulation (2 micro-batches) and the EMA on; the learning rate > 0 from the
# first step; clipping on at every step (gradient norms ~0.7: the norm summed over shards scales
# the update); arrays of >= 16 elements split (the tiny U-Net's kernels; biases of 8 stay whole).
FLAGS = {
  "train.grad_clip": 0.5,
  "train.num_steps": 5,
  "train.batch_size": 16,
  "train.grad_accum": 2,
  "train.warmup_steps": 0,
  "train.log_every": 1,
  "train.checkpoint_every": 2,
  "model.dropout": 0.1,
  "parallel.fsdp_min_size": 16,
}

MESHES = r"""
import os, shutil, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from conftest import TINY_DIT, tiny_config
from test_fsdp import FLAGS, assert_close
from test_train import final_params, rows
from diffusion import parallel, sharding, train
from diffusion.model import Diffusion, SampleSettings

root, devices = sys.argv[1], jax.devices()
assert len(devices) == 8

def config(fsdp):
  c = tiny_config()
  for k, v in FLAGS.items():
    section, field = k.split(".")
    c[section][field] = v
  c.parallel.fsdp = fsdp
  return c

def run(name, n, fsdp):
  state = train.train(config(fsdp), f"{root}/{name}", mesh=parallel.make_mesh(fsdp, devices[:n]))
  logged = [(r["loss"], r["grad_norm"]) for r in rows(f"{root}/{name}")]
  return state, np.array(logged), final_params(f"{root}/{name}")[1]

one, losses, ref = run("one", 1, 1)
assert np.all(losses[:, 1] > 0.5), losses  # clipped at every step


def check_split(state, fsdp):  # each device holds 1/fsdp of every split array
  lay = parallel.layout(parallel.make_mesh(fsdp), 16)
  split = [x for x in jax.tree.leaves(state) if lay.leaf_dim(x) != sharding.REPLICATED]
  n_params = sum(lay.leaf_dim(x) != sharding.REPLICATED for x in jax.tree.leaves(state.params))
  assert len(split) == 4 * n_params and n_params > 5, (len(split), n_params)
  for x in split:
    d = lay.leaf_dim(x)
    assert x.addressable_shards[0].data.shape[d] == x.shape[d] // fsdp
  held = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards[:1])
  assert held == sharding.state_bytes(state, lay), (held, sharding.state_bytes(state, lay))


# fsdp 8 alone (data 4 x fsdp 2 runs in the elastic resume below).
state, got, params = run("f8", 8, 8)
print("f8 losses, gradient norms", got.tolist(), "vs", losses.tolist(), flush=True)
np.testing.assert_allclose(got, losses, rtol=1e-5)
assert_close(params["params"], ref["params"])
assert_close(params["ema_params"], ref["ema_params"])
check_split(state, 8)

# The DiT (no dropout in the network; label dropout): one device and fsdp=8 alike.
def dit(fsdp):
  c = config(fsdp)
  c.model.update(TINY_DIT, depth=1, num_classes=8)  # the sprites classes
  c.train.num_steps = 3
  return c

for name, n, fsdp in (("dit1", 1, 1), ("dit8", 8, 8)):
  train.train(dit(fsdp), f"{root}/{name}", mesh=parallel.make_mesh(fsdp, devices[:n]))
logged = lambda n: np.array([(r["loss"], r["grad_norm"]) for r in rows(f"{root}/{n}")])
got = [logged("dit1"), logged("dit8")]
print("dit losses, gradient norms", got[1].tolist(), "vs", got[0].tolist(), flush=True)
np.testing.assert_allclose(got[1], got[0], rtol=1e-5)
assert_close(final_params(f"{root}/dit8")[1], final_params(f"{root}/dit1")[1])

# Sampling with the parameters as training leaves them (split over fsdp=8): the same images as
# from host copies.
diffusion = Diffusion.from_config(config(8))
fn = diffusion.sample_fn(SampleSettings.from_config(config(8).sample))
labels, key = np.zeros(4, np.int32), jax.random.PRNGKey(3)
host = jax.tree.map(np.asarray, jax.device_get(state.ema_params))
np.testing.assert_allclose(
  np.asarray(fn(state.ema_params, key, labels, 4)), np.asarray(fn(host, key, labels, 4)), atol=1e-5
)

# Elastic resume: f8's checkpoint of step 2 (8 devices, fsdp=8) restored with data 4 x fsdp 2 and
# on one device: exactly, split as the mesh says. Data 4 x fsdp 2 (the data axis's gradient mean
# with an fsdp split) then trains on to the end of the uninterrupted run; on one device, training
# on from an exact state is run "one"'s program.
_, uninterrupted = final_params(f"{root}/f8")
for name, n, fsdp in (("e82", 8, 2), ("e1", 1, 1)):
  os.makedirs(f"{root}/{name}")
  shutil.copytree(f"{root}/f8/checkpoints/2", f"{root}/{name}/checkpoints/2")
  from diffusion import checkpoints
  ck = checkpoints.Checkpointer(f"{root}/{name}/checkpoints", read_only=True)
  mesh = parallel.make_mesh(fsdp, devices[:n])
  lay = parallel.layout(mesh, 16)
  d, o = Diffusion.from_config(config(fsdp)), train.optimizer(config(fsdp).train)
  shard = lambda t: parallel.shardings(t, mesh, lay)
  target = train.initial_state(d, o, 0, shardings=shard, shapes_only=True)
  restored = ck.restore(target, 2)
  saved = ck.restore_host(2)
  ck.close()
  flat = lambda t: {checkpoints._path(k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  restored, saved = flat(restored), flat(saved)
  assert sorted(restored) == sorted(saved)
  for k, a in restored.items():
    assert a.sharding.mesh == mesh and np.array_equal(np.asarray(a), saved[k]), k
  if fsdp == 1:
    continue
  state = train.train(config(fsdp), f"{root}/{name}", mesh=mesh)
  check_split(state, fsdp)
  step, got = final_params(f"{root}/{name}")
  assert step == 5
  assert_close(got, uninterrupted)
  print(name, "resumed", flush=True)
print("OK")
"""


def assert_close(a, b, rtol: float = 1e-5) -> None:
  """float32 trees equal up to reduction order: the relative L2 error of the whole tree below
  `rtol`, and no element off by more than rtol times the largest element (zero-initialised
  layers hold values ~1e-4 after a few steps, where a relative test per element is noise)."""
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)]).astype(np.float64)
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)]).astype(np.float64)
  assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), np.linalg.norm(x - y) / np.linalg.norm(
    y
  )
  assert np.max(np.abs(x - y)) <= rtol * np.max(np.abs(y)), np.max(np.abs(x - y))


def test_every_mesh_trains_the_same_parameters_and_resumes_elastically(tmp_path):
  """One 8-device process trains 5 steps on 1 device and on 8 with fsdp 8 (the same losses and
  parameters), checks the split, trains a DiT on 1 device and with fsdp 8 (the same), samples
  from split parameters, restores fsdp=8's step-2 checkpoint with data 4 x fsdp 2 and on one
  device, and trains on with data 4 x fsdp 2. (Gradient accumulation against one micro-batch:
  test_parallel.py.)"""
  r = run_python(["-c", MESHES, str(tmp_path)], devices=8, timeout=1800)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_split_rule_and_per_device_bytes():
  """The largest dimension divisible by fsdp (the last of equals), above the size threshold;
  integers and indivisible arrays whole; a device's bytes shrink fsdp-fold for split arrays."""
  lay = sharding.Layout(fsdp=4, min_size=64)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  assert lay.leaf_dim(f32(3, 3, 64, 128)) == 3
  assert lay.leaf_dim(f32(3, 3, 6, 6, 7)) == sharding.REPLICATED  # 1,134 elements, none divisible
  assert lay.leaf_dim(f32(8, 8)) == 1  # equals: the last
  assert lay.leaf_dim(f32(12, 5)) == sharding.REPLICATED  # 60 < min_size
  assert lay.leaf_dim(f32(200, 3)) == 0
  assert lay.leaf_dim(jax.ShapeDtypeStruct((256,), np.uint32)) == sharding.REPLICATED
  assert lay.spec(f32(3, 3, 64, 128)) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert lay.unsplit({"a": f32(3, 3, 6, 6, 7), "b": f32(8, 8)}) == [("['a']", (3, 3, 6, 6, 7))]
  tree = {"w": f32(256, 64), "b": f32(7, 3)}
  assert sharding.state_bytes(tree, lay) == 256 * 64 * 4 // 4 + 7 * 3 * 4
  assert sharding.state_bytes(tree, sharding.Layout(fsdp=1)) == (256 * 64 + 21) * 4


def test_fsdp_that_does_not_divide_the_devices_is_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"fsdp=3 does not divide the 4 devices; set it to one of"):
    parallel.fsdp_size(3, 4)
  assert parallel.fsdp_size(-1) == jax.local_device_count()
  r = launch(tmp_path, "--config.parallel.fsdp=3", devices=2)
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
  assert lines and "config.parallel.fsdp=3 does not divide the 2 devices" in lines[0], r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_clipping_matches_optax_and_takes_the_norm_it_is_given():
  import optax

  from diffusion.train_state import clip_by_global_norm

  rng = np.random.default_rng(0)
  tree = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.float32([2.0, -1.0])}
  norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in tree.values()))
  for max_norm in (0.5 * norm, 2.0 * norm):
    got, _ = clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    for k in tree:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  # A squared norm from elsewhere (the sum over a device's shards) sets the scale.
  got, _ = clip_by_global_norm(1.0, lambda g: np.float32(16.0)).update(tree, optax.EmptyState())
  np.testing.assert_allclose(got["a"], tree["a"] / 4, rtol=1e-6)
  assert clip_by_global_norm(1.0).init(tree) == optax.clip_by_global_norm(1.0).init(tree)
