"""The data-parallel step, resume, faults and multi-host runs, on tiny models and CPU devices."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from diffusion import checkpoints, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # a ~50k-parameter model on 8x8 sprites: enough to exercise every path quickly
  "--config.data.image_size=8", "--config.data.num_sprites=512",
  "--config.model.base_channels=16", "--config.model.channel_mult=(1,2)",
  "--config.model.attn_resolutions=(4,)", "--config.model.num_groups=8",
  "--config.model.num_res_blocks=1",
  "--config.train.batch_size=8", "--config.train.log_every=2", "--config.train.warmup_steps=2",
  "--config.train.sample_every=0", "--config.sample.num_images=0",
]


def tiny_config(**train_overrides):
  c = default.get_config()
  c.data.update(image_size=8, num_sprites=512, prefetch=0)
  c.model.update(base_channels=16, channel_mult=(1, 2), attn_resolutions=(4,), num_groups=8,
                 num_res_blocks=1)
  c.train.update({"batch_size": 8, "log_every": 2, "warmup_steps": 2, "sample_every": 0,
                  **train_overrides})
  c.sample.update(num_images=0, num_steps=3)  # no sample grids unless a test asks
  return c


def run_script(code: str, devices: int, env_extra=None, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def launch(workdir, *flags, devices=1, env_extra=None, wait=True):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  cmd = [sys.executable, "launch.py", "--config", "configs/default.py", "--workdir", str(workdir),
         *TINY, *flags]
  if not wait:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def final_params(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    return step, ckpt.restore_host(step)
  finally:
    ckpt.close()


PMAP_VS_SHARD_MAP = r"""
import jax, jax.numpy as jnp, numpy as np
import sys; sys.path.insert(0, "tests")
from test_train import tiny_config
from diffusion import data, train
assert jax.device_count() == 4
c = tiny_config(batch_size=16, grad_accum=2)
c.model.dropout = 0.1
model, tx, sch = train.make_model(c), train.make_optimizer(c.train), train.make_schedule(c)
state = train.init_state(c, model, tx)
ds = data.load(c.data)
local = [data.batch_at(ds, s, global_batch=16, seed=0, local_devices=4) for s in range(2)]
per_device = train.make_per_device_step(c, model, tx, sch)
mesh = train.make_mesh()
s1, m1 = train.compile_step(per_device, mesh)(train.replicate(state, mesh),
                                              train.global_batches(local, mesh))
pm = jax.pmap(train.scan_steps(per_device), axis_name="data")
stack = lambda x: jnp.stack([x] * 4)
batches = {k: np.stack([b[k] for b in local], 1) for k in local[0]}  # (devices, k, b, ...)
s2, m2 = pm(jax.tree.map(stack, state), batches)
d = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b[0]))), s1, s2)
worst = max(jax.tree.leaves(d))
print("max abs diff", worst, "loss", np.asarray(m1["loss"]), np.asarray(m2["loss"][0]))
assert worst < 1e-6, worst
assert np.allclose(np.asarray(m1["loss"]), np.asarray(m2["loss"][0]), atol=1e-6)
assert int(s1.step) == 2
moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, state.params)
assert max(jax.tree.leaves(moved)) > 1e-5  # training changed the parameters
# Keys per device: with the same per-device batch on all four devices, the mean loss differs from
# device 0's alone (a key copied to every device would make all four losses equal).
same = [{k: np.stack([v[0]] * 4) for k, v in b.items()} for b in local]  # (4, b, ...)
_, m4 = train.compile_step(per_device, mesh)(train.replicate(state, mesh),
                                             train.global_batches(same, mesh))
one = jax.pmap(train.scan_steps(per_device), axis_name="data", devices=jax.devices()[:1])
_, m1 = one(jax.tree.map(lambda x: x[None], state),
            {k: np.stack([b[k][:1] for b in same], 1) for k in same[0]})  # (1, k, b, ...)
print("four devices", np.asarray(m4["loss"]), "device 0", np.asarray(m1["loss"][0]))
assert np.all(np.abs(np.asarray(m4["loss"]) - np.asarray(m1["loss"][0])) > 1e-4)
print("OK")
"""


def test_shard_map_step_equals_pmap_on_four_devices():
  r = run_script(PMAP_VS_SHARD_MAP, devices=4)
  assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_resume_is_bit_identical(tmp_path):
  full, part = tmp_path / "full", tmp_path / "part"
  train.train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=3), str(full))
  train.train_and_evaluate(tiny_config(num_steps=3, checkpoint_every=3), str(part))
  resumed = tiny_config(num_steps=6, checkpoint_every=3)
  resumed.sample.num_images = 4  # the end of training writes a grid
  train.train_and_evaluate(resumed, str(part))
  assert (part / "samples" / "step_6.png").exists()
  (s1, a), (s2, b) = final_params(full), final_params(part)
  assert s1 == s2 == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  rows = [json.loads(line) for line in open(part / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 3, 4, 6]  # every 2 steps, and at the end of each run
  assert {"loss", "learning_rate", "grad_norm", "images_per_sec"} <= set(rows[0])


def test_several_steps_per_call_match_one_and_fire_at_crossed_boundaries(tmp_path):
  """k steps per call train the same parameters (up to float rounding: XLA fuses the unrolled
  steps differently); logs, saves and grids fire at the end of a call that crossed a multiple of
  their interval, and at the end of training."""
  got = {}
  for k, rows in ((1, [2, 4, 5]), (3, [3, 5])):
    c = tiny_config(num_steps=5, steps_per_call=k, checkpoint_every=2, sample_every=2)
    c.sample.num_images = 4
    train.train_and_evaluate(c, str(tmp_path / str(k)))
    run = tmp_path / str(k)
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == rows
    assert sorted(os.listdir(run / "samples")) == [f"step_{s}.png" for s in rows]
    assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == rows
    got[k] = final_params(run)
  (s1, a), (s3, b) = got[1], got[3]
  assert s1 == s3 == 5
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_kill_during_save_then_resume_matches_uninterrupted(tmp_path):
  steps = 12
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  flags = [f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1"]
  assert launch(ref, *flags).returncode == 0
  proc = launch(killed, *flags, wait=False)
  deadline, caught = time.time() + 240, False
  while time.time() < deadline and proc.poll() is None:
    tmp = glob.glob(str(killed / "checkpoints" / "*tmp*"))
    if tmp and glob.glob(str(killed / "checkpoints" / "[0-9]*")):
      os.kill(proc.pid, signal.SIGKILL)  # mid-save, with an earlier checkpoint complete
      caught = True
      break
    time.sleep(0.002)
  proc.wait()
  assert caught, "the run finished before a save could be interrupted"
  r = launch(killed, *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  (s1, a), (s2, b) = final_params(ref), final_params(killed)
  assert s1 == s2 == steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_stops(tmp_path):
  proc = launch(tmp_path, "--config.train.num_steps=100000", "--config.train.checkpoint_every=0",
                wait=False)
  deadline = time.time() + 120
  metrics = tmp_path / "metrics.jsonl"  # created empty before step 1; wait for a logged row
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  step, _ = final_params(tmp_path)
  assert 0 < step < 100000 and "Relaunch with the same --workdir" in out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  train.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=1), str(tmp_path))
  c = tiny_config(num_steps=5, checkpoint_every=1, learning_rate=float("nan"))
  with pytest.raises(train.NonFiniteLossError, match="step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  step, state = final_params(tmp_path)
  assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_non_finite_step_between_logs_is_caught_before_the_final_save(tmp_path):
  # No log, checkpoint or sample boundary before the end: the flags are checked one call late.
  train.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), str(tmp_path))
  c = tiny_config(num_steps=7, checkpoint_every=100, log_every=100, learning_rate=float("nan"))
  with pytest.raises(train.NonFiniteLossError, match="step 3.*last good checkpoint is step 2"):
    train.train_and_evaluate(c, str(tmp_path))
  step, state = final_params(tmp_path)
  assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
  train.train_and_evaluate(tiny_config(num_steps=1), str(tmp_path))
  c = tiny_config(num_steps=2)
  c.model.base_channels = 24
  want = r"(?s)another shape.*conv_in/kernel: checkpoint \(3, 3, 3, 16\) vs model \(3, 3, 3, 24\)"
  with pytest.raises(checkpoints.ShapeMismatchError, match=want):
    train.train_and_evaluate(c, str(tmp_path))


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of"):
    data.check_batch(10, 4, 1)


def test_ema_and_learning_rate_schedule():
  c = tiny_config(num_steps=100, warmup_steps=10, learning_rate=1e-3, lr_schedule="cosine")
  lr = train.learning_rate(c.train)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3) and float(lr(100)) == pytest.approx(0.0, abs=1e-9)



def test_ema_follows_the_warmed_up_decay():
  """Three real steps: ema_{n+1} = d_n ema_n + (1 - d_n) params_{n+1} with
  d_n = min(ema_decay, (1 + n) / (10 + n)), i.e. 0.1, 2/11, 3/12 (the first EMA is mostly the new
  parameters); without warm-up d = ema_decay throughout."""
  for warm in (True, False):
    c = tiny_config(ema_decay=0.999, ema_warmup=warm)
    model, tx, schedule = train.make_model(c), train.make_optimizer(c.train), \
      train.make_schedule(c)
    mesh = train.make_mesh()
    state = train.replicate(train.init_state(c, model, tx), mesh)
    step = train.compile_step(train.make_per_device_step(c, model, tx, schedule), mesh)
    rng = np.random.default_rng(0)
    host = lambda tree: [np.asarray(jax.device_get(x.addressable_data(0)), np.float64)
                         for x in jax.tree.leaves(tree)]
    ema = host(state.params)
    for n in range(3):
      local = [{"image": rng.integers(0, 256, (1, 8, 8, 8, 3), np.uint8),
                "label": np.zeros((1, 8), np.int32)}]
      state, _ = step(state, train.global_batches(local, mesh))
      d = min(0.999, (1 + n) / (10 + n)) if warm else 0.999
      ema = [d * e + (1 - d) * p for e, p in zip(ema, host(state.params), strict=True)]
      for want, got in zip(ema, host(state.ema_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


TWO_HOSTS = r"""
import os, sys
pid = int(sys.argv[1])
sys.argv = ["launch.py", "--config", "configs/default.py", "--workdir", sys.argv[2],
            "--config.train.coordinator_address=127.0.0.1:" + sys.argv[3],
            "--config.train.num_processes=2", f"--config.train.process_id={pid}"] + sys.argv[4:]
sys.path.insert(0, ".")
import runpy; runpy.run_path("launch.py", run_name="__main__")
"""


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  import socket

  flags = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2",
           "--config.train.batch_size=16"]
  assert launch(tmp_path / "one", *flags, devices=4).returncode == 0
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, str(i), str(tmp_path / "two"), port,
                             *TINY, *flags], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  (s1, a), (s2, b) = final_params(tmp_path / "one"), final_params(tmp_path / "two")
  assert s1 == s2 == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert (tmp_path / "two" / "metrics.jsonl").exists()


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """A preemption signal may reach one process only; both must stop at the same step and save
  together (each alone would wait forever in the other's collective)."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  flags = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=0",
           "--config.train.batch_size=16"]
  procs = [subprocess.Popen([sys.executable, "-c", TWO_HOSTS, str(i), str(tmp_path), port,
                             *TINY, *flags], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
  step, _ = final_params(tmp_path)
  assert 0 < step < 100000 and step % 2 == 0  # a log step (log_every=2)
  assert "Relaunch with the same --workdir" in outs[0]


def test_bfloat16_compute_trains_with_float32_parameters(tmp_path):
  c = tiny_config(num_steps=2, checkpoint_every=0)
  c.model.dtype = "bfloat16"
  state = train.train_and_evaluate(c, str(tmp_path))
  assert int(jax.device_get(state.step)) == 2
  for tree in (state.params, state.ema_params):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 2 and 0.0 < rows[-1]["loss"] < 10.0
  # The TensorBoard events hold the same scalars (records: length, crc, Event proto, crc).
  from tensorboardX.proto import event_pb2

  (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  raw, pos, scalars = open(events, "rb").read(), 0, {}
  while pos < len(raw):
    n = int.from_bytes(raw[pos:pos + 8], "little")
    event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
    pos += 16 + n
    for v in event.summary.value:
      scalars[(v.tag, event.step)] = v.simple_value
  for tag in ("loss", "learning_rate", "grad_norm", "images_per_sec"):
    assert scalars[(tag, 2)] == pytest.approx(rows[-1][tag], rel=1e-6), tag


def test_eta_shows_days_past_24_hours():
  assert train._duration(3 * 3600 + 4 * 60 + 5) == "03:04:05"
  assert train._duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5.9) == "2d 03:04:05"


@pytest.mark.parametrize("env, mode, expected", [
  ({}, "auto", None),
  ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "auto", None),  # an sbatch script itself
  ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, "auto", {}),  # srun: 4 tasks
  ({"TPU_WORKER_HOSTNAMES": "a,b"}, "auto", {}),
  ({"TPU_WORKER_HOSTNAMES": "a"}, "auto", None),  # one TPU host
  ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "auto", {}),
  ({}, "on", {}),
  ({"SLURM_STEP_NUM_TASKS": "4"}, "off", None),
])
def test_distributed_initialisation_follows_the_environment(monkeypatch, env, mode, expected):
  for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's CPU alone
  c = tiny_config(distributed=mode)
  assert train.maybe_initialize_distributed(c.train) == (expected is not None)
  assert calls == ([] if expected is None else [expected])


def test_explicit_coordinator_is_passed_on(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  c = tiny_config(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert train.maybe_initialize_distributed(c.train)
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
  with pytest.raises(ValueError, match="auto, on or off"):
    train.maybe_initialize_distributed(tiny_config(distributed="yes").train)
