"""The Diffusion Transformer (DiT, Peebles & Xie 2023) in Flax linen, with the options of later
papers (qk-norm, RMSNorm, SwiGLU, 2D axial RoPE).

Layout: x (B, H, W, C) -> patchify (a p x p conv with stride p: (B, H/p * W/p, D) tokens, row
major) + a fixed 2D sin-cos position embedding -> `depth` adaLN-Zero blocks -> final adaLN layer
-> linear to p*p*C_out per token -> unpatchify (B, H, W, C_out).

Conditioning c = MLP(sinusoid(t)) + Embed(label) (+ MLP(sinusoid(t2)) with `second_time`), one
(B, D) vector; every block regresses from SiLU(c) a shift, scale and gate for its attention and its
MLP branch (6D values, zero-initialised: each block starts as the identity):

    x = x + gate_a * Attn(norm(x) * (1 + scale_a) + shift_a)
    x = x + gate_m * MLP(norm(x) * (1 + scale_m) + shift_m)

The final layer (shift, scale and the output projection) is zero-initialised too, so the fresh
network is the zero function. Labels lie in [0, num_classes]; num_classes is the null class of
classifier-free guidance.

Time embedding (256 channels, max period 10^4): freqs_i = exp(-ln(10^4) i / (128 - shift)),
i < 128, emb = [cos(t freqs), sin(t freqs)]; `time_freq_shift` = 0 is the DiT code's, 1 diffusers'.

Options: `norm` layernorm | rmsnorm (both without affine parameters: adaLN modulates);
`qk_norm`: RMSNorm with a learned scale on each head's queries and keys; `mlp` gelu (tanh
approximation, hidden mlp_ratio * D) | swiglu (silu(x W1) * (x W3) W2, hidden 2/3 mlp_ratio * D,
about the same parameters); `pos_embed` sincos (added to the tokens) | rope (2D axial rotary on
q and k: the first half of each head's channels rotate with the row, the second with the column).

Mixed precision: parameters float32; matrix products in `dtype`; the residual stream, the
normalisations, softmax, conditioning and the output layer in float32. With `remat` every block
is rematerialised (same parameter tree).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBEDS = ("sincos", "rope")
FREQ_DIM = 256  # sinusoid size of the time embedders
# name -> (depth, hidden_size, num_heads), the DiT paper's Table 1; "/p" is the patch size.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = {f"DiT-{s}/{p}": (*SIZES[s], p) for s in SIZES for p in (2, 4, 8)}
_zeros = nn.initializers.zeros
_xavier = nn.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """The architecture of a DiT (defaults: DiT-S/2, unconditional)."""

  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0  # > 0: label embedding with num_classes + 1 rows (the last: null)
  qk_norm: bool = False
  norm: str = "layernorm"  # NORMS
  mlp: str = "gelu"  # MLPS
  pos_embed: str = "sincos"  # POS_EMBEDS
  time_freq_shift: float = 0.0  # 0: DiT's time frequencies; 1: diffusers'
  norm_eps: float = 1e-6
  second_time: bool = False  # a second (B,) time input t2, embedded like t and added to c
  dtype: str = "float32"  # compute dtype, DTYPES
  attention_impl: str = ""  # "" (cudnn on a GPU in bfloat16 where head dims allow) | xla | cudnn
  remat: bool = False

  @classmethod
  def preset(cls, name: str, **fields: Any) -> DiTConfig:
    """The config of a named size, "DiT-XL/2" etc. (PRESETS), with `fields` for the rest."""
    if name not in PRESETS:
      raise ValueError(f"unknown DiT preset {name!r}; use one of: {', '.join(PRESETS)}.")
    depth, hidden, heads, patch = PRESETS[name]
    return cls(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, **fields)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    h = int(self.hidden_size * self.mlp_ratio)
    return int(2 * h / 3) if self.mlp == "swiglu" else h


def check(cfg: DiTConfig, *, height: int, width: int) -> None:
  """Raises ValueError (cause and fix, in the DiTConfig's field names) for an impossible DiT."""
  for name, value, known in (
    ("norm", cfg.norm, NORMS),
    ("mlp", cfg.mlp, MLPS),
    ("pos_embed", cfg.pos_embed, POS_EMBEDS),
    ("dtype", cfg.dtype, tuple(DTYPES)),
    ("attention_impl", cfg.attention_impl, ("", "xla", "cudnn")),
  ):
    if value not in known:
      raise ValueError(f"unknown {name} {value!r}; set {name} to one of: {', '.join(known)}.")
  if min(cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.num_heads) < 1 or cfg.mlp_ratio <= 0:
    raise ValueError(
      "patch_size, hidden_size, depth, num_heads and mlp_ratio must be positive; fix them."
    )
  if height % cfg.patch_size or width % cfg.patch_size:
    raise ValueError(
      f"patch_size {cfg.patch_size} does not divide the {height}x{width} image; set "
      "patch_size to a divisor of the image size or change the image size."
    )
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(
      f"num_heads {cfg.num_heads} does not divide hidden_size {cfg.hidden_size}; set num_heads "
      "to a divisor of hidden_size."
    )
  if cfg.hidden_size % 4:
    raise ValueError(
      f"hidden_size {cfg.hidden_size} is not a multiple of 4 (the 2D sin-cos embedding); fix it."
    )
  if cfg.pos_embed == "rope" and cfg.head_dim % 4:
    raise ValueError(
      f"2D RoPE needs a head dim divisible by 4, got {cfg.head_dim} (hidden_size / num_heads); "
      "change hidden_size or num_heads."
    )
  if cfg.num_classes < 0:
    raise ValueError(f"num_classes must be >= 0, got {cfg.num_classes}.")


def attention_implementation(cfg: DiTConfig, backend: str | None = None) -> str | None:
  """`implementation` for jax.nn.dot_product_attention: cuDNN's flash kernel when asked, or by
  default on a GPU in bfloat16 with a head dim that is a multiple of 8 up to 128; else XLA's."""
  fits = cfg.dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
  if cfg.attention_impl == "cudnn" and not fits:
    raise ValueError(
      f"attention_impl 'cudnn' needs dtype bfloat16 and a head dim that is a multiple of 8 up "
      f"to 128 (got {cfg.dtype}, {cfg.head_dim}); set dtype / num_heads, or attention_impl xla."
    )
  impl = cfg.attention_impl or (
    "cudnn" if fits and (backend or jax.default_backend()) == "gpu" else "xla"
  )
  return None if impl == "xla" else impl


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, shift: float = 0.0) -> jax.Array:
  """(B,) float -> (B, dim) float32 [cos | sin] with freqs exp(-ln(1e4) i / (dim/2 - shift))."""
  half = dim // 2
  # float32 constants computed as the PyTorch references do (at t ~ 1000, one ulp of a frequency
  # moves the embedding by ~6e-5)
  e = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
  freqs = np.exp(e)
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
  """Fixed 2D position embedding (h*w, dim) float32, tokens row major: the first dim/2 channels
  embed the column index, the last dim/2 the row index, each as [sin(pos w_i) | cos(pos w_i)]
  with w_i = 10^(-4 i / (dim/4)), i < dim/4 (the DiT / MAE convention)."""
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(
    np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
  )

  def one(pos: np.ndarray) -> np.ndarray:
    a = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(a), np.cos(a)], axis=1)

  return np.concatenate([one(cols), one(rows)], axis=1).astype(np.float32)


def rope_angles(head_dim: int, h: int, w: int, theta: float = 10000.0) -> np.ndarray:
  """2D axial RoPE angles (h*w, head_dim/2) float32: pair i < head_dim/4 turns by row * f_i,
  pair head_dim/4 + i by column * f_i, f_i = theta^(-i / (head_dim/4)) (RoFormer per axis)."""
  q = head_dim // 4
  f = theta ** (-np.arange(q, dtype=np.float64) / q)
  rows, cols = np.meshgrid(
    np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
  )
  return np.concatenate([rows.reshape(-1, 1) * f, cols.reshape(-1, 1) * f], 1).astype(np.float32)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates consecutive channel pairs (x_2i, x_2i+1) of x (B, L, heads, Dh) by angles (L, Dh/2)."""
  b, n, hd, d = x.shape
  pairs = x.astype(jnp.float32).reshape(b, n, hd, d // 2, 2)
  cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
  x0, x1 = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(b, n, hd, d).astype(x.dtype)


def normalize(x: jax.Array, kind: str, eps: float) -> jax.Array:
  """LayerNorm or RMSNorm over the last axis without affine parameters, in float32."""
  x = x.astype(jnp.float32)
  if kind == "layernorm":
    x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale (qk-norm); float32 out."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    return normalize(x, "rmsnorm", self.eps) * scale


class TimeEmbedder(nn.Module):
  """(B,) float -> (B, D) float32: sinusoid, Dense, SiLU, Dense."""

  hidden: int
  shift: float

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    h = nn.Dense(self.hidden, kernel_init=init, name="mlp_0")(
      timestep_embedding(t, shift=self.shift)
    )
    return nn.Dense(self.hidden, kernel_init=init, name="mlp_1")(nn.silu(h))


class Attention(nn.Module):
  """Multi-head self-attention (B, L, D) -> (B, L, D) in `dtype`; optional qk-norm and RoPE."""

  num_heads: int
  qk_norm: bool
  dtype: Any
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, angles: jax.Array | None) -> jax.Array:
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=_xavier, name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
    if self.qk_norm:
      q = RMSNorm(name="q_norm")(q).astype(self.dtype)
      k = RMSNorm(name="k_norm")(k).astype(self.dtype)
    if angles is not None:
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name="proj")(h.reshape(b, n, d))


class MLP(nn.Module):
  """Position-wise MLP (B, L, D) -> (B, L, D): gelu (tanh) or swiglu."""

  hidden: int
  kind: str
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    if self.kind == "swiglu":
      a, g = jnp.split(
        nn.Dense(2 * self.hidden, dtype=self.dtype, kernel_init=_xavier, name="fc1")(x), 2, -1
      )
      h = nn.silu(a) * g
    else:
      h = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_xavier, name="fc1")(x))
    return nn.Dense(d, dtype=self.dtype, kernel_init=_xavier, name="fc2")(h)


class Block(nn.Module):
  """One adaLN-Zero block on the float32 residual stream x (B, L, D), c = SiLU(cond) (B, D)."""

  cfg: DiTConfig
  dtype: Any
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, angles: jax.Array | None) -> jax.Array:
    cfg = self.cfg
    mod = nn.Dense(6 * cfg.hidden_size, kernel_init=_zeros, name="adaLN")(c)[:, None, :]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    h = normalize(x, cfg.norm, cfg.norm_eps) * (1 + scale_a) + shift_a
    h = Attention(cfg.num_heads, cfg.qk_norm, self.dtype, self.implementation, name="attn")(
      h.astype(self.dtype), angles
    )
    x = x + gate_a * h.astype(jnp.float32)
    h = normalize(x, cfg.norm, cfg.norm_eps) * (1 + scale_m) + shift_m
    h = MLP(cfg.mlp_hidden, cfg.mlp, self.dtype, name="mlp")(h.astype(self.dtype))
    return x + gate_m * h.astype(jnp.float32)


class DiT(nn.Module):
  """The denoiser transformer (see the module docstring); `check` lists the constraints."""

  config: DiTConfig
  out_channels: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @property
  def second_time(self) -> bool:
    return self.config.second_time

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    labels: jax.Array | None = None,
    train: bool = False,
    t2: jax.Array | None = None,
  ) -> jax.Array:
    """x (B, H, W, C); t (B,) float (timestep or noise-level input); labels (B,) int32 in
    [0, num_classes] (None = the null class); t2 (B,) float, only with second_time -> float32
    (B, H, W, out_channels). `train` is accepted for the shared interface (no dropout)."""
    del train
    cfg, dt = self.config, self.dtype
    b, height, width, _ = x.shape
    check(cfg, height=height, width=width)
    p, d = cfg.patch_size, cfg.hidden_size
    gh, gw = height // p, width // p

    c = TimeEmbedder(d, cfg.time_freq_shift, name="t_embedder")(t)
    if cfg.second_time:
      if t2 is None:
        raise ValueError("this DiT has second_time=True: pass t2, a (B,) float array.")
      c = c + TimeEmbedder(d, cfg.time_freq_shift, name="t2_embedder")(t2)
    elif t2 is not None:
      raise ValueError("t2 was given to a DiT with second_time=False; pass t2=None.")
    if cfg.num_classes > 0:
      if labels is None:
        labels = jnp.full((b,), cfg.num_classes, jnp.int32)
      table = nn.Embed(
        cfg.num_classes + 1, d, embedding_init=nn.initializers.normal(0.02), name="y_embedder"
      )
      c = c + table(labels)
    elif labels is not None:
      raise ValueError("labels were given to an unconditional DiT (num_classes=0); pass None.")
    c = nn.silu(c)

    h = nn.Conv(
      d, (p, p), strides=(p, p), padding="VALID", dtype=dt, kernel_init=_xavier, name="patch_embed"
    )(x.astype(dt))
    h = h.reshape(b, gh * gw, d).astype(jnp.float32)
    angles = None
    if cfg.pos_embed == "rope":
      angles = jnp.asarray(rope_angles(cfg.head_dim, gh, gw))
    else:
      h = h + jnp.asarray(sincos_2d(d, gh, gw))[None]

    block = nn.remat(Block) if cfg.remat else Block
    for i in range(cfg.depth):
      h = block(cfg, dt, self.attention_impl, name=f"block_{i}")(h, c, angles)

    shift, scale = jnp.split(
      nn.Dense(2 * d, kernel_init=_zeros, name="final_adaLN")(c)[:, None], 2, -1
    )
    h = normalize(h, cfg.norm, cfg.norm_eps) * (1 + scale) + shift
    h = nn.Dense(p * p * self.out_channels, kernel_init=_zeros, name="final_proj")(h)
    h = h.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, self.out_channels)


def create_model(cfg: DiTConfig, *, image_size: int, channels: int, out_channels: int) -> DiT:
  """Checks `cfg` for (image_size, image_size, channels) inputs and builds the DiT."""
  check(cfg, height=image_size, width=image_size)
  if channels < 1 or out_channels < 1:
    raise ValueError(f"channels={channels} and out_channels={out_channels} must be positive.")
  impl = attention_implementation(cfg)
  return DiT(cfg, out_channels=out_channels, dtype=DTYPES[cfg.dtype], attention_impl=impl)
