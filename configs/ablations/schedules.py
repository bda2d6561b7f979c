"""Noise-schedule ablation on the 16x16 sprites: 4 schedules x {eps, v} x {uniform, min-SNR}.

Run:  python -m experiments.sweep --config configs/ablations/schedules.py --root runs --eval
      python -m experiments.report runs/schedules
      (`configs/ablations/schedules.py:tiny` runs the same 16 runs, smaller: with --parallel 2
      and --eval 8 min 35 s measured on an idle 2-core CPU; add --dry_run to see the 16
      launch.py command lines first.)
Produces: runs/schedules/sweep.json (the manifest), one workdir per run named by its overrides
(e.g. runs/schedules/prediction=v,schedule=cosine,weighting=min_snr) with checkpoints,
metrics.jsonl, sample grids and eval/metrics.json; the report writes runs/schedules/report/
(report.md, report.csv, loss curves, quality against network evaluations, sample grids).

The schedules are `linear` (DDPM), `cosine` (improved DDPM), `sigmoid` (Chen 2023) and
`logsnr_cosine_shifted` (simple diffusion's cosine in log-SNR, shifted for the image size),
crossed with eps/v prediction and uniform ("simple") or min-SNR-5 loss weighting. Everything
else is configs/sprites.py. A single run of the grid is an ordinary launch.py job:
  python launch.py --config configs/ablations/schedules.py --workdir /tmp/one \\
    --config.diffusion.schedule=sigmoid --config.diffusion.prediction=v
"""

from __future__ import annotations

import ml_collections

from configs import sprites

SCHEDULES = ("linear", "cosine", "sigmoid", "logsnr_cosine_shifted")
PREDICTIONS = ("eps", "v")
WEIGHTINGS = ("simple", "min_snr")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: "" (each run is the sprites job as configs/sprites.py sets it) or "tiny" (16 small
  runs for a 2-core CPU)."""
  c = sprites.get_config()
  # Sampling pinned here, not inherited: timesteps evenly spaced in t, so that where a schedule
  # puts its noise levels also shapes its samples. Quality against sampling cost: two samplers,
  # each at a few step counts.
  c.sample.update(sampler="ddim", spacing="uniform", num_steps=50, eta=0.0)
  c.eval.samplers = "ddim:10,ddim:25,ddim:50,dpm_solver++:10,dpm_solver++:20"
  if arg == "tiny":
    # A 45k-parameter U-Net, 200 steps of 16 sprites and T = 250 (bits/dim costs T network
    # evaluations per image): each run trains in well under a minute on 2 CPU cores, mostly
    # compiling. Enough to rank the loss curves and exercise eval, not to draw good sprites.
    sprites.tiny_network(c)
    c.diffusion.num_timesteps = 250
    c.train.update(
      batch_size=16, num_steps=200, warmup_steps=20, log_every=10, checkpoint_every=200
    )
    c.sample.update(num_steps=20, num_images=16, batch_size=16)
    c.eval.update(
      samplers="ddim:5,ddim:20",
      num_images=128,
      reference_images=512,
      batch_size=128,
      bpd_images=16,
      bpd_batch_size=16,
      feature_steps=100,
    )
  elif arg:
    raise ValueError(
      f"unknown variant {arg!r} of configs/ablations/schedules.py; use '' or 'tiny'."
    )
  return c


def get_sweep(arg: str | None = None) -> list[dict]:
  """The 16 runs: schedule x prediction x weighting, as override dicts (dotted config keys)."""
  from configs.common import product

  size = get_config(arg).data.image_size
  schedules = [{"diffusion.schedule": name} for name in SCHEDULES[:-1]]
  # The shifted family needs the image size (shift = 2 log(64 / size)). The whole params dict is
  # one override, since a locked config cannot gain keys one by one.
  schedules.append(
    {"diffusion.schedule": SCHEDULES[-1], "diffusion.schedule_params": {"image_size": size}}
  )
  return product(
    schedules, {"diffusion.prediction": list(PREDICTIONS), "diffusion.weighting": list(WEIGHTINGS)}
  )
