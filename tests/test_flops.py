"""Tests of diffusion/flops.py: closed forms of one convolution, one dense layer and one attention;
nested jaxprs (scan, cond, while); the DDPM CIFAR-10 network's published count; the 3x training
convention against the traced gradient, and what remat adds. Traced only, nothing compiled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs.common import load
from diffusion import flops, unet
from diffusion.model import net_config

f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)


class ConvDenseAttention(nn.Module):
  """A 3x3 convolution (3 -> 4 channels, SAME, on 6x5), a strided 3x3 convolution, a grouped 1x1
  convolution, a dense layer (4 -> 10) and 2-head self-attention over the 30 positions."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3))(x)
    nn.Conv(8, (3, 3), strides=2)(h)  # output 3x3
    nn.Conv(6, (1, 1), feature_group_count=2)(h)
    nn.Dense(10)(h)
    b, hgt, wid, c = h.shape
    q = h.reshape(b, hgt * wid, 2, c // 2)  # 2 heads of 2 channels
    return jax.nn.dot_product_attention(q, q, q)


def test_closed_form_conv_dense_attention():
  b, hgt, wid = 2, 6, 5
  x = f32(b, hgt, wid, 3)
  net = ConvDenseAttention()
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
  positions, length = hgt * wid, hgt * wid
  conv = 2 * b * positions * 4 * (3 * 3 * 3)  # 2 x outputs x (kh kw C_in)
  strided = 2 * b * (3 * 3) * 8 * (3 * 3 * 4)
  grouped = 2 * b * positions * 6 * (4 // 2)
  dense = 2 * b * positions * 4 * 10
  attention = 2 * (2 * b * 2 * length * length * 2)  # QK^T and AV: 2 B heads L L head_dim each
  assert flops.count(net.apply, params, x) == conv + strided + grouped + dense + attention
  # Linear in the batch, and a plain matrix product: 2 M N K.
  assert flops.count(net.apply, params, f32(1, hgt, wid, 3)) * b == flops.count(
    net.apply, params, x
  )
  assert flops.count(jnp.matmul, f32(7, 5), f32(5, 3)) == 2 * 7 * 5 * 3


def test_nested_jaxprs():
  w = f32(4, 4)
  mm = 2 * 4 * 4 * 4

  def scanned(w, x):
    return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]

  assert flops.count(scanned, w, f32(4, 4)) == 5 * mm
  assert flops.count(jax.jit(lambda w, x: x @ w @ w), w, f32(4, 4)) == 2 * mm
  assert flops.count(jax.checkpoint(lambda w, x: x @ w), w, f32(4, 4)) == mm

  def branches(p, w, x):  # the costlier branch counts
    return jax.lax.cond(p, lambda x: x @ w @ w @ w, lambda x: x @ w, x)

  assert flops.count(branches, jax.ShapeDtypeStruct((), jnp.bool_), w, f32(4, 4)) == 3 * mm
  with pytest.raises(ValueError, match="while loop"):
    flops.count(lambda x: jax.lax.while_loop(lambda h: h.sum() < 1, lambda h: h @ h, x), w)


def _net(spec: str, **model):
  c = load(spec)
  c.model.update(model)
  s = c.data.image_size
  return unet.create_model(net_config(c.model), image_size=s, channels=c.data.channels), s


def test_ddpm_cifar10_network_count():
  """Issue 17: the DDPM CIFAR-10 network is 12.4 GFLOP forward and 37.3 GFLOP per training
  image; the count ignores the compute dtype and the attention kernel."""
  net, s = _net("configs/cifar10.py")
  forward = flops.unet_forward(net, (s, s, 3))
  assert forward == pytest.approx(12.4e9, rel=0.01)
  assert flops.TRAIN_FACTOR * forward == pytest.approx(37.3e9, rel=0.01)
  bf16 = net.clone(dtype=jnp.bfloat16, attention_impl="cudnn")  # traced with XLA's attention
  assert flops.unet_forward(bf16, (s, s, 3)) == forward
  assert flops.unet_forward(net, (s, s, 3), batch=3) == 3 * forward


@pytest.mark.parametrize("remat,low,high", [(False, 2.9, 3.1), (True, 3.3, 4.0)])
def test_training_is_three_forward_passes(remat, low, high):
  """The traced gradient of the tiny U-Net costs ~3 forward passes (TRAIN_FACTOR's convention);
  with remat the backward pass recomputes most of the forward pass (~3.6)."""
  net, s = _net("configs/tiny.py", remat=remat)
  x, cond = f32(1, s, s, 3), f32(1)
  params = jax.eval_shape(lambda x, c: net.init(jax.random.PRNGKey(0), x, c, train=False), x, cond)
  grad = jax.grad(lambda p, x, c: net.apply(p, x, c, train=False).sum())
  ratio = flops.count(grad, params, x, cond) / flops.unet_forward(net, (s, s, 3))
  assert low < ratio < high, ratio
