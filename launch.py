"""Entry point: python launch.py --config configs/X.py [--config.a.b=v] [--workdir DIR] [--mode M].

Modes:
  train     train, resuming from --workdir's newest checkpoint
  sample    images from a checkpoint (config.sample) -> samples/<tag>/ (grid, PNGs, npz, GIF)
  eval      bits/dim and sample quality (config.eval) -> eval/metrics.json, metrics.jsonl rows
  pictures  the forward process, the schedule and the loss curve -> pictures/
  posthoc   the post-hoc EMA of config.sample.ema="posthoc:<sigma_rel>" from the power-EMA
            snapshots of training -> posthoc/sigma_rel=<x>/ (then sample/eval with the same ema)
  distill   consistency distillation of --config.distill.teacher=WORKDIR (docs/few_step.md)
The workdir defaults to runs/<config name>[-<arg>]-<hash of the fields that can change training>:
deterministic, so a relaunch resumes and the other modes find the training run. train, sample
and eval run multi-host (config.train.distributed); pictures and posthoc are single-process jobs.

Exit codes (docs/faults.md): 0 done; 2 a user error (one line on stderr naming the cause and the
fix, before anything is compiled or written; --debug shows the traceback); 75 stopped by
SIGTERM/SIGINT at any moment, with the lock released (training saves a checkpoint first; relaunch
to resume); 1 a fault (a failed save, a non-finite loss: one line; anything unexpected: its
traceback).
"""

from __future__ import annotations

import os
import signal
import sys

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FAULT, USER_ERROR, STOPPED = 1, 2, 75


def _stop_now(signum: int, frame) -> None:
  """SIGTERM/SIGINT outside the training loop (start-up, eval, sample, pictures): exit 75 at
  once with the workdir's lock released. Everything on disk survives a kill -9 (atomic writes,
  exact resume), so stopping at any point loses nothing; training's own handler replaces this
  one while it runs and saves first."""
  rundir = sys.modules.get("diffusion.rundir")
  if rundir is not None:
    rundir.release_locks()
  name = signal.Signals(signum).name
  try:  # stderr may be a pipe whose reader is gone (a killed sweep runner)
    os.write(2, f"\nstopped by {name}; relaunch the same command to go on.\n".encode())
  finally:
    os._exit(STOPPED)


if __name__ == "__main__":  # first thing: a signal during the imports below stops cleanly too
  for _sig in _STOP_SIGNALS:
    signal.signal(_sig, _stop_now)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held across the malloc re-exec

import contextlib  # noqa: E402
import logging as pylogging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import common  # noqa: E402
from diffusion import runtime  # noqa: E402

DEFAULT_CONFIG = os.path.join(common.REPO, "configs", "sprites.py")  # from any directory
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  DEFAULT_CONFIG,
  "Config file (configs/X.py or configs/X.py:arg).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: derived from config).")
_MODE = flags.DEFINE_enum(
  "mode", "train", ["train", "sample", "eval", "pictures", "posthoc", "distill"], "What to do."
)
_DEBUG = flags.DEFINE_bool(
  "debug",
  bool(os.environ.get("DIFFUSION_DEBUG")),
  "Show tracebacks for user errors too (or set DIFFUSION_DEBUG=1).",
)


def check(config, mode: str, workdir: str = "") -> None:
  """Every check that needs no data and compiles nothing: registry names, shapes, batch sizes,
  step counts and intervals, the fields a config file sets, and the combinations a later mode
  needs (sampling grid, labels, guidance). Raises ValueError naming the field and the fix."""
  from diffusion import data, evaluation, few_step, parameters, train
  from diffusion.model import Diffusion, SampleSettings, resolve_labels

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
  common.check_fields(config)
  data.DataSpec(**config.data.to_dict())
  from diffusion import autoencoding

  diffusion = None
  if autoencoding.is_autoencoder_run(config):
    if mode != "train":
      raise ValueError(
        f"--mode {mode} is for diffusion runs; an autoencoder run trains (--mode train) and "
        "then serves python -m diffusion.data.prepare --encode WORKDIR."
      )
    autoencoding.AutoencoderTask.from_config(config)
  else:
    if mode == "distill":
      from diffusion.modes import distill

      distill.check(config, workdir)
      config = distill.student_config(config)
    elif config.diffusion.objective == "consistency":
      raise ValueError(
        "config.diffusion.objective=consistency is set by --mode distill; for a consistency "
        "model run --mode distill --config.distill.teacher=WORKDIR (and sample with "
        "config.sample.sampler=consistency)."
      )
    diffusion = Diffusion.from_config(config)
    settings = SampleSettings.from_config(config.sample)
    diffusion.check_sampling(settings)
    few_step.check_sampler(diffusion, settings)
    resolve_labels(diffusion.num_classes, config.sample.labels, 1)
    if config.data.source == "latents":  # the autoencoder named and the latents' own
      autoencoding.run_autoencoder(config)
      if mode == "eval" and (config.eval.protocol == "heldout" or not config.eval.reference):
        from diffusion.evaluation import pixels

        pixels.spec_of(config)  # the pixel images the latents were encoded from can be reopened
  train.optimizer(t)
  parameters.sigma_rel_of(config.sample.ema)
  if mode == "train":
    from diffusion import parallel

    parallel.fsdp_size(config.parallel.fsdp)  # divides the devices (after distributed start-up)
  if mode == "eval":
    evaluation.check(config)
    for settings in evaluation.parse_samplers(config.eval.samplers, config.sample):
      few_step.check_sampler(diffusion, settings)


def run(config, workdir: str, mode: str) -> None:
  import jax

  from diffusion import data, parallel, rundir, runlog, train  # after XLA flags are set

  runlog.quiet_library_logs()  # orbax's per-save INFO lines, in every mode
  if mode in ("train", "distill", "sample", "eval"):  # the modes on every device of every process
    t = config.train
    parallel.initialize_distributed(
      mode=t.distributed,
      coordinator_address=t.coordinator_address,
      num_processes=t.num_processes,
      process_id=t.process_id,
    )
  check(config, mode, workdir)
  lead = jax.process_index() == 0
  if lead:
    logging.info("workdir: %s (mode %s)", workdir, mode)
    rundir.check_workdir(workdir)
  if mode in ("train", "distill"):
    dataset = data.load(data.DataSpec(**config.data.to_dict()), split="train", stream=True)
    with rundir.Lock(workdir) if lead else contextlib.nullcontext():
      as_json = common.as_dict(config)
      if lead:
        rundir.check_config(
          workdir, as_json, common.training_changes
        )  # refuses a changed config before any work

      def record() -> None:  # after the checkpoint is known to fit this config
        changed = rundir.record_config(workdir, as_json, common.training_changes) if lead else []
        if changed:
          logging.info(
            "config.json: %s changed since the last launch (see %s)",
            ", ".join(changed),
            rundir.HISTORY,
          )

      if mode == "distill":
        from diffusion.modes import distill

        distill.run(config, workdir, dataset=dataset, on_start=record)
      else:
        train.train(config, workdir, dataset=dataset, on_start=record)
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


def _config_args(argv: list[str]) -> tuple[str, list[str]]:
  """The --config spec and its --config.a.b=v overrides in `argv` (for error messages)."""
  spec, overrides, i = DEFAULT_CONFIG, [], 1
  while i < len(argv):
    a = argv[i]
    if a in ("--config", "-config") and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 1
    elif a.startswith("--config="):
      spec = a.partition("=")[2]
    elif a.startswith("--config."):
      if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        a, i = f"{a}={argv[i + 1]}", i + 1
      overrides.append(a if "=" in a else f"{a}=True")
    i += 1
  return spec, overrides


def _user_error(text: str) -> None:
  first, *rest = text.split("\n")  # a syntax error's line and caret follow the message
  print("\n".join([f"error: {first} (--debug shows the traceback)", *rest]), file=sys.stderr)
  sys.exit(USER_ERROR)


def _debug(argv: list[str]) -> bool:
  """--debug before absl has parsed it (errors of the flags themselves)."""
  return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv) or bool(
    os.environ.get("DIFFUSION_DEBUG")
  )


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with every error (unknown config field, bad value, a config file that
  is missing, has a syntax error or raises) as one line and exit 2; --debug re-raises."""
  spec, overrides = _config_args(argv)
  path, sep, arg = spec.partition(":")
  try:
    full = common.resolve_config_path(path)  # configs/X.py from any directory
    if full != path:  # DEFAULT_CONFIG is absolute: a relative path was given
      fixed = f"{full}{sep}{arg}"
      argv = [
        f"--config={fixed}"
        if a == f"--config={spec}"
        else fixed
        if a == spec and argv[i - 1] in ("--config", "-config")
        else a
        for i, a in enumerate(argv)
      ]
    return flags.FLAGS(argv)
  except Exception as e:
    if _debug(argv):
      raise
    try:  # the same load by configs.common, whose messages name the field and the fix
      common.load(spec, overrides)
    except (ValueError, KeyError, TypeError) as mine:
      _user_error(mine.args[0] if isinstance(mine, KeyError) and mine.args else str(mine))
    text = str(e).strip().splitlines()
    _user_error(text[-1] if text else type(e).__name__)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.configure_xla()
  runtime.configure_compilation_cache()
  # jax reports at INFO each platform it could not start (libtpu on every CPU machine); the
  # devices in use are logged with the model.
  pylogging.getLogger("jax._src.xla_bridge").setLevel(pylogging.WARNING)
  config, mode = _CONFIG.value, _MODE.value
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or common.default_workdir(spec, config)
  try:
    run(config, workdir, mode)
  except Exception as e:
    code, text = outcome(e)
    if code is None or (_DEBUG.value and code != STOPPED):
      raise
    if code == STOPPED:
      logging.warning("%s", text)
    elif code == USER_ERROR:
      _user_error(text)
    else:
      print(f"error: {text}", file=sys.stderr)
    sys.exit(code)


def outcome(e: Exception) -> tuple[int | None, str]:
  """(exit code, one-line message) of an exception out of `run`: STOPPED for a signal's save,
  FAULT for a failed save or a non-finite loss (relaunching may help), USER_ERROR for a setting
  or file to fix; None: an unexpected fault, shown with its traceback."""
  from diffusion import checkpoints, rundir, train

  user_errors = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    rundir.WorkdirBusyError,
    checkpoints.ShapeMismatchError,
  )
  if isinstance(e, train.StoppedBySignal):
    return STOPPED, str(e)
  if isinstance(e, checkpoints.CheckpointSaveError | train.NonFiniteLossError):
    return FAULT, str(e)
  if isinstance(e, user_errors):
    return USER_ERROR, e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return None, str(e)


if __name__ == "__main__":
  try:
    runtime.relaunch_with_malloc_tunables(hold_signals=_STOP_SIGNALS)  # before any allocation
  except ValueError as e:
    if _debug(sys.argv):
      raise
    _user_error(str(e))
  app.run(main, flags_parser=parse_flags)
