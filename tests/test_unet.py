"""Tests of diffusion/unet.py: shapes, zero init, dropout, mixed precision, conditioning,
parameter counts and configuration errors. Tiny networks; shapes and counts by jax.eval_shape."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10, default, sprites
from diffusion import unet
from diffusion.model import net_config


def key(seed):
  """A PRNG key whose random bits compile much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="unsafe_rbg")


def tiny(**overrides):
  """A small UNetConfig: channels 16/32 at 8x8 and 4x4, attention at 4x4."""
  m = default.get_config().model
  m.update(
    dict(
      base_channels=16,
      channel_mult=(1, 2),
      num_res_blocks=1,
      attn_resolutions=(4,),
      num_heads=2,
      num_groups=8,
      dropout=0.0,
    ),
    **overrides,
  )
  return net_config(m)


def shapes(model, x_shape, labels=True):
  """Output ShapeDtypeStruct and param count of `model` on x_shape, traced only."""
  b = x_shape[0]
  x, t = jnp.zeros(x_shape), jnp.zeros((b,))
  lab = jnp.zeros((b,), jnp.int32) if labels else None
  params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x, t, lab)
  out = jax.eval_shape(functools.partial(model.apply, train=False), params, x, t, lab)
  return out, unet.count_params(params)


def perturb(params, scale=0.1, seed=1):
  """Moves every parameter away from its (partly zero) initial value (NumPy noise: no compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params
  )


@pytest.mark.parametrize(
  "size,channels,out_channels,overrides",
  [
    (8, 3, None, {}),
    (8, 1, 2, dict(num_classes=10)),  # grayscale, learned variances, class labels
    (
      16,
      3,
      6,
      dict(
        channel_mult=(1, 2, 2),
        attn_resolutions=(8, 4),
        resblock_updown=True,
        head_dim=8,
        num_res_blocks=2,
      ),
    ),
    (32, 3, None, dict(channel_mult=(1, 1, 2, 2), attn_resolutions=(), film=False)),
  ],
)
def test_output_shapes(size, channels, out_channels, overrides):
  cfg = tiny(**overrides)
  model = unet.create_model(cfg, image_size=size, channels=channels, out_channels=out_channels)
  out, _ = shapes(model, (3, size, size, channels), labels=cfg.num_classes > 0)
  assert out.shape == (3, size, size, out_channels or channels)
  assert out.dtype == jnp.float32


def test_non_square_and_bfloat16_shapes():
  model = unet.create_model(tiny(dtype="bfloat16"), image_size=8, channels=3)
  out, _ = shapes(model, (2, 8, 16, 3), labels=False)
  assert out.shape == (2, 8, 16, 3) and out.dtype == jnp.float32


@pytest.fixture(scope="module")
def cond_net():
  """A class-conditional FiLM net with BigGAN resampling and dropout, its zero-init params,
  and a jitted apply(params, x, t, labels, key, train, dtype)."""
  cfg = tiny(num_classes=3, dropout=0.2, resblock_updown=True)
  model = unet.create_model(cfg, image_size=8, channels=3, out_channels=6)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
  params = jax.jit(functools.partial(model.init, train=False))(key(1), x, jnp.zeros((1,)))

  @functools.partial(jax.jit, static_argnames=("train", "dtype"))
  def apply(params, x, t, labels=None, key=None, *, train=False, dtype="float32"):
    m = model.clone(dtype=unet.DTYPES[dtype])
    return m.apply(params, x, t, labels, train=train, rngs={"dropout": key} if train else {})

  return params, apply


def test_example_keys_give_each_example_its_own_dropout_masks():
  """With example_keys, example i's dropout masks depend on example_keys[i] alone: the same in a
  batch of one, different under another key, and about `rate` of the units are dropped."""
  model = unet.create_model(tiny(num_classes=3, dropout=0.5), image_size=8, channels=3)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  t, lab = jnp.array([10.0, 400.0, 50.0]), jnp.array([1, 2, 0])
  params = perturb(jax.jit(functools.partial(model.init, train=False))(key(1), x, t, lab))
  run = jax.jit(lambda x, t, lab, k: model.apply(params, x, t, lab, train=True, example_keys=k))
  keys = jax.random.split(jax.random.PRNGKey(2), 3)  # threefry: vmap-invariant bits
  whole = np.asarray(run(x, t, lab, keys))
  alone = np.asarray(run(x[1:2], t[1:2], lab[1:2], keys[1:2]))
  np.testing.assert_allclose(whole[1:2], alone, rtol=1e-5, atol=1e-6)
  other = np.asarray(run(x, t, lab, keys.at[1].set(jax.random.PRNGKey(9))))
  assert np.abs(other[1] - whole[1]).max() > 1e-3 and np.all(other[0] == whole[0])
  h = jnp.ones((400, 8, 8, 4))
  kept = (
    np.asarray(unet.example_dropout(h, 0.3, jax.random.split(jax.random.PRNGKey(3), 400), 5)) > 0
  )
  assert abs(kept.mean() - 0.7) < 0.01 and np.all(np.asarray(h)[kept] * 0 + 1 / 0.7 > 1)


def test_zero_at_initialisation(cond_net):
  params, apply = cond_net
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  y = apply(params, x, jnp.array([3.0, 900.0]), jnp.array([0, 2]))
  assert y.shape == (2, 8, 8, 6) and np.all(np.asarray(y) == 0.0)
  # Zero only because of the zero-initialised output layers: moving conv_out makes it non-zero.
  moved = jax.tree_util.tree_map(lambda p: p, params)
  moved["params"]["conv_out"]["kernel"] = moved["params"]["conv_out"]["kernel"] + 0.1
  assert np.abs(np.asarray(apply(moved, x, jnp.array([3.0, 900.0]), jnp.array([0, 2])))).max() > 0


def test_zero_at_initialisation_additive_conditioning():
  model = unet.create_model(tiny(film=False), image_size=8, channels=3)
  x, t = jax.random.normal(jax.random.key(3), (2, 8, 8, 3)), jnp.array([1.0, 2.0])
  params = jax.jit(functools.partial(model.init, train=False))(key(4), x, t)
  y = jax.jit(functools.partial(model.apply, train=False))(params, x, t)
  assert y.shape == (2, 8, 8, 3) and np.all(np.asarray(y) == 0.0)
  block = params["params"]["down0_res0"]
  assert block["Dense_0"]["kernel"].shape == (64, 16)  # additive: one value per channel
  assert np.all(np.asarray(block["Conv_1"]["kernel"]) == 0)  # last conv of the block
  assert np.all(np.asarray(params["params"]["mid_attn"]["out"]["kernel"]) == 0)


def test_dropout_only_when_training(cond_net):
  params, apply = cond_net
  params = perturb(params)
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
  t, lab = jnp.array([10.0, 400.0]), jnp.array([1, 3])
  k1, k2 = key(6), key(7)
  a, b = apply(params, x, t, lab, k1, train=True), apply(params, x, t, lab, k2, train=True)
  assert np.abs(np.asarray(a - b)).max() > 1e-3  # different masks
  np.testing.assert_array_equal(a, apply(params, x, t, lab, k1, train=True))  # same key
  e1, e2 = apply(params, x, t, lab), apply(params, x, t, lab)
  np.testing.assert_array_equal(e1, e2)
  assert np.abs(np.asarray(e1 - a)).max() > 1e-3


def test_conditioning_changes_output(cond_net):
  params, apply = cond_net
  params = perturb(params)
  x = jnp.repeat(jax.random.normal(jax.random.key(8), (1, 8, 8, 3)), 4, axis=0)
  # Same image in every row; rows differ only in the conditioning scalar or the label.
  y = np.asarray(apply(params, x, jnp.array([5.0, 5.0, 5.0, 600.0]), jnp.array([0, 1, 3, 0])))
  assert np.abs(y[0] - y[1]).max() > 1e-3  # class 0 vs class 1
  assert np.abs(y[0] - y[2]).max() > 1e-3  # class 0 vs null class
  assert np.abs(y[0] - y[3]).max() > 1e-3  # timestep 5 vs 600
  # labels=None means the null class (index num_classes).
  y_none = np.asarray(apply(params, x, jnp.array([5.0, 5.0, 5.0, 600.0])))
  np.testing.assert_allclose(y_none[2], y[2], rtol=1e-5, atol=1e-5)
  assert np.abs(y_none[0] - y[0]).max() > 1e-3


def test_bfloat16_close_to_float32(cond_net):
  params, apply = cond_net
  params = perturb(params)
  x = jax.random.normal(jax.random.key(9), (2, 8, 8, 3))
  t, lab = jnp.array([20.0, 700.0]), jnp.array([2, 0])
  y32, y16 = apply(params, x, t, lab), apply(params, x, t, lab, dtype="bfloat16")
  assert y16.dtype == jnp.float32 and jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
  err = np.abs(np.asarray(y16 - y32)).max() / np.abs(np.asarray(y32)).max()
  assert 0 < err < 0.05, err  # bfloat16 really used (not bit-identical), yet close


def test_unconditional_model_rejects_labels():
  model = unet.create_model(tiny(), image_size=8, channels=3)
  with pytest.raises(ValueError, match="num_classes"):
    shapes(model, (2, 8, 8, 3), labels=True)


def test_timestep_embedding():
  e = np.asarray(unet.timestep_embedding(jnp.array([0.0, 1.0]), 8))
  np.testing.assert_allclose(e[0], [0, 0, 0, 0, 1, 1, 1, 1])
  freqs = 10000.0 ** (-np.arange(4) / 4)  # max period 10000
  np.testing.assert_allclose(e[1], np.concatenate([np.sin(freqs), np.cos(freqs)]), rtol=1e-6)


def test_group_norm_matches_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, (2, 4, 4, 12)).astype(np.float32)  # non-zero mean
  scale, shift = rng.normal(size=(2, 12)), rng.normal(size=(2, 12))
  norm = unet.GroupNorm(num_groups=4)
  params = {"params": {"scale": rng.normal(size=12), "bias": rng.normal(size=12)}}
  y = np.asarray(norm.apply(params, jnp.asarray(x, jnp.bfloat16), scale, shift))
  xg = x.astype(jnp.bfloat16).astype(np.float32).reshape(2, 16, 4, 3)
  ref = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-6)
  ref = ref.reshape(2, 4, 4, 12) * params["params"]["scale"] + params["params"]["bias"]
  ref = ref * (1 + scale[:, None, None]) + shift[:, None, None]
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_cifar10_parameter_count():
  cfg = cifar10.get_config()
  model = unet.create_model(
    net_config(cfg.model), image_size=cfg.data.image_size, channels=cfg.data.channels
  )
  _, n = shapes(model, (1, 32, 32, 3), labels=False)
  assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
  assert n == 35_746_307  # diffusers' google/ddpm-cifar10-32 port of the DDPM network


def test_sprites_peer_network_parameter_count():
  cfg = sprites.get_config("peer")
  model = unet.create_model(net_config(cfg.model), image_size=16, channels=3)
  _, n = shapes(model, (1, 16, 16, 3), labels=False)
  assert n == 3_940_547  # diffusers UNet2DModel, peer-bench `sprites16s`
  film = unet.create_model(net_config(cfg.model), image_size=16, channels=3).clone(film=True)
  # FiLM doubles each block's conditioning projection: 4 * 32 inputs per extra output.
  assert shapes(film, (1, 16, 16, 3), labels=False)[1] > n


def test_sprites_config_builds():
  cfg = sprites.get_config()
  model = unet.create_model(
    net_config(cfg.model), image_size=cfg.data.image_size, channels=cfg.data.channels
  )
  out, n = shapes(model, (2, 16, 16, 3), labels=cfg.model.num_classes > 0)
  assert out.shape == (2, 16, 16, 3)
  assert round(n / 1e6, 2) == 1.19, n  # the size the config, README and benchmarks state
  params = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)), None, train=False
    )
  )
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


def test_attention_implementation_choice():
  cfg = net_config(sprites.get_config().model)  # 4 heads over 64 channels: head dim 16
  pick = lambda backend, **kw: unet.attention_implementation(
    dataclasses.replace(cfg, **kw), image_size=16, backend=backend
  )
  assert pick("gpu") is None and pick("cpu", dtype="bfloat16") is None  # float32 / no GPU: XLA
  assert pick("gpu", dtype="bfloat16") == "cudnn"
  assert pick("gpu", dtype="bfloat16", num_heads=16) is None  # head dim 4: cuDNN cannot
  assert pick("gpu", dtype="bfloat16", attention_impl="xla") is None
  with pytest.raises(ValueError, match="needs dtype bfloat16"):
    pick("gpu", attention_impl="cudnn")
  with pytest.raises(ValueError, match="multiples of 8"):
    pick("gpu", dtype="bfloat16", num_heads=16, attention_impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl 'flash'"):
    unet.validate(dataclasses.replace(cfg, attention_impl="flash"), image_size=16)


@pytest.mark.parametrize(
  "overrides,size,match",
  [
    (dict(attn_resolutions=(16,)), 8, r"attention resolution.*\[16\].*\[8, 4\]"),
    (dict(channel_mult=(1, 2, 2, 2)), 12, r"12x12 cannot be halved 3 times.*divisible by 8"),
    (dict(num_groups=32, base_channels=48), 8, r"GroupNorm cannot split 48 channels into 32"),
    (dict(num_groups=32), 8, r"GroupNorm cannot split 48 channels"),  # 32 + 16 skip concat
    (dict(dtype="float16"), 8, r"unknown model dtype 'float16'.*bfloat16"),
    (dict(num_heads=3), 8, r"num_heads=3.*divisor"),
    (dict(head_dim=12), 8, r"head_dim=12.*divisor"),
    (dict(dropout=1.0), 8, r"dropout"),
  ],
)
def test_bad_configurations(overrides, size, match):
  with pytest.raises(ValueError, match=match):
    unet.validate(tiny(**overrides), image_size=size)
  with pytest.raises(ValueError, match=match):
    unet.create_model(tiny(**overrides), image_size=size, channels=3)


def test_direct_module_checks_input_size():
  model = unet.UNet(
    out_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_groups=8, attn_resolutions=()
  )
  with pytest.raises(ValueError, match="cannot be halved"):
    shapes(model, (1, 10, 10, 3), labels=False)


def test_remat_same_params_outputs_and_gradients():
  """config.model.remat recomputes blocks in the backward pass: the same parameter tree (so
  checkpoints are interchangeable), outputs and gradients (dropout included: the same rng
  streams), and the remat is really there (checkpoint primitives in the gradient's jaxpr)."""
  cfg = tiny(
    num_classes=3,
    dropout=0.2,
    base_channels=8,
    channel_mult=(1,),
    attn_resolutions=(),
    num_groups=4,
  )
  plain = unet.create_model(cfg, image_size=4, channels=3)
  cfg = dataclasses.replace(cfg, remat=True)
  remat = unet.create_model(cfg, image_size=4, channels=3)
  assert remat.remat and not plain.remat
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  t, lab = jnp.array([3.0, 700.0]), jnp.array([0, 2])
  abstract = lambda m: jax.eval_shape(functools.partial(m.init, train=False), key(1), x, t, lab)
  assert jax.tree.map(jnp.shape, abstract(remat)) == jax.tree.map(jnp.shape, abstract(plain))
  params = perturb(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract(plain)))

  def loss(m, p):
    y = m.apply(p, x, t, lab, train=True, rngs={"dropout": key(2)})
    return jnp.mean(jnp.square(y - x)), y

  grads = [jax.grad(functools.partial(loss, m), has_aux=True) for m in (plain, remat)]
  (g0, y0), (g1, y1) = jax.jit(lambda p: (grads[0](p), grads[1](p)))(params)
  assert float(jnp.abs(y0).max()) > 0.01  # a real output, not the zero function
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)

  # One rematerialised call per residual block (down, 2 mid, 2 up) and the mid attention.
  def calls(m):  # the loss's jaxpr, traced once per model
    text = str(jax.make_jaxpr(lambda p: loss(m, p)[0])(params))
    return text.count("remat2[") + text.count("checkpoint[")

  assert (calls(plain), calls(remat)) == (0, 6)


def test_second_time_is_embedded_like_the_first_and_absent_by_default():
  """t2 passes through its own copy of the time MLP and is added: with cond2's weights equal to
  cond's and t2 = t, the network equals a one-time network whose last time layer is doubled. A
  one-time network has no cond2 parameters and refuses t2."""
  cfg = tiny(attn_resolutions=())
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  t = jnp.array([3.0, 700.0])
  one = unet.create_model(cfg, image_size=8, channels=3)
  two = unet.create_model(cfg, image_size=8, channels=3, second_time=True)
  # Compiled whole: op by op, each of the networks' operations is a program of its own.
  apply1 = jax.jit(lambda p, x, t: one.apply(p, x, t, None, train=False))
  apply2 = jax.jit(lambda p, x, t, t2: two.apply(p, x, t, None, train=False, t2=t2))
  p1 = perturb(jax.jit(lambda k: one.init(k, x, t, None, train=False))(key(0)))
  assert not any("cond2" in k for k in p1["params"])
  p2 = jax.eval_shape(lambda k: two.init(k, x, t, None, train=False, t2=t), key(0))
  assert {k for k in p2["params"]} - set(p1["params"]) == {"cond2_mlp_0", "cond2_mlp_1"}
  p2 = {"params": {**p1["params"], "cond2_mlp_0": p1["params"]["cond_mlp_0"]}}
  p2["params"]["cond2_mlp_1"] = p1["params"]["cond_mlp_1"]
  doubled = {"params": dict(p1["params"])}
  doubled["params"]["cond_mlp_1"] = jax.tree.map(lambda a: 2 * a, p1["params"]["cond_mlp_1"])
  want = apply1(doubled, x, t)
  got = apply2(p2, x, t, t)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  other = apply2(p2, x, t, jnp.zeros(2))
  assert float(jnp.abs(other - got).max()) > 1e-3  # t2 reaches the output
  with pytest.raises(ValueError, match="second_time"):
    one.apply(p1, x, t, None, train=False, t2=t)
