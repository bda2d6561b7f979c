"""`SampleSettings`: how images are drawn (config.sample's sampling fields, checked against the
sampler registry), and the class labels a sample run draws (config.sample.labels)."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from diffusion import denoiser, solvers


def _choice(field: str, value: str, known: tuple[str, ...] | list[str]) -> str:
  if value not in known:
    raise ValueError(f"unknown {field} {value!r}; set it to one of: {', '.join(known)}.")
  return value


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """How images are drawn: config.sample's sampling fields, checked."""

  sampler: str = "ddim"
  num_steps: int = 50
  spacing: str = "uniform"  # a timestep spacing (integer grid) or a sigma grid (karras, log)
  eta: float = 0.0
  guidance_scale: float = 1.0
  clip_x0: str = "clip"
  rho: float = 7.0  # karras grid
  sigma_min: float = 0.0  # sigma grids: 0 = the process's default range
  sigma_max: float = 0.0
  s_churn: float = 0.0  # the edm sampler (EDM Algorithm 2)
  s_tmin: float = 0.0
  s_tmax: float = 1e9
  s_noise: float = 1.0
  guidance_interval: tuple[float, float] = (0.0, 1e9)  # noise levels s where guidance applies

  def __post_init__(self):
    _choice("config.sample.spacing", self.spacing, (*solvers.SPACINGS, *solvers.GRIDS))
    if self.sampler in solvers.FEW_STEP:  # their own grids; 1..4 steps
      solvers.few_step_sigmas(self.sampler, self.num_steps, 0.002, 80.0)
    if self.sampler not in solvers.SOLVERS:
      raise ValueError(
        f"unknown sampler {self.sampler!r}; set config.sample.sampler to one of: "
        f"{', '.join(solvers.SOLVERS)}."
      )
    _choice("config.sample.clip_x0", self.clip_x0, denoiser.X0_CLIPS)
    if (
      len(self.guidance_interval) != 2 or not self.guidance_interval[0] <= self.guidance_interval[1]
    ):
      raise ValueError(
        f"config.sample.guidance_interval must be (lo, hi) with lo <= hi, got "
        f"{self.guidance_interval}; swap the two values."
      )
    if int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(
        f"config.sample.num_steps must be a positive integer, got {self.num_steps!r}."
      )

  @classmethod
  def from_config(
    cls,
    sample: ml_collections.ConfigDict,
    *,
    sampler: str | None = None,
    num_steps: int | None = None,
  ) -> SampleSettings:
    """config.sample's settings, with `sampler` / `num_steps` replaced when given."""
    floats = (
      "eta",
      "guidance_scale",
      "rho",
      "sigma_min",
      "sigma_max",
      "s_churn",
      "s_tmin",
      "s_tmax",
      "s_noise",
    )
    return cls(
      sampler=sampler or sample.sampler,
      num_steps=int(num_steps or sample.num_steps),
      spacing=sample.spacing,
      clip_x0=sample.clip_x0,
      guidance_interval=tuple(float(v) for v in sample.guidance_interval),
      **{k: float(sample[k]) for k in floats},
    )

  @property
  def nfe(self) -> int:
    """Network evaluations per image (guidance doubles the network passes, not this)."""
    return solvers.network_evaluations(self.sampler, self.num_steps)


def sample_labels(num_classes: int, n: int) -> np.ndarray:
  """int32 (n,) labels cycling through the classes (one row per class in a grid), or zeros."""
  return np.arange(n, dtype=np.int32) % max(num_classes, 1)


def resolve_labels(num_classes: int, spec: str, n: int) -> np.ndarray | None:
  """int32 (n,) class labels from config.sample.labels ("" = cycle 0..K-1, "3" or "1,4" = cycle
  these; K, the null class, samples unconditionally), or None for an unconditional model."""
  k, spec = num_classes, str(spec).strip()
  if k == 0:
    if spec:
      raise ValueError(
        f"config.sample.labels={spec!r} but the model is unconditional "
        "(config.model.num_classes=0); leave config.sample.labels empty."
      )
    return None
  if not spec:
    return np.arange(n, dtype=np.int32) % k
  try:
    values = [int(v) for v in spec.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
      f"config.sample.labels={spec!r}: use comma-separated integers such as '3' or '1,4'."
    ) from None
  bad = [v for v in values if not 0 <= v <= k]
  if bad or not values:
    raise ValueError(
      f"config.sample.labels={spec!r}: labels must lie in [0, {k - 1}] (or {k}, "
      f"the null class for unconditional samples); bad: {bad}."
    )
  return np.resize(np.asarray(values, np.int32), n)
