"""processes.py against closed forms: alpha(t), sigma(t), their inverse and the training noise
distributions of every process (float64 NumPy references)."""

import math

import jax
import numpy as np
import pytest

from diffusion import schedules
from diffusion.processes import Process, discrete_t_of_log_snr

T = np.linspace(0.01, 0.99, 25)


def reference(name, t, smin=0.002, smax=80.0, rho=7.0):
  """(alpha, sigma) in float64, written from the papers' definitions."""
  if name == "ve":
    return np.ones_like(t), smin * (smax / smin) ** t
  if name == "edm":  # EDM eq. 5 with t = 1 - i / (N - 1)
    return np.ones_like(t), (
      smax ** (1 / rho) + (1 - t) * (smin ** (1 / rho) - smax ** (1 / rho))
    ) ** rho
  if name == "flow":
    return 1 - t, t
  return np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)


@pytest.mark.parametrize("name", ["ve", "edm", "flow", "cosine"])
def test_alpha_sigma_and_their_inverse(name):
  p = Process(name=name)
  alpha, sigma = map(np.asarray, p.alpha_sigma(T))
  a_ref, s_ref = reference(name, T)
  np.testing.assert_allclose(alpha, a_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sigma, s_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(p.t_of_s(s_ref / a_ref)), T, atol=2e-5)


def test_vp_follows_its_schedule_in_continuous_time():
  sch = schedules.make("cosine", 1000)
  p = Process(name="vp", schedule=sch)
  alpha, sigma = map(np.asarray, p.alpha_sigma(T))
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  # At u = (t + 1) / T the continuous process is the table's.
  ts = np.array([0, 10, 500, 990])
  a_tab, s_tab = map(np.asarray, p.alpha_sigma((ts + 1) / 1000.0))
  abar = np.asarray(sch.alphas_cumprod, np.float64)[ts]
  np.testing.assert_allclose(a_tab**2, abar, rtol=1e-4)
  # A network trained on integer t is conditioned on the fractional t of a log-SNR.
  lam = np.asarray(sch.log_snr)[ts]
  np.testing.assert_allclose(np.asarray(discrete_t_of_log_snr(sch, lam)), ts, atol=1e-3)
  lo, hi = p.sampling_range()  # EDM's range, within the table's
  assert lo == pytest.approx(math.sqrt((1 - abar[0]) / abar[0]), rel=1e-3) and hi == 80.0
  short = Process(name="vp", schedule=schedules.make("linear", 1000), sigma_max=1e4)
  assert short.sampling_range()[1] == pytest.approx(
    math.exp(-0.5 * float(short.schedule.log_snr[-1])), rel=1e-4
  )


def draws(p, n=200_000):
  alpha, sigma = p.training_noise(jax.random.PRNGKey(0), n)
  return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def test_training_noise_levels_follow_each_papers_distribution():
  _, sigma = draws(Process(name="edm"))
  logs = np.log(sigma)
  se = 1.2 / math.sqrt(len(logs))
  assert abs(logs.mean() + 1.2) < 5 * se and abs(logs.std() - 1.2) < 0.01
  alpha, sigma = draws(Process(name="ve"))
  u = np.log(sigma / 0.002) / math.log(80 / 0.002)  # log-uniform sigma = uniform t
  assert np.all(alpha == 1) and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
  _, t = draws(Process(name="flow", t_distribution="logit_normal", logit_mean=0.5, logit_std=0.8))
  z = np.log(t) - np.log1p(-t)
  assert abs(z.mean() - 0.5) < 0.01 and abs(z.std() - 0.8) < 0.01
  alpha, t = draws(Process(name="flow"))
  np.testing.assert_allclose(alpha, 1 - t, atol=1e-6)
  assert abs(t.mean() - 0.5) < 0.005


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(name="vpp"), "unknown process 'vpp'"),
    (dict(name="ve", sigma_min=2.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
    (dict(name="flow", t_distribution="beta"), "t_distribution 'beta'"),
    (dict(name="vp"), "needs a schedule"),
  ],
)
def test_bad_process_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Process(**kwargs)
