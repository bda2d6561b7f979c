"""Losses, weightings and the variational bound against exact denoisers of known data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion import losses as L
from diffusion import schedules as S
from diffusion.processes import Process

KEY = jax.random.PRNGKey(0)


def vp(schedule):
  return Process("vp", schedule=schedule)


def point_mass_model(schedule, c, prediction, continuous=False):
  """Exact denoiser for data that is always the image c: knows x0 = c given x_t."""

  def model(x, cond, labels):
    if continuous:
      a, s = G.alpha_sigma_from_log_snr(cond, x.ndim)
    else:
      a, s = G.alpha_sigma(schedule, cond.astype(jnp.int32), x.ndim)
    eps = (x - a * c) / s
    return G.prediction_target(prediction, c + 0 * x, eps, a, s)

  return model


def mixture_model(schedule, values):
  """Exact eps-denoiser for pixels iid uniform over `values` (a discrete distribution)."""

  def model(x, cond, labels):
    a, s = G.alpha_sigma(schedule, cond.astype(jnp.int32), x.ndim)
    logits = -((x[..., None] - a[..., None] * values) ** 2) / (2 * s[..., None] ** 2)
    x0 = jnp.sum(jax.nn.softmax(logits, -1) * values, -1)
    return (x - a * x0) / s

  return model


@pytest.mark.parametrize("method", L.T_SAMPLINGS)
def test_sampled_t_is_uniform(method):
  T, n = 10, 100_000
  t = np.asarray(L.sample_t(KEY, n, T, method))
  assert t.min() == 0 and t.max() == T - 1
  counts = np.bincount(t, minlength=T)
  assert np.all(np.abs(counts - n / T) < 5 * np.sqrt(n / T))


def test_antithetic_and_stratified_structure():
  u = np.asarray(L.sample_u(KEY, 8, "antithetic"))
  np.testing.assert_allclose(u[:4] + u[4:], 1.0, atol=1e-6)
  u = np.sort(np.asarray(L.sample_u(KEY, 8, "stratified")))
  assert np.all((u >= np.arange(8) / 8) & (u < (np.arange(8) + 1) / 8))


def test_weightings_agree_across_parameterisations():
  """The same x0 error must cost the same in eps, x0 and v space for SNR-defined weightings."""
  k1, k2, k3 = jax.random.split(KEY, 3)
  x0, eps, err = jax.random.normal(k1, (3, 6, 4, 4, 1))
  lam = jnp.linspace(-6, 6, 6)
  a, s = G.alpha_sigma_from_log_snr(lam, 4)
  xt = a * x0 + s * eps
  x0_hat = x0 + 0.1 * err
  eps_hat = G.eps_from_x0(xt, x0_hat, alpha=a, sigma=s)
  v_hat = G.v_from_eps_x0(eps=eps_hat, x0=x0_hat, alpha=a, sigma=s)
  preds = {"x0": x0_hat, "eps": eps_hat, "v": v_hat}
  for weighting in ("min_snr", "trunc_snr"):
    losses = [
      L.loss_weight(weighting, k, alpha=a, sigma=s, gamma=5.0)[:, 0, 0, 0]
      * L.mean_flat((p - G.prediction_target(k, x0, eps, a, s)) ** 2)
      for k, p in preds.items()
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-3)
  w = L.loss_weight("min_snr", "eps", alpha=a, sigma=s, gamma=5.0)[:, 0, 0, 0]
  np.testing.assert_allclose(w, np.minimum(np.exp(lam), 5.0) / np.exp(lam), rtol=1e-5)


@pytest.mark.parametrize("prediction", G.PREDICTIONS)
@pytest.mark.parametrize("continuous", [False, True])
def test_exact_denoiser_has_zero_loss(prediction, continuous):
  s = S.make("cosine", 100)
  c = jnp.linspace(-1, 1, 48).reshape(1, 4, 4, 3)
  x0 = jnp.broadcast_to(c, (16, 4, 4, 3))
  out = L.loss(
    point_mass_model(s, c, prediction, continuous),
    vp(s),
    x0,
    KEY,
    prediction=prediction,
    weighting="min_snr",
    time="continuous" if continuous else "discrete",
  )
  assert out.loss.shape == (16,)
  assert float(out.mse.max()) < 1e-6 * (1e4 if prediction != "eps" else 1)


def test_zero_model_eps_loss_is_noise_variance():
  s = S.make("linear", 1000)
  x0 = jax.random.uniform(KEY, (256, 8, 8, 3), minval=-1, maxval=1)
  out = L.loss(lambda x, c, y: jnp.zeros_like(x), vp(s), x0, KEY)
  assert float(out.loss.mean()) == pytest.approx(1.0, abs=0.02)


def test_label_dropout_replaces_labels_with_null():
  seen = {}

  def model(x, c, y):
    seen["labels"] = y
    return jnp.zeros_like(x)

  s = S.make("linear", 100)
  x0 = jnp.zeros((64, 2, 2, 1))
  labels = jnp.arange(64) % 3
  L.loss(model, vp(s), x0, KEY, labels=labels, label_dropout=1.0, null_label=3)
  assert np.all(np.asarray(seen["labels"]) == 3)
  L.loss(model, vp(s), x0, KEY, labels=labels, label_dropout=0.5, null_label=3)
  dropped = np.asarray(seen["labels"]) == 3
  assert 10 < dropped.sum() < 54
  assert np.all(np.asarray(seen["labels"])[~dropped] == labels[~dropped])


def test_hybrid_loss_stops_the_mean_gradient_in_the_vlb():
  s = S.make("linear", 100)
  x0 = jax.random.uniform(KEY, (8, 4, 4, 1), minval=-1, maxval=1)

  def terms(ab):
    model = lambda x, c, y: jnp.concatenate([ab[0] * x, ab[1] + 0 * x], -1)
    return L.loss(model, vp(s), x0, KEY, variance="learned_range")

  grads = jax.jit(  # the three gradients in one program
    lambda ab: [
      jax.grad(lambda p, k=k: getattr(terms(p), k).mean())(ab) for k in ("vlb", "loss", "mse")
    ]
  )
  g_vlb, g_all, g_mse = grads(jnp.array([0.3, 0.1]))
  assert float(g_vlb[0]) == 0.0 and abs(float(g_vlb[1])) > 1e-6
  assert float(g_all[0]) == pytest.approx(float(g_mse[0]), rel=1e-5)


@pytest.mark.parametrize("T", [100, 400])
def test_hybrid_loss_weights_the_vlb_by_lambda_times_T(T):
  """Improved DDPM: L_hybrid = L_simple + lambda L_vlb, L_vlb = sum_t L_t, estimated by T L_t at
  uniform t (the reference code adds vb * T / 1000 with lambda = 1e-3). Exact-mean model with
  v = 1 (variance beta_t): L_t is closed form, KL = (r - 1 - log r) / 2 nats per dim with
  r = beta~_t / beta_t = (1 - abar_{t-1}) / (1 - abar_t), and at t = 0 the decoder NLL
  -log(Phi(d/sd) - Phi(-d/sd)), d = 1/255, sd = sqrt(beta_0), for interior 8-bit values."""
  from scipy import stats

  s = S.make("linear", T)
  betas = np.linspace(1e-4, 0.02, T) * 1000 / T  # float64, from the definition
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  r = ((1 - abar_prev) / (1 - abar))[1:]
  sd0, d = math.sqrt(betas[0]), 1 / 255
  decoder = -math.log(stats.norm.cdf(d / sd0) - stats.norm.cdf(-d / sd0))
  kl_bits = np.concatenate([[decoder], 0.5 * (r - 1 - np.log(r))]) / math.log(2)
  c = (jnp.array([40.0, 100.0, 128.0, 200.0]) / 127.5 - 1).reshape(1, 2, 2, 1)  # bin centres
  x0 = jnp.broadcast_to(c, (T, 2, 2, 1))
  mean_model = point_mass_model(s, c, "eps")
  model = lambda x, cond, y: jnp.concatenate([mean_model(x, cond, y), jnp.ones_like(x)], -1)
  lam = 0.001
  # Stratified t with B = T draws every t in [0, T) exactly once.
  out = L.loss(
    model, vp(s), x0, KEY, variance="learned_range", vlb_weight=lam, t_sampling="stratified"
  )
  logsnr = np.log(abar / (1 - abar))
  t = np.abs(np.asarray(out.log_snr, np.float64)[:, None] - logsnr[None]).argmin(1)
  assert sorted(t.tolist()) == list(range(T))
  want = kl_bits[t]
  np.testing.assert_allclose(np.asarray(out.vlb), want, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.loss - out.mse), lam * T * want, rtol=2e-3, atol=1e-6)
  assert float(jnp.max(out.mse)) < 1e-8  # the mean is exact: the VLB part is all there is


@pytest.mark.parametrize(
  "variance,v",
  [
    ("fixed_small", None),
    ("fixed_large", None),
    ("learned_range", -1.0),
    ("learned_range", 0.0),
    ("learned_range", 0.6),
    ("learned_range", 1.0),
  ],
)
def test_vlb_terms_of_an_exact_mean_are_closed_form(variance, v):
  """The VLB terms (what bits/dim sums) of the shared reverse kernel at s = t - 1 for an exact
  mean, in float64 from the definition of the schedule: KL = (r - 1 - log r) / 2 nats per dim,
  r = beta~_t / sigma_t^2, for t > 0; the decoder (t = 0) -log(Phi(d/sd) - Phi(-d/sd)), d = 1/255,
  sd = sigma_0, at interior 8-bit values. sigma_t^2: fixed_small beta~_t, fixed_large beta_t,
  both beta~_1 at t = 0 (DDPM's decoder); learned_range beta_t^frac beta~_t^(1 - frac), frac =
  (v + 1) / 2, with beta~_0 clipped to beta~_1 (and beta_0 itself at v = 1, improved DDPM)."""
  from scipy import stats

  T = 100
  sch = S.make("linear", T)
  betas = np.linspace(1e-4, 0.02, T) * 1000 / T
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  post = betas * (1 - abar_prev) / (1 - abar)
  post_c = np.concatenate([post[1:2], post[1:]])
  t = np.array([0, 1, 2, 30, 99])
  frac = 0.0 if v is None else (v + 1) / 2
  sig2 = {
    "fixed_small": post_c,
    "fixed_large": np.concatenate([post[1:2], betas[1:]]),
    "learned_range": np.exp(frac * np.log(betas) + (1 - frac) * np.log(post_c)),
  }[variance]
  sig2 = sig2[t]
  r = post[t] / sig2
  kl = 0.5 * (r - 1 - np.log(np.where(t > 0, r, 1.0)))
  d, sd0 = 1 / 255, math.sqrt(sig2[0])
  want = np.concatenate([[-math.log(stats.norm.cdf(d / sd0) - stats.norm.cdf(-d / sd0))], kl[1:]])
  c = (jnp.array([40.0, 100.0, 128.0, 200.0]) / 127.5 - 1).reshape(1, 2, 2, 1)  # bin centres
  x0 = jnp.broadcast_to(c, (len(t), 2, 2, 1))
  noise = np.random.default_rng(0).standard_normal(x0.shape).astype(np.float32)

  @jax.jit
  def terms(x0, tt):
    x_t = G.q_sample(sch, x0, tt, noise)
    out = point_mass_model(sch, c, "eps")(x_t, tt.astype(jnp.float32), None)
    if v is not None:
      out = jnp.concatenate([out, jnp.full_like(out, v)], -1)
    mean, logvar, x0_hat = L.p_mean_logvar(sch, out, x_t, tt, prediction="eps", variance=variance)
    return x0_hat, logvar, L.vlb_term(sch, x0, x_t, tt, mean, logvar)

  x0_hat, logvar, got = terms(x0, jnp.array(t))
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)  # sigma/alpha amplifies eps rounding
  np.testing.assert_allclose(np.exp(np.asarray(logvar, np.float64)[:, 0, 0, 0]), sig2, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(got), want / math.log(2), rtol=2e-3, atol=1e-5)


def test_learned_range_needs_discrete_time():
  with pytest.raises(ValueError, match="continuous_time=False"):
    L.loss(
      lambda x, c, y: x,
      vp(S.make("linear", 10 * 10)),
      jnp.zeros((2, 2, 2, 1)),
      KEY,
      variance="learned_range",
      time="continuous",
    )


def test_kl_terms_vanish_for_the_true_posterior():
  s = S.make("cosine", 200)
  c = jnp.linspace(-1, 1, 16).reshape(1, 4, 4, 1)
  x0 = jnp.broadcast_to(c, (4, 4, 4, 1))
  bpd = L.bits_per_dim(point_mass_model(s, c, "eps"), s, x0, KEY)
  assert float(jnp.abs(bpd["terms"][1:]).max()) < 1e-4


def test_bits_per_dim_of_exact_denoiser_is_the_entropy():
  """Pixels iid uniform over 4 levels: 2 bits/dim of entropy; the bound is tight for the exact
  denoiser when beta_0 is small enough for the decoder to resolve 8-bit bins."""
  s = S.make("linear", 1000, beta_start=1e-6)
  values = jnp.array([-1.0, -1 / 3, 1 / 3, 1.0])  # uint8 0, 85, 170, 255
  x0 = values[jax.random.randint(KEY, (128, 4, 4, 1), 0, 4)]
  model = mixture_model(s, values)
  bpd = jax.jit(lambda x, k: L.bits_per_dim(model, s, x, k))(x0, jax.random.PRNGKey(1))
  # ~0.03 above 2 from the fixed (not optimal) reverse variance; MC std ~0.01 at this size.
  assert float(bpd["total"].mean()) == pytest.approx(2.0, abs=0.06)
  assert float(bpd["prior"].mean()) < 1e-3
  # The one-sample estimate is unbiased for the sum over t.
  est = jax.jit(jax.vmap(lambda k: L.bits_per_dim_estimate(model, s, x0, k).mean()))(
    jax.random.split(jax.random.PRNGKey(2), 512)
  )
  err = float(est.std()) / math.sqrt(512)
  assert abs(float(est.mean()) - float(bpd["total"].mean())) < 4 * err + 0.02
  # So is the stratified estimate (decoder exact, 16 ranges of t), and with 17 evaluations per
  # image instead of 1000 it is close to the entropy on these 128 images.
  strat = jax.jit(lambda x, k: L.bits_per_dim_stratified(model, s, x, k, strata=16))
  out = strat(x0, jax.random.PRNGKey(3))
  err = float(out["total"].std()) / math.sqrt(128)
  assert abs(float(out["total"].mean()) - float(bpd["total"].mean())) < 4 * err + 0.02
  assert float(out["total"].mean()) == pytest.approx(2.0, abs=0.06 + 4 * err)
  with pytest.raises(ValueError, match=r"strata must be in \[1, 999\]"):
    L.bits_per_dim_stratified(model, s, x0, KEY, strata=1000)


def test_strata_cover_every_step_once():
  """The ranges of t partition 1..T-1 (so the weighted draws sum to the bound in expectation),
  single steps at both ends."""
  for n, k in [(1000, 32), (1000, 1), (20, 8), (20, 19), (250, 7), (2, 1)]:
    e = L.strata_edges(n, k)
    assert len(e) == k + 1 and e[0] == 1 and e[-1] == n and np.all(np.diff(e) > 0), (n, k, e)
  assert L.strata_edges(1000, 32)[:4] == [1, 2, 3, 4] and L.strata_edges(1000, 32)[-3:] == [
    998,
    999,
    1000,
  ]


def test_prior_bpd_is_the_gaussian_kl():
  s = S.make("linear", 1000)
  x0 = jnp.full((1, 1, 1, 1), 0.5)
  abar = float(np.prod(1 - np.asarray(s.betas, np.float64)))
  kl = 0.5 * (abar * 0.25 + (1 - abar) - 1 - math.log(1 - abar))
  assert float(L.prior_bpd(s, x0)[0]) == pytest.approx(kl / math.log(2), rel=1e-3)


def test_unknown_names_are_clear_errors():
  s = S.make("linear", 100)
  x0 = jnp.zeros((2, 2, 2, 1))
  m = lambda x, c, y: x
  with pytest.raises(ValueError, match="known: eps, x0, v"):
    L.loss(m, vp(s), x0, KEY, prediction="score")
  with pytest.raises(ValueError, match="known: simple, min_snr, trunc_snr"):
    L.loss(m, vp(s), x0, KEY, weighting="p2")


@pytest.mark.parametrize("weighting", ["min_snr", "trunc_snr"])
def test_snr_weightings_of_the_continuous_parameterisations(weighting):
  """The one weighting rule carried to edm's F (d x0 / d F = c_out = s sd / sqrt(s^2 + sd^2),
  Karras et al. Table 1) and to the flow velocity (x0 = x_t - t v: d x0 / d v = -t), in float64:
  w = w_x0(SNR) k^2 with SNR = 1 / s^2 for edm (alpha = 1) and ((1 - t) / t)^2 for flow."""
  s, t, sd = np.array([0.01, 0.3, 2.0, 40.0]), np.array([0.05, 0.3, 0.7, 0.95]), 0.5
  w_x0 = (
    (lambda snr: np.minimum(snr, 5.0))
    if weighting == "min_snr"
    else (lambda snr: np.maximum(snr, 1.0))
  )
  edm = L.loss_weight(weighting, "edm", alpha=jnp.ones(4), sigma=jnp.asarray(s), sigma_data=sd)
  want = w_x0(1 / s**2) * (s * sd) ** 2 / (s**2 + sd**2)
  np.testing.assert_allclose(np.asarray(edm), want, rtol=1e-5)
  flow = L.loss_weight(weighting, "flow", alpha=jnp.asarray(1 - t), sigma=jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(flow), w_x0(((1 - t) / t) ** 2) * t**2, rtol=1e-5)


def test_label_dropout_is_the_same_for_every_process():
  """One rule for vp and the continuous processes: with the same key the same labels drop."""
  seen = []
  model = lambda x, c, y: seen.append(np.asarray(y)) or jnp.zeros_like(x)
  x0, labels = jnp.zeros((64, 2, 2, 1)), jnp.arange(64) % 3
  for process in (vp(S.make("linear", 100)), Process("edm"), Process("flow")):
    pred = "eps" if process.name == "vp" else "x0"
    L.loss(model, process, x0, KEY, labels=labels, label_dropout=0.5, null_label=3, prediction=pred)
  assert 10 < (seen[0] == 3).sum() < 54
  np.testing.assert_array_equal(seen[1], seen[0])
  np.testing.assert_array_equal(seen[2], seen[0])


@pytest.mark.parametrize("process", ["vp", "vp_continuous", "edm"])
def test_per_example_keys_draw_what_a_batch_of_one_draws(process):
  """With one key per example, example i's noise level, noise and label dropout are those of a
  batch of one under keys[i], while the network is called once on the whole batch."""
  proc = Process("edm") if process == "edm" else vp(S.make("cosine", 100))
  time = "discrete" if process == "vp" else "continuous"
  calls = []

  def model(x, c, y):
    calls.append(x.shape[0])
    return 0.3 * x + c.reshape(-1, 1, 1, 1) + y.reshape(-1, 1, 1, 1)  # output depends on all

  x0 = jax.random.uniform(KEY, (6, 3, 3, 2), minval=-1, maxval=1)
  labels, keys = jnp.arange(6) % 3, jax.random.split(jax.random.PRNGKey(5), 6)
  kw = dict(time=time, labels=labels, label_dropout=0.5, null_label=3, prediction="x0")
  batched = L.loss(model, proc, x0, keys, **kw)
  assert calls == [6]
  for i in range(6):
    one = L.loss(model, proc, x0[i : i + 1], keys[i], **{**kw, "labels": labels[i : i + 1]})
    np.testing.assert_allclose(batched.loss[i], one.loss[0], rtol=1e-5)  # float rounding
    np.testing.assert_allclose(batched.log_snr[i], one.log_snr[0], atol=1e-5)
  assert len(set(np.asarray(batched.log_snr).tolist())) == 6  # not one key copied to all
