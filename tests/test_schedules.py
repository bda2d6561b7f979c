"""Schedule tables against their defining formulas, recomputed here in float64."""

import math

import jax
import numpy as np
import pytest

from diffusion import schedules as S


def test_linear_known_values():
  s = S.make("linear", 1000)
  assert s.betas[0] == pytest.approx(1e-4, rel=1e-6)
  assert s.betas[-1] == pytest.approx(0.02, rel=1e-6)
  # DDPM's alpha-bar at the last step, as commonly quoted: 4.036e-05.
  assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-05, rel=1e-3)
  assert s.num_timesteps == 1000


def test_linear_scales_with_T():
  s = S.make("linear", 250)
  assert float(s.betas[0]) == pytest.approx(4e-4, rel=1e-6)
  assert float(s.betas[-1]) == pytest.approx(0.08, rel=1e-6)


def test_scaled_linear_is_linear_in_sqrt_beta():
  s = S.make("scaled_linear", 100, beta_start=0.001, beta_end=0.02)
  r = np.sqrt(np.asarray(s.betas, np.float64))
  np.testing.assert_allclose(np.diff(r), (math.sqrt(0.02) - math.sqrt(0.001)) / 99, rtol=1e-4)


def test_cosine_matches_improved_ddpm_formula():
  T, s0 = 1000, 0.008
  f = lambda u: math.cos((u + s0) / (1 + s0) * math.pi / 2) ** 2
  betas = np.array([min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)])
  sch = S.make("cosine", T)
  np.testing.assert_allclose(np.asarray(sch.betas), betas, rtol=2e-5, atol=1e-9)
  np.testing.assert_allclose(
    np.asarray(sch.alphas_cumprod), np.cumprod(1 - betas), rtol=2e-5, atol=1e-12
  )
  assert float(sch.betas.max()) == pytest.approx(0.999)


def test_sigmoid_matches_chen_formula():
  T, start, end, tau = 200, -3.0, 3.0, 0.7
  sig = lambda z: 1 / (1 + math.exp(-z))
  g = lambda u: (
    (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
  )
  abar = np.array([g((t + 1) / T) for t in range(T - 1)])
  sch = S.make("sigmoid", T, start=start, end=end, tau=tau)
  np.testing.assert_allclose(np.asarray(sch.alphas_cumprod)[: T - 1], abar, rtol=1e-4)


def test_logsnr_cosine_and_shift():
  T = 100
  u = (np.arange(T) + 1) / T
  tmin, tmax = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
  want = -2 * np.log(np.tan(tmin + u * (tmax - tmin)))
  base = S.make("logsnr_cosine", T)
  np.testing.assert_allclose(np.asarray(base.log_snr), want, atol=2e-4)
  shifted = S.make("logsnr_cosine_shifted", T, image_size=16, base_size=64)
  np.testing.assert_allclose(np.asarray(shifted.log_snr - base.log_snr), 2 * math.log(4), atol=2e-4)


@pytest.mark.parametrize("name", S.NAMES)
def test_tables_are_consistent(name):
  kw = {"image_size": 32} if name == "logsnr_cosine_shifted" else {}
  s = S.make(name, 64, **kw)
  b = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - b)
  prev = np.concatenate([[1.0], abar[:-1]])
  # (recomputed from float32 betas: relative error grows where abar is tiny)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), abar, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev), prev, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s.log_snr), np.log(abar / (1 - abar)), atol=2e-3)
  np.testing.assert_allclose(
    np.asarray(s.posterior_variance), b * (1 - prev) / (1 - abar), rtol=1e-4
  )
  np.testing.assert_allclose(
    np.asarray(s.sqrt_alphas_cumprod) ** 2 + np.asarray(s.sqrt_one_minus_alphas_cumprod) ** 2,
    1.0,
    rtol=1e-6,
  )
  np.testing.assert_allclose(np.asarray(s.sqrt_recip_alphas_cumprod), 1 / np.sqrt(abar), rtol=1e-4)
  np.testing.assert_allclose(
    np.asarray(s.sqrt_recipm1_alphas_cumprod), np.sqrt(1 / abar - 1), rtol=1e-4
  )
  np.testing.assert_allclose(
    np.asarray(s.log_one_minus_alphas_cumprod), np.log1p(-abar), rtol=1e-4, atol=1e-6
  )
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
  assert float(s.posterior_log_variance_clipped[0]) == float(s.posterior_log_variance_clipped[1])
  assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(s))


@pytest.mark.parametrize("name", S.NAMES)
def test_continuous_log_snr_agrees_with_table(name):
  kw = {"image_size": 32} if name == "logsnr_cosine_shifted" else {}
  s = S.make(name, 100, **kw)
  u = (np.arange(100) + 1) / 100
  lam = np.asarray(S.continuous_log_snr(s, u))
  np.testing.assert_allclose(lam[:-1], np.asarray(s.log_snr)[:-1], atol=2e-3)
  dense = np.asarray(S.continuous_log_snr(s, np.linspace(0, 1, 1001)))
  assert np.all(np.isfinite(dense)) and np.all(np.diff(dense) <= 1e-5)


def test_schedule_is_a_pytree_for_jit():
  s = S.make("cosine", 10)
  f = jax.jit(lambda sch, t: sch.sqrt_alphas_cumprod[t])
  assert float(f(s, 3)) == pytest.approx(float(s.sqrt_alphas_cumprod[3]))


@pytest.mark.parametrize(
  "args,kwargs,match",
  [
    (("nope", 10), {}, "known schedules: linear, scaled_linear, cosine"),
    (("linear", 0), {}, "num_timesteps"),
    (("linear", 10), {"beta_end": 2.0}, r"\(0, 1\)"),
    (("linear", 10), {"beta_start": 0.0}, r"\(0, 1\)"),
    (("cosine", 10), {"tau": 1.0}, "unknown parameters"),
    (("logsnr_linear", 10), {"logsnr_min": 5.0, "logsnr_max": -5.0}, r"\(0, 1\)"),
  ],
)
def test_bad_input_is_a_clear_error(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    S.make(*args, **kwargs)


def test_from_betas_rejects_betas_outside_the_unit_interval():
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    S.from_betas(np.array([0.1, -0.1, 0.2]))


@pytest.mark.parametrize("T", [1, 10, 20])
def test_linear_with_small_T_names_the_1000_over_T_scaling(T):
  """beta_end = 0.02 * 1000/T >= 1 for T <= 20: the message blames the scaling, not start/end."""
  with pytest.raises(
    ValueError,
    match=rf"num_timesteps={T}: .*1000/T = {1000 // T}.*"
    r"num_timesteps > 20.*beta_end below",
  ) as err:
    S.make("linear", T)
  assert "start < end" not in str(err.value)


def test_linear_small_T_fixes_named_in_the_message_work():
  assert float(S.make("linear", 21).betas[-1]) == pytest.approx(0.02 * 1000 / 21, rel=1e-6)
  s = S.make("linear", 20, beta_start=1e-4, beta_end=0.01)  # below T/1000 = 0.02
  assert float(s.betas[-1]) == pytest.approx(0.5, rel=1e-6)
  assert float(s.betas[0]) == pytest.approx(5e-3, rel=1e-6)


def test_from_betas_rejects_alpha_bar_underflow():
  """Betas in (0, 1) but abar = 0.001^(t+1) falls below float64's smallest normal (2.2e-308)
  first at t + 1 = ceil(307.65 / 3) = 103."""
  with pytest.raises(ValueError, match=r"alpha-bar underflows float64 .* at t=102 of T=120"):
    S.from_betas(np.full(120, 0.999))


def test_from_betas_rejects_betas_too_small_to_lower_alpha_bar():
  """1 - 1e-17 == 1 in float64, so abar_1 == abar_0 although beta_1 is in (0, 1)."""
  with pytest.raises(ValueError, match=r"alpha-bar must decrease strictly.*t=\[1\]"):
    S.from_betas(np.array([0.1, 1e-17, 0.2]))
  S.from_betas(np.array([0.1, 1e-15, 0.2]))  # the smallest beta the message allows


def test_ddpm_reciprocal_tables_match_closed_forms():
  """DDPM linear at T = 1000, recomputed from its definition in float64."""
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
  s = S.make("linear", 1000)
  for table in (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
  ):
    assert getattr(s, table).dtype == np.float32 and getattr(s, table).shape == (1000,)
  np.testing.assert_allclose(np.asarray(s.sqrt_recip_alphas_cumprod), 1 / np.sqrt(abar), rtol=2e-6)
  np.testing.assert_allclose(
    np.asarray(s.sqrt_recipm1_alphas_cumprod), np.sqrt(1 / abar - 1), rtol=2e-6
  )
  np.testing.assert_allclose(
    np.asarray(s.log_one_minus_alphas_cumprod), np.log(1 - abar), rtol=2e-6
  )
  # Known values: at t = 0, 1 - abar = beta_0 = 1e-4; at t = T-1, abar = 4.0358e-05.
  assert float(s.sqrt_recipm1_alphas_cumprod[0]) == pytest.approx(
    np.sqrt(1e-4 / (1 - 1e-4)), rel=1e-6
  )
  assert float(s.log_one_minus_alphas_cumprod[0]) == pytest.approx(np.log(1e-4), rel=1e-6)
  assert float(s.sqrt_recip_alphas_cumprod[-1]) == pytest.approx(4.0358e-05**-0.5, rel=1e-3)
  # They invert q_sample: x_0 = x_t / sqrt(abar) - eps sqrt(1/abar - 1).
  x0, eps = 0.3, -1.2
  xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
  x0_back = (
    np.asarray(s.sqrt_recip_alphas_cumprod, np.float64) * xt
    - np.asarray(s.sqrt_recipm1_alphas_cumprod, np.float64) * eps
  )
  np.testing.assert_allclose(x0_back, x0, atol=1e-3)
