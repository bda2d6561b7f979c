"""diffusion/nets/dit.py and convert.py: parity with diffusers' DiTTransformer2DModel, the
options against float64 NumPy references written from their papers, the presets' parameter
counts against the DiT paper, config errors, and a tiny DiT through every process and solver."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_DIT, launch, tiny_config

import launch as launch_module
from configs import cifar10, imagenet, sprites
from diffusion import flops, train, unet
from diffusion.model import Diffusion, SampleSettings, net_config
from diffusion.modes import sample as sample_mode
from diffusion.nets import convert, dit

# ---- parity with diffusers ---------------------------------------------------------------------


def diffusers_dit(heads, head_dim, channels, out, depth, size, patch, classes, seed=0):
  """diffusers' DiT in float32 with every weight random (zero-initialised layers included) and
  the per-block embedder copies tied to block 0's, as in the published checkpoints."""
  import torch  # imported where used, not by every pytest worker (docs/performance.md)
  from diffusers import DiTTransformer2DModel

  torch.manual_seed(seed)
  m = DiTTransformer2DModel(
    num_attention_heads=heads,
    attention_head_dim=head_dim,
    in_channels=channels,
    out_channels=out,
    num_layers=depth,
    sample_size=size,
    patch_size=patch,
    num_embeds_ada_norm=classes,
    norm_eps=1e-6,
  ).eval()
  sd = m.state_dict()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for v in sd.values():  # O(1) activations: std 1 / sqrt(fan-in) (rows), biases 1/4
      v.copy_(torch.randn(v.shape, generator=g) / np.sqrt(v[0].numel() if v.ndim > 1 else 16))
    for k, v in sd.items():
      if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
        v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
  return m


PARITY = {  # name: (heads, head_dim, channels, out, depth, size, patch, classes)
  "DiT-S/2-like": (6, 64, 4, 4, 2, 8, 2, 10),
  "learned-sigma": (4, 16, 4, 8, 2, 16, 4, 5),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_matches_diffusers_dit(name):
  import torch

  heads, hd, ch, out, depth, size, patch, classes = PARITY[name]
  m = diffusers_dit(heads, hd, ch, out, depth, size, patch, classes)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, ch, size, size)).astype(np.float32)
  t = np.array([1.0, 500.0, 999.0], np.float32)
  y = np.array([0, classes - 1, classes])  # the last: the null class
  with torch.no_grad():
    ref = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
  cfg = dit.DiTConfig(
    patch_size=patch,
    hidden_size=heads * hd,
    depth=depth,
    num_heads=heads,
    num_classes=classes,
    time_freq_shift=1.0,
  )
  params = convert.dit_from_diffusers({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
  net = dit.create_model(cfg, image_size=size, channels=ch, out_channels=out)
  xj, tj, yj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y)
  got = np.asarray(net.apply(params, xj, tj, yj)).transpose(0, 3, 1, 2)
  assert got.shape == ref.shape == (3, out, size, size)
  assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(got - ref).max()
  # The shift matters: DiT's own frequencies (shift 0) give other outputs.
  dit0 = net.clone(config=dataclasses.replace(cfg, time_freq_shift=0.0))
  other = np.asarray(dit0.apply(params, xj, tj, yj)).transpose(0, 3, 1, 2)
  assert np.abs(other - ref).max() > 1e-3 * np.abs(ref).max()


def test_converter_refuses_untied_embedders_and_missing_blocks():
  m = diffusers_dit(2, 8, 4, 4, 2, 8, 2, 3)
  sd = {k: v.numpy().copy() for k, v in m.state_dict().items()}
  cfg = dit.DiTConfig(patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3)
  key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  sd[key] = sd[key] + 1
  with pytest.raises(ValueError, match="differs from block 0's"):
    convert.dit_from_diffusers(sd, cfg)
  with pytest.raises(ValueError, match="do not fit a depth-1 DiT"):
    convert.dit_from_diffusers(
      {k: v.numpy() for k, v in m.state_dict().items()}, dataclasses.replace(cfg, depth=1)
    )
  with pytest.raises(ValueError, match="no rope option|no pos_embed"):
    convert.dit_from_diffusers(sd, dataclasses.replace(cfg, pos_embed="rope"))


def test_convert_cli_and_init_from(tmp_path):
  from safetensors.torch import save_file

  m = diffusers_dit(2, 8, 3, 3, 2, 8, 2, 4)
  src = tmp_path / "dit" / "diffusion_pytorch_model.safetensors"
  src.parent.mkdir()
  save_file(m.state_dict(), str(src))
  (src.parent / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
  out = tmp_path / "dit.safetensors"
  assert convert.main(["dit", str(src), str(out)]) == 0
  for bad in ("weights.pt", "weights.bin", "weights.pkl"):
    (tmp_path / bad).write_bytes(b"not read")
    assert convert.main(["dit", str(tmp_path / bad), str(out)]) == 2
  c = tiny_config()
  c.model.update(
    arch="dit",
    patch_size=2,
    hidden_size=16,
    depth=2,
    num_heads=2,
    num_classes=4,
    init_from=str(out),
  )
  d = Diffusion.from_config(c)
  params = d.pretrained_params()
  want = convert.dit_from_diffusers({k: v.numpy() for k, v in m.state_dict().items()}, d.net.config)
  jax.tree.map(np.testing.assert_array_equal, params, want)
  # fine-tuning starts from them; sampling without checkpoints uses them
  state = train.initial_state(d, train.optimizer(c.train), c.seed)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), want)
  c.sample.update(num_images=4, batch_size=4, gif_images=0, num_steps=2)
  folder = sample_mode.run(c, str(tmp_path / "run"), progress=False)
  images = np.load(f"{folder}/samples.npz")["images"]
  assert images.shape == (4, 8, 8, 3) and images.std() > 0
  c.model.depth = 3  # another model: a named shape error
  with pytest.raises(Exception, match="init_from"):
    Diffusion.from_config(c).pretrained_params()
  c.model.init_from = str(tmp_path / "weights.pt")
  with pytest.raises(ValueError, match="only .safetensors"):
    Diffusion.from_config(c)


def test_convert_cli_refuses_a_pickle_in_one_line(tmp_path, capfd):
  (tmp_path / "w.bin").write_bytes(b"\x80\x04 a pickle")
  assert convert.main(["dit", str(tmp_path / "w.bin"), str(tmp_path / "o.safetensors")]) == 2
  err = capfd.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "only .safetensors" in err[0]
  assert not (tmp_path / "o.safetensors").exists()


# ---- the options against float64 references ---------------------------------------------------


def rotation(angle):
  return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def rope_matrix(row, col, dim):
  """RoFormer's block-diagonal rotation (eq. 15) for a 2D position: the first dim/2 channels
  turn with the row, the last dim/2 with the column, pair i by theta_i = 10^4^(-i / (dim/4))."""
  q = dim // 4
  thetas = 10000.0 ** (-np.arange(q) / q)
  r = np.zeros((dim, dim))
  for axis, pos in enumerate((row, col)):
    for i, th in enumerate(thetas):
      j = 2 * (axis * q + i)
      r[j : j + 2, j : j + 2] = rotation(pos * th)
  return r


def np_block(p, x, c, cfg, grid):
  """One adaLN-Zero DiT block in float64 from the papers' formulas (x (B, L, D), c = SiLU(cond)):
  LayerNorm / RMSNorm (Zhang & Sennrich 2019) without affine, qk-norm = RMSNorm with a gain,
  SwiGLU (Shazeer 2020) (swish(xW) * xV) W2, 2D axial RoPE, softmax(q k^T / sqrt(d)) v."""
  f64 = lambda a: np.asarray(a, np.float64)
  dense = lambda v, q: v @ f64(q["kernel"]) + f64(q["bias"])
  d, nh = cfg.hidden_size, cfg.num_heads
  hd = d // nh

  def rms(v, eps=1e-6):
    return v / np.sqrt((v**2).mean(-1, keepdims=True) + eps)

  def norm(v):
    return rms(v - v.mean(-1, keepdims=True) if cfg.norm == "layernorm" else v, cfg.norm_eps)

  sa, ca, ga, sm, cm, gm = np.split(dense(c, p["adaLN"])[:, None], 6, -1)
  h = norm(x) * (1 + ca) + sa
  qkv = dense(h, p["attn"]["qkv"]).reshape(*h.shape[:2], 3, nh, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  if cfg.qk_norm:
    q, k = rms(q) * f64(p["attn"]["q_norm"]["scale"]), rms(k) * f64(p["attn"]["k_norm"]["scale"])
  if cfg.pos_embed == "rope":
    mats = np.stack([rope_matrix(r, s, hd) for r in range(grid[0]) for s in range(grid[1])])
    q, k = np.einsum("lij,blhj->blhi", mats, q), np.einsum("lij,blhj->blhi", mats, k)
  logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(hd)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bhlm,bmhd->blhd", w, v).reshape(h.shape)
  x = x + ga * dense(a, p["attn"]["proj"])
  h = norm(x) * (1 + cm) + sm
  if cfg.mlp == "swiglu":
    hid = cfg.mlp_hidden
    kern, bias = f64(p["mlp"]["fc1"]["kernel"]), f64(p["mlp"]["fc1"]["bias"])
    u = h @ kern[:, :hid] + bias[:hid]
    g = h @ kern[:, hid:] + bias[hid:]
    h = (u / (1 + np.exp(-u))) * g
  else:
    u = dense(h, p["mlp"]["fc1"])
    h = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
  return x + gm * dense(h, p["mlp"]["fc2"])


@pytest.mark.parametrize(
  "options",
  [
    dict(norm="rmsnorm"),
    dict(mlp="swiglu"),
    dict(pos_embed="rope"),
    dict(qk_norm=True),
    dict(norm="rmsnorm", mlp="swiglu", pos_embed="rope", qk_norm=True),
  ],
)
def test_block_options_match_float64_reference(options):
  cfg = dit.DiTConfig(hidden_size=32, num_heads=2, depth=1, **options)
  grid = (3, 4)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 12, 32)).astype(np.float32)
  c = rng.standard_normal((2, 32)).astype(np.float32)
  angles = jnp.asarray(dit.rope_angles(16, *grid)) if cfg.pos_embed == "rope" else None
  block = dit.Block(cfg, jnp.float32)
  shapes = jax.eval_shape(block.init, jax.random.key(0), x, c, angles)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  if cfg.qk_norm:  # gains near 1, not 0
    for n in ("q_norm", "k_norm"):
      params["params"]["attn"][n]["scale"] += 1.0
  got = np.asarray(block.apply(params, x, c, angles))
  want = np_block(params["params"], x.astype(np.float64), c.astype(np.float64), cfg, grid)
  # Elements near zero differ by float32 rounding of the block's intermediates (outputs up to
  # ~300: one float32 ulp there is 3e-5), whatever the order of the sums XLA emits.
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
  if cfg.mlp == "swiglu":  # the hidden width keeps about the GELU MLP's parameters
    assert cfg.mlp_hidden == int(2 * 4 * 32 / 3)


def test_rope_scores_depend_only_on_the_offset():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 16)).astype(np.float32)
  angles = jnp.asarray(dit.rope_angles(16, 6, 6))
  at = lambda v, r, s: np.asarray(dit.apply_rope(jnp.broadcast_to(v, (1, 36, 1, 16)), angles))[
    0, r * 6 + s, 0
  ]
  a = at(q, 1, 2) @ at(k, 3, 5)
  b = at(q, 2, 0) @ at(k, 4, 3)  # same offset (2, 3)
  c = at(q, 1, 2) @ at(k, 3, 4)
  assert a == pytest.approx(b, rel=1e-5) and abs(a - c) > 1e-3


# ---- the network -------------------------------------------------------------------------------


def tiny_dit(**fields):
  return dit.DiTConfig(patch_size=2, hidden_size=16, depth=2, num_heads=2, **fields)


def test_zero_at_initialisation_and_the_second_time_input():
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([3.0, 700.0])
  base = dit.create_model(tiny_dit(num_classes=3), image_size=8, channels=3, out_channels=6)
  params = jax.jit(lambda k: base.init(k, x, t, jnp.array([0, 3])))(jax.random.key(0))
  y = base.apply(params, x, t, jnp.array([0, 3]))
  assert y.shape == (2, 8, 8, 6) and not np.asarray(y).any()
  two = base.clone(config=dataclasses.replace(base.config, second_time=True))
  p2 = jax.jit(lambda k: two.init(k, x, t, None, t2=t))(jax.random.key(0))
  extra = set(p2["params"]) - set(params["params"])
  assert extra == {"t2_embedder"} and set(params["params"]) <= set(p2["params"])
  assert jax.tree.map(jnp.shape, p2["params"]["t2_embedder"]) == jax.tree.map(
    jnp.shape, p2["params"]["t_embedder"]
  )
  moved = jax.tree.map(lambda p: p + 0.1, p2)  # off the zero init: t2 changes the output
  out = lambda t2: np.asarray(two.apply(moved, x, t, None, t2=t2))
  assert np.abs(out(t) - out(t + 100.0)).max() > 1e-3
  with pytest.raises(ValueError, match="pass t2"):
    two.apply(moved, x, t, None)
  with pytest.raises(ValueError, match="second_time=False"):
    base.apply(params, x, t, None, t2=t)


def test_remat_and_bfloat16_keep_the_parameters():
  """remat: the same parameter tree, outputs and gradients, with checkpoints in the jaxpr;
  bfloat16 compute: float32 parameters and output, close to the float32 network's."""
  cfg = tiny_dit(num_classes=3, qk_norm=True, mlp="swiglu")
  x, t, y = jnp.ones((2, 8, 8, 3)), jnp.array([3.0, 700.0]), jnp.array([0, 3])
  nets = {
    name: dit.create_model(dataclasses.replace(cfg, **kw), image_size=8, channels=3, out_channels=3)
    for name, kw in (("plain", {}), ("remat", dict(remat=True)), ("bf16", dict(dtype="bfloat16")))
  }
  shapes = {k: jax.eval_shape(n.init, jax.random.key(0), x, t, y) for k, n in nets.items()}
  assert shapes["plain"] == shapes["remat"] == shapes["bf16"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["plain"]
  )
  loss = lambda n, p: jnp.mean(jnp.square(n.apply(p, x, t, y)))
  grads = {k: jax.jit(jax.grad(functools.partial(loss, n))) for k, n in nets.items()}
  g0, g1 = grads["plain"](params), grads["remat"](params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), g0, g1)
  text = str(jax.make_jaxpr(grads["remat"])(params))
  assert "checkpoint" in text or "remat" in text
  out32 = np.asarray(nets["plain"].apply(params, x, t, y))
  out16 = nets["bf16"].apply(params, x, t, y)
  assert out16.dtype == jnp.float32
  assert np.abs(np.asarray(out16) - out32).max() < 0.05 * np.abs(out32).max()


def test_attention_implementation_choice():
  pick = lambda backend, **kw: dit.attention_implementation(tiny_dit(**kw), backend)  # head dim 8
  assert pick("gpu") is None and pick("cpu", dtype="bfloat16") is None
  assert pick("gpu", dtype="bfloat16") == "cudnn"
  assert pick("gpu", dtype="bfloat16", attention_impl="xla") is None
  with pytest.raises(ValueError, match="needs dtype bfloat16"):
    pick("gpu", attention_impl="cudnn")


# The DiT paper's model sizes in millions of parameters (Table 1 / Table 4); the patch size moves
# a count by < 0.2% (the patch embedding and the output layer).
PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}


def test_preset_parameter_counts_match_the_paper():
  """At 32x32x4 inputs, 1,000 classes, learned sigma (8 outputs), counted with eval_shape."""
  x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
  t, y = jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
  counts = {}
  for preset in dit.PRESETS:
    c = tiny_config()
    c.model.update(arch="dit", preset=preset, num_classes=1000)
    net = dit.DiT(net_config(c.model), out_channels=8)
    params = jax.eval_shape(lambda x, t, y, n=net: n.init(jax.random.key(0), x, t, y), x, t, y)
    counts[preset] = unet.count_params(params)
    paper = PAPER_MILLIONS[preset.split("-")[1].split("/")[0]] * 1e6
    assert abs(counts[preset] - paper) < 0.01 * paper, (preset, counts[preset])
  # + the fixed position embedding, which the DiT code keeps as a (frozen) parameter: the count
  # the DiT code reports for DiT-XL/2
  assert counts["DiT-XL/2"] + 256 * 1152 == 675_129_632
  assert counts["DiT-S/2"] < counts["DiT-S/4"] < counts["DiT-S/8"]


def test_configs_build():
  d = Diffusion.from_config(sprites.get_config("dit"))
  assert isinstance(d.net, dit.DiT) and round(unet.count_params(d.param_shapes()) / 1e6, 1) == 1.9
  d = Diffusion.from_config(cifar10.get_config("dit"))
  assert d.net.config.hidden_size == 768 and d.net.config.patch_size == 2
  c = imagenet.get_config("dit_xl2")
  d = Diffusion.from_config(c)  # the network and process build; the latents are checked at launch
  assert d.net.config.hidden_size == 1152 and d.net.config.depth == 28
  assert d.variance == "learned_range" and d.image_shape == (32, 32, 4)
  with pytest.raises(FileNotFoundError, match="not a latent shard folder"):
    launch_module.check(c, "train")


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(arch="vit"), "unknown config.model.arch 'vit'"),
    (dict(arch="dit", preset="DiT-M/2"), "unknown config.model.preset 'DiT-M/2'"),
    (dict(preset="DiT-S/2"), "names a DiT: set config.model.arch='dit'"),
    (dict(arch="dit", patch_size=3), "patch_size 3 does not divide the 8x8 image"),
    (dict(arch="dit", hidden_size=24, num_heads=5), "num_heads 5 does not divide hidden_size 24"),
    (dict(arch="dit", norm="batchnorm"), "unknown norm 'batchnorm'"),
  ],
)
def test_bad_model_fields_are_one_line_errors_before_compiling(fields, message):
  c = tiny_config()
  c.model.update(fields)
  with pytest.raises(ValueError, match=message) as e:
    launch_module.check(c, "train")
  assert "\n" not in str(e.value) and "config.model" in str(e.value)


def test_transformer_flops_count_attention():
  """DiT-XL/2 at 32x32x4 (L = 256 tokens of width D = 1152, 28 blocks): per block qkv, output
  projection and MLP 12 L D^2, attention QK^T and AV 2 L^2 D, adaLN 6 D^2 multiply-adds; the
  paper's 118.6 "Gflops" are multiply-adds, the count here is 2 FLOPs per multiply-add."""
  net = dit.DiT(dit.DiTConfig.preset("DiT-XL/2", num_classes=1000), out_channels=8)
  n = flops.net_forward(net, (32, 32, 4))
  big, d = 256, 1152
  blocks = 28 * (12 * big * d * d + 2 * big * big * d + 6 * d * d)
  rest = big * d * 16 + 2 * d * d + big * d * 32 + 256 * d + d * d  # patches, final, time MLP
  assert n == 2 * (blocks + rest)
  assert n / 2 == pytest.approx(118.6e9, rel=0.005)


# ---- every process and solver ------------------------------------------------------------------


@pytest.mark.parametrize("process", ["vp", "edm", "flow"])
def test_tiny_dit_trains_and_samples_with_every_process(process):
  c = tiny_config()
  c.model.update(TINY_DIT)
  prediction = {"vp": "eps", "edm": "edm", "flow": "flow"}[process]
  c.diffusion.update(process=process, prediction=prediction)
  d = Diffusion.from_config(c)
  params = d.init_params(jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p + 0.02, params)  # off the zero function
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)), jnp.uint8)

  @jax.jit
  def step(p, key):
    loss = lambda p: d.loss(p, images, jnp.zeros((4,), jnp.int32), key).loss.mean()
    value, g = jax.value_and_grad(loss)(p)
    return value, jax.tree.map(lambda a, b: a - 1e-2 * b, p, g)

  losses = []
  for i in range(3):
    value, params = step(params, jax.random.PRNGKey(i))
    losses.append(float(value))
  assert all(np.isfinite(losses))
  for sampler in ("euler", "heun", "dpm_solver++"):
    fn = d.sample_fn(SampleSettings(sampler=sampler, num_steps=3, spacing="karras"))
    x = np.asarray(fn(params, jax.random.PRNGKey(5), jnp.zeros((2,), jnp.int32), 2))
    assert x.shape == (2, 8, 8, 3) and np.isfinite(x).all() and x.std() > 0


def test_tiny_dit_trains_and_samples_through_launch(tmp_path):
  flags = [f"--config.model.{k}={v}" for k, v in TINY_DIT.items()]
  r = launch(
    tmp_path / "run",
    *flags,
    "--config.train.num_steps=2",
    "--config.sample.num_images=4",
    "--config.sample.sampler=dpm_solver++",
    "--config.sample.spacing=logsnr",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / "run" / "samples" / "step_2.png").exists()
  assert (tmp_path / "run" / "checkpoints" / "2").exists()
  r = launch(tmp_path / "bad", *flags, "--config.model.num_heads=3")  # 3 does not divide 16
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(errors) == 1 and "num_heads 3 does not divide hidden_size 16" in errors[0]
  assert not (tmp_path / "bad").exists()
