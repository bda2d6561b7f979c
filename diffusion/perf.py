"""Default XLA settings for speed, applied before JAX starts its backends."""

from __future__ import annotations

import os

# XLA:CPU in jax 0.10 sends convolutions to YNNPACK, about half as fast as its Eigen path on
# the 2-core x86 machines measured (see README, Performance); this moves them back.
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)


def configure_xla() -> None:
  """Adds the default flags to XLA_FLAGS unless the user already set them. Call before the
  first JAX computation."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_FLAGS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
