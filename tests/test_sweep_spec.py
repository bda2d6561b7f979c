"""experiments/sweep/spec.py: expansion of a config's get_sweep() into runs, folder names,
launch.py command lines, the manifest; the sweep builders of configs.common that configs use;
the sweep and report packages import no JAX."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_python

from configs import common
from experiments import sweep

ABLATION = "configs/ablations/schedules.py"


def test_product_grid_and_chain():
  axis = [{"a": 1}, {"a": 2, "p": {"s": 3}}]
  runs = common.product(axis, {"b": ["x", "y"], "c": [True]})
  assert runs == [
    {"a": 1, "b": "x", "c": True},
    {"a": 1, "b": "y", "c": True},
    {"a": 2, "p": {"s": 3}, "b": "x", "c": True},
    {"a": 2, "p": {"s": 3}, "b": "y", "c": True},
  ]
  assert common.grid({"a": [1, 2]}) == [{"a": 1}, {"a": 2}]
  assert common.chain([{"a": 1}], [{"a": 1}, {"a": 2}]) == [{"a": 1}, {"a": 2}]
  with pytest.raises(ValueError, match="both set"):
    common.product({"a": [1]}, {"a": [2]})
  with pytest.raises(TypeError, match="list of values"):
    common.grid({"a": "linear"})


def test_slug_is_readable_order_independent_and_distinct():
  a = {"diffusion.schedule": "cosine", "diffusion.prediction": "v"}
  b = {"diffusion.prediction": "v", "diffusion.schedule": "cosine"}
  assert sweep.slug(a) == sweep.slug(b) == "prediction=v,schedule=cosine"
  assert sweep.slug({}) == "base"
  nested = {"diffusion.schedule_params": {"image_size": 16}, "diffusion.schedule": "x"}
  assert sweep.slug(nested) == "schedule=x,image_size=16"
  # Same leaf under two keys: both written in full. Odd characters become "_".
  clash = {"data.image_size": 32, "diffusion.schedule_params.image_size": 16, "data.path": "/a b"}
  assert sweep.slug(clash) == "data.image_size=32,path=_a_b,diffusion.schedule_params.image_size=16"
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


def test_commands_carry_the_overrides_as_launch_flags():
  s = sweep.expand(f"{ABLATION}:tiny", "runs", common={"train.batch_size": 16})
  run = next(r for r in s.runs if r.overrides["diffusion.schedule"] == "logsnr_cosine_shifted")
  argv = sweep.command(s, run, "eval", python="python")
  assert argv[:3] == ["python", "launch.py", "--config"]
  assert argv[argv.index("--workdir") + 1] == run.workdir
  assert argv[argv.index("--mode") + 1] == "eval"
  assert "--config.diffusion.schedule=logsnr_cosine_shifted" in argv
  assert "--config.diffusion.schedule_params={'image_size': 16}" in argv
  assert "--config.train.batch_size=16" in argv
  # The rendered values parse back (as launch.py's flags do) into the config the sweep checked.
  flags = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
  cfg = common.load(f"{ABLATION}:tiny", flags)
  assert cfg.diffusion.schedule_params.to_dict() == {"image_size": 16}
  assert cfg.train.batch_size == 16 and cfg.diffusion.schedule == "logsnr_cosine_shifted"
  with pytest.raises(ValueError, match="mode must be one of"):
    sweep.command(s, run, "sample")


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
  assert sorted(os.listdir(tmp_path)) == ["bad.py", "dup.py"]  # no folder was made


def test_manifest_round_trip_and_select(tmp_path):
  s = sweep.expand(f"{ABLATION}:tiny", str(tmp_path), eval=True)
  path = sweep.write_manifest(s)
  assert path == os.path.join(str(tmp_path), "schedules-tiny", "sweep.json")
  back = sweep.read_manifest(path)
  assert back.to_json() == s.to_json() and back.runs == s.runs
  m = json.load(open(path))
  assert m["num_runs"] == 16 and m["eval"] is True
  assert m["runs"][1]["overrides"] == s.runs[1].overrides
  assert m["runs"][0]["workdir"].endswith(
    "schedules-tiny/prediction=eps,schedule=linear,weighting=simple"
  )
  assert [r.index for r in sweep.select(s.runs, "0-2,7")] == [0, 1, 2, 7]
  assert len(sweep.select(s.runs, None)) == 16
  with pytest.raises(IndexError, match="out of range"):
    sweep.select(s.runs, "15-16")


def test_a_gs_root_stays_a_url():
  s = sweep.expand(f"{ABLATION}:tiny", "gs://bkt/runs/")
  assert s.root == "gs://bkt/runs/schedules-tiny"
  workdir = "gs://bkt/runs/schedules-tiny/prediction=eps,schedule=linear,weighting=simple"
  assert s.runs[0].workdir == sweep.local_path(workdir) == workdir
  argv = sweep.command(s, s.runs[0], "train")
  assert argv[argv.index("--workdir") + 1] == workdir


def test_sweep_and_report_import_no_jax():
  code = (
    "import sys; import experiments.sweep, experiments.report; "
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'orbax') "
    "or (m.startswith('diffusion.') and m not in ('diffusion.runlog', 'diffusion.storage', "
    "'diffusion.plots', 'diffusion.rundir')));"
    " print(bad); sys.exit(1 if bad else 0)"
  )
  out = run_python(["-c", code], timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  # The package runs as `python -m experiments.sweep`, with the same flags.
  out = run_python(
    ["-m", "experiments.sweep", "--config", f"{ABLATION}:tiny", "--dry_run", "--index", "3"],
    timeout=120,
  )
  assert out.returncode == 0, out.stderr
  assert "# sweep schedules-tiny: 16 runs" in out.stdout and "--mode train" in out.stdout


@pytest.mark.parametrize(
  "body, flags, message",
  [
    ("return [{'diffusion.schedul': 'cosine'}]", [], "no field 'diffusion.schedul'"),
    ("return [{'train.num_steps': 'many'}]", [], "train.num_steps='many' does not fit"),
    ("raise RuntimeError('boom')", [], "get_sweep() of"),
    ("return [{'seed': 1}, {'seed': 1}]", [], "listed twice"),
    ("return common.product({'seed': [1]}, {'seed': [2]})", [], "each key belongs to one axis"),
    ("return ['seed=1']", [], "run 0 is 'seed=1', not a dict"),
    ("return [{'seed': 1}]", ["--index", "x"], "--index 'x': give run numbers"),
    ("return [{'seed': 1}]", ["--index", "4"], "out of range"),
    ("return [{'seed': 1}]", ["--set", "seed"], "an override is key=value"),
  ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, body, flags, message):
  bad = tmp_path / "bad.py"
  bad.write_text(
    f"from configs import common, tiny\nget_config = tiny.get_config\ndef get_sweep():\n  {body}\n"
  )
  rc = sweep.main(["--config", str(bad), "--root", str(tmp_path), "--dry_run", *flags])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("error: ") and message in err, err
  assert len(err.strip().splitlines()) == 1


def test_cli_without_a_sweep_or_with_a_bad_manifest_is_exit_2(tmp_path, capsys):
  assert sweep.main(["--root", str(tmp_path)]) == 2
  assert "give --config" in capsys.readouterr().err
  assert sweep.main(["--manifest", str(tmp_path / "none.json")]) == 2
  assert "no such file" in capsys.readouterr().err
  (tmp_path / "m.json").write_text('{"runs": 3}')
  assert sweep.main(["--manifest", str(tmp_path / "m.json")]) == 2
  assert "is not a sweep manifest" in capsys.readouterr().err
  with pytest.raises(ValueError, match="not a sweep manifest"):  # --debug: the traceback
    sweep.main(["--manifest", str(tmp_path / "m.json"), "--debug"])
