"""posthoc_ema.py against the paper's numbers, quadrature and float64 brute force (EDM2 app. C)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion import posthoc_ema as ph


def density(s, t, g):
  """The power profile p_t(s) = (g + 1) s^g / t^(g + 1) on [0, t], written out independently."""
  return np.where(s <= t, (g + 1.0) / t * (np.minimum(s, t) / t) ** g, 0.0)


def discrete_weights(t, g, n):
  """Weights of theta_1..theta_n in the step-t EMA by unrolling beta_tau = (1 - 1/tau)^(g + 1):
  w_tau = (1 - beta_tau) prod_{u=tau+1..t} beta_u, float64, zero beyond t."""
  beta = np.array([(1.0 - 1.0 / tau) ** (g + 1.0) for tau in range(1, t + 1)])
  tail = np.concatenate([np.cumprod(beta[::-1])[::-1][1:], [1.0]])  # prod over u > tau
  return np.concatenate([(1.0 - beta) * tail, np.zeros(n - t)])


def test_std_to_exp_matches_the_paper_and_the_moments_of_the_profile():
  # EDM2 sec. 3: sigma_rel 0.05 and 0.10 correspond to gamma = 16.97 and 6.94.
  assert ph.std_to_exp(0.05) == pytest.approx(16.97, abs=5e-3)
  assert ph.std_to_exp(0.10) == pytest.approx(6.94, abs=5e-3)
  # gamma = 0 is the uniform average: sigma_rel = 1/sqrt(12).
  assert ph.exp_to_std(0.0) == pytest.approx(12**-0.5, rel=1e-12)
  sig = np.array([[0.01, 0.05, 0.07], [0.10, 0.2, 0.29]])
  g = ph.std_to_exp(sig)
  assert g.shape == sig.shape and np.all(np.diff(g.ravel()) < 0)  # wider average, smaller gamma
  np.testing.assert_allclose(ph.exp_to_std(g), sig, rtol=1e-10)
  moment = lambda k, g: integrate.quad(
    lambda u: u**k * (g + 1) * u**g, 0, 1, epsabs=0, epsrel=1e-12
  )[0]
  for gi, si in zip(g.ravel(), sig.ravel(), strict=True):  # std of u = s/t under (g + 1) u^g
    m1, m2 = moment(1, gi), moment(2, gi)
    assert np.sqrt(m2 - m1**2) == pytest.approx(si, rel=1e-8)
  # The largest sigma_rel a power profile reaches; beyond it there is no exponent.
  assert ph.exp_to_std(ph.GAMMA_AT_MAX) == pytest.approx(ph.SIGMA_REL_MAX)
  assert np.all(ph.exp_to_std(ph.GAMMA_AT_MAX + np.array([-1e-3, 1e-3])) < ph.SIGMA_REL_MAX)
  for bad in (0.0, 0.31, -0.05):
    with pytest.raises(ValueError, match="sigma_rel must lie in"):
      ph.std_to_exp(bad)


def test_tracker_equals_float64_brute_force_ema():
  """A scalar and a bf16 vector over 3,000 steps, jitted scan with a traced step, against the
  float64 recursion ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t and against the unrolled
  weights (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1) (the integral of the profile over (tau-1, tau])."""
  n, sig = 3000, (0.05, 0.10, 0.2)
  rng = np.random.default_rng(1)
  theta = 3.0 + np.cumsum(rng.normal(size=n)) * 0.1  # theta_1..theta_n
  vec = rng.normal(size=(n, 4)).astype(jnp.bfloat16)
  state = ph.init({"a": jnp.float32(-7.0), "v": jnp.zeros(4, jnp.bfloat16)}, sig)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.emas))

  @jax.jit
  def run(state, xs):
    def body(st, x):
      st = ph.update(st, {"a": x[0], "v": x[1]}, x[2])
      return st, st.emas

    return jax.lax.scan(body, state, xs)

  _, hist = run(
    state,
    (jnp.asarray(theta, jnp.float32), jnp.asarray(vec), jnp.arange(1, n + 1, dtype=jnp.int32)),
  )
  gammas = ph.std_to_exp(np.array(sig))
  for k, g in enumerate(gammas):
    ema, want = np.zeros(n), 0.0
    for t in range(1, n + 1):  # float64 recursion; the initial value gets weight beta_1 = 0
      beta = (1.0 - 1.0 / t) ** (g + 1.0)
      want = beta * want + (1.0 - beta) * theta[t - 1]
      ema[t - 1] = want
    got = np.asarray(hist[k]["a"], np.float64)
    assert got[0] == np.float32(theta[0])  # step 1 resets to theta_1 exactly
    np.testing.assert_allclose(got, ema, rtol=0, atol=1e-6 * np.abs(theta).max())
    for t in (1, 17, 500, n):
      tau = np.arange(1, t + 1, dtype=np.float64)
      w = (tau / t) ** (g + 1) - ((tau - 1) / t) ** (g + 1)
      assert w.sum() == pytest.approx(1.0, rel=1e-12)
      assert ema[t - 1] == pytest.approx(w @ theta[:t], rel=1e-10)
      np.testing.assert_allclose(
        np.asarray(hist[k]["v"][t - 1]), w @ vec[:t].astype(np.float64), rtol=2e-5, atol=2e-6
      )


def test_update_weight_is_accurate_at_large_steps():
  # 1 - 1/t rounds to 1 in float32 for t > 2^24; the weight must still be ~(gamma + 1) / t.
  t = np.array([0, 1, 2, 10, 1_000, 100_000, 10_000_000, 2**31 - 1], np.int64)
  for g in ph.std_to_exp(np.array([0.05, 0.10])):
    tf = np.maximum(t, 1).astype(np.float64)
    want = 1.0 - (1.0 - 1.0 / tf) ** (g + 1.0)  # float64: 1 - 1/t keeps >= 6 digits of 1/t
    got = np.asarray(ph.update_weight(jnp.asarray(t, jnp.int32), jnp.float32(g)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[0] == got[1] == 1.0


def test_profile_dot_matches_quadrature():
  cases = [
    (100.0, 16.97, 2000.0, 6.94),
    (2000.0, 16.97, 100.0, 6.94),
    (1500.0, 6.94, 1500.0, 6.94),
    (800.0, 0.0, 1000.0, 0.5),
    (1000.0, 11.2, 999.0, 16.97),
    (3.0, 2.0, 7.0, -0.3),
  ]
  for ta, ga, tb, gb in cases:
    want = integrate.quad(
      lambda s, *c: density(s, *c[:2]) * density(s, *c[2:]),
      0,
      min(ta, tb),
      args=(ta, ga, tb, gb),
      epsabs=0,
      epsrel=1e-12,
      limit=200,
    )[0]
    assert ph.profile_dot(ta, ga, tb, gb) == pytest.approx(want, rel=1e-9)
    assert ph.profile_dot(tb, gb, ta, ga) == pytest.approx(want, rel=1e-12)
  # Broadcasting: a (3, 1) x (1, 2) Gram block.
  t, g = np.array([[10.0], [20.0], [30.0]]), np.array([[3.0], [5.0], [7.0]])
  assert ph.profile_dot(t, g, t.T[:, :2], g.T[:, :2]).shape == (3, 2)


@pytest.fixture(scope="module")
def random_walk_run():
  """A random walk of an 8-vector over 2,000 steps, tracked with sigma_rel 0.05, 0.10 (the
  snapshotted pair) and 0.07 (tracked directly, the reconstruction target); EMAs every step."""
  n, sig = 2000, (0.05, 0.10, 0.07)
  theta = np.cumsum(np.random.default_rng(0).normal(size=(n, 8)), axis=0)
  state = ph.init({"w": jnp.zeros(8), "b": jnp.zeros((2, 3))}, sig)

  @jax.jit
  def run(state, xs):
    def body(st, x):
      st = ph.update(st, {"w": x[0], "b": x[0][:6].reshape(2, 3) * 2.0}, x[1])
      return st, st

    return jax.lax.scan(body, state, xs)

  _, hist = run(state, (jnp.asarray(theta, jnp.float32), jnp.arange(1, n + 1)))
  return n, theta, hist


def snapshots(hist, every, last):
  """Restored checkpoints every `every` steps up to `last`, flattened: (steps, gammas, trees)."""
  saved = [
    (s, jax.tree.map(lambda a, s=s: np.asarray(a[s - 1]), hist))
    for s in range(every, last + 1, every)
  ]
  saved = [(s, st.replace(emas=st.emas[:2], gammas=st.gammas[:2])) for s, st in saved]
  return ph.flatten_snapshots(saved)


def test_reconstruction_matches_a_directly_tracked_profile(random_walk_run):
  """sigma_rel 0.07 at step 2,000 from 40 snapshots (0.05 and 0.10, every 100 steps).

  The reconstruction is an exact linear combination of the snapshots, so its weights on
  theta_1..theta_n are sum_i x_i w_i with w_i the unrolled discrete weights (brute force, no
  inner products). Asserted: (1) the float32 reconstruction equals those weights applied to the
  float64 trajectory (it is the weighted sum it claims to be); (2) the weight error dw against
  the target's own weights is small in total variation (measured 0.0023; the LS residual of the
  profile fit); (3) since sum(dw) = 0, each coordinate's error is at most 1/2 |dw|_1 range(theta)
  (asserted with float32 slack); (4) relative to the gap between the two tracked EMAs the error
  is small (measured 7.8e-4 of ||ema_0.05 - ema_0.10||; asserted < 1e-2).
  """
  n, theta, hist = random_walk_run
  steps, gammas, trees = snapshots(hist, 100, n)
  assert len(trees) == 40 and set(np.round(gammas, 2)) == {16.97, 6.94}
  target_g = float(np.asarray(hist.gammas)[0, 2])  # the float32 exponent the tracker used
  x = ph.solve_coefficients(steps, gammas, n, target_g)
  assert x.shape == (40,) and x.sum() == pytest.approx(1.0, abs=1e-12)
  rec = ph.reconstruct(trees, x)
  assert rec["w"].dtype == np.float32 and rec["b"].shape == (2, 3)
  w_rec = sum(
    xi * discrete_weights(int(ti), gi, n) for xi, ti, gi in zip(x, steps, gammas, strict=True)
  )
  w_target = discrete_weights(n, target_g, n)
  np.testing.assert_allclose(rec["w"], w_rec @ theta, rtol=0, atol=1e-4)  # (1)
  dw = w_rec - w_target
  assert abs(dw.sum()) < 1e-12 and np.abs(dw).sum() < 0.01  # (2)
  direct = np.asarray(hist.emas[2]["w"][n - 1], np.float64)
  err = np.abs(rec["w"] - direct)
  assert np.all(err <= 0.5 * np.abs(dw).sum() * np.ptp(theta, axis=0) + 1e-4)  # (3)
  gap = np.linalg.norm(np.asarray(hist.emas[0]["w"][n - 1] - hist.emas[1]["w"][n - 1]))
  assert np.linalg.norm(err) < 1e-2 * gap  # (4)
  np.testing.assert_allclose(rec["b"], np.asarray(hist.emas[2]["b"][n - 1]), atol=0.05)


def test_own_last_snapshot_gets_coefficient_one(random_walk_run):
  n, _, hist = random_walk_run
  steps, gammas, trees = snapshots(hist, 100, n)
  for k in (38, 39):  # the 0.05 and 0.10 snapshots at the last step
    x = ph.solve_coefficients(steps, gammas, n, gammas[k], normalize=False)
    assert x[k] == pytest.approx(1.0, abs=1e-9) and np.abs(np.delete(x, k)).max() < 1e-9
    np.testing.assert_allclose(ph.reconstruct(trees, x)["w"], trees[k]["w"], rtol=1e-6, atol=1e-5)


def test_reconstruct_accumulates_in_float64_and_rejects_bad_input():
  # 1e4 (a + 1/3) - 1e4 a with a = 2^20: float32 accumulation would lose the 1/3 completely.
  a = np.float32(2.0**20)
  snaps = [{"x": np.array([a + np.float32(1 / 3)], np.float32)}, {"x": np.array([a])}]
  got = ph.reconstruct(snaps, [1e4, -1e4])["x"]
  assert got[0] == np.float32(1e4 * (np.float64(snaps[0]["x"][0]) - np.float64(a)))
  with pytest.raises(ValueError, match="2 snapshots but coefficients"):
    ph.reconstruct(snaps, [1.0])
  with pytest.raises(ValueError, match="duplicate"):
    ph.solve_coefficients([100, 100], [6.94, 6.94], 100, 10.0)
  with pytest.raises(ValueError, match=">= 1"):
    ph.solve_coefficients([0, 100], [6.94, 6.94], 100, 10.0)
