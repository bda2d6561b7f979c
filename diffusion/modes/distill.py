"""`--mode distill`: consistency distillation (Song et al. 2023) of a trained workdir.

    python launch.py --config configs/X.py --mode distill --config.distill.teacher=TEACHER_DIR

The teacher is the EMA of TEACHER_DIR's newest checkpoint, trained with the same config (data
shape, model and process). The student starts from the teacher's EMA weights and is trained by
the ordinary training loop (diffusion/train.py: checkpoints, resume, signals, logs) on the
consistency-distillation loss of diffusion/objectives.py: adjacent Karras levels
(config.distill.num_scales), the teacher's ODE step between them (config.distill.solver), and a
target network that is an EMA of the student (config.distill.target_ema). The teacher's weights
and the target network live in the train state, so a relaunch resumes exactly.

The workdir defaults to the config's own (config.distill.teacher is part of its hash); sample it
with the same flags and --mode sample --config.sample.sampler=consistency (1-4 steps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from diffusion import checkpoints, data, posthoc_ema, storage, train
from diffusion.model import Diffusion

# Fields a student shares with its teacher (the network and how its outputs are read).
SHARED = {
  "data": ("image_size", "channels"),
  "diffusion": (
    "process",
    "schedule",
    "num_timesteps",
    "prediction",
    "continuous_time",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "variance",
  ),
}
_NOT_SHARED_MODEL = ("remat", "dtype", "attention_impl", "dropout")


def check(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The teacher's config.json, after checking that it can teach this config; ValueError or
  FileNotFoundError (one line, cause and fix) otherwise. Reads one small file."""
  teacher = config.distill.teacher
  if not teacher:
    raise ValueError(
      "--mode distill needs --config.distill.teacher=WORKDIR, the --workdir of a trained run."
    )
  if os.path.abspath(teacher) == os.path.abspath(workdir):
    raise ValueError("the student's --workdir is the teacher's; give the student its own.")
  path = os.path.join(teacher, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(
      f"{path} not found: config.distill.teacher must be the --workdir of a trained run."
    )
  saved = json.loads(storage.read_text(path))
  if saved["diffusion"].get("objective", "denoising") != "denoising":
    raise ValueError(f"the teacher in {teacher} is not a denoising model; distill one that is.")
  if config.diffusion.objective == "meanflow":
    raise ValueError("--mode distill trains a consistency model: leave config.diffusion.objective.")
  wanted = [(sec, k) for sec, keys in SHARED.items() for k in keys]
  wanted += [("model", k) for k in saved["model"] if k not in _NOT_SHARED_MODEL]
  for sec, k in wanted:
    mine, theirs = config[sec].get(k), saved[sec].get(k)
    if isinstance(mine, tuple | list):
      mine, theirs = list(mine), list(theirs)
    if mine != theirs:
      raise ValueError(
        f"the teacher in {teacher} has config.{sec}.{k}={theirs!r} but this config has "
        f"{mine!r}: set --config.{sec}.{k} to the teacher's (or use its config file)."
      )
  return saved


def student_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config the training loop runs: diffusion.objective = consistency, and its sample grids
  drawn by the consistency sampler (2 steps unless config.sample.sampler already is it)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.diffusion.objective = "consistency"
  if out.sample.sampler != "consistency":
    out.sample.update(sampler="consistency", num_steps=2)
  return out


def teacher_params(diffusion: Diffusion, teacher: str) -> tuple[int, Any]:
  """(step, EMA parameters) of the newest intact checkpoint in `teacher`, checked against the
  student's network (host NumPy)."""
  directory = os.path.join(teacher, "checkpoints")
  if not storage.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}: train the teacher first.")
  ckpt = checkpoints.Checkpointer(directory, read_only=True)
  try:
    if not ckpt.all_steps():
      raise FileNotFoundError(f"no complete checkpoint in {directory}: train the teacher first.")
    state = ckpt.restore_host()
    step = int(ckpt.restored_step)
  finally:
    ckpt.close()
  params = state["ema_params"]
  diffusion.check_params(params, f" at step {step} in {directory}")
  return step, params


def initial_state(config: ml_collections.ConfigDict, diffusion: Diffusion, teacher: Any):
  """The student's step-0 train state: parameters, EMA and target network all the teacher's."""
  opt = train.optimizer(config.train)
  state = train.initial_state(diffusion, opt, config.seed)  # the optimiser state and base key
  copy = lambda: jax.tree.map(np.array, teacher)
  sigma_rels = tuple(float(s) for s in config.train.posthoc_ema)
  return state.replace(
    params=copy(),
    ema_params=copy(),
    phema=posthoc_ema.init(copy(), sigma_rels) if sigma_rels else None,
    distill={"teacher": teacher, "target": copy()},
  )


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  dataset: data.Dataset | data.ShardDataset | None = None,
  on_start: Callable[[], None] | None = None,
):
  """Distils config.distill.teacher into `workdir` (resuming there); returns the final state.
  `on_start` as train.train's."""
  check(config, workdir)
  config = student_config(config)
  diffusion = Diffusion.from_config(config)
  _, teacher = teacher_params(diffusion, config.distill.teacher)
  state = initial_state(config, diffusion, teacher)
  return train.train(config, workdir, dataset=dataset, initial=state, on_start=on_start)
