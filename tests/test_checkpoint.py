"""Checkpoints: exact resume (planned stop and SIGKILL), corrupted checkpoints, NaN guard,
architecture checks, export/load round trip."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40  # 4 checkpoints per run: enough for a mid-run kill, a torn save and keep=3
# The same run from the CLI and in-process: configs/digits.py made tiny.
OVERRIDES = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "train.batch_size": 16,
             "train.num_steps": NUM_STEPS, "train.checkpoint_every": 10, "train.log_every": 10,
             "train.keep_checkpoints": 3, "train.warmup_steps": 5, "train.sample_at_end": False}


def make_config(**extra):
  import importlib.util
  spec = importlib.util.spec_from_file_location("digits_cfg", os.path.join(ROOT, "configs", "digits.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  for k, v in {**OVERRIDES, **extra}.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def cli(workdir, *extra):
  args = [sys.executable, "-m", "deediff_jax.main", "--config", "configs/digits.py", "--workdir", str(workdir)]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return args, env


def params_of(state):
  import jax
  return jax.device_get(state.params)


def max_abs_diff(a, b):
  import jax
  d = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree_util.tree_leaves(d))


def tree_hashes(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted NUM_STEPS run: (final state, workdir)."""
  from deediff_jax.train.trainer import train
  wd = tmp_path_factory.mktemp("ref")
  state = train(make_config(), wd, progress=False)
  return state, wd


def test_restart_equals_uninterrupted(reference, tmp_path):
  from deediff_jax.train.metrics import read_metrics
  from deediff_jax.train.trainer import train
  ref_state, _ = reference
  c = make_config()
  half = train(c, tmp_path, stop_after=NUM_STEPS // 2, progress=False)
  assert int(half.step) == NUM_STEPS // 2
  assert max_abs_diff(params_of(half), params_of(ref_state)) > 1e-4  # genuinely half-way
  full = train(make_config(), tmp_path, progress=False)
  assert int(full.step) == NUM_STEPS
  assert max_abs_diff(params_of(full), params_of(ref_state)) <= 1e-6
  assert max_abs_diff(jax_get(full.ema_params), jax_get(ref_state.ema_params)) <= 1e-6
  steps = [m["step"] for m in read_metrics(tmp_path)]
  assert steps == list(range(10, NUM_STEPS + 1, 10))  # each logged once, resumed log continues
  assert json.load(open(tmp_path / "config.json"))["train"]["num_steps"] == NUM_STEPS
  # keep_checkpoints=3: only the newest three steps remain.
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [NUM_STEPS - 20, NUM_STEPS - 10, NUM_STEPS]


def jax_get(tree):
  import jax
  return jax.device_get(tree)


def test_sigkill_mid_run_resumes_to_same_params(reference, tmp_path):
  from deediff_jax.train.checkpoint import latest_step, load_params
  ref_state, _ = reference
  args, env = cli(tmp_path)
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ckdir = tmp_path / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ckdir.exists() and any(p.name.isdigit() for p in ckdir.iterdir()):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
  killed_at = latest_step(tmp_path)
  assert killed_at is not None and killed_at < NUM_STEPS
  # A save torn by the kill: a temporary directory of a later step with part of its files.
  torn = ckdir / f"{killed_at + 10}.orbax-checkpoint-tmp-1700000000000000"
  shutil.copytree(ckdir / str(killed_at) / "params", torn / "params")
  assert latest_step(tmp_path) == killed_at  # never taken for a complete step

  rerun = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert latest_step(tmp_path) == NUM_STEPS and not torn.exists()
  c = make_config()
  got = jax_get(load_params(tmp_path, c, use_ema=False))
  assert max_abs_diff(got, params_of(ref_state)) <= 1e-6
  got_ema = jax_get(load_params(tmp_path, c))
  assert max_abs_diff(got_ema, jax_get(ref_state.ema_params)) <= 1e-6


def test_corrupted_checkpoint_is_one_line_error_and_untouched(tmp_path, capsys, monkeypatch):
  from deediff_jax import main
  from deediff_jax.train.trainer import train
  train(make_config(), tmp_path, stop_after=10, progress=False)
  step_dir = tmp_path / "checkpoints" / "10"
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "opt_state") for f in fs
                if os.sep + "d" + os.sep in os.path.join(r, f)]
  assert data_files
  for f in data_files:
    with open(f, "wb") as fh:
      fh.write(b"not a checkpoint")
  before = tree_hashes(tmp_path)
  # The CLI in-process (main() is what `python -m deediff_jax.main` runs): exit code and stderr.
  args, _ = cli(tmp_path)
  monkeypatch.chdir(ROOT)
  capsys.readouterr()
  code = main.main(["deediff_jax.main", *args[3:]])
  stderr = capsys.readouterr().err
  assert code == 2, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: cannot restore checkpoint step 10 at ")
  assert str(step_dir) in lines[0] and "Traceback" not in stderr
  assert tree_hashes(tmp_path) == before  # nothing deleted, nothing overwritten, no restart


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  from deediff_jax.train import trainer
  from deediff_jax.train.checkpoint import latest_step, load_params
  c = make_config()
  good_fn, _ = trainer.default_batch_fn(c)

  def poisoned(step):
    batch = good_fn(step)
    if step == 25:  # the 26th update
      batch["image"] = np.full_like(batch["image"], np.nan)
    return batch

  with pytest.raises(trainer.TrainingDivergedError) as e:
    trainer.train(c, tmp_path, batch_fn=poisoned, progress=False)
  msg = str(e.value)
  assert "loss is nan at step 26" in msg and "last good checkpoint is step 20" in msg
  assert "\n" not in msg
  assert latest_step(tmp_path) == 20
  params = jax_get(load_params(tmp_path, c, use_ema=False))
  assert all(np.isfinite(x).all() for x in __import__("jax").tree_util.tree_leaves(params))
  # The same 20 steps without poison give these parameters: the saved state is the good one.
  clean = trainer.train(make_config(), tmp_path / "clean", stop_after=20, progress=False)
  assert max_abs_diff(params, params_of(clean)) <= 1e-6


def test_resume_refuses_other_architecture(reference):
  from deediff_jax.train.checkpoint import CheckpointError
  from deediff_jax.train.trainer import train
  _, wd = reference
  with pytest.raises(CheckpointError, match=r"model\.embed_dim=32 but the config says 64"):
    train(make_config(**{"model.embed_dim": 64}), wd, progress=False)


def test_export_and_load_params_round_trip(reference, tmp_path):
  import jax
  from deediff_jax.train.checkpoint import CheckpointError, export_params, load_params
  ref_state, wd = reference
  c = make_config()
  # A training workdir: EMA by default, raw params on request.
  assert max_abs_diff(jax_get(load_params(wd, c)), jax_get(ref_state.ema_params)) == 0.0
  assert max_abs_diff(jax_get(load_params(wd, c, use_ema=False)), params_of(ref_state)) == 0.0
  # An export: params-only, read back exactly (also with use_ema, which falls back to params).
  raw = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.0, params_of(ref_state))
  export_params(tmp_path / "exp", raw, c)
  assert os.path.exists(tmp_path / "exp" / "config.json")
  back = jax_get(load_params(tmp_path / "exp", c))
  assert max_abs_diff(back, raw) == 0.0
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(raw)
  with pytest.raises(CheckpointError, match=r"model\.depth=2 but the config says 4"):
    load_params(tmp_path / "exp", make_config(**{"model.depth": 4}))
  with pytest.raises(CheckpointError, match="no checkpoints in"):
    load_params(tmp_path / "nothing", c)
  # A step deleted by a training run's keep-N while orbax lists the directory: the reader tries again.
  from deediff_jax.train import checkpoint as ckpt
  real, calls = ckpt.make_manager, []

  def vanishing_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise FileNotFoundError(2, "No such file or directory", str(wd / "checkpoints" / "30"))
    return real(*args, **kwargs)
  ckpt.make_manager = vanishing_once
  try:
    assert max_abs_diff(jax_get(load_params(wd, c)), jax_get(ref_state.ema_params)) == 0.0
  finally:
    ckpt.make_manager = real
  assert len(calls) == 2
