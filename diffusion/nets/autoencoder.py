"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE family), Flax linen.

Layout (LDM / diffusers `AutoencoderKL`), L = len(block_out_channels), C_i = block_out_channels[i]:

  encoder: conv_in 3x3 -> C_0; level i: `layers_per_block` ResNet blocks -> C_i, then (except the
           last level) a stride-2 3x3 conv after padding 1 pixel on the bottom and right only;
           mid: ResNet, single-head self-attention, ResNet; GroupNorm, SiLU, conv_out 3x3 ->
           2 * latent_channels; quant_conv 1x1 (optional) -> (mean, logvar), logvar clipped to
           [-30, 20].
  decoder: post_quant_conv 1x1 (optional); conv_in 3x3 -> C_{L-1}; mid as above; level i of the
           reversed channels: `layers_per_block + 1` ResNet blocks, then (except the last) nearest
           x2 upsampling and a 3x3 conv; GroupNorm, SiLU, conv_out 3x3 -> out_channels.

A ResNet block is h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))) + shortcut(x), the shortcut a 1x1 conv
when the width changes. Every GroupNorm has `norm_num_groups` groups and eps 1e-6. Attention is
one head of width C over the H*W positions, softmax(q k^T / sqrt(C)) v, with its own GroupNorm
and a residual connection. A latent is 2^(L-1) times smaller per side than the image.

Latent normalisation is data, not code: the diffusion model sees (z - shift_factor) *
scaling_factor (`normalize`), the decoder gets z back (`denormalize`). SD 1.x/2.x and
sd-vae-ft-ema/mse: scaling 0.18215, shift 0; SDXL 0.13025, 0; SD3 1.5305, 0.0609; FLUX 0.3611,
0.1159 (SD3 and FLUX also drop quant_conv and post_quant_conv).

Arrays are NHWC float32; images in [-1, 1]. The parameter tree mirrors diffusers' module names
(`down_0_resnets_1/conv1`, `mid_block/attention/to_q`, ...), see `convert_autoencoder.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EPS = 1e-6


def _norm(groups: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=EPS, use_fast_variance=False, name=name)


def _conv(features: int, name: str, kernel: int = 3) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), name=name)


class ResnetBlock(nn.Module):
  """(B, H, W, C_in) -> (B, H, W, features)."""

  features: int
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.features, "conv1")(nn.silu(_norm(self.groups, "norm1")(x)))
    h = _conv(self.features, "conv2")(nn.silu(_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, "conv_shortcut", kernel=1)(x)
    return x + h


class Attention(nn.Module):
  """Single-head self-attention over all positions with a residual: (B, H, W, C) -> same."""

  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = _norm(self.groups, "group_norm")(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, name=n)(h) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / jnp.sqrt(jnp.float32(c))
    h = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits.astype(jnp.float32), axis=-1), v)
    return x + nn.Dense(c, name="to_out")(h).reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """ResNet, attention (optional), ResNet at constant width."""

  groups: int
  attention: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, name="attention")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class Encoder(nn.Module):
  """(B, H, W, in) -> (B, H / 2^(L-1), W / 2^(L-1), 2 * latent_channels) moments."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_attention: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chans = self.block_out_channels
    h = _conv(chans[0], "conv_in")(x)
    for i, c in enumerate(chans):
      for j in range(self.layers_per_block):
        h = ResnetBlock(c, self.groups, name=f"down_{i}_resnets_{j}")(h)
      if i < len(chans) - 1:  # asymmetric padding: one pixel at the bottom and right
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = nn.Conv(c, (3, 3), strides=(2, 2), padding="VALID", name=f"down_{i}_downsample")(h)
    h = MidBlock(self.groups, self.mid_attention, name="mid_block")(h)
    h = nn.silu(_norm(self.groups, "conv_norm_out")(h))
    return _conv(2 * self.latent_channels, "conv_out")(h)


class Decoder(nn.Module):
  """(B, h, w, latent_channels) -> (B, h * 2^(L-1), w * 2^(L-1), out_channels)."""

  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_attention: bool

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans = tuple(reversed(self.block_out_channels))
    h = _conv(chans[0], "conv_in")(z)
    h = MidBlock(self.groups, self.mid_attention, name="mid_block")(h)
    for i, c in enumerate(chans):
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(c, self.groups, name=f"up_{i}_resnets_{j}")(h)
      if i < len(chans) - 1:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
        h = _conv(c, f"up_{i}_upsample")(h)
    h = nn.silu(_norm(self.groups, "conv_norm_out")(h))
    return _conv(self.out_channels, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """The KL autoencoder. `encode(x) -> (mean, logvar)`, `decode(z) -> x`; `__call__` (used by
  `init`) reconstructs from the posterior mean. Fields as diffusers' config of the same names."""

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  def setup(self) -> None:
    chans = tuple(self.block_out_channels)
    self.encoder = Encoder(
      chans,
      self.layers_per_block,
      self.latent_channels,
      self.norm_num_groups,
      self.mid_block_add_attention,
    )
    self.decoder = Decoder(
      chans,
      self.layers_per_block,
      self.out_channels,
      self.norm_num_groups,
      self.mid_block_add_attention,
    )
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, "quant_conv", kernel=1)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, "post_quant_conv", kernel=1)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, in_channels) in [-1, 1] -> posterior mean and log-variance, each
    (B, H / f, W / f, latent_channels), f = `downsample_factor`; logvar in [-30, 20]."""
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    """(B, h, w, latent_channels) raw (unnormalised) latent -> (B, h f, w f, out_channels)."""
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x)[0])

  def normalize(self, z: jax.Array) -> jax.Array:
    """Raw latent -> what the diffusion model sees: (z - shift_factor) * scaling_factor."""
    return (z - self.shift_factor) * self.scaling_factor

  def denormalize(self, z: jax.Array) -> jax.Array:
    """Inverse of `normalize`: z / scaling_factor + shift_factor."""
    return z / self.scaling_factor + self.shift_factor
