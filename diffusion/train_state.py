"""The train state, the optimiser with its learning-rate schedule, and the parameter EMA."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from diffusion import posthoc_ema

LR_SCHEDULES = ("constant", "cosine")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  ema_params: Any
  opt_state: Any
  key: jax.Array  # base PRNG key (uint32[2]); never split in place
  phema: posthoc_ema.PowerEMAState | None = None  # post-hoc EMA profiles (None: not tracked)
  # consistency distillation: {"teacher": params (fixed), "target": params (an EMA)}; else None
  distill: Any = None


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """AdamW with global-norm clipping, linear warm-up then constant or cosine decay, and an EMA
  of the parameters (config.train's fields of the same names)."""

  learning_rate: float = 2e-4
  warmup_steps: int = 500
  lr_schedule: str = "constant"
  num_steps: int = 10_000
  grad_clip: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  ema_decay: float = 0.9999
  ema_warmup: bool = True

  def __post_init__(self):
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(
        f"unknown config.train.lr_schedule {self.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}."
      )
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      raise ValueError(
        f"config.train.learning_rate must be a finite number > 0, got {self.learning_rate}; "
        "e.g. 2e-4."
      )
    if not 0.0 <= self.ema_decay <= 1.0:
      raise ValueError(f"config.train.ema_decay must lie in [0, 1], got {self.ema_decay}.")
    if self.warmup_steps < 0:
      raise ValueError(f"config.train.warmup_steps must be >= 0, got {self.warmup_steps}.")

  def schedule(self) -> optax.Schedule:
    """Linear warm-up to the peak, then constant or cosine decay to 0 at num_steps."""
    warm = optax.linear_schedule(0.0, self.learning_rate, max(self.warmup_steps, 1))
    if self.lr_schedule == "constant":
      after = optax.constant_schedule(self.learning_rate)
    else:
      after = optax.cosine_decay_schedule(
        self.learning_rate, max(self.num_steps - self.warmup_steps, 1)
      )
    return optax.join_schedules([warm, after], [self.warmup_steps])

  def transform(
    self, sum_squares: Callable[[Any], jax.Array] | None = None
  ) -> optax.GradientTransformation:
    """Clipping (when grad_clip > 0) then AdamW. `sum_squares(grads)`: the squared global norm
    of gradients that a device may hold in shards (default: of the whole tree)."""
    chain = [clip_by_global_norm(self.grad_clip, sum_squares)] if self.grad_clip > 0 else []
    chain.append(
      optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
    )
    return optax.chain(*chain)

  def ema(self, ema_params: Any, params: Any, step: jax.Array) -> Any:
    """EMA after optimiser step `step` (0-based): decay min(ema_decay, (1 + n) / (10 + n)) with
    warm-up, else ema_decay."""
    decay = jnp.float32(self.ema_decay)
    if self.ema_warmup:
      n = step.astype(jnp.float32)
      decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def clip_by_global_norm(
  max_norm: float, sum_squares: Callable[[Any], jax.Array] | None = None
) -> optax.GradientTransformation:
  """Scales the updates by max_norm / ||g|| when ||g|| >= max_norm (optax.clip_by_global_norm's
  rule and empty state), with the squared norm from `sum_squares` (FSDP: a sum over shards)."""
  norm_sq = sum_squares or (lambda g: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))

  def update(updates, state, params=None):
    del params
    g_norm = jnp.sqrt(norm_sq(updates))
    keep = g_norm < max_norm
    clip = lambda t: jax.lax.select(keep, t, (t / g_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def init_state(
  params: Any,
  tx: optax.GradientTransformation,
  key: jax.Array,
  posthoc_sigma_rels: tuple[float, ...] = (),
) -> TrainState:
  """Step 0 with the EMA equal to `params` and base key `key` (host-side; replicate it), tracking
  power-function EMAs of `posthoc_sigma_rels` (EDM2; none when empty)."""
  phema = posthoc_ema.init(params, posthoc_sigma_rels) if posthoc_sigma_rels else None
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=tx.init(params),
    key=key,
    phema=phema,
  )
