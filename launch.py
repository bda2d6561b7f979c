"""Entry point: python launch.py --config configs/X.py [--config.a.b=v] [--workdir DIR] [--mode M].

Modes:
  train     train, resuming from --workdir's newest checkpoint
  sample    images from a checkpoint (config.sample) -> samples/<tag>/ (grid, PNGs, npz, GIF)
  eval      bits/dim and sample quality (config.eval) -> eval/metrics.json, metrics.jsonl rows
  pictures  the forward process, the schedule and the loss curve -> pictures/
  posthoc   the post-hoc EMA of config.sample.ema="posthoc:<sigma_rel>" from the power-EMA
            snapshots of training -> posthoc/sigma_rel=<x>/ (then sample/eval with the same ema)
The workdir defaults to runs/<config name>[-<arg>]-<hash of the fields that can change training>:
deterministic, so a relaunch resumes and the other modes find the training run. train, sample
and eval run multi-host (config.train.distributed); pictures and posthoc are single-process jobs.

Exit codes: 0 done; 2 a user error (one line on stderr naming the cause and the fix; --debug
shows the traceback); 75 stopped by SIGTERM/SIGINT after saving a checkpoint (relaunch to
resume); anything else is a fault.
"""

from __future__ import annotations

import contextlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import common
from diffusion import runtime

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "configs/sprites.py",
  "Config file (configs/X.py or configs/X.py:arg).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: derived from config).")
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "sample", "eval", "pictures", "posthoc"], "What to do."
)
_DEBUG = flags.DEFINE_bool(
  "debug",
  bool(os.environ.get("DIFFUSION_DEBUG")),
  "Show tracebacks for user errors too (or set DIFFUSION_DEBUG=1).",
)
USER_ERROR, STOPPED = 2, 75


def check(config, mode: str) -> None:
  """Every check that needs no data and compiles nothing: registry names, shapes, batch sizes,
  step counts and intervals. Raises ValueError naming the field and the fix."""
  from diffusion import train
  from diffusion.model import Diffusion, SampleSettings

  t = config.train
  positive = {
    "train.batch_size": t.batch_size,
    "train.num_steps": t.num_steps,
    "train.log_every": t.log_every,
    "train.steps_per_call": t.steps_per_call,
    "train.grad_accum": t.grad_accum,
    "train.keep_checkpoints": t.keep_checkpoints,
    "sample.batch_size": config.sample.batch_size,
  }
  for field, value in positive.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{field} must be a positive integer, got {value!r}.")
  for field in ("checkpoint_every", "sample_every", "keep_every"):
    if t[field] < 0:
      raise ValueError(f"config.train.{field} must be >= 0 (0 = off), got {t[field]}.")
  Diffusion.from_config(config)
  SampleSettings.from_config(config.sample)
  train.optimizer(t)
  from diffusion.modes import posthoc

  posthoc.sigma_rel_of(config.sample.ema)
  if mode == "train":
    from diffusion import parallel

    parallel.fsdp_size(config.parallel.fsdp)  # divides the devices (after distributed start-up)
  if mode == "eval":
    from diffusion.modes import evaluate

    evaluate.parse_samplers(config.eval.samplers, config.sample)


def run(config, workdir: str, mode: str) -> None:
  import jax

  from diffusion import data, parallel, rundir, runlog, train  # after XLA flags are set

  runlog.quiet_library_logs()  # orbax's per-save INFO lines, in every mode
  if mode in ("train", "sample", "eval"):  # the modes that run on every device of every process
    t = config.train
    parallel.initialize_distributed(
      mode=t.distributed,
      coordinator_address=t.coordinator_address,
      num_processes=t.num_processes,
      process_id=t.process_id,
    )
  check(config, mode)
  lead = jax.process_index() == 0
  if lead:
    logging.info("workdir: %s (mode %s)", workdir, mode)
  if mode == "train":
    dataset = data.load(data.DataSpec(**config.data.to_dict()), split="train", stream=True)
    with rundir.Lock(workdir) if lead else contextlib.nullcontext():
      if lead:
        changed = rundir.record_config(workdir, common.as_dict(config))
        if changed:
          logging.info(
            "config.json: %s changed since the last launch (see %s)",
            ", ".join(changed),
            rundir.HISTORY,
          )
      train.train(config, workdir, dataset=dataset)
  elif mode == "sample":
    from diffusion.modes import sample

    logging.info("samples in %s", sample.run(config, workdir))
  elif mode == "eval":
    from diffusion.modes import evaluate

    evaluate.run(config, workdir)
    logging.info("results in %s", os.path.join(workdir, "eval", "metrics.json"))
  elif mode == "posthoc":
    from diffusion.modes import posthoc

    logging.info("post-hoc EMA in %s", posthoc.run(config, workdir))
  else:
    from diffusion.modes import pictures

    logging.info("pictures: %s", pictures.run(config, workdir))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.configure_xla()
  runtime.configure_compilation_cache()
  from diffusion import checkpoints, rundir, train

  config, mode = _CONFIG.value, _MODE.value
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or common.default_workdir(spec, config)
  user_errors = (
    ValueError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    rundir.WorkdirBusyError,
    checkpoints.ShapeMismatchError,
  )
  try:
    run(config, workdir, mode)
  except train.StoppedBySignal as e:
    logging.warning("%s", e)
    sys.exit(STOPPED)
  except user_errors as e:
    if _DEBUG.value:
      raise
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"error: {text} (--debug shows the traceback)", file=sys.stderr)
    sys.exit(USER_ERROR)


if __name__ == "__main__":
  runtime.relaunch_with_malloc_tunables()  # once, before anything is allocated
  app.run(main)
