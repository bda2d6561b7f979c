"""The TF FID Inception v3 as pytorch-fid builds it (FIDInception blocks), in Flax: pool3 features
and, with `logits`, the 1008-way unbiased logits. Weights, preprocessing and features:
`diffusion.metrics.inception`."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_LOGITS = 1008  # the 2015-12-05 graph's classes (1000 ImageNet + 8 unused)


class _Conv(nn.Module):
  """BasicConv2d: convolution without bias, BatchNorm (eps 1e-3, running statistics), ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  pad: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pads = [(p, p) for p in self.pad]
    x = nn.Conv(self.features, self.kernel, self.stride, pads, use_bias=False, name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x))


def _seq(x: jax.Array, *layers: Callable[[jax.Array], jax.Array]) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


_avg3 = lambda x: nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
_max3 = lambda x: nn.max_pool(x, (3, 3), (2, 2))
_cat = lambda *xs: jnp.concatenate(xs, axis=-1)
_R17, _C17, _R13, _C13 = (1, 7), (7, 1), (1, 3), (3, 1)  # factorised kernels and their pads
_P17, _P71, _P13, _P31 = (0, 3), (3, 0), (0, 1), (1, 0)


class _MixedA(nn.Module):  # Mixed_5b/c/d (FIDInceptionA: average pool without the padding)
  pool: int

  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(64, name="branch1x1")(x),
      _seq(x, C(48, name="branch5x5_1"), C(64, (5, 5), pad=(2, 2), name="branch5x5_2")),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_3"),
      ),
      C(self.pool, name="branch_pool")(_avg3(x)),
    )


class _MixedB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      C(384, (3, 3), 2, name="branch3x3")(x),
      _seq(
        x,
        C(64, name="branch3x3dbl_1"),
        C(96, (3, 3), pad=(1, 1), name="branch3x3dbl_2"),
        C(96, (3, 3), 2, name="branch3x3dbl_3"),
      ),
      _max3(x),
    )


class _MixedC(nn.Module):  # Mixed_6b/c/d/e: factorised 7x7 (FIDInceptionC)
  c7: int

  @nn.compact
  def __call__(self, x):
    C, c7 = _Conv, self.c7
    return _cat(
      C(192, name="branch1x1")(x),
      _seq(
        x,
        C(c7, name="branch7x7_1"),
        C(c7, _R17, pad=_P17, name="branch7x7_2"),
        C(192, _C17, pad=_P71, name="branch7x7_3"),
      ),
      _seq(
        x,
        C(c7, name="branch7x7dbl_1"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_2"),
        C(c7, _R17, pad=_P17, name="branch7x7dbl_3"),
        C(c7, _C17, pad=_P71, name="branch7x7dbl_4"),
        C(192, _R17, pad=_P17, name="branch7x7dbl_5"),
      ),
      C(192, name="branch_pool")(_avg3(x)),
    )


class _MixedD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
  @nn.compact
  def __call__(self, x):
    C = _Conv
    return _cat(
      _seq(x, C(192, name="branch3x3_1"), C(320, (3, 3), 2, name="branch3x3_2")),
      _seq(
        x,
        C(192, name="branch7x7x3_1"),
        C(192, _R17, pad=_P17, name="branch7x7x3_2"),
        C(192, _C17, pad=_P71, name="branch7x7x3_3"),
        C(192, (3, 3), 2, name="branch7x7x3_4"),
      ),
      _max3(x),
    )


class _MixedE(nn.Module):  # Mixed_7b (average pool) / Mixed_7c (max pool): FIDInceptionE_1/2
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    C = _Conv
    b3 = C(384, name="branch3x3_1")(x)
    bd = _seq(x, C(448, name="branch3x3dbl_1"), C(384, (3, 3), pad=(1, 1), name="branch3x3dbl_2"))
    pool = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg3(x)
    return _cat(
      C(320, name="branch1x1")(x),
      C(384, _R13, pad=_P13, name="branch3x3_2a")(b3),
      C(384, _C13, pad=_P31, name="branch3x3_2b")(b3),
      C(384, _R13, pad=_P13, name="branch3x3dbl_3a")(bd),
      C(384, _C13, pad=_P31, name="branch3x3dbl_3b")(bd),
      C(192, name="branch_pool")(pool),
    )


class _Logits(nn.Module):
  """The fc layer: (B, 2048) -> (B, 1008) = x @ kernel. Its bias is a variable (it is in the state
  dict) that is not added: the Inception Score is defined on the unbiased logits."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    return x @ kernel


class InceptionV3(nn.Module):
  """The FID Inception v3: x (B, 299, 299, 3) in [-1, 1] -> pool3 (B, 2048), or with `logits`
  (pool3 (B, 2048), logits (B, 1008)): pool3 @ fc kernel, without the fc bias (the IS convention).

  Module names follow the PyTorch state dict (e.g. Mixed_5b/branch1x1/conv), so weights load
  by name (`load_weights`)."""

  logits: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
    C = _Conv
    x = _seq(
      x,
      C(32, (3, 3), 2, name="Conv2d_1a_3x3"),
      C(32, (3, 3), name="Conv2d_2a_3x3"),
      C(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3"),
      _max3,
      C(80, name="Conv2d_3b_1x1"),
      C(192, (3, 3), name="Conv2d_4a_3x3"),
      _max3,
    )
    x = _seq(
      x,
      _MixedA(32, name="Mixed_5b"),
      _MixedA(64, name="Mixed_5c"),
      _MixedA(64, name="Mixed_5d"),
      _MixedB(name="Mixed_6a"),
      _MixedC(128, name="Mixed_6b"),
      _MixedC(160, name="Mixed_6c"),
      _MixedC(160, name="Mixed_6d"),
      _MixedC(192, name="Mixed_6e"),
      _MixedD(name="Mixed_7a"),
      _MixedE(False, name="Mixed_7b"),
      _MixedE(True, name="Mixed_7c"),
    )
    pool3 = x.mean(axis=(1, 2))
    if not self.logits:
      return pool3
    return pool3, _Logits(name="fc")(pool3)
