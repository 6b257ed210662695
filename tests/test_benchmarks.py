"""Smoke tests of the benchmark scripts (so they cannot rot): each runs at a tiny size and its
output is checked against numbers that follow from the inputs."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_train_tiny(tmp_path, capsys):
  out = tmp_path / "train.json"
  row = _script("bench_train").main(["--tiny", "--json", str(out)])
  assert json.load(open(out)) == row
  # Hand count for the tiny model: D=32, 8x8 images, patch 4 -> 4 patches + 1 time token, 3 blocks
  # (one long skip), MLP 128, batch 4; forward + backward = 3x the forward matmuls.
  b, t, d, h = 4, 5, 32, 128
  per_block = 2 * b * t * (4 * d * d + 2 * d * h) + 2 * 2 * b * t * t * d
  skip = 2 * b * t * 2 * d * d
  assert row["analytic_gflop_per_step"] == pytest.approx(3 * (3 * per_block + skip) / 1e9, rel=1e-12)
  assert row["model"] == "D=32, 3 blocks, 5 tokens, batch 4, all exits + UEMs"
  assert row["step_s_wall"] > 0 and row["images_per_sec"] == pytest.approx(4 / row["step_s_wall"])
  assert np.isfinite(row["loss"])


def test_bench_early_exit_tiny(tmp_path, capsys):
  out = tmp_path / "ee.json"
  rows = _script("bench_early_exit").main(["--tiny", "--json", str(out)])
  assert json.load(open(out)) == rows
  by = {r["name"]: r for r in rows}
  for depth in (2, 3, 4, 5):                      # a static depth runs exactly that many of 5 blocks
    r = by[f"static_depth_{depth}"]
    assert r["layers_run_fraction"] == pytest.approx(depth / 5)
    assert r["ideal_speedup"] == pytest.approx(5 / depth)
  assert by["threshold_zero_overhead"]["layers_run_fraction"] == 1.0   # threshold 0: nothing exits
  assert by["ddim_2_steps_static_depth_3"]["layers_run_fraction"] == pytest.approx(3 / 5)
  assert all(r["seconds"] > 0 and r["seconds_full"] > 0 for r in rows)


def _row(policy, setting, ratio, psnr, steps=10, fid=10.0, acc=0.9):
  return dict(policy=policy, setting=setting, gflops_ratio=ratio, psnr_vs_full=psnr, steps=steps,
              fid=fid, class_accuracy=acc)


def test_pareto_budgets_verdicts(tmp_path, capsys):
  rows = [_row("none", "none", 1.0, None),
          _row("uem", "uem 0.2", 0.40, 30.0, fid=10.5), _row("static", "static 5", 0.38, 30.4),
          _row("uem", "uem 0.1", 0.55, 31.0), _row("time_schedule", "time_schedule 9,3", 0.55, 34.0),
          _row("none", "none @ 7 steps", 0.70, 36.0, steps=7)]
  (tmp_path / "m").mkdir()
  path = tmp_path / "m" / "sweep.json"
  path.write_text(json.dumps(rows))
  assert _script("pareto_budgets").main([str(path), "--budgets", "0.4,0.55,0.7"]) == 0
  out = capsys.readouterr().out
  assert "| uem (m) | 30.0 dB (uem 0.2, 0.40) | 31.0 dB (uem 0.1, 0.55) | 31.0 dB (uem 0.1, 0.55) |" in out
  assert "| fewer steps | — | — | 36.0 dB (none @ 7 steps, 0.70) |" in out
  # -0.4 dB is within 0.5 of the best fixed row; -3 dB and -5 dB are not.
  assert "- ≤ 40%: best learned uem 0.2 (m) 30.0 dB vs best fixed static 5 30.4 dB: **on the front** (-0.4 dB)" in out
  assert "- ≤ 55%: best learned uem 0.1 (m) 31.0 dB vs best fixed time_schedule 9,3 34.0 dB: **loses** (-3.0 dB)" in out
  assert "**loses** (-5.0 dB)" in out
  # FID 10.5 is within 10% of 10 and accuracy equal: both learned rows at <= 60% qualify.
  assert "uem 0.2 (m, FID 10.5, acc 0.900), uem 0.1 (m, FID 10.0, acc 0.900)" in out


def test_make_mnist14_pools_2x2_rounding_half_up(tmp_path, capsys):
  img = np.zeros((2, 4, 4, 1), np.uint8)
  img[0, :2, :2, 0] = [[0, 1], [1, 0]]            # mean 0.5 -> rounds up to 1
  img[1, 2:, 2:, 0] = [[255, 255], [255, 254]]    # mean 254.75 -> 255
  np.savez(tmp_path / "in.npz", image=img, label=np.array([3, 4]), test_image=img[:1], test_label=np.array([3]))
  _script("make_mnist14").main([str(tmp_path / "in.npz"), str(tmp_path / "out.npz")])
  with np.load(tmp_path / "out.npz") as z:
    assert z["image"].shape == (2, 2, 2, 1) and z["test_image"].shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(z["image"][0, :, :, 0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(z["image"][1, :, :, 0], [[0, 0], [0, 255]])
    np.testing.assert_array_equal(z["label"], [3, 4])


def test_bench_wallclock_pairs_every_setting_with_full_depth(tmp_path, capsys):
  """bench_wallclock on a random digits-shaped model: one row per (batch, setting), `repeats`
  (full, setting) pairs each, the median ratio computed from those pairs, a progress bar on stderr."""
  import jax
  from deediff_jax.config import load_config_file
  from deediff_jax.model import build, init_params
  from deediff_jax.train import params_file
  config = load_config_file(os.path.join(ROOT, "configs", "digits.py"))
  config.model.update(embed_dim=32, depth=2, num_heads=2)
  path = str(tmp_path / "p.npz")
  params_file.save(path, init_params(build(config.model), jax.random.PRNGKey(0)), config)
  settings = tmp_path / "settings.json"
  settings.write_text(json.dumps([{"name": "depth 2", "overrides": {"exit.policy": "static", "exit.depth": 2}},
                                  {"name": "2 steps", "overrides": {"exit.policy": "none", "sample.steps": 2}}]))
  out = tmp_path / "wall.json"
  assert _script("bench_wallclock").main(
      ["--config", os.path.join(ROOT, "configs", "digits.py"), "--settings", str(settings), "--json", str(out),
       "--batches", "3", "--repeats", "2", f"--config.sample.params_file={path}", "--config.sample.steps=3",
       "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2"]) == 0
  got = json.load(open(out))
  assert [(r["batch"], r["name"]) for r in got["rows"]] == [(3, "depth 2"), (3, "2 steps")]
  for r in got["rows"]:
    ratios = sorted(f / t for f, t in r["pairs"])
    assert len(ratios) == 2 and r["speedup_median"] == pytest.approx(sum(ratios) / 2)
    assert (r["speedup_min"], r["speedup_max"]) == (ratios[0], ratios[1])
  assert got["repeats"] == 2 and got["steps"] == 3
  captured = capsys.readouterr()
  assert "wallclock" in captured.err and "batch    3  2 steps" in captured.out


def test_stroke_components_counts_hand_built_strokes(tmp_path, capsys):
  sc = _script("stroke_components")
  img = np.zeros((4, 6, 6), np.float32)
  img[0, 1:5, 2] = 1.0                       # one vertical stroke: 1 component
  img[1, 1, 1] = img[1, 4, 4] = 0.9          # two separate dots: 2
  img[2, 2, 2] = img[2, 3, 3] = 1.0          # diagonal neighbours are not 4-connected: 2
  img[3, 2, 2:4] = 0.3                       # below the 0.35 threshold: no ink
  assert sc.components_per_image(img).tolist() == [1, 2, 2, 0]
  s = sc.summary(img)
  assert s == {"images": 4, "components_mean": 1.25, "share_over_2": 0.0, "ink_mean": 2.0}
  # samples.npz in [-1, 1] NHWC, and real uint8 28x28 images pooled 2x2 to 14x14.
  np.savez(tmp_path / "samples.npz", images=img[..., None] * 2 - 1)
  real = np.zeros((2, 28, 28), np.uint8)
  real[0, 4:20, 10:12] = 255                 # a 2-pixel-wide bar: one stroke after pooling
  real[1, 4:6, 4:6] = real[1, 20:22, 20:22] = 255
  np.savez(tmp_path / "real.npz", test_image=real)
  assert sc.main([str(tmp_path / "samples.npz"), "--real", f"npz:{tmp_path / 'real.npz'}", "--size", "14"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("real npz:") and "1.50 ink components per image" in out[0]
  assert "1.25 ink components per image, 0% with more than 2, 2.0 ink pixels (4 images)" in out[1]
