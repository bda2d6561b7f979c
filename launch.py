"""Entry point: python launch.py --config configs/X.py [--config.a.b=value] [--workdir DIR].

Modes: `train` (resumes from --workdir's newest checkpoint). The workdir defaults to
runs/<config name>[-<arg>]-<hash of the config>: deterministic, so a relaunch resumes.
"""

from __future__ import annotations

import hashlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion import perf

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sprites.py",
                                          "Config file (configs/X.py or configs/X.py:arg).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: derived from config).")
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to do.")


def default_workdir(config_arg: str, config) -> str:
  """runs/<name>-<8 hex of the config's JSON>: the same config always maps to the same folder."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
  digest = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:8]
  return os.path.join("runs", f"{name}-{digest}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  perf.configure_xla()
  from diffusion import train  # after XLA flags are set

  config = _CONFIG.value
  train.maybe_initialize_distributed(config.train)
  workdir = _WORKDIR.value or default_workdir(
    config_flags.get_config_filename(flags.FLAGS["config"]), config)
  logging.info("workdir: %s", workdir)
  if _MODE.value == "train":
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  app.run(main)
