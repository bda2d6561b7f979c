"""The denoising U-Net (Flax linen), configured by a `UNetConfig` (built from `config.model` in
diffusion/model.py).

Maps (x_t, a per-example conditioning scalar, an optional class label) to a prediction. It knows
nothing of noise schedules: the scalar is whatever the caller feeds (an integer timestep as float,
or log-SNR), embedded sinusoidally (max period 10000) and passed through an MLP of width
4 * base_channels.

Layout (DDPM / ADM): conv_in -> per level `num_res_blocks` residual blocks (+ self-attention where
the feature map side is in `attn_resolutions`), then a stride-2 downsample except at the last level
-> middle (block, attention, block) -> per level, reversed, `num_res_blocks + 1` blocks on
concat(h, skip) (+ attention), then a nearest x2 upsample except at the top -> GroupNorm, SiLU,
conv_out. With `resblock_updown` the resampling happens inside residual blocks (BigGAN style).

Conditioning enters every residual block as FiLM, h = norm(h) * (1 + scale) + shift, or, with
`film=False`, DDPM's additive h = h + proj(emb) (fewer parameters; the DDPM CIFAR-10 network).
The last conv of every residual block, the attention output projection and conv_out start at
zero, so the freshly initialised model is the zero function.

With `remat` every residual block and attention is rematerialised
(`nn.remat`): only block inputs are kept for the backward pass, which recomputes the rest (less
activation memory for large networks or batches, ~1.2x the training FLOPs); the parameter tree is
the same, so checkpoints are interchangeable.

Mixed precision: parameters float32; convolutions, attention matmuls and the residual stream in
`dtype`; GroupNorm statistics, softmax, the conditioning MLP and the output layer in float32.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture of a U-Net (the UNet fields of the same names; `validate` checks them)."""

  base_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (8,)
  num_heads: int = 4
  head_dim: int = -1
  dropout: float = 0.0
  resblock_updown: bool = False
  num_groups: int = 32
  num_classes: int = 0
  dtype: str = "float32"  # DTYPES
  film: bool = True
  attention_impl: str = ""  # "" (automatic) | xla | cudnn
  remat: bool = False
  second_time: bool = False  # a second conditioning input t2 (two-time objectives)


def timestep_embedding(cond: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of a (B,) float scalar -> (B, dim) float32, [sin | cos] halves."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) / half * jnp.arange(half, dtype=jnp.float32))
  args = cond.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))  # odd dim: one zero column


class GroupNorm(nn.Module):
  """GroupNorm of (B, ..., C) over space and C/G channels, in float32, optionally
  FiLM-modulated; returns float32.

  Statistics come from per-channel spatial means of x and x^2 (one pass; variance
  E[x^2] - E[x]^2, as flax's fast variance), pooled per group on the small (B, C) arrays;
  normalisation, affine and FiLM fold into one per-(example, channel) multiply-add. On XLA:CPU
  this is several times faster, forward and backward, than reducing a (B, HW, G, C/G) view.
  """

  num_groups: int
  eps: float = 1e-6

  @nn.compact
  def __call__(
    self, x: jax.Array, scale: jax.Array | None = None, shift: jax.Array | None = None
  ) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    g = min(self.num_groups, c)
    x = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))

    def group_mean(v: jax.Array) -> jax.Array:  # (B, C) -> mean over each group, (B, C)
      v = v.reshape(b, g, c // g).mean(axis=-1, keepdims=True)
      return jnp.broadcast_to(v, (b, g, c // g)).reshape(b, c)

    mean = group_mean(x.mean(axis=axes))
    var = jnp.maximum(group_mean(jnp.square(x).mean(axis=axes)) - jnp.square(mean), 0.0)
    mul = jax.lax.rsqrt(var + self.eps) * self.param("scale", nn.initializers.ones, (c,))
    add = self.param("bias", _zeros, (c,)) - mean * mul
    if scale is not None:  # FiLM: (norm * mul + add) * (1 + scale) + shift
      mul, add = mul * (1 + scale), add * (1 + scale) + shift
    bshape = (b,) + (1,) * len(axes) + (c,)
    return x * mul.reshape(bshape) + add.reshape(bshape)


def _downsample(x: jax.Array) -> jax.Array:
  """2x2 average pooling, (B, H, W, C) -> (B, H/2, W/2, C)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2, (B, H, W, C) -> (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def example_dropout(h: jax.Array, rate: float, keys: jax.Array, salt: int) -> jax.Array:
  """Inverted dropout of h (B, ...) whose example i's mask comes from fold_in(keys[i], salt)
  alone, whatever else is in the batch; keys (B, 2) uint32."""
  shape = h.shape[1:]
  keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), 1 - rate, shape))
  return jnp.where(keep(keys), h / (1 - rate), 0).astype(h.dtype)


class ResBlock(nn.Module):
  """Residual block conditioned on `emb`; `resample` "up"/"down" resamples inside (BigGAN)."""

  out_ch: int
  num_groups: int
  dropout: float
  film: bool
  dtype: Any
  resample: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, emb: jax.Array, train: bool, keys: jax.Array | None = None
  ) -> jax.Array:
    """x (B, H, W, Cin) in dtype, emb (B, E) float32 (already SiLU-ed) -> (B, H', W', out_ch).
    keys: (B, 2) uint32 per-example dropout keys, or None for the "dropout" rng."""
    h = nn.silu(GroupNorm(self.num_groups)(x)).astype(self.dtype)
    if self.resample is not None:
      fn = _upsample if self.resample == "up" else _downsample
      h, x = fn(h), fn(x)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(h)
    e = nn.Dense(2 * self.out_ch if self.film else self.out_ch)(emb)  # float32
    if self.film:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = GroupNorm(self.num_groups)(h, scale, shift)
    else:
      h = GroupNorm(self.num_groups)(h + e[:, None, None, :].astype(self.dtype))
    h = nn.silu(h).astype(self.dtype)
    if train and self.dropout > 0 and keys is not None:
      h = example_dropout(h, self.dropout, keys, zlib.crc32(self.name.encode()) & 0x7FFFFFFF)
    else:
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=_zeros)(h)
    if x.shape[-1] != self.out_ch:
      # A 1x1 Conv, not Dense: its weight gradient avoids a transposed copy of the incoming
      # gradient on XLA:CPU (jitted gradient of the cifar10 network, batch 16: 2.15 -> 2.03 s;
      # the whole step in experiments/benchmark.py stayed within noise, 6.91 -> 6.87 images/s).
      x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class _QKV(nn.Module):
  """The Dense(3C) projection to q, k, v, (B, L, C) -> 3 x (B, L, heads, C/heads), computed as
  three products with slices of the kernel: slicing one (B, L, 3C) output costs XLA:CPU a copy
  per slice in each direction (measured: 4.1 -> 2.5 ms forward+backward for an attention block
  at 4x4x128, batch 64). Same parameters as nn.Dense (kernel (C, 3C), bias (3C,))."""

  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    c = h.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (c, 3 * c))
    bias = self.param("bias", _zeros, (3 * c,))
    w = kernel.reshape(c, 3, self.num_heads, c // self.num_heads).astype(self.dtype)
    bias = bias.reshape(3, self.num_heads, c // self.num_heads).astype(self.dtype)
    return tuple(jnp.einsum("blc,chd->blhd", h, w[:, i]) + bias[i] for i in range(3))


class Attention(nn.Module):
  """Multi-head self-attention over the H*W positions, residual; (B, H, W, C) -> same."""

  num_heads: int
  num_groups: int
  dtype: Any
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.num_groups)(x).astype(self.dtype).reshape(b, hgt * wid, c)
    q, k, v = _QKV(self.num_heads, self.dtype, name="qkv")(h)
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)  # f32 softmax
    h = nn.Dense(c, dtype=self.dtype, kernel_init=_zeros, name="out")(h.reshape(b, hgt, wid, c))
    return x + h


class UNet(nn.Module):
  """The denoiser. See the module docstring for the layout; `validate` for the constraints."""

  out_channels: int
  base_channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (8,)
  num_heads: int = 4
  head_dim: int = -1
  dropout: float = 0.0
  resblock_updown: bool = False
  num_groups: int = 32
  num_classes: int = 0
  dtype: Any = jnp.float32
  film: bool = True
  attention_impl: str | None = None
  remat: bool = False  # recompute residual blocks and attention in the backward pass
  second_time: bool = False  # a second conditioning scalar t2 (MeanFlow's t - r), own MLP

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    cond: jax.Array,
    labels: jax.Array | None = None,
    *,
    train: bool,
    t2: jax.Array | None = None,
    example_keys: jax.Array | None = None,
  ) -> jax.Array:
    """x (B, H, W, C) float in [-1, 1]; cond (B,) float (timestep or log-SNR); labels (B,) int32
    in [0, num_classes] (num_classes = null class; None = null class); t2 (B,) float, required
    when `second_time` (else must be None) -> float32 (B, H, W, out_channels). When train and
    dropout > 0: example_keys (B, 2) uint32 (example i's masks from example_keys[i] alone), or
    else a "dropout" rng."""
    names = {jnp.dtype(v): k for k, v in DTYPES.items()}
    _check(
      dtype=names.get(jnp.dtype(self.dtype), str(self.dtype)),
      height=x.shape[1],
      width=x.shape[2],
      **_shape_fields(self),
    )
    dt, ch0 = self.dtype, self.base_channels
    # remat: same parameter tree (modules keep their names), activations kept only at block
    # boundaries; `train` (argument 3, counting self) stays a Python bool.
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = nn.remat(Attention) if self.remat else Attention
    block = lambda ch, name, resample=None: res_cls(
      ch, self.num_groups, self.dropout, self.film, dt, resample, name=name
    )

    def attention(h: jax.Array, name: str) -> jax.Array:
      c = h.shape[-1]
      heads = c // self.head_dim if self.head_dim > 0 else self.num_heads
      return attn_cls(heads, self.num_groups, dt, self.attention_impl, name=name)(h)

    # Conditioning (float32, only (B, 4 * ch0) values): sinusoid -> MLP (+ class embedding).
    emb = timestep_embedding(cond, ch0)
    emb = nn.Dense(4 * ch0, name="cond_mlp_0")(emb)
    emb = nn.Dense(4 * ch0, name="cond_mlp_1")(nn.silu(emb))
    if self.second_time != (t2 is not None):
      raise ValueError(f"UNet(second_time={self.second_time}) needs t2 exactly when second_time.")
    if self.second_time:  # embedded like cond by its own sinusoid and MLP, then added
      emb2 = nn.Dense(4 * ch0, name="cond2_mlp_0")(timestep_embedding(t2, ch0))
      emb = emb + nn.Dense(4 * ch0, name="cond2_mlp_1")(nn.silu(emb2))
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, 4 * ch0, name="class_emb")(labels)
    elif labels is not None:
      raise ValueError(
        "labels were given to an unconditional UNet (num_classes=0); "
        "set num_classes > 0 or pass labels=None."
      )
    emb = nn.silu(emb)  # the SiLU before every block's projection, computed once

    h = nn.Conv(ch0, (3, 3), dtype=dt, name="conv_in")(x.astype(dt))
    skips = [h]
    last = len(self.channel_mult) - 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = block(ch0 * mult, f"down{level}_res{i}")(h, emb, train, example_keys)
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f"down{level}_attn{i}")
        skips.append(h)
      if level != last:
        if self.resblock_updown:
          h = block(ch0 * mult, f"down{level}_resample", "down")(h, emb, train, example_keys)
        else:
          h = nn.Conv(
            ch0 * mult, (3, 3), strides=2, padding=1, dtype=dt, name=f"down{level}_resample"
          )(h)
        skips.append(h)

    h = block(h.shape[-1], "mid_res0")(h, emb, train, example_keys)
    h = attention(h, "mid_attn")
    h = block(h.shape[-1], "mid_res1")(h, emb, train, example_keys)

    for level in reversed(range(len(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(ch0 * self.channel_mult[level], f"up{level}_res{i}")(h, emb, train, example_keys)
        if h.shape[1] in self.attn_resolutions:
          h = attention(h, f"up{level}_attn{i}")
      if level != 0:
        if self.resblock_updown:
          h = block(h.shape[-1], f"up{level}_resample", "up")(h, emb, train, example_keys)
        else:
          h = nn.Conv(h.shape[-1], (3, 3), dtype=dt, name=f"up{level}_resample")(_upsample(h))

    h = nn.silu(GroupNorm(self.num_groups, name="norm_out")(h))  # float32
    return nn.Conv(self.out_channels, (3, 3), kernel_init=_zeros, name="conv_out")(h)


_FIELDS = (
  "base_channels",
  "channel_mult",
  "num_res_blocks",
  "attn_resolutions",
  "num_heads",
  "head_dim",
  "dropout",
  "resblock_updown",
  "num_groups",
  "num_classes",
  "film",
)


def _shape_fields(src: Any) -> dict[str, Any]:
  """The architecture fields of a UNet or a UNetConfig, as plain Python values."""
  out = {k: getattr(src, k) for k in _FIELDS}
  for k in ("channel_mult", "attn_resolutions"):
    try:
      out[k] = tuple(int(v) for v in out[k])
    except (TypeError, ValueError):
      raise ValueError(f"{k} must be a tuple of integers such as (1, 2), got {out[k]!r}.") from None
  return out


def _check(
  *,
  dtype: str,
  height: int,
  width: int,
  base_channels: int,
  channel_mult: tuple[int, ...],
  num_res_blocks: int,
  attn_resolutions: tuple[int, ...],
  num_heads: int,
  head_dim: int,
  dropout: float,
  num_groups: int,
  num_classes: int,
  **_: Any,
) -> None:
  """Raises ValueError naming the cause and the fix for an impossible configuration."""
  fix = ""
  if dtype not in DTYPES:
    raise ValueError(f"unknown model dtype {dtype!r}; set {fix}dtype to one of {sorted(DTYPES)}.")
  if base_channels < 1 or not channel_mult or min(channel_mult) < 1 or num_res_blocks < 1:
    raise ValueError(
      f"base_channels={base_channels}, channel_mult={channel_mult}, num_res_blocks="
      f"{num_res_blocks}: all must be positive and channel_mult non-empty; "
      f"fix {fix}base_channels / channel_mult / num_res_blocks."
    )
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout={dropout} is not in [0, 1); fix {fix}dropout.")
  if num_classes < 0 or num_groups < 1:
    raise ValueError(
      f"num_classes={num_classes} (>= 0) or num_groups={num_groups} (>= 1) out of "
      f"range; fix {fix}num_classes / num_groups."
    )
  levels, factor = len(channel_mult), 2 ** (len(channel_mult) - 1)
  if height % factor or width % factor or height < factor or width < factor:
    raise ValueError(
      f"image size {height}x{width} cannot be halved {levels - 1} times ({levels} levels, "
      f"channel_mult={channel_mult}); use an image size divisible by {factor} "
      f"or fewer levels ({fix}channel_mult)."
    )
  sizes = [height // 2**i for i in range(levels)]
  missing = [r for r in attn_resolutions if r not in sizes]
  if missing:
    raise ValueError(
      f"attention resolution(s) {missing} never occur: the feature maps are "
      f"{sizes} pixels high; set {fix}attn_resolutions to a subset of {sizes}."
    )
  # Every channel count that meets a GroupNorm, and the widths that hold attention.
  chans = [base_channels * m for m in channel_mult]
  skips = [chans[0]] + [
    c for lv, c in enumerate(chans) for c in [c] * num_res_blocks + ([c] if lv < levels - 1 else [])
  ]
  norm_in, h = set(chans), chans[-1]
  for lv in reversed(range(levels)):
    for _ in range(num_res_blocks + 1):
      norm_in.add(h + skips.pop())
      h = chans[lv]
  for c in sorted(norm_in):
    g = min(num_groups, c)
    if c % g:
      raise ValueError(
        f"GroupNorm cannot split {c} channels into {g} groups (num_groups="
        f"{num_groups}, channels per level {chans}, skip concatenations included); "
        f"set {fix}num_groups to a divisor of {c} or change {fix}base_channels."
      )
  attn_chans = {chans[-1]} | {chans[i] for i, s in enumerate(sizes) if s in attn_resolutions}
  for c in sorted(attn_chans):
    if (head_dim > 0 and c % head_dim) or (head_dim <= 0 and (num_heads < 1 or c % num_heads)):
      what = f"head_dim={head_dim}" if head_dim > 0 else f"num_heads={num_heads}"
      raise ValueError(
        f"attention over {c} channels cannot use {what}; set {fix}num_heads or "
        f"{fix}head_dim to a divisor of {c}."
      )


def validate(model_config: UNetConfig, *, image_size: int) -> None:
  """Raises ValueError (cause and fix, in the UNetConfig's field names) if `model_config` cannot
  build a U-Net for square images of side `image_size`. Runs in microseconds, before compiling."""
  _check(
    dtype=str(model_config.dtype),
    height=image_size,
    width=image_size,
    **_shape_fields(model_config),
  )
  attention_implementation(model_config, image_size=image_size, backend="cpu")


def create_model(
  model_config: UNetConfig,
  *,
  image_size: int,
  channels: int,
  out_channels: int | None = None,
  second_time: bool = False,
) -> UNet:
  """Validates `model_config` and builds the UNet for (image_size, image_size, channels) inputs.
  `out_channels` defaults to `channels` (pass 2 * channels for learned variances);
  `second_time` adds the t2 conditioning input (two-time objectives)."""
  validate(model_config, image_size=image_size)
  out = channels if out_channels is None else out_channels
  if channels < 1 or out < 1:
    raise ValueError(f"channels={channels} and out_channels={out} must be positive.")
  impl = attention_implementation(model_config, image_size=image_size)
  return UNet(
    out_channels=out,
    dtype=DTYPES[model_config.dtype],
    attention_impl=impl,
    remat=bool(model_config.remat),
    second_time=second_time or model_config.second_time,
    **_shape_fields(model_config),
  )


def _head_dims(f: dict[str, Any], image_size: int) -> set[int]:
  chans = [f["base_channels"] * m for m in f["channel_mult"]]
  sizes = [image_size // 2**i for i in range(len(chans))]
  attn = {chans[-1]} | {c for c, s in zip(chans, sizes, strict=True) if s in f["attn_resolutions"]}
  return {f["head_dim"] if f["head_dim"] > 0 else c // f["num_heads"] for c in attn}


def attention_implementation(
  model_config: UNetConfig, *, image_size: int, backend: str | None = None
) -> str | None:
  """The `implementation` passed to `jax.nn.dot_product_attention` (None = XLA's).

  `attention_impl`: "xla"; "cudnn" (the fused flash kernel: a GPU, bfloat16 and
  head dims that are multiples of 8 up to 128); or "" = cudnn where those hold on `backend`
  (default: JAX's), else XLA. Raises ValueError (cause and fix) for an impossible choice.
  """
  impl = model_config.attention_impl
  if impl not in ("", "xla", "cudnn"):
    raise ValueError(f"unknown attention_impl {impl!r}; use '' (automatic), 'xla' or 'cudnn'.")
  fields = _shape_fields(model_config)
  bad_heads = sorted(d for d in _head_dims(fields, image_size) if d % 8 or d > 128)
  fits = model_config.dtype == "bfloat16" and not bad_heads
  if impl == "cudnn" and not fits:
    raise ValueError(
      f"attention_impl='cudnn' needs dtype bfloat16 (got {model_config.dtype}) and head dims "
      f"that are multiples of 8 up to 128 (bad: {bad_heads}); set dtype / "
      "num_heads / head_dim, or attention_impl='xla'."
    )
  if impl == "":
    impl = "cudnn" if fits and (backend or jax.default_backend()) == "gpu" else "xla"
  return None if impl == "xla" else impl


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays or jax.ShapeDtypeStruct leaves)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
