"""train_state.py: the learning-rate schedule and the EMA against their closed forms."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from diffusion import parallel, train
from diffusion.model import Diffusion
from diffusion.train_state import Optimizer


def test_learning_rate_warms_up_then_decays_by_a_cosine():
  lr = Optimizer(
    num_steps=100, warmup_steps=10, learning_rate=1e-3, lr_schedule="cosine"
  ).schedule()
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3) and float(lr(100)) == pytest.approx(0.0, abs=1e-9)
  assert float(lr(55)) == pytest.approx(0.5e-3, rel=1e-5)  # half-way through the decay
  with pytest.raises(ValueError, match="lr_schedule 'linear'"):
    Optimizer(lr_schedule="linear")


def test_ema_follows_the_warmed_up_decay():
  """Three real steps: ema_{n+1} = d_n ema_n + (1 - d_n) params_{n+1} with
  d_n = min(ema_decay, (1 + n) / (10 + n)), i.e. 0.1, 2/11, 3/12 (the first EMA is mostly the new
  parameters); without warm-up d = ema_decay throughout."""
  c = tiny_config()
  diffusion, mesh = Diffusion.from_config(c), parallel.make_mesh()
  host = lambda tree: [
    np.asarray(jax.device_get(x.addressable_data(0)), np.float64) for x in jax.tree.leaves(tree)
  ]
  for warm in (True, False):
    opt = Optimizer(ema_decay=0.999, ema_warmup=warm, warmup_steps=2)
    state = parallel.replicate(train.initial_state(diffusion, opt, 0), mesh)
    per_device = train.make_per_device_step(diffusion, opt, layout=parallel.layout(mesh))
    step = parallel.compile_step(per_device, mesh)
    rng = np.random.default_rng(0)
    ema = host(state.params)
    for n in range(3):
      local = [
        {
          "image": rng.integers(0, 256, (1, 8, 8, 8, 3), np.uint8),
          "label": np.zeros((1, 8), np.int32),
        }
      ]
      state, _ = step(state, parallel.global_batches(local, mesh))
      d = min(0.999, (1 + n) / (10 + n)) if warm else 0.999
      ema = [d * e + (1 - d) * p for e, p in zip(ema, host(state.params), strict=True)]
      for want, got in zip(ema, host(state.ema_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
