"""experiments/: sweep expansion and naming, skipping finished runs, the SLURM and TPU-pod job
scripts (rendered and run against stub srun/gcloud), and the report from fabricated workdirs.
No training here: workdirs are fabricated with metrics.jsonl, checkpoints/, eval/ and samples/."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from experiments import report, sweep

ABLATION = "configs/ablations/schedules.py"
REPO = sweep.REPO


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
  """A workdir as launch.py leaves it after `steps` steps (log every 10), optionally evaluated."""
  wd = sweep.local_path(run.workdir)
  os.makedirs(wd, exist_ok=True)
  losses = losses or [1.0 / (1 + s) for s in range(10, steps + 1, 10)]
  with open(os.path.join(wd, "metrics.jsonl"), "w") as fh:
    for s, loss in zip(range(10, steps + 1, 10), losses, strict=True):
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
    rng = np.random.default_rng(steps)
    img = rng.integers(0, 255, (66, 66, 3), dtype=np.uint8)
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


# ---- expansion and naming ---------------------------------------------------------------------


def test_product_grid_and_chain():
  axis = [{"a": 1}, {"a": 2, "p": {"s": 3}}]
  runs = sweep.product(axis, {"b": ["x", "y"], "c": [True]})
  assert runs == [
    {"a": 1, "b": "x", "c": True},
    {"a": 1, "b": "y", "c": True},
    {"a": 2, "p": {"s": 3}, "b": "x", "c": True},
    {"a": 2, "p": {"s": 3}, "b": "y", "c": True},
  ]
  assert sweep.grid({"a": [1, 2]}) == [{"a": 1}, {"a": 2}]
  assert sweep.chain([{"a": 1}], [{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]
  with pytest.raises(ValueError, match="both set"):
    sweep.product({"a": [1]}, {"a": [2]})
  with pytest.raises(TypeError, match="list of values"):
    sweep.grid({"a": "linear"})


def test_slug_is_readable_order_independent_and_distinct():
  a = {"diffusion.schedule": "cosine", "diffusion.prediction": "v"}
  b = {"diffusion.prediction": "v", "diffusion.schedule": "cosine"}
  assert sweep.slug(a) == sweep.slug(b) == "prediction=v,schedule=cosine"
  assert sweep.slug({}) == "base"
  nested = {"diffusion.schedule_params": {"image_size": 16}, "diffusion.schedule": "x"}
  assert sweep.slug(nested) == "schedule=x,image_size=16"
  # Same leaf under two keys: both written in full. Odd characters become "_".
  clash = {"data.image_size": 32, "diffusion.schedule_params.image_size": 16, "data.path": "/a b"}
  assert sweep.slug(clash) == (
    "data.image_size=32,path=_a_b,diffusion.schedule_params.image_size=16"
  )
  long = {f"k{i}": "x" * 20 for i in range(10)}
  assert len(sweep.slug(long)) <= 120 and sweep.slug(long) != sweep.slug({**long, "k0": "y"})


def test_ablation_expands_to_16_distinct_deterministic_runs(tmp_path):
  s1 = sweep.expand(f"{ABLATION}:tiny", str(tmp_path))
  s2 = sweep.expand(f"{ABLATION}:tiny", str(tmp_path))
  assert len(s1.runs) == 16 and [r.workdir for r in s1.runs] == [r.workdir for r in s2.runs]
  assert len({r.workdir for r in s1.runs}) == 16
  assert s1.root == os.path.join(str(tmp_path), "schedules-tiny")
  assert {r.overrides["diffusion.schedule"] for r in s1.runs} == {
    "linear",
    "cosine",
    "sigmoid",
    "logsnr_cosine_shifted",
  }
  assert {
    (r.overrides["diffusion.prediction"], r.overrides["diffusion.weighting"]) for r in s1.runs
  } == {("eps", "simple"), ("eps", "min_snr"), ("v", "simple"), ("v", "min_snr")}
  shifted = [r for r in s1.runs if r.overrides["diffusion.schedule"] == "logsnr_cosine_shifted"]
  assert all(r.overrides["diffusion.schedule_params"] == {"image_size": 16} for r in shifted)
  tiny_steps = s1.runs[0].num_steps
  assert sweep.expand(ABLATION, str(tmp_path)).runs[0].num_steps > tiny_steps
  assert sweep.expand(ABLATION, str(tmp_path)).root.endswith("schedules")
  # --set overrides reach every run and name the sweep folder.
  s3 = sweep.expand(f"{ABLATION}:tiny", str(tmp_path), common={"train.num_steps": 7})
  assert s3.name == "schedules-tiny+num_steps=7" and {r.num_steps for r in s3.runs} == {7}


def test_commands_carry_the_overrides_as_launch_flags(tmp_path):
  s = sweep.expand(f"{ABLATION}:tiny", "runs", common={"train.batch_size": 16})
  run = next(r for r in s.runs if r.overrides["diffusion.schedule"] == "logsnr_cosine_shifted")
  argv = sweep.command(s, run, "eval", python="python")
  assert argv[:3] == ["python", "launch.py", "--config"]
  assert argv[argv.index("--workdir") + 1] == run.workdir
  assert argv[argv.index("--mode") + 1] == "eval"
  assert "--config.diffusion.schedule=logsnr_cosine_shifted" in argv
  assert "--config.diffusion.schedule_params={'image_size': 16}" in argv
  assert "--config.train.batch_size=16" in argv
  # The rendered values parse back into the config the sweep checked.
  from ml_collections import config_flags  # noqa: F401  (the parser launch.py uses)

  cfg = sweep.resolve_config(f"{ABLATION}:tiny", {**s.common, **run.overrides})
  assert cfg.diffusion.schedule_params.to_dict() == {"image_size": 16}


def test_bad_overrides_fail_before_anything_runs(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
    "from configs import sprites\nget_config = sprites.get_config\n"
    "def get_sweep():\n  return [{'diffusion.schedul': 'cosine'}]\n"
  )
  with pytest.raises(KeyError, match="diffusion.schedul"):
    sweep.expand(str(bad), str(tmp_path))
  dup = tmp_path / "dup.py"
  dup.write_text(
    "from configs import sprites\nget_config = sprites.get_config\n"
    "def get_sweep():\n  return [{'seed': 1}, {'seed': 1}]\n"
  )
  with pytest.raises(ValueError, match="listed twice"):
    sweep.expand(str(dup), str(tmp_path))
  with pytest.raises(TypeError, match="does not fit"):
    sweep.expand(f"{ABLATION}:tiny", str(tmp_path), common={"train.num_steps": 1.5})


def test_manifest_round_trip(tmp_path, two_run_config):
  s = sweep.expand(two_run_config, str(tmp_path), eval=True)
  path = sweep.write_manifest(s)
  assert path == os.path.join(str(tmp_path), "two", "sweep.json")
  back = sweep.read_manifest(path)
  assert back.to_json() == s.to_json()
  m = json.load(open(path))
  assert m["num_runs"] == 2 and m["runs"][1]["overrides"] == {"diffusion.schedule": "cosine"}
  assert m["runs"][0]["workdir"].endswith("two/schedule=linear")


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
    code = (
      f"import json, os; os.makedirs({wd!r} + '/checkpoints/{run.num_steps}', exist_ok=True); "
      f"open({wd!r} + '/metrics.jsonl', 'a').write(json.dumps({{'step': {run.num_steps}, "
      f"'loss': 0.1}}) + '\\n'); open({wd!r} + '/ran_{mode}', 'w'); print('resuming {run.name}')"
    )
    return [sys.executable, "-c", code]

  monkeypatch.setattr(sweep, "command", fake_command)
  results = sweep.LocalRunner(s, parallel=2).run(s.runs)
  assert [what for _, what in results] == ["skipped (finished)", "ran train"]
  assert not os.path.exists(os.path.join(lin.workdir, "ran_train"))
  assert os.path.exists(os.path.join(cos.workdir, "ran_train"))
  assert "resuming schedule=cosine" in open(os.path.join(cos.workdir, "sweep.log")).read()
  # The CLI: exit status 0, the manifest written, a failing run reported with its log.
  assert sweep.status(cos, False) == "done"
  # --only eval (TPU worker 0) on a run that has not finished training starts nothing.
  fresh = dataclasses.replace(lin, workdir=str(tmp_path / "fresh"))
  assert sweep.LocalRunner(s, only="eval").run([fresh]) == [
    (fresh, "eval waits for train to finish")
  ]
  # The CLI: the manifest written; a failing run, and one that stops early (a signal), reported.
  fabricate(cos, steps=20)
  monkeypatch.setattr(sweep, "command", lambda *a, **k: [sys.executable, "-c", "exit(3)"])
  rc = sweep.main(["--config", two_run_config, "--root", str(tmp_path)])
  out = capsys.readouterr().out
  assert rc == 1 and "train failed (exit 3)" in out and "skipped (finished)" in out
  assert os.path.exists(os.path.join(s.root, "sweep.json"))
  monkeypatch.setattr(sweep, "command", lambda *a, **k: [sys.executable, "-c", "exit(0)"])
  rc = sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--eval"])
  out = capsys.readouterr().out
  assert rc == 1 and "train stopped before its last step" in out  # and eval not started
  assert "eval ..." not in out.split("[1]", 1)[1]


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
  cfg = sweep.resolve_config(two_run_config, run.overrides)
  with open(os.path.join(run.workdir, "config.json"), "w") as fh:
    fh.write(cfg.to_json(sort_keys=True, indent=2))
  assert sweep.config_drift(s, run) == []
  cfg.train.learning_rate, cfg.train.num_steps, cfg.eval.num_images = 0.5, 10, 1
  with open(os.path.join(run.workdir, "config.json"), "w") as fh:
    fh.write(cfg.to_json(sort_keys=True, indent=2))
  assert sweep.config_drift(s, run) == ["train.learning_rate"]  # not num_steps, not eval
  assert sweep.main(["--config", two_run_config, "--root", str(tmp_path), "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "[0] schedule=linear: done; WARNING" in out and "train.learning_rate" in out


# ---- cluster job scripts ----------------------------------------------------------------------


def _stub(bindir, name: str, calls_dir) -> None:
  """An executable that records its arguments, one per line, in a new file under `calls_dir`
  (a file per call: calls from parallel pods do not interleave)."""
  os.makedirs(calls_dir, exist_ok=True)
  path = os.path.join(bindir, name)
  with open(path, "w") as fh:
    fh.write(f'#!/bin/bash\nprintf \'%s\\n\' "$@" > "$(mktemp -p {calls_dir} call.XXXXXX)"\n')
  os.chmod(path, 0o755)


def _calls(calls_dir) -> list[list[str]]:
  """The recorded argument lists, oldest first; the records are removed."""
  files = sorted(glob.glob(os.path.join(calls_dir, "call.*")), key=os.path.getmtime)
  out = []
  for f in files:
    with open(f) as fh:
      out.append(fh.read().rstrip("\n").split("\n"))
    os.remove(f)
  return out


def test_slurm_dry_run_and_array_task(tmp_path, capsys):
  root = str(tmp_path / "runs")
  assert (
    sweep.main(
      [
        "--config",
        f"{ABLATION}:tiny",
        "--root",
        root,
        "--eval",
        "--slurm",
        "--dry_run",
        "--gpus_per_node",
        "4",
        "--partition",
        "gpu",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "#SBATCH --array=0-15\n" in text and "#SBATCH --ntasks-per-node=4" in text
  assert "#SBATCH --gpus-per-task=1" in text and "#SBATCH --partition=gpu" in text
  assert "srun" in text and "SLURM_ARRAY_TASK_ID" in text and "{{" not in text
  assert '--next "$MODE"' in text and "for MODE in train eval" in text
  assert not os.path.exists(os.path.join(root, "schedules-tiny"))
  # Submit for real with no sbatch here: the manifest and script are written.
  assert sweep.main(["--config", f"{ABLATION}:tiny", "--root", root, "--eval", "--slurm"]) == 0
  s = sweep.read_manifest(os.path.join(root, "schedules-tiny", "sweep.json"))
  script = os.path.join(s.root, "slurm.sbatch")
  assert os.path.exists(script) and os.path.isdir(os.path.join(s.root, "slurm"))
  # Run array task 13 against a stub srun: it gets run 13's train command; eval waits for it.
  bindir, calls_dir = tmp_path / "bin", tmp_path / "srun_calls"
  bindir.mkdir()
  _stub(bindir, "srun", calls_dir)
  env = {
    **os.environ,
    "PATH": f"{bindir}:{os.environ['PATH']}",
    "SLURM_ARRAY_TASK_ID": "13",
    "PYTHON": sys.executable,
  }
  run = s.runs[13]  # the shifted schedule: its dict-valued override survives the quoting
  assert run.overrides["diffusion.schedule_params"] == {"image_size": 16}

  def task() -> tuple[list[list[str]], str]:
    out = subprocess.run(["bash", script], env=env, check=True, capture_output=True, text=True)
    return _calls(calls_dir), out.stderr

  def check(argv: list[str], mode: str) -> None:
    # Training: every task of the allocation; eval: one process.
    srun = ["--kill-on-bad-exit=1"] if mode == "train" else ["--nodes=1", "--ntasks=1"]
    assert argv[: len(srun)] == srun
    argv = argv[len(srun) :]
    assert argv[1] == "launch.py"
    assert argv[argv.index("--workdir") + 1] == run.workdir
    assert argv[argv.index("--mode") + 1] == mode
    assert argv[argv.index("--config") + 1] == f"{ABLATION}:tiny"
    assert "--config.diffusion.schedule=logsnr_cosine_shifted" in argv
    assert "--config.diffusion.schedule_params={'image_size': 16}" in argv

  calls, err = task()
  assert len(calls) == 1 and "run 13: eval waits for train to finish" in err
  check(calls[0], "train")
  fabricate(run, steps=run.num_steps)  # trained: the task evaluates
  calls, err = task()
  assert len(calls) == 1 and "run 13: train already finished" in err
  check(calls[0], "eval")
  fabricate(
    run,
    steps=run.num_steps,
    eval_results=[
      {"sampler": "ddim", "num_steps": n, "nfe": n, "fd": 1.0, "kid": 0.1, "swd": 0.1}
      for n in (5, 20)
    ],
    bpd=5.0,
  )
  calls, err = task()  # finished: the task starts nothing
  assert calls == [] and "run 13: eval already finished" in err


def test_tpu_dry_run_and_script(tmp_path, capsys):
  assert (
    sweep.main(
      [
        "--config",
        f"{ABLATION}:tiny",
        "--root",
        "/mnt/runs",
        "--eval",
        "--tpu",
        "pod-a,pod-b",
        "--zone",
        "europe-west4-a",
        "--dry_run",
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  assert "--zone=europe-west4-a" in text and "{{" not in text
  assert text.count("run_on pod-a all ") == 8 and text.count("run_on pod-b all ") == 8
  assert text.count("run_on pod-a 0 ") == 8 and ") &" in text and 'wait "$PID"' in text
  # Run the rendered script with a stub gcloud: each run trains on all workers of its pod, then
  # evaluates on worker 0.
  script, calls_dir = tmp_path / "tpu.sh", tmp_path / "gcloud_calls"
  s = sweep.expand(f"{ABLATION}:tiny", "/mnt/runs", eval=True)
  script.write_text(sweep.tpu_script(s, "/mnt/runs", ["pod-a", "pod-b"], zone="z"))
  _stub(tmp_path, "gcloud", calls_dir)
  env = {**os.environ, "GCLOUD": str(tmp_path / "gcloud")}
  subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
  calls = _calls(calls_dir)
  assert len(calls) == 32
  seen = set()
  for argv in calls:
    assert argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--zone=z" in argv
    remote = next(a for a in argv if a.startswith("--command="))
    assert "python3 -m experiments.sweep --config configs/ablations/schedules.py:tiny" in remote
    assert "--root /mnt/runs" in remote and "--eval" in remote
    index, mode = remote.rsplit("--index ", 1)[1].split(" --only ")
    assert argv[4] == ("pod-a" if int(index) % 2 == 0 else "pod-b")
    assert f"--worker={'all' if mode == 'train' else '0'}" in argv
    seen.add((int(index), mode))
  assert seen == {(i, m) for i in range(16) for m in ("train", "eval")}


def test_one_pod_runs_one_after_another():
  s = sweep.expand(f"{ABLATION}:tiny", "/mnt/runs")
  text = sweep.tpu_script(s, "/mnt/runs", ["only"], zone="z")
  assert ") &" not in text and text.count("run_on only all ") == 16
  assert "--only eval" not in text  # no eval asked for


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
  assert row["fid ddim:10"] if "fid ddim:10" in row else True  # no FID column without values
  assert "fid ddim:10" not in row
  with open(files["quality.csv"]) as fh:
    q = list(csv.DictReader(fh))
  assert len(q) == 4 and {(r["run"], r["nfe"], r["fd"]) for r in q} >= {
    ("schedule=linear", "50", "20.0")
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


def test_layout_panels_follow_the_other_overrides():
  runs = [
    report.RunData(name=str(i), workdir="", overrides=o)
    for i, o in enumerate(
      sweep.product(
        [
          {"diffusion.schedule": "cosine"},
          {"diffusion.schedule": "shifted", "diffusion.schedule_params": {"image_size": 16}},
        ],
        {"diffusion.prediction": ["eps", "v"]},
      )
    )
  ]
  key, values, panel_keys, panels = report.layout(runs)
  assert key == "diffusion.schedule" and values == ["cosine", "shifted"]
  assert panel_keys == ["diffusion.prediction"]  # schedule_params follows the schedule
  assert [t for t, _ in panels] == ["prediction=eps", "prediction=v"]


# ---- the benchmark ----------------------------------------------------------------------------


def test_benchmark_counts_flops_over_all_devices_and_writes_a_trace(tmp_path):
  """Two fake CPU devices: the training step's FLOPs per image must count both devices' shares,
  so they come out near 3x the forward pass's (forward + backward), not half of that."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "DIFFUSION_MALLOC": "off"}
  out = subprocess.run(
    [sys.executable, "experiments/benchmark.py", "--config", "configs/sprites.py", "--batch", "8",
     "--what", "train,fwd,sample", "--sample_steps", "2", "--repeats", "1", "--min_seconds",
     "0.05", "--warmup_seconds", "0", "--trace", str(tmp_path / "trace"), "--config_overrides",
     "model.base_channels=8", "model.channel_mult=(1,2)", "model.attn_resolutions=()"],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {r["what"]: r for r in (json.loads(line) for line in out.stdout.splitlines()
                                 if line.startswith("{"))}
  assert set(rows) == {"train", "forward", "sample:ddim"}
  assert rows["train"]["devices"] == 2 and rows["train"]["malloc"] == "off"
  ratio = rows["train"]["gflops_per_image"] / rows["forward"]["gflops_per_image"]
  assert 2.5 < ratio < 4.0, ratio
  assert all(r["images_per_s"] > 0 for r in rows.values())
  assert glob.glob(str(tmp_path / "trace" / "**" / "*.xplane.pb"), recursive=True)
