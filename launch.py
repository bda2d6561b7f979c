"""Entry point: python launch.py --config configs/X.py [--config.a.b=v] [--workdir DIR] [--mode M].

Modes:
  train     train, resuming from --workdir's newest checkpoint
  sample    images from a checkpoint (config.sample) -> samples/<tag>/ (grid, PNGs, npz, GIF)
  eval      bits/dim and sample quality (config.eval) -> eval/metrics.json, metrics.jsonl rows
  pictures  the forward process, the schedule and the loss curve -> pictures/
The workdir defaults to runs/<config name>[-<arg>]-<hash of the config without its sample and
eval sections>: deterministic, so a relaunch resumes and the other modes find the training run.
Only `train` runs multi-host; the other modes are single-process jobs.
"""

from __future__ import annotations

import hashlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion import perf

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  "configs/sprites.py",
  "Config file (configs/X.py or configs/X.py:arg).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: derived from config).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "pictures"], "What to do.")
# Settings that never change the trained parameters: sampling, eval, logging, checkpoint cadence,
# where the data files live, prefetching, steps per call (the same steps, fused differently) and
# how the processes find each other.
_NOT_HASHED = ("sample", "eval", "data.prefetch", "data.data_dir", "data.cache_dir",
               "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.keep_every", "train.sample_every", "train.steps_per_call",
               "train.distributed", "train.coordinator_address", "train.num_processes",
               "train.process_id")


def default_workdir(config_arg: str, config) -> str:
  """runs/<name>-<8 hex of the config's JSON without the `_NOT_HASHED` fields>: the same training
  config always maps to the same folder, whatever the sampling, eval or logging settings."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
  trained = config.to_dict()
  for dotted in _NOT_HASHED:
    *parents, leaf = dotted.split(".")
    section = trained
    for p in parents:
      section = section.get(p, {})
    section.pop(leaf, None)
  text = config.__class__(trained).to_json(sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()[:8]
  return os.path.join("runs", f"{name}-{digest}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  perf.configure_xla()
  import jax

  from diffusion import evaluate, sample, train, visualize  # after XLA flags are set

  config, mode = _CONFIG.value, _MODE.value
  train.quiet_library_logs()  # orbax's per-save INFO lines, in every mode
  if mode == "train":
    train.maybe_initialize_distributed(config.train)
  workdir = _WORKDIR.value or default_workdir(
    config_flags.get_config_filename(flags.FLAGS["config"]), config
  )
  if jax.process_index() == 0:
    logging.info("workdir: %s (mode %s)", workdir, mode)
  if mode == "train":
    train.train_and_evaluate(config, workdir)
  elif mode == "sample":
    logging.info("samples in %s", sample.run(config, workdir))
  elif mode == "eval":
    evaluate.run(config, workdir)
    logging.info("results in %s", os.path.join(workdir, "eval", "metrics.json"))
  else:
    logging.info("pictures: %s", visualize.write_pictures(config, workdir))


if __name__ == "__main__":
  perf.relaunch_with_malloc_tunables()  # once, before anything is allocated (diffusion/perf.py)
  app.run(main)
