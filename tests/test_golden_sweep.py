"""A committed golden sweep: a refactor that changes no behaviour gives the same rows.

Two tiny digits models (a DeeDiff one with UEMs and an AdaDiff one), each trained for 30 steps
with fixed seeds (the parameters are committed in tests/golden/*.npz, so the test trains
nothing), swept over every built-in policy family, a calibrated threshold (scalar and per
timestep bucket) and the oracle-calibrated time_schedule. Every field of every row is compared
except the timings (`TIMING_KEYS`), floats to a relative 1e-4.

Regenerate (only when a change of behaviour is intended, and say so in the commit):
  DEEDIFF_REGEN_GOLDEN=1 python -m pytest tests/test_golden_sweep.py     # rewrites the JSON
  DEEDIFF_REGEN_GOLDEN=train python -m pytest tests/test_golden_sweep.py # retrains the params too
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from deediff_jax.config import base_config, validate
from deediff_jax.eval import sweep

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
# DEEDIFF_GOLDEN_JSON: compare with (or regenerate) another file, e.g. a baseline of a working tree.
GOLDEN_JSON = os.environ.get("DEEDIFF_GOLDEN_JSON") or os.path.join(GOLDEN_DIR, "sweep_golden.json")
TIMING_KEYS = ("seconds", "seconds_full", "speedup")
REGEN = os.environ.get("DEEDIFF_REGEN_GOLDEN", "")


def _model_config(style: str):
  c = base_config()                       # digits: 8x8x1, 10 classes
  c.model.update(embed_dim=32, depth=4, num_heads=2, exit_style=style)
  c.exit.policy = "uem" if style == "deediff" else "adadiff"
  c.train.update(num_steps=30, batch_size=32, warmup_steps=5, log_every=10, checkpoint_every=30,
                 sample_at_end=False, seed=0)
  return c


def _sweep_config(style: str):
  c = _model_config(style)
  c.sample.update(sampler="ddim", steps=4, batch_size=8, num_images=8, guidance_scale=1.0, seed=0)
  c.sweep.update(num_images=8, fid_kind="none", classifier_steps=20, step_fractions="0.5",
                 oracle_tolerances="0.1", depths="2,4")
  if style == "deediff":
    c.sweep.update(policies="uem,static,time_schedule,state_cosine,oracle,none", thresholds="0.3,0.5",
                   cosine_thresholds="0.9", time_schedules="2,3,5")
    c.exit.update(target_layer_ratio=0.6, calibration_tolerance=0.05, calibration_buckets=2)
  else:
    c.sweep.update(policies="adadiff,static,none", confidence_thresholds="0.5,0.9")
    c.exit.update(aggregate="mean", min_layers=2)
  return validate(c)


def _params_path(style: str) -> str:
  return os.path.join(GOLDEN_DIR, f"params_{style}.npz")


def _train(style: str, tmp_path) -> None:
  """30 training steps through the CLI; the EMA params flattened into an npz."""
  from deediff_jax.train.checkpoint import load_params
  workdir = str(tmp_path / f"train_{style}")
  c = _model_config(style)
  flags = [f"--config.model.{k}={v}" for k, v in c.model.items() if k in ("embed_dim", "depth", "num_heads",
                                                                           "exit_style")]
  flags += [f"--config.train.{k}={v}" for k, v in c.train.items()
            if k in ("num_steps", "batch_size", "warmup_steps", "log_every", "checkpoint_every", "sample_at_end")]
  subprocess.run([sys.executable, "-m", "deediff_jax.main", "--config", "configs/digits.py", "--workdir", workdir,
                  "--config.sample.guidance_scale=0", f"--config.exit.policy={c.exit.policy}", *flags], check=True,
                 cwd=os.path.dirname(os.path.dirname(GOLDEN_DIR)))
  params = load_params(workdir, c, use_ema=True)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in __import__("jax").tree_util.tree_flatten_with_path(params)[0]}
  np.savez_compressed(_params_path(style), **flat)


def _load_params(style: str) -> dict:
  out: dict = {}
  with np.load(_params_path(style)) as f:
    for key in f.files:
      node = out
      *parents, leaf = key.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = np.asarray(f[key])
  return out


def _rows(style: str, workdir) -> list:
  rows = sweep.run(_sweep_config(style), str(workdir), params=_load_params(style), progress=False)
  return json.loads(json.dumps([{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]))


def _same(a, b, where: str) -> None:
  if isinstance(a, float) or isinstance(b, float):
    assert isinstance(a, (int, float)) and isinstance(b, (int, float)), f"{where}: {a!r} vs {b!r}"
    if math.isnan(a) or math.isnan(b):
      assert math.isnan(a) and math.isnan(b), f"{where}: {a!r} vs {b!r}"
    else:
      assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"{where}: {a!r} vs {b!r}"
  elif isinstance(a, dict) and isinstance(b, dict):
    assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
    for k in a:
      if k not in TIMING_KEYS:
        _same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list) and isinstance(b, list):
    assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
      _same(x, y, f"{where}[{i}]")
  else:
    assert a == b, f"{where}: {a!r} vs {b!r}"


def test_golden_sweep(tmp_path):
  if REGEN == "train" or not all(os.path.isfile(_params_path(s)) for s in ("deediff", "adadiff")):
    if not REGEN:
      pytest.fail("tests/golden/params_*.npz missing; run with DEEDIFF_REGEN_GOLDEN=train")
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    for style in ("deediff", "adadiff"):
      _train(style, tmp_path)
  got = {style: _rows(style, tmp_path / style) for style in ("deediff", "adadiff")}
  if REGEN:
    with open(GOLDEN_JSON, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write("\n")
  with open(GOLDEN_JSON) as f:
    want = json.load(f)
  for style in ("deediff", "adadiff"):
    assert [r["setting"] for r in got[style]] == [r["setting"] for r in want[style]], style
    for g, w in zip(got[style], want[style]):
      _same(g, w, f"{style}[{w['setting']}]")
