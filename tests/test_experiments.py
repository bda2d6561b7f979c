"""experiments/ on fabricated workdirs: where sweep runs stand (experiments/sweep/state.py), the
local runner and the CLI skipping finished runs, config drift, a SLURM array task against a stub
srun, and the report (experiments/report/); then the benchmark. No training here: workdirs are
fabricated with metrics.jsonl, checkpoints/, eval/ and samples/. Expansion and naming are in
test_sweep_spec.py, the job scripts in test_sweep_cluster.py."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS
from PIL import Image

from configs import common
from experiments import report, sweep
from experiments.sweep import local

ABLATION = "configs/ablations/schedules.py"
REPO = sweep.REPO
# The runner starts its children with a preexec_fn (PR_SET_PDEATHSIG), so by fork; JAX, imported
# in this test process by other tests (never by the runner), warns about any fork.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


# ---- fabricated sweeps and workdirs -----------------------------------------------------------


@pytest.fixture
def two_run_config(tmp_path):
  """A config file with a two-run get_sweep() (linear vs cosine, 40 steps)."""
  path = tmp_path / "two.py"
  path.write_text(
    textwrap.dedent("""
    from configs import sprites

    def get_config(arg=None):
      c = sprites.get_config()
      c.train.num_steps = 40
      c.eval.samplers = "ddim:10,ddim:50"
      return c

    def get_sweep():
      return [{"diffusion.schedule": "linear"}, {"diffusion.schedule": "cosine"}]
  """)
  )
  return str(path)


def fabricate(
  run: sweep.Run,
  *,
  steps: int,
  losses=None,
  eval_results=None,
  bpd=None,
  samples: bool = True,
  checkpoint: bool = True,
) -> None:
  """A workdir as launch.py leaves it after `steps` steps (log every 10), optionally evaluated
  (eval rows in metrics.jsonl and eval/metrics.json)."""
  wd = sweep.local_path(run.workdir)
  os.makedirs(wd, exist_ok=True)
  logged = range(10, steps + 1, 10)
  losses = losses or [1.0 / (1 + s) for s in logged]
  with open(os.path.join(wd, "metrics.jsonl"), "w") as fh:
    for s, loss in zip(logged, losses, strict=True):
      fh.write(
        json.dumps(
          {
            "step": s,
            "loss": loss,
            "mse": loss / 2,
            "grad_norm": 0.5,
            "learning_rate": 1e-3,
            "images_per_sec": 100.0,
          }
        )
        + "\n"
      )
    for r in eval_results or []:
      fh.write(json.dumps({"step": steps, "mode": "eval", "bpd": bpd, **r}) + "\n")
  if checkpoint:
    os.makedirs(os.path.join(wd, "checkpoints", str(steps)), exist_ok=True)
  if samples:
    img = np.random.default_rng(steps).integers(0, 255, (66, 66, 3), dtype=np.uint8)
    os.makedirs(os.path.join(wd, "samples"), exist_ok=True)
    Image.fromarray(img).save(os.path.join(wd, "samples", f"step_{steps}.png"))
  if eval_results is not None:
    os.makedirs(os.path.join(wd, "eval"), exist_ok=True)
    with open(os.path.join(wd, "eval", "metrics.json"), "w") as fh:
      json.dump(
        {
          "step": steps,
          "bpd": bpd,
          "bpd_protocol": {"images": 64},
          "floor": {"fd": 0.5, "kid": 0.001, "swd": 0.01},
          "results": eval_results,
        },
        fh,
      )


def quality(fd10: float, fd50: float) -> list[dict]:
  return [
    {
      "sampler": "ddim",
      "num_steps": n,
      "nfe": n,
      "fd": fd,
      "kid": fd / 100,
      "swd": fd / 10,
      "fid": None,
      "inception_kid": None,
    }
    for n, fd in ((10, fd10), (50, fd50))
  ]


# ---- skipping and resuming --------------------------------------------------------------------


def test_status_of_fabricated_workdirs(tmp_path, two_run_config):
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  lin, cos = s.runs
  assert sweep.status(lin, True) == "new" and sweep.pending_modes(lin, True) == ["train", "eval"]
  fabricate(lin, steps=20)  # interrupted at step 20 of 40
  assert sweep.status(lin, True) == "partial" and sweep.pending_modes(lin, False) == ["train"]
  fabricate(lin, steps=40)
  assert sweep.status(lin, False) == "done" and sweep.pending_modes(lin, False) == []
  assert sweep.status(lin, True) == "trained" and sweep.pending_modes(lin, True) == ["eval"]
  fabricate(lin, steps=40, eval_results=quality(3, 2)[:1])  # ddim:50 missing
  assert sweep.pending_modes(lin, True) == ["eval"]
  fabricate(lin, steps=40, eval_results=quality(3, 2), bpd=4.0)
  assert sweep.status(lin, True) == "done"
  fabricate(cos, steps=40, checkpoint=False)  # logged the last row, killed before the save
  assert sweep.pending_modes(cos, False) == ["train"]


def test_rerun_skips_finished_and_relaunches_unfinished(
  tmp_path, two_run_config, monkeypatch, capsys
):
  s = sweep.expand(two_run_config, str(tmp_path))
  lin, cos = s.runs
  fabricate(lin, steps=40)
  fabricate(cos, steps=20)

  def fake_command(sw, run, mode, python=None):  # stands in for launch.py: finishes the run
    wd = sweep.local_path(run.workdir)
    row = json.dumps({"step": run.num_steps, "loss": 0.1})
    code = (
      f"import os; os.makedirs({wd!r} + '/checkpoints/{run.num_steps}', exist_ok=True); "
      f"open({wd!r} + '/metrics.jsonl', 'a').write({row!r} + '\\n'); "
      f"open({wd!r} + '/ran_{mode}', 'w'); print('resuming {run.name}')"
    )
    return [sys.executable, "-c", code]

  monkeypatch.setattr(local, "command", fake_command)
  results = sweep.LocalRunner(s, parallel=2).run(s.runs)
  assert [what for _, what in results] == ["skipped (finished)", "ran train"]
  assert not os.path.exists(os.path.join(lin.workdir, "ran_train"))
  assert os.path.exists(os.path.join(cos.workdir, "ran_train"))
  assert "resuming schedule=cosine" in open(os.path.join(cos.workdir, "sweep.log")).read()
  assert sweep.status(cos, False) == "done"
  # --only eval (TPU worker 0) on a run that has not finished training starts nothing.
  fresh = dataclasses.replace(lin, workdir=str(tmp_path / "fresh"))
  assert sweep.LocalRunner(s, only="eval").run([fresh]) == [
    (fresh, "eval waits for train to finish")
  ]
  # The CLI: the manifest written; a failing run, and one that stops early (a signal), reported.
  fabricate(cos, steps=20)
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", "exit(3)"])
  rc = sweep.main(["--config", two_run_config, "--root", str(tmp_path)])
  out = capsys.readouterr().out
  assert rc == 1 and "train failed (exit 3)" in out and "skipped (finished)" in out
  assert os.path.exists(os.path.join(s.root, "sweep.json"))
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", "exit(0)"])
  rc = sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--eval"])
  out = capsys.readouterr().out
  assert rc == 75 and "train stopped before its last step" in out  # and eval not started
  assert "eval ..." not in out.split("[1]", 1)[1]


def test_a_run_stopped_after_saving_is_interrupted_not_failed(
  tmp_path, two_run_config, monkeypatch, capsys
):
  """launch.py exits 75 when SIGTERM/SIGINT stopped training after a checkpoint (here a stand-in
  that exits 75): the runner reports the run as interrupted and resumable, not failed, and starts
  no eval."""
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  run = s.runs[0]
  fabricate(run, steps=20)
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", "exit(75)"])
  assert sweep.LocalRunner(s).run([run]) == [
    (run, "train interrupted (exit 75, checkpoint saved; rerun to resume)")
  ]
  out = capsys.readouterr().out
  assert "train interrupted" in out and "rerun to resume" in out
  assert "FAILED" not in out and "eval ..." not in out


def test_signal_endings_are_interrupted_and_the_cli_exits_75(
  tmp_path, two_run_config, monkeypatch, capsys
):
  """A child killed by SIGTERM before its handler ran (-15) is stopped, not failed; the CLI
  exits 75 (rerun to resume) when a run was interrupted, as launch.py does."""
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  run = s.runs[0]
  fabricate(run, steps=20)
  kill = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", kill])
  assert sweep.LocalRunner(s).run([run]) == [
    (run, "train interrupted (stopped by a signal; rerun to resume)")
  ]
  assert "FAILED" not in capsys.readouterr().out
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", "exit(75)"])
  assert sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--index", "0"]) == 75


def test_ctrl_c_waits_for_the_runs_and_a_live_lock_is_waited_for(
  tmp_path, two_run_config, monkeypatch, capsys
):
  """Ctrl-C (SIGINT to the runner: the children get their own from the terminal) leaves no
  traceback: the runner waits for the runs to save and reports them. A run whose workdir lock a
  live process holds (a killed runner's child still saving) is reported busy, not failed."""
  import signal
  import threading

  s = sweep.expand(two_run_config, str(tmp_path))
  run = s.runs[0]
  fabricate(run, steps=20)
  # The child runs until told to stop, after the runner has had its SIGINT (at any load).
  started, go = tmp_path / "started", tmp_path / "go"
  slow = (
    f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); t = time.time()\n"
    f"while not pathlib.Path({str(go)!r}).exists() and time.time() - t < 120: time.sleep(0.05)\n"
    "exit(75)"
  )
  monkeypatch.setattr(local, "command", lambda *a, **k: [sys.executable, "-c", slow])

  def interrupt() -> None:
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # as a terminal's Ctrl-C
    time.sleep(1.0)
    go.touch()

  threading.Thread(target=interrupt, daemon=True).start()
  # Whatever SIGINT did before (here: ignored, as in a job started with `&`), the runner's own
  # handler answers it while it runs, and the old one is back afterwards.
  old = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    (_, what), (_, second) = sweep.LocalRunner(s).run(s.runs)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, old)
  assert what.startswith("train interrupted") and second == "not started (stopping)", second
  assert "waiting for the runs to save" in capsys.readouterr().out
  from diffusion import rundir

  monkeypatch.setattr(local, "LOCK_WAIT_S", 0.2)
  log = os.path.join(sweep.local_path(run.workdir), "sweep.log")
  launches = open(log).read().count("\n==== ")
  with rundir.Lock(sweep.local_path(run.workdir)):
    ((_, what),) = sweep.LocalRunner(s).run([run])
  assert what.startswith(f"busy (pid {os.getpid()} on ")
  assert open(log).read().count("\n==== ") == launches  # nothing was started


def test_a_child_dies_with_a_killed_runner(tmp_path):
  """kill -9 of the runner: its child gets SIGTERM (PR_SET_PDEATHSIG) instead of training on
  as an orphan."""
  import signal
  import time

  code = textwrap.dedent(f"""
    import os, subprocess, sys, time
    from experiments.sweep import local
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             preexec_fn=local._die_with_parent(os.getpid()))
    open({str(tmp_path / "pid")!r}, "w").write(str(child.pid))
    time.sleep(60)
  """)
  runner = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
  deadline = time.time() + 60
  while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
    assert time.time() < deadline and runner.poll() is None
    time.sleep(0.05)
  child = int((tmp_path / "pid").read_text())
  runner.send_signal(signal.SIGKILL)
  runner.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
    if state == "Z":  # dead, waiting for init to reap it
      break
    time.sleep(0.05)
  else:
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the runner's child outlived it")


def test_dry_run_prints_what_is_left(tmp_path, two_run_config, capsys):
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  fabricate(s.runs[0], steps=40, eval_results=quality(3, 2), bpd=4.0)
  assert (
    sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--eval", "--dry_run"]) == 0
  )
  out = capsys.readouterr().out
  assert "[0] schedule=linear: done" in out and "[1] schedule=cosine: new" in out
  cmds = [line for line in out.splitlines() if line.startswith("python launch.py")]
  assert len(cmds) == 2 and all("schedule=cosine" in c for c in cmds)
  assert "--mode train" in cmds[0] and "--mode eval" in cmds[1]
  assert not os.path.exists(os.path.join(s.root, "sweep.json"))  # a dry run writes nothing
  assert "WARNING" not in out


def test_a_changed_config_file_is_flagged(tmp_path, two_run_config, capsys):
  s = sweep.expand(two_run_config, str(tmp_path))
  run = s.runs[0]
  fabricate(run, steps=40)
  cfg = common.load(two_run_config, run.overrides)
  with open(os.path.join(run.workdir, "config.json"), "w") as fh:
    fh.write(cfg.to_json(sort_keys=True, indent=2))
  assert sweep.config_drift(s, run) == []
  # Fields that cannot change training (configs.common.NOT_HASHED) and num_steps are no drift.
  cfg.train.num_steps, cfg.eval.num_images, cfg.train.log_every, cfg.data.data_dir = 10, 1, 7, "x"
  with open(os.path.join(run.workdir, "config.json"), "w") as fh:
    fh.write(cfg.to_json(sort_keys=True, indent=2))
  assert sweep.config_drift(s, run) == []
  cfg.train.learning_rate, cfg.model.dropout = 0.5, 0.3
  with open(os.path.join(run.workdir, "config.json"), "w") as fh:
    fh.write(cfg.to_json(sort_keys=True, indent=2))
  assert sweep.config_drift(s, run) == ["model.dropout", "train.learning_rate"]
  assert sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "[0] schedule=linear: done; WARNING" in out and "train.learning_rate" in out


# ---- the report -------------------------------------------------------------------------------


def test_report_from_a_two_run_sweep(tmp_path, two_run_config):
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  sweep.write_manifest(s)
  lin, cos = s.runs
  fabricate(lin, steps=40, losses=[0.9, 0.5, 0.4, 0.3], eval_results=quality(30.0, 20.0), bpd=4.5)
  fabricate(cos, steps=40, losses=[0.8, 0.4, 0.2, 0.1], eval_results=quality(25.0, 15.0), bpd=4.0)
  files = report.build(s.root, last=3)
  with open(files["report.csv"]) as fh:
    table = {row["run"]: row for row in csv.DictReader(fh)}
  assert set(table) == {"schedule=linear", "schedule=cosine"}
  row = table["schedule=cosine"]
  assert row["diffusion.schedule"] == "cosine" and row["step"] == "40"
  assert float(row["final_loss"]) == pytest.approx((0.4 + 0.2 + 0.1) / 3)
  assert float(row["bpd"]) == 4.0 and float(row["floor_fd"]) == 0.5
  assert float(row["fd ddim:10"]) == 25.0 and float(row["swd ddim:50"]) == 1.5
  assert "fid ddim:10" not in row  # no FID column without values
  with open(files["quality.csv"]) as fh:
    q = list(csv.DictReader(fh))
  assert len(q) == 4 and ("schedule=linear", "50", "20.0") in {
    (r["run"], r["nfe"], r["fd"]) for r in q
  }
  md = open(files["report.md"]).read()
  assert "| 1 | cosine | 40 |" in md and "**25**" in md and "**4**" in md
  for name, min_size in (
    ("loss.png", (500, 300)),
    ("quality.png", (500, 300)),
    ("samples.png", (300, 200)),
  ):
    with Image.open(files[name]) as im:
      assert im.width >= min_size[0] and im.height >= min_size[1]
      pixels = np.asarray(im.convert("RGB"))
      assert pixels.std() > 5  # something was drawn
  # The sample grid is pasted in, not just a placeholder.
  with Image.open(files["samples.png"]) as im:
    assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 200


def test_report_without_eval_results(tmp_path, two_run_config):
  s = sweep.expand(two_run_config, str(tmp_path))
  sweep.write_manifest(s)
  fabricate(s.runs[0], steps=40)
  fabricate(s.runs[1], steps=20, losses=[0.5, float("nan")], samples=False)  # diverging
  files = report.build(os.path.join(s.root, "sweep.json"))
  assert "quality.png" not in files and os.path.exists(files["loss.png"])
  with open(files["report.csv"]) as fh:
    rows = list(csv.DictReader(fh))
  assert rows[1]["step"] == "20" and rows[1]["bpd"] == "" and rows[0]["floor_fd"] == ""
  md = open(files["report.md"]).read()
  assert "No eval results yet" in md and "1 trained to their last step" in md


def test_report_reads_eval_rows_when_metrics_json_is_missing(tmp_path):
  run = sweep.Run(index=0, name="a", workdir=str(tmp_path / "a"), overrides={}, num_steps=40)
  fabricate(run, steps=40, eval_results=quality(9.0, 7.0), bpd=3.0)
  os.remove(tmp_path / "a" / "eval" / "metrics.json")
  data = report.load_run(str(tmp_path / "a"))
  assert data.eval["bpd"] == 3.0 and len(data.quality()) == 2
  files = report.build(str(tmp_path))  # a plain folder of workdirs, no manifest
  assert os.path.exists(files["quality.png"])


# ---- the benchmark ----------------------------------------------------------------------------


def test_benchmark_rows_flops_eval_pipeline_and_trace(tmp_path):
  """Two fake CPU devices, the tiny config, every row: FLOPs per image are the analytic count
  (diffusion/flops.py; training 3x the forward pass) and utilisation follows from it; XLA's own
  count covers both devices' shares (half of it would mean one device's); the training row counts
  the images of all steps of a call; the eval row gives the FID-50k time of its rate."""
  from diffusion import flops
  from diffusion.model import Diffusion

  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}",
    "DIFFUSION_MALLOC": "off",
  }
  # fmt: off
  args = [
    "--config", "configs/tiny.py", "--batch", "8", "--what", "train,fwd,sample,eval",
    "--sample_steps", "2", "--eval_sampler", "ddim", "--eval_steps", "2",
    "--features", "feature_net", "--steps_per_call", "2", "--peak_tflops", "0.001",
    "--repeats", "1", "--min_seconds", "0.05", "--warmup_seconds", "0",
    "--trace", str(tmp_path / "trace"),
  ]
  # fmt: on
  out = subprocess.run(
    [sys.executable, "experiments/benchmark.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {
    r["what"]: r
    for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
  }
  assert set(rows) == {"train", "forward", "sample:ddim", "eval:ddim:2+feature_net"}
  train, fwd, eval_row = rows["train"], rows["forward"], rows["eval:ddim:2+feature_net"]
  assert train["devices"] == 2 and train["malloc"] == "off" and train["steps_per_call"] == 2
  expected = flops.unet_forward(
    Diffusion.from_config(common.load("configs/tiny.py")).net, (8, 8, 3)
  )
  assert fwd["gflops_per_image"] == float(f"{expected / 1e9:.4g}")
  assert train["gflops_per_image"] == float(f"{3 * expected / 1e9:.4g}")
  assert 0.8 < train["xla_gflops_per_image"] / train["gflops_per_image"] < 2.0
  # 2 steps of 8 images per call
  assert train["images_per_s"] == pytest.approx(8 * train["steps_per_s"], rel=0.01)
  for r in rows.values():
    assert r["images_per_s"] > 0
    util = r["gflops_per_image"] * r["images_per_s"]  # GFLOP/s over 1 GFLOP/s peak
    assert r["utilisation"] == pytest.approx(util, rel=0.01, abs=1e-4)
  assert eval_row["nfe"] == 2 and eval_row["gflops_per_image"] > 2 * fwd["gflops_per_image"]
  minutes = 50_000 / eval_row["images_per_s"] / 60
  assert eval_row["fid50k_minutes"] == pytest.approx(minutes, rel=0.01, abs=0.01)
  assert "FID-50k (ddim, 2 network evaluations, feature_net)" in out.stdout
  assert glob.glob(str(tmp_path / "trace" / "**" / "*.xplane.pb"), recursive=True)
