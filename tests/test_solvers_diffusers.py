"""Sigma-space solvers against an independent implementation: diffusers' EDM Euler, Heun and EDM
DPM-Solver++(2M) schedulers, on the same exact Gaussian denoiser, sigma grid and x_T, in float64
(ours under jax.enable_x64; diffusers keeps its sigmas in float32, and EDMEulerScheduler steps in
float32). Needs the test extras: pip install -r requirements-test.txt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import solvers as SV

MU = np.array([0.5, -0.3, 0.2, 0.1])
SIGMA = np.array(
  [[1.0, 0.4, 0.2, 0.0], [0.4, 0.6, 0.1, 0.1], [0.2, 0.1, 0.3, 0.05], [0.0, 0.1, 0.05, 0.15]]
)
LAM, U = np.linalg.eigh(SIGMA)
S_MIN, S_MAX = 0.002, 80.0
BATCH = 16


def denoise(x, s):
  """Exact E[x0 | x~] for x0 ~ N(MU, SIGMA), images (B, 2, 2, 1), in x's dtype."""
  y = (x.reshape(x.shape[0], 4) - MU) @ U
  return (MU + (y * (LAM / (LAM + s**2))) @ U.T).astype(x.dtype).reshape(x.shape)


def torch_denoise(x, s):
  """The same denoiser on torch float64 rows (B, 4): MU + SIGMA (SIGMA + s^2 I)^-1 (x - MU)."""
  import torch  # torch and diffusers are imported when used, not while the suite is collected

  k = np.linalg.solve(SIGMA + float(s) ** 2 * np.eye(4), SIGMA).T  # = (SIGMA (...)^-1)^T
  return torch.from_numpy(MU) + (x - torch.from_numpy(MU)) @ torch.from_numpy(k)


def diffusers_schedulers():
  import diffusers.schedulers  # requirements-test.txt: a missing install fails here

  return diffusers.schedulers


def ours(name, x_T, sigmas):
  with jax.enable_x64(True):
    x = jnp.asarray(x_T.reshape(-1, 2, 2, 1))
    out = SV.sample(name, denoise, x, sigmas, jax.random.PRNGKey(0))
    return np.asarray(out, np.float64).reshape(-1, 4)


def theirs(sched, x_T, evaluate):
  """The diffusers loop; `evaluate(sched, x, t)` returns the step's keyword arguments."""
  import torch

  sched.set_begin_index(0)
  x = torch.from_numpy(x_T)
  for t in sched.timesteps:
    sched.scale_model_input(x, t)  # sets the step index; the model input scaling is unused
    x = sched.step(timestep=t, sample=x, **evaluate(sched, x, t)).prev_sample
  return x.numpy()


def noise(sigma_max):
  return sigma_max * np.random.default_rng(0).standard_normal((BATCH, 4))


def close(a, b, rtol):
  """Relative error in the Frobenius norm (measured: Euler ~2e-7, diffusers stepping in float32;
  Heun and DPM-Solver++ <= 5e-8, from diffusers' float32 sigmas and step sizes)."""
  err = np.linalg.norm(a - b) / np.linalg.norm(b)
  assert err < rtol, err


@pytest.mark.parametrize("steps", [6, 18])
def test_euler_matches_edm_euler_scheduler(steps):
  sched = diffusers_schedulers().EDMEulerScheduler(
    sigma_min=S_MIN, sigma_max=S_MAX, rho=7.0, final_sigmas_type="zero"
  )
  sched.set_timesteps(steps)
  sigmas = sched.sigmas.numpy().astype(np.float64)
  np.testing.assert_allclose(sigmas, SV.karras_sigmas(steps, S_MIN, S_MAX), rtol=1e-6)

  def evaluate(sched, x, t):
    d = torch_denoise(x, sched.sigmas[sched.step_index])
    return dict(model_output=d, pred_original_sample=d)

  x_T = noise(S_MAX)
  close(ours("euler", x_T, sigmas), theirs(sched, x_T, evaluate), 1e-6)


@pytest.mark.parametrize("steps", [6, 18])
def test_heun_matches_heun_discrete_scheduler_with_karras_sigmas(steps):
  """HeunDiscreteScheduler derives its Karras range from a training schedule (its default
  linear betas 0.00085..0.012: sigma 0.029 to 25.1), repeats each interior sigma for its
  corrector and ends with an Euler step to 0; `edm` with S_churn = 0 is the same method."""
  sched = diffusers_schedulers().HeunDiscreteScheduler(
    use_karras_sigmas=True, prediction_type="sample"
  )
  sched.set_timesteps(steps)
  rep = sched.sigmas.numpy().astype(np.float64)  # s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0
  sigmas = np.concatenate([rep[:1], rep[1::2]])
  assert sigmas.shape == (steps + 1,)
  np.testing.assert_allclose(sigmas, SV.karras_sigmas(steps, sigmas[-2], sigmas[0]), rtol=1e-6)

  def evaluate(sched, x, t):  # at s_i, then at s_{i+1} on the Euler point
    return dict(model_output=torch_denoise(x, sched.sigmas[sched.step_index]))

  x_T = noise(sigmas[0])
  want = theirs(sched, x_T, evaluate)
  close(ours("heun", x_T, sigmas), want, 1e-7)
  close(ours("edm", x_T, sigmas), want, 1e-7)  # S_churn = 0


@pytest.mark.parametrize("steps", [6, 18])
def test_dpm_solver_pp_matches_edm_dpm_solver_multistep_scheduler(steps):
  """EDMDPMSolverMultistepScheduler(solver_order=2, midpoint): first order on the first and the
  last step (final sigma 0), as ours; on this grid r = h_prev / h >= 1/2 throughout, so our
  first-order fallback never fires. Its x0 preconditioning is bypassed (D is given)."""
  sched = diffusers_schedulers().EDMDPMSolverMultistepScheduler(
    sigma_min=S_MIN,
    sigma_max=S_MAX,
    rho=7.0,
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    final_sigmas_type="zero",
  )
  sched.set_timesteps(steps)
  sched.convert_model_output = lambda model_output, sample: model_output
  sigmas = sched.sigmas.numpy().astype(np.float64)
  h = -np.diff(np.log(sigmas[:-1]))
  assert np.all(h[:-1] / h[1:] >= SV.MIN_STEP_RATIO)

  def evaluate(sched, x, t):
    return dict(model_output=torch_denoise(x, sched.sigmas[sched.step_index]))

  x_T = noise(S_MAX)
  close(ours("dpm_solver++", x_T, sigmas), theirs(sched, x_T, evaluate), 2.5e-7)
