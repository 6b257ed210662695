"""The CLI: every bad input is exit code 2 and one line on stderr naming the key and the fix;
divergence is exit code 1; a tiny train run writes metrics and a checkpoint, and sample reads it."""
import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.train.batch_size=16", "--config.train.warmup_steps=2"]


def invoke(capsys, monkeypatch, workdir, *args, config="configs/digits.py", cwd=ROOT):
  """(exit code, stderr) of `python -m deediff_jax.main` run in this process (main() is what the
  module runs; its compiles are shared with the other tests of this worker)."""
  from deediff_jax import main
  monkeypatch.chdir(cwd)
  capsys.readouterr()
  code = main.main(["deediff_jax.main", "--config", config, "--workdir", str(workdir), *args])
  return code, capsys.readouterr().err


def start(workdir, *args, config="configs/digits.py", cwd=ROOT):
  cmd = [sys.executable, "-m", "deediff_jax.main", "--config", config, "--workdir", str(workdir), *args]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# (arguments, config file, words the single stderr line must contain)
BAD_INPUTS = {
    "unknown_key": (["--config.train.lrr=0.1"], "configs/digits.py",
                    ["unknown config key 'train.lrr'", "did you mean --config.train.lr"]),
    "bad_enum": (["--config.exit.policy=foo"], "configs/digits.py",
                 ["exit.policy", "'foo'", "choose one of uem"]),
    "odd_depth": (["--config.model.depth=7"], "configs/digits.py", ["model.depth", "even", "use 8"]),
    "patch_not_dividing": (["--config.model.patch_size=3"], "configs/digits.py",
                           ["model.patch_size", "does not divide image_size 8", "pick a divisor"]),
    "missing_config_file": ([], "configs/no_such_config.py",
                            ["config file not found: configs/no_such_config.py", "--config configs/NAME.py"]),
    "missing_npz": (["--config.data.source=npz:/no/such/file.npz"], "configs/digits.py",
                    ["npz file not found", "/no/such/file.npz", "check the path"]),
    "bad_mode": (["--mode", "fly"], "configs/digits.py", ["--mode", "fly"]),
    "bad_value_type": (["--config.train.batch_size=1.5"], "configs/digits.py", ["train.batch_size", "1.5"]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, name):
  # In-process from ROOT (the configs' relative paths, as a user types them).
  args, cfg, words = BAD_INPUTS[name]
  workdir = tmp_path / name
  code, stderr = invoke(capsys, monkeypatch, workdir, *args, config=cfg)
  lines = stderr.strip().splitlines()
  assert code == 2, stderr
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ")
  for w in words:
    assert w in lines[0], lines[0]
  assert not os.path.exists(workdir / "checkpoints")  # Nothing was started.


def test_bad_input_from_the_shell_exits_2_without_traceback(tmp_path):
  # The one real process: `python -m` maps main()'s return value to the exit status.
  p = start(tmp_path / "w", "--config.train.lrr=0.1")
  _, stderr = p.communicate(timeout=300)
  assert p.returncode == 2 and stderr.strip().splitlines() == [
      "error: unknown config key 'train.lrr' in --config.train.lrr; did you mean --config.train.lr?"]


def test_train_then_sample_end_to_end(tmp_path, capsys, monkeypatch):
  wd = tmp_path / "run"
  # A relative --workdir, as users type it (orbax itself needs absolute paths).
  code, stderr = invoke(capsys, monkeypatch, "run", *TINY, "--config.train.num_steps=6", "--config.train.log_every=3",
                        "--config.train.checkpoint_every=3", "--config.train.sample_at_end=False",
                        config=os.path.join(ROOT, "configs/digits.py"), cwd=tmp_path)
  assert code == 0, stderr[-3000:]
  metrics = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [3, 6]
  for m in metrics:
    for key in ("loss", "loss_simple", "loss_u", "loss_ual", "lr", "grad_norm", "images_per_sec"):
      assert key in m and isinstance(m[key], float)
  assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd / "tb"))
  assert json.load(open(wd / "config.json"))["model"]["embed_dim"] == 32

  code, stderr = invoke(capsys, monkeypatch, wd, *TINY, "--mode", "sample", "--config.sample.num_images=4",
                        "--config.sample.batch_size=4", "--config.sample.steps=3")
  assert code == 0, stderr[-3000:]
  for f in ("samples.png", "samples.npz", "sample_stats.json"):
    assert os.path.exists(wd / f), f
  import numpy as np
  with np.load(wd / "samples.npz") as z:
    assert z["images"].shape == (4, 8, 8, 1)
    assert np.all(np.abs(z["images"]) <= 1.0 + 1e-6)


def test_text_model_encode_train_sample_with_early_exit(tmp_path, capsys, monkeypatch):
  # The whole text path from the CLI: captions written from labels -> MiniLM features -> a few
  # training steps of configs/mnist_text.py (on 8x8 digits here) -> sampling the held-out
  # wordings with guidance and early exit. Threshold 1 exits every sample after block 1.
  import numpy as np
  from PIL import Image
  from sklearn.datasets import load_digits
  from deediff_jax.data import encode_text
  d = load_digits()
  img = (d.images[:64] * (255.0 / 16.0)).round().astype(np.uint8)
  np.savez(tmp_path / "d.npz", image=img, label=d.target[:64])
  caps = tmp_path / "caps.npz"
  assert encode_text.main(["--captions-for-npz", str(tmp_path / "d.npz"), "--out", str(caps), "--no-progress"]) == 0
  wd = tmp_path / "text"
  code, stderr = invoke(capsys, monkeypatch, wd, *TINY, f"--config.data.source=npz:{tmp_path / 'd.npz'}",
                        "--config.data.image_size=8", "--config.model.image_size=8", "--config.model.patch_size=2",
                        f"--config.data.context_file={caps}", "--config.train.num_steps=4",
                        "--config.train.log_every=2", "--config.train.checkpoint_every=4",
                        "--config.sample.num_images=6", "--config.sample.batch_size=6", "--config.sample.steps=3",
                        "--config.exit.threshold=1.0", config="configs/mnist_text.py")
  assert code == 0, stderr[-3000:]
  stats = json.load(open(wd / "sample_stats.json"))
  assert stats["policy"] == "uem" and stats["guidance_scale"] == 1.0 and stats["layers_total"] == 3
  assert stats["layer_ratio_run"] == 1 / 3 and stats["layer_ratio_per_sample"] == 1 / 3
  with np.load(wd / "samples.npz") as z, np.load(caps) as c:
    assert z["images"].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(z["labels"], c["eval_labels"][:6])   # the held-out captions, in order
  # One row per held-out caption (6 captions, one image each; 8x8 at 4x, 1 px padding).
  assert Image.open(wd / "samples.png").size[1] == 6 * (32 + 1) + 1


def test_divergence_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
  wd = tmp_path / "nan"
  code, stderr = invoke(capsys, monkeypatch, wd, *TINY, "--config.train.num_steps=6", "--config.train.log_every=2",
                        "--config.train.checkpoint_every=2", "--config.train.warmup_steps=0",
                        "--config.train.lr=1e30", "--config.train.sample_at_end=False")
  lines = stderr.strip().splitlines()
  assert code == 1, stderr
  assert lines[-1].startswith("error: training stopped: ") and "lower train.lr" in lines[-1]
  assert "Traceback" not in stderr
  # Whatever was saved before the check is finite; the diverged state never was.
  saved = sorted(int(s) for s in os.listdir(wd / "checkpoints")) if os.path.exists(wd / "checkpoints") else []
  assert 6 not in saved
