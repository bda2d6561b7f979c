"""The design-space ablation on the 16x16 sprites: process x parameterisation, each model sampled by
the same sigma-space samplers at 10, 20 and 35 network evaluations.

Run:  python -m experiments.sweep --config configs/ablations/design_space.py:tiny --root runs --eval
      python -m experiments.report runs/design_space-tiny
      (without `:tiny` each arm is the sprites job of configs/sprites.py; add --dry_run to see the
      launch.py command lines first.)
Produces: one workdir per arm (e.g. runs/design_space-tiny/prediction=edm,process=edm) with
checkpoints, metrics.jsonl and eval/metrics.json scoring every sampler:steps entry below (in-house
FD, KID and SWD against held-out sprites), and the report's tables and plots.

Arms: cosine-VP with eps and with v (the DDPM family, discrete time), EDM (its process,
preconditioning and loss), rectified flow (uniform and logit-normal t) and VE with EDM's
preconditioning. Samplers on one karras grid (rho = 7) for every arm: Euler (= DDIM), Heun (EDM
Algorithm 1) and DPM-Solver++(2M); NFE = steps (Euler, DPM-Solver++) or 2 steps - 1 (Heun).
A single arm is an ordinary launch.py job:
  python launch.py --config configs/ablations/design_space.py --workdir /tmp/one \\
    --config.diffusion.process=edm --config.diffusion.prediction=edm
"""

from __future__ import annotations

import ml_collections

from configs import sprites

ARMS = (
  {"diffusion.process": "vp", "diffusion.prediction": "eps"},
  {"diffusion.process": "vp", "diffusion.prediction": "v"},
  {"diffusion.process": "edm", "diffusion.prediction": "edm"},
  {"diffusion.process": "ve", "diffusion.prediction": "edm"},
  {
    "diffusion.process": "flow",
    "diffusion.prediction": "flow",
    "diffusion.t_distribution": "uniform",
  },
  {
    "diffusion.process": "flow",
    "diffusion.prediction": "flow",
    "diffusion.t_distribution": "logit_normal",
  },
)
SAMPLERS = (
  "euler:10,euler:20,euler:35,heun:6,heun:10,heun:18,"
  "dpm_solver++:10,dpm_solver++:20,dpm_solver++:35"
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "" (each arm is the sprites job) or "tiny" (small arms for a 2-core CPU)."""
  c = sprites.get_config()
  c.diffusion.update(schedule="cosine", weighting="simple")
  c.sample.update(sampler="heun", num_steps=18, spacing="karras", clip_x0="none")
  c.eval.update(samplers=SAMPLERS, bpd_images=0)  # bits/dim exists for the discrete vp only
  if arg == "tiny":
    # The schedules ablation's tiny network (45k parameters), 3,000 steps of 32 sprites.
    sprites.tiny_network(c)
    c.train.update(
      batch_size=32, num_steps=3000, warmup_steps=100, log_every=50, checkpoint_every=1000
    )
    c.sample.update(num_images=16, batch_size=16)
    c.eval.update(num_images=256, reference_images=1024, batch_size=128, feature_steps=200)
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r} of configs/ablations/design_space.py; use '' or 'tiny'."
    )
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The arms as override dicts (dotted config keys)."""
  del arg
  return [dict(a) for a in ARMS]
