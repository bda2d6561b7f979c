"""AutoencoderKL against diffusers' AutoencoderKL (PyTorch, CPU, float32) with random weights,
through the converter and its command line; the converted folder's refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from diffusion.nets import convert_autoencoder as conv
from diffusion.nets.autoencoder import AutoencoderKL

# SD-style (quant convs, 4 channels, three levels) and SD3/FLUX-style (16 channels, no quant convs)
CONFIGS = {
  "sd4": dict(
    block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8
  ),
  "flux16": dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
  ),
}


def _torch_vae(kw: dict, seed: int = 0):
  import diffusers  # imported where used, not by every pytest worker (docs/performance.md)
  import torch

  levels = len(kw["block_out_channels"])
  vae = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    **kw,
  ).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in vae.named_parameters():  # every weight random, norms' affine included
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
  return vae


def _state(vae) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in vae.state_dict().items()}


def _close(got, want, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err < rtol, err


def _reference(vae, x_nhwc: np.ndarray, z_nhwc: np.ndarray):
  import torch

  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).latent_dist
    dec = vae.decode(torch.from_numpy(z_nhwc.transpose(0, 3, 1, 2))).sample
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
  return nhwc(dist.mean), nhwc(dist.logvar), nhwc(dec)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_with_diffusers(name):
  kw = CONFIGS[name]
  vae = _torch_vae(kw)
  state = _state(vae)
  fields = conv.config_from_diffusers(state, dict(vae.config))
  assert AutoencoderKL(**fields) == AutoencoderKL(**kw)  # every field read back
  params = conv.autoencoder_from_diffusers(state)
  module = AutoencoderKL(**fields)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  f = module.downsample_factor
  z = rng.standard_normal((2, 16 // f, 16 // f, kw["latent_channels"])).astype(np.float32)
  mean, logvar = module.apply(params, x, method=module.encode)
  dec = module.apply(params, z, method=module.decode)
  want_mean, want_logvar, want_dec = _reference(vae, x, z)
  _close(mean, want_mean)
  _close(logvar, want_logvar)
  _close(dec, want_dec)
  raw = z * 1.7 + 0.3  # normalisation: diffusers' (z - shift) * scaling, and back
  norm = module.normalize(raw)
  np.testing.assert_allclose(norm, (raw - kw.get("shift_factor", 0.0)) * vae.config.scaling_factor)
  np.testing.assert_allclose(module.denormalize(norm), raw, rtol=1e-5, atol=1e-6)


def test_command_line_folder_and_refusals(tmp_path, capsys):
  kw = CONFIGS["flux16"]
  vae = _torch_vae(kw, seed=3)
  vae.save_pretrained(tmp_path / "hf")  # diffusion_pytorch_model.safetensors + config.json
  out = tmp_path / "ae"
  assert (
    conv.main_autoencoder([str(tmp_path / "hf/diffusion_pytorch_model.safetensors"), str(out)]) == 0
  )
  module, params, fp = conv.load(out)
  assert module.scaling_factor == pytest.approx(0.3611) and module.latent_channels == 16
  assert json.loads((out / conv.CONFIG_FILE).read_text())["fingerprint"] == fp
  z = np.random.default_rng(0).standard_normal((1, 8, 8, 16)).astype(np.float32)
  x = np.zeros((1, 16, 16, 3), np.float32)
  _close(module.apply(params, z, method=module.decode), _reference(vae, x, z)[2])

  # another autoencoder has another fingerprint
  other = conv.config_from_diffusers(_state(_torch_vae(kw, seed=4)), dict(vae.config))
  assert conv.fingerprint(other, conv.autoencoder_from_diffusers(_state(_torch_vae(kw, 4)))) != fp

  # pickles are refused unread: the file is not even opened
  capsys.readouterr()
  pt = tmp_path / "vae.pt"
  pt.write_bytes(b"\x80\x04 not read")
  assert conv.main_autoencoder([str(pt), str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip()
  assert "only .safetensors" in err and len(err.splitlines()) == 1
  assert not (tmp_path / "x").exists()

  # a truncated safetensors file: one line, nothing written
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes((tmp_path / "hf/diffusion_pytorch_model.safetensors").read_bytes()[:1000])
  assert conv.main_autoencoder([str(bad), str(tmp_path / "y")]) == 2
  assert len(capsys.readouterr().err.strip().splitlines()) == 1
  assert not (tmp_path / "y").exists()

  # damaged converted weights fail their fingerprint
  data = bytearray((out / conv.PARAMS_FILE).read_bytes())
  data[-7] ^= 0xFF
  (out / conv.PARAMS_FILE).write_bytes(bytes(data))
  with pytest.raises(ValueError, match="fingerprint"):
    conv.load(out)


def test_init_tree_is_what_the_converter_writes():
  kw = CONFIGS["sd4"]
  module = AutoencoderKL(**kw)
  init = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
  got = conv.autoencoder_from_diffusers(_state(_torch_vae(kw)))
  shapes = lambda t: jax.tree_util.tree_map(np.shape, t)  # noqa: E731
  assert shapes(got) == shapes(init)
