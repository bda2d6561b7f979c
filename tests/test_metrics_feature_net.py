"""diffusion.metrics.feature_net: both kinds of training, accuracy, the .npz round trip."""

import numpy as np
import pytest
from conftest import tiny_config

from diffusion import data
from diffusion.metrics import feature_net


@pytest.fixture(scope="module")
def images():
  c = tiny_config()
  c.data.update(num_sprites=300)
  return data.load(data.DataSpec(**c.data.to_dict()), split="train")


def test_unlabelled_data_trains_a_rotation_predictor(images):
  net = feature_net.train(images.images[:200], None, 0, steps=5, batch_size=32)
  assert net.meta["kind"] == "rotation" and net.meta["num_outputs"] == 4
  assert net.meta["steps"] == 5 and net.meta["image_shape"] == [8, 8, 3]
  assert np.isfinite(net.meta["final_loss"]) and net.meta["feature_scale"] > 0
  f = net.features(images.images[:10], batch_size=4)  # padded last batch
  assert f.shape == (10, 128) and f.dtype == np.float64 and (f >= 0).all()
  # Features are divided by the RMS feature of the training images.
  rms = np.sqrt(np.mean(net.features(images.images[:200]) ** 2))
  assert rms == pytest.approx(1.0, rel=0.25)
  acc = feature_net.accuracy(net, images.images[200:], None)  # of the 4 rotations
  assert 0.0 <= acc <= 1.0
  with pytest.raises(ValueError, match="feature_steps must be > 0"):
    feature_net.train(images.images, None, 0, steps=0)
  with pytest.raises(ValueError, match="square"):
    feature_net.train(images.images[:, :6], None, 0, steps=5)


def test_labels_train_a_classifier_saved_and_loaded_without_pickle(images, tmp_path):
  net = feature_net.train(
    images.images, images.labels, images.num_classes, steps=5, batch_size=32, seed=3
  )
  assert net.meta["kind"] == "classifier" and net.meta["num_outputs"] == images.num_classes
  acc = feature_net.accuracy(net, images.images[:50], images.labels[:50])
  logits = net.logits(images.images[:50])
  assert acc == np.mean(logits.argmax(-1) == images.labels[:50])
  path = str(tmp_path / "sub" / "feature_net.npz")
  feature_net.save(path, net)
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["feature_net.npz"]  # no temp
  with np.load(path, allow_pickle=False) as z:  # plain arrays and a JSON string only
    assert all(z[k].dtype != object for k in z.files) and "__meta__" in z.files
  back = feature_net.load(path)
  assert back.meta == net.meta
  np.testing.assert_array_equal(back.features(images.images[:20]), net.features(images.images[:20]))
