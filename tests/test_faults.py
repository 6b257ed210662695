"""Faults a pod user meets (issue 25): preemption (a real SIGTERM to a real training process),
damaged checkpoints, a full disk during a save (ENOSPC, simulated), and more bad inputs, each
one line and a non-zero exit that touches nothing.

The tiny model is test_checkpoint.py's (the same programs, compiled once per session)."""
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "train.batch_size": 16,
             "train.num_steps": 40, "train.checkpoint_every": 10, "train.log_every": 10,
             "train.keep_checkpoints": 3, "train.warmup_steps": 5, "train.sample_at_end": False}
SAMPLE = ["--mode", "sample", "--config.sample.num_images=4", "--config.sample.batch_size=4",
          "--config.sample.steps=3"]


def make_config(**extra):
  from deediff_jax.config import config_from_file
  c = config_from_file(os.path.join(ROOT, "configs", "digits.py"))
  for k, v in {**OVERRIDES, **extra}.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def cli_args(workdir, overrides=None):
  o = {**OVERRIDES, **(overrides or {})}
  return ["--config", "configs/digits.py", "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in o.items()]


def invoke(capsys, monkeypatch, args):
  """(exit code, stderr) of `python -m deediff_jax.main ARGS`, run in this process."""
  from deediff_jax import main
  monkeypatch.chdir(ROOT)
  capsys.readouterr()
  code = main.main(["deediff_jax.main", *args])
  return code, capsys.readouterr().err


def tree_hashes(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def steps_in(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def host(tree):
  import jax
  return jax.tree_util.tree_leaves(jax.device_get(tree))


def assert_bitwise(a, b):
  la, lb = host(a), host(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def said(stderr):
  """stderr's lines without tqdm's progress bars (redrawn with carriage returns)."""
  return [l for l in stderr.replace("\r", "\n").splitlines()
          if l.strip() and not re.match(r"^[\w ]+:\s+\d+%\|", l)]


# ----------------------------------------------------------------------------- preemption

def test_sigterm_saves_the_step_reached_and_resume_is_bitwise(tmp_path):
  from deediff_jax.train.checkpoint import latest_step
  from deediff_jax.train.trainer import train
  # No periodic save is due before step 1000; metrics every step show how far it got.
  long = {"train.num_steps": 1000, "train.checkpoint_every": 1000, "train.log_every": 1}
  wd = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "deediff_jax.main", *cli_args(wd, long)], cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGTERM)
  time.sleep(0.05)
  os.kill(proc.pid, signal.SIGTERM)  # a second notice (schedulers repeat it) changes nothing
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert "Traceback" not in stderr
  lines = error_lines(stderr)
  assert said(stderr) == lines and len(lines) == 1, stderr[-3000:]
  reached = latest_step(wd)
  assert reached is not None and 3 <= reached < 1000
  assert lines[0] == (f"error: training stopped by SIGTERM after step {reached}; checkpoint step {reached} "
                      f"is saved in {wd / 'checkpoints'}; rerun the same command to resume from it")
  assert steps_in(wd) == [reached]   # the one save: at the step reached, between periodic saves

  # Resume two more steps on the same schedule; an uninterrupted run of as many steps agrees bitwise.
  stop = {**long, "train.log_every": 10, "train.stop_at": reached + 2}
  resumed = train(make_config(**stop), wd, progress=False)
  straight = train(make_config(**stop), tmp_path / "straight", progress=False)
  assert int(resumed.step) == int(straight.step) == reached + 2
  assert_bitwise(resumed.params, straight.params)
  assert_bitwise(resumed.ema_params, straight.ema_params)
  assert_bitwise(resumed.opt_state, straight.opt_state)


def test_signal_during_the_save_is_ignored_and_the_save_commits(tmp_path, monkeypatch):
  from deediff_jax.train import checkpoint as ckpt
  from deediff_jax.train import preemption, trainer
  from deediff_jax.train.preemption import Preempted
  c = make_config()
  real_should_stop = preemption.Watch.should_stop

  def notice_at_3(self, step):  # the scheduler's SIGTERM arrives while step 3 runs
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_should_stop(self, step)

  monkeypatch.setattr(preemption.Watch, "should_stop", notice_at_3)
  real_save = ckpt.save_state

  def save_under_fire(manager, state, config):
    os.kill(os.getpid(), signal.SIGINT)    # Ctrl-C and a repeated SIGTERM in the middle of the save
    os.kill(os.getpid(), signal.SIGTERM)
    real_save(manager, state, config)
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(ckpt, "save_state", save_under_fire)
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with pytest.raises(Preempted) as e:
    trainer.train(c, tmp_path, progress=False)
  assert e.value.exit_code == 143 and "after step 3;" in str(e.value)
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
  monkeypatch.setattr(ckpt, "save_state", real_save)
  assert steps_in(tmp_path) == [3]
  ckpt.load_params(tmp_path, c, step=3)   # committed and intact


# ----------------------------------------------------------------------------- damaged checkpoints

def _truncate_step(step_dir):
  """Every array file of one step cut to half its size (a disk that filled, a copy cut short)."""
  cut = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      if os.sep + "d" + os.sep in p or f.startswith("manifest"):
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 2)
        cut += 1
  assert cut


def test_truncated_newest_checkpoint_falls_back_in_sampling_and_training(tmp_path, capsys, monkeypatch):
  from deediff_jax.train.trainer import train
  wd = tmp_path / "run"
  train(make_config(), wd, stop_after=20, progress=False)   # steps 10 and 20
  _truncate_step(wd / "checkpoints" / "20")
  damaged = tree_hashes(wd / "checkpoints" / "20")
  ckpts = tree_hashes(wd / "checkpoints")

  # Sampling reads step 10, says so in one line, and moves or writes nothing in checkpoints/.
  code, stderr = invoke(capsys, monkeypatch, cli_args(wd) + SAMPLE)
  assert code == 0, stderr[-3000:]
  warnings = [l for l in said(stderr) if l.startswith("warning:")]
  assert said(stderr) == warnings and len(warnings) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert warnings[0].startswith(f"warning: checkpoint step 20 at {wd / 'checkpoints' / '20'} cannot be restored (")
  assert warnings[0].endswith("; using step 10 instead")
  assert tree_hashes(wd / "checkpoints") == ckpts and os.path.exists(wd / "samples.png")

  # Training resumes from step 10 after moving step 20 aside, intact, to checkpoints/damaged/20.
  capsys.readouterr()
  state = train(make_config(), wd, stop_after=20, progress=False)
  stderr = capsys.readouterr().err
  assert int(state.step) == 30
  assert f"warning: checkpoint step 20 at {wd / 'checkpoints' / '20'} cannot be restored (" in stderr
  assert f"; resuming from step 10; the damaged step is kept in {wd / 'checkpoints' / 'damaged'}" in stderr
  assert tree_hashes(wd / "checkpoints" / "damaged" / "20") == damaged
  straight = train(make_config(), tmp_path / "straight", stop_after=30, progress=False)
  assert_bitwise(state.params, straight.params)
  # keep_checkpoints=3 counts the steps only: the damaged one is neither counted nor deleted.
  train(make_config(), wd, progress=False)
  assert steps_in(wd) == [20, 30, 40]
  assert tree_hashes(wd / "checkpoints" / "damaged" / "20") == damaged


def test_missing_item_and_wrong_shapes_are_damage(tmp_path, capsys):
  import jax
  import orbax.checkpoint as ocp
  from deediff_jax.train.checkpoint import CheckpointError, load_params
  from deediff_jax.train.trainer import train
  wd = tmp_path / "run"
  c = make_config()
  train(c, wd, stop_after=30, progress=False)
  ck = wd / "checkpoints"
  shutil.rmtree(ck / "30" / "ema_params")             # a half-copied step folder
  # Step 20's EMA replaced by arrays of other shapes (same names, same saved config).
  ema = load_params(wd, c, step=20)
  wrong = jax.tree_util.tree_map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), np.float32), ema)
  shutil.rmtree(ck / "20" / "ema_params")
  with ocp.StandardCheckpointer() as saver:
    saver.save(ck / "20" / "ema_params", wrong)
  capsys.readouterr()
  got, step = load_params(wd, c, with_step=True)
  err = capsys.readouterr().err
  assert step == 10
  assert err.count("\n") == 1 and err.startswith("warning: checkpoint step 30 at ")
  assert "(nor step 20); using step 10 instead" in err and "Traceback" not in err
  assert_bitwise(got, load_params(wd, c, step=10))
  # The same three steps unreadable: one line, naming the newest.
  shutil.rmtree(ck / "10" / "ema_params")
  with pytest.raises(CheckpointError) as e:
    load_params(wd, c)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith(f"cannot restore checkpoint step 30 at {ck / '30'}: ")
  assert f"no intact checkpoint is left in {ck} (damaged: 30, 20, 10)" in str(e.value)


# ----------------------------------------------------------------------------- a full disk

def test_enospc_during_a_save_keeps_earlier_checkpoints(tmp_path, capsys, monkeypatch):
  import orbax.checkpoint as ocp
  from deediff_jax.train.checkpoint import latest_step, load_params
  from deediff_jax.train.trainer import train
  wd = tmp_path / "run"
  c = make_config(**{"train.keep_checkpoints": 2})
  train(c, wd, stop_after=20, progress=False)   # steps 10, 20; a commit of 30 would delete 10
  before = tree_hashes(wd / "checkpoints")
  real = ocp.handlers.JsonCheckpointHandler._save_fn

  async def disk_full(self, x, directory):  # the disk fills while step 30 is written
    (directory / "metadata").write_text("{\"st")
    raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))

  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)
  code, stderr = invoke(capsys, monkeypatch, cli_args(wd, {"train.keep_checkpoints": 2, "train.stop_at": 30}))
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", real)
  assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
  assert said(stderr) == error_lines(stderr) and len(error_lines(stderr)) == 1, stderr[-3000:]
  line = error_lines(stderr)[0]
  assert line.startswith(f"error: cannot save checkpoint step 30 in {wd / 'checkpoints'}: no space left "
                         "on device (")
  assert "one checkpoint needs about " in line and "; free at least " in line
  assert line.endswith("then rerun the same command to resume from step 20")
  # Steps 10 and 20 as they were, both restorable; no step 30 that anyone would trust.
  assert steps_in(wd) == [10, 20] and latest_step(wd) == 20
  assert {k: v for k, v in tree_hashes(wd / "checkpoints").items() if k.split(os.sep)[0] in ("10", "20")} == before
  for step in (10, 20):
    load_params(wd, c, step=step)
  # A reader meanwhile (as --mode sample beside a running training) takes step 20, without a
  # warning: the half-written step 30 is a temporary directory, not a step.
  assert [p for p in os.listdir(wd / "checkpoints") if p.startswith("30.")]
  capsys.readouterr()
  assert_bitwise(load_params(wd, c), load_params(wd, c, step=20))
  assert "warning" not in capsys.readouterr().err
  state = train(make_config(**{"train.keep_checkpoints": 2, "train.stop_at": 30}), wd, progress=False)
  assert int(state.step) == 30 and steps_in(wd) == [20, 30]
  assert not [p for p in os.listdir(wd / "checkpoints") if "tmp" in p]   # the torn save is cleaned up


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with one checkpoint: what every bad input below must leave as it is."""
  from deediff_jax.train.trainer import train
  wd = tmp_path_factory.mktemp("trained")
  train(make_config(), wd, stop_after=10, progress=False)
  return wd


# name: (extra arguments, mode, the exact stderr line; {wd} is the workdir)
BAD_INPUTS = {
    "threshold_nan": (["--config.exit.threshold=nan"], "sample",
                      "error: config key 'exit.threshold' is nan; give a finite number (default "
                      "--config.exit.threshold=0.1)"),
    "float_inf": (["--config.train.ema_rate=inf"], "train",
                  "error: config key 'train.ema_rate' is inf; give a finite number (default "
                  "--config.train.ema_rate=0.999)"),
    "nan_in_a_list": (["--config.exit.threshold_schedule=0.1,nan"], "sample",
                      "error: config key 'exit.threshold_schedule' holds nan; give finite numbers, got "
                      "'0.1,nan'"),
    "negative_lr": (["--config.train.lr=-1"], "train",
                    "error: train.lr must be positive, got -1.0; e.g. --config.train.lr=1e-3"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_value_is_one_line_and_touches_nothing(trained, capsys, monkeypatch, name):
  extra, mode, want = BAD_INPUTS[name]
  before = tree_hashes(trained)
  code, stderr = invoke(capsys, monkeypatch, cli_args(trained) + extra + ["--mode", mode])
  assert code == 2 and said(stderr) == [want.format(wd=trained)], stderr
  assert tree_hashes(trained) == before


def test_workdir_that_cannot_exist_is_one_line(capsys, monkeypatch, trained):
  code, stderr = invoke(capsys, monkeypatch, cli_args("/proc/nope"))
  assert code == 2 and said(stderr) == [
      "error: --workdir /proc/nope cannot be created: No such file or directory in /proc; pass a "
      "--workdir you can write to"], stderr
  assert not os.path.exists("/proc/nope")
  under_a_file = trained / "config.json" / "run"
  before = tree_hashes(trained)
  code, stderr = invoke(capsys, monkeypatch, cli_args(under_a_file))
  assert code == 2 and said(stderr) == [
      f"error: --workdir {under_a_file} cannot be created: {trained / 'config.json'} is a file, not a "
      "directory; pass a --workdir you can write to"], stderr
  assert tree_hashes(trained) == before


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_unwritable_workdir_is_one_line_and_touches_nothing(trained, capsys, monkeypatch, mode):
  # The suite runs as root, where file modes stop nothing: the OS refusing is simulated.
  real_open = os.open

  def refuse(path, *a, **k):
    if str(path).startswith(str(trained)):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, *a, **k)

  before = tree_hashes(trained)
  monkeypatch.setattr(os, "open", refuse)
  code, stderr = invoke(capsys, monkeypatch, cli_args(trained) + ["--mode", mode])
  monkeypatch.setattr(os, "open", real_open)
  assert code == 2 and said(stderr) == [
      f"error: --workdir {trained} cannot be written: Permission denied in {trained}; pass a --workdir "
      "you can write to"], stderr
  assert tree_hashes(trained) == before


def test_params_file_checks(trained, tmp_path, capsys, monkeypatch):
  """sample.params_file: NaN in it, or a file of another model, is one line, exit 2."""
  params_file = pytest.importorskip("deediff_jax.train.params_file")
  from deediff_jax.train.checkpoint import load_params
  c = make_config()
  params = load_params(trained, c)
  good = str(tmp_path / "good.npz")
  params_file.save(good, params, c)
  flat = dict(np.load(good))
  name = next(k for k in flat if k != params_file.CONFIG_KEY)
  flat[name] = flat[name].copy()
  flat[name].flat[0] = np.nan
  nan_file = str(tmp_path / "nan.npz")
  np.savez(nan_file, **flat)
  other = str(tmp_path / "other.npz")
  c64 = make_config(**{"model.embed_dim": 64})
  import jax
  from deediff_jax.model import build, init_params
  shapes = jax.eval_shape(lambda: init_params(build(c64.model), jax.random.PRNGKey(0)))
  params_file.save(other, jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes), c64)
  before = tree_hashes(trained)
  for path, words in ((nan_file, [nan_file, name]), (other, [other, "model.embed_dim"])):
    code, stderr = invoke(capsys, monkeypatch, cli_args(trained) + SAMPLE + [f"--config.sample.params_file={path}"])
    lines = said(stderr)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for w in words:
      assert w in lines[0], lines[0]
  assert tree_hashes(trained) == before


def test_tune_file_with_unknown_keys_is_one_line(trained, tmp_path, capsys, monkeypatch):
  pytest.importorskip("deediff_jax.eval.tune")
  import json
  tuned = tmp_path / "tuned.json"
  tuned.write_text(json.dumps({"overrides": {"exit.thresholdd": 0.1}}))
  before = tree_hashes(trained)
  code, stderr = invoke(capsys, monkeypatch, cli_args(trained) + SAMPLE + [f"--config.tune.file={tuned}"])
  lines = said(stderr)
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert str(tuned) in lines[0] and "'exit.thresholdd'" in lines[0]
  assert tree_hashes(trained) == before


def test_router_of_another_model_is_one_line(trained, tmp_path, capsys, monkeypatch):
  pytest.importorskip("deediff_jax.caching")
  router = str(tmp_path / "router.npz")   # for a 5-block model; the tiny one has 3 blocks
  np.savez(router, prob=np.zeros((3, 10), np.float32), num_blocks=np.asarray(5), sampler=np.asarray("ddim"),
           steps=np.asarray(3))
  before = tree_hashes(trained)
  code, stderr = invoke(capsys, monkeypatch, cli_args(trained) + SAMPLE + [
      "--config.cache.policy=l2c", f"--config.cache.router={router}", "--config.sample.sampler=ddim"])
  lines = said(stderr)
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert router in lines[0] and "blocks" in lines[0]
  assert tree_hashes(trained) == before


# ----------------------------------------------------------------------------- concurrent readers

def test_sampling_while_training_reads_only_committed_steps(tmp_path):
  """`--mode sample` against a workdir whose training is running (saving every 10 steps, keeping 3,
  so steps appear and disappear under the reader) reads a committed step, never a half-written or
  vanishing one: every read succeeds with no damage warning."""
  train_args = [sys.executable, "-m", "deediff_jax.main",
                *cli_args(tmp_path, {"train.num_steps": 100000, "train.log_every": 1000})]
  trainer = subprocess.Popen(train_args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and trainer.poll() is None:
      if os.path.isdir(tmp_path / "checkpoints") and steps_in(tmp_path):
        break
      time.sleep(0.05)
    assert trainer.poll() is None and steps_in(tmp_path), "training never committed a step"
    first = steps_in(tmp_path)[-1]
    read = subprocess.run([sys.executable, "-m", "deediff_jax.main", *cli_args(tmp_path), *SAMPLE],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert trainer.poll() is None, "training stopped while it was being read"
    assert read.returncode == 0, read.stderr[-2000:]
    assert not [l for l in said(read.stderr) if "cannot be restored" in l or "damaged" in l], read.stderr[-2000:]
    assert steps_in(tmp_path)[-1] > first + 30         # training saved (and deleted) steps during the read
  finally:
    trainer.send_signal(signal.SIGTERM)
    trainer.wait(timeout=120)
  assert trainer.returncode == 143
  assert os.path.exists(tmp_path / "samples.npz")
