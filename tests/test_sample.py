"""`--mode sample` (deediff_jax.sample.run): files, fields and their consistency."""
import json
import sys
import types

import jax
import numpy as np
import pytest
from PIL import Image

from deediff_jax import sample as sample_mode
from deediff_jax.data.eval_context import load_eval_context
from deediff_jax.config import base_config, validate
from deediff_jax.model import build, init_params

FIELDS = ("policy", "threshold", "sampler", "steps", "layers_total", "layer_ratio_run",
          "layer_ratio_per_sample", "seconds", "seconds_full_depth", "speedup",
          "layers_run_per_step", "mean_exit_layer_per_step", "exit_histogram", "psnr_vs_full")


def _digits_config(**sample):
  c = base_config()
  c.model.update(embed_dim=32, depth=4, num_heads=2)       # digits-like: 8x8x1, 10 classes, 5 blocks
  c.sample.update(**{"sampler": "ddim", "steps": 3, "num_images": 20, "batch_size": 8,
                     "guidance_scale": 1.0, **sample})
  return validate(c)


@pytest.fixture(scope="module")
def params():
  module = build(_digits_config().model)
  return jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))


def test_run_writes_every_file_and_field(tmp_path, params):
  c = _digits_config()
  c.exit.update(policy="uem", threshold=0.5)
  stats = sample_mode.run(c, str(tmp_path), params=params)
  with np.load(tmp_path / "samples.npz") as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.float32
  assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.01
  np.testing.assert_array_equal(labels, np.arange(20) % 10)
  on_disk = json.loads((tmp_path / "sample_stats.json").read_text())
  assert on_disk == json.loads(json.dumps(stats))  # the file is exactly the returned dict
  for k in FIELDS:
    assert k in on_disk, k
  assert on_disk["policy"] == "uem" and on_disk["threshold"] == pytest.approx(0.5)
  assert on_disk["sampler"] == "ddim" and on_disk["steps"] == 3 and on_disk["layers_total"] == 5
  assert 0 < on_disk["layer_ratio_per_sample"] <= on_disk["layer_ratio_run"] <= 1
  assert on_disk["speedup"] == pytest.approx(on_disk["seconds_full_depth"] / on_disk["seconds"])
  assert on_disk["seconds"] > 0 and on_disk["seconds_full_depth"] > 0
  assert len(on_disk["layers_run_per_step"]) == 3 and len(on_disk["mean_exit_layer_per_step"]) == 3
  assert np.asarray(on_disk["exit_histogram"]).shape == (3, 5)
  assert np.asarray(on_disk["exit_histogram"]).sum(axis=1).tolist() == [20, 20, 20]
  # The grid: one row per class (10 rows of 2 images), 8x8 tiles upscaled 4x (pixel repetition)
  # with 1-pixel padding.
  png = Image.open(tmp_path / "samples.png")
  assert png.size == (2 * 33 + 1, 10 * 33 + 1)
  grid = np.asarray(png)
  tile = grid[1:33:4, 1:33:4].astype(np.float64) / 255 * 2 - 1          # class 0, first image = sample 0
  np.testing.assert_allclose(tile, images[0, ..., 0], atol=1 / 255 + 1e-6)
  tile = grid[1 + 33:33 + 33:4, 1 + 33:33 + 33:4].astype(np.float64) / 255 * 2 - 1  # class 1, second = sample 11
  np.testing.assert_allclose(tile, images[11, ..., 0], atol=1 / 255 + 1e-6)

def test_static_depth_ratios_are_exact(tmp_path, params):
  c = _digits_config(num_images=8, guidance_scale=0.0)
  c.exit.update(policy="static", depth=2)
  stats = sample_mode.run(c, str(tmp_path), params=params)
  assert stats["layer_ratio_run"] == pytest.approx(2 / 5)
  assert stats["layer_ratio_per_sample"] == pytest.approx(2 / 5)
  assert stats["layers_run_per_step"] == [2.0, 2.0, 2.0]
  assert stats["depth"] == 2


def test_threshold_zero_images_equal_full_depth(tmp_path, params):
  c = _digits_config(num_images=8, guidance_scale=0.0)
  c.exit.update(policy="uem", threshold=0.0)
  stats = sample_mode.run(c, str(tmp_path), params=params)
  assert stats["layer_ratio_run"] == 1.0 and stats["layer_ratio_per_sample"] == 1.0
  assert stats["psnr_vs_full"] > 80  # same noise, same network: identical up to float rounding


def test_loads_checkpoint_params_when_none_given(tmp_path, params, monkeypatch):
  calls = []
  fake = types.ModuleType("deediff_jax.train.checkpoint")
  def load_params(workdir, config, use_ema=True):
    calls.append((workdir, use_ema))
    return params
  fake.load_params = load_params
  monkeypatch.setitem(sys.modules, "deediff_jax.train.checkpoint", fake)
  c = _digits_config(num_images=4, batch_size=4, guidance_scale=0.0)
  c.exit.policy = "none"
  stats = sample_mode.run(c, str(tmp_path), params=None)
  assert calls == [(str(tmp_path), True)]
  assert stats["policy"] == "none" and stats["layer_ratio_run"] == 1.0


def _text_config(context_file, **sample):
  c = base_config()
  c.model.update(embed_dim=32, depth=2, num_heads=2, num_classes=0, context_dim=6, context_len=3)
  c.data.context_file = context_file
  c.sample.update(**{"sampler": "dpm_solver", "steps": 2, "num_images": 5, "batch_size": 5,
                     "guidance_scale": 1.0, **sample})
  return validate(c)


def test_text_model_samples_from_context_file(tmp_path):
  path = str(tmp_path / "captions.npz")
  rng = np.random.default_rng(0)
  np.savez(path, eval_features=rng.normal(size=(3, 3, 6)).astype(np.float32),
           eval_labels=np.array([7, 1, 4]), null_features=np.zeros((3, 6), np.float32),
           eval_captions=np.array(["a seven", "number one", "a four"]))
  c = _text_config(path)
  assert sample_mode.load_eval_captions(c, 5) == ["a seven", "number one", "a four", "a seven", "number one"]
  module = build(c.model)
  p = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(1))
  c.exit.update(policy="uem", threshold=0.5)
  stats = sample_mode.run(c, str(tmp_path), params=p)
  with np.load(tmp_path / "samples.npz") as f:
    np.testing.assert_array_equal(f["labels"], [7, 1, 4, 7, 1])   # caption rows cycle
    assert f["images"].shape == (5, 8, 8, 1)
  assert stats["sampler"] == "dpm_solver" and 0 < stats["layer_ratio_run"] <= 1
  # The grid has one row per caption (2 + 2 + 1 images -> 3 rows of 2; 8x8 shown at 4x, 1 px padding).
  assert Image.open(tmp_path / "samples.png").size[1] == 3 * (32 + 1) + 1


def test_text_model_errors(tmp_path):
  path = str(tmp_path / "bad.npz")
  np.savez(path, features=np.zeros((2, 3, 6), np.float32))
  with pytest.raises(ValueError, match="has no 'eval_features' array"):
    load_eval_context(_text_config(path), 4)
  with pytest.raises(ValueError, match="set data.context_file=FILE.npz"):
    load_eval_context(_text_config(""), 4)
  path = str(tmp_path / "nonull.npz")
  np.savez(path, eval_features=np.zeros((2, 3, 6), np.float32))
  c = _text_config(path)
  module = build(c.model)
  p = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="needs the null caption's features"):
    sample_mode.run(c, str(tmp_path), params=p)
