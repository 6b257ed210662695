"""Measurements you can trust: one config measures the same thing in every mode, and nothing is
compiled inside a timed call (sample.py, eval/sweep.py, eval/evaluate.py, diffusion/samplers.py)."""
import json

import jax
import numpy as np
import pytest

from deediff_jax import sampling
from deediff_jax import sample as sample_mode
from deediff_jax.config import base_config, validate
from deediff_jax.eval import evaluate as eval_mode
from deediff_jax.eval import runner
from deediff_jax.eval import sweep
from deediff_jax.eval import settings as settings_lib
from deediff_jax.model import build, init_params

# A program is compiled by XLA or, when the session's persistent cache (tests/conftest.py) has
# it, read back from the cache: both mean it was not compiled before the timed call.
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                  "/jax/compilation_cache/cache_retrieval_time_sec")


def _config(num_images=4, exit_style="deediff", **exit_kw):
  # One batch of 4 unless a test needs a partial last batch (each batch size is its own program).
  c = base_config()
  c.model.update(embed_dim=32, depth=2, num_heads=2, exit_style=exit_style)   # 8x8x1, 10 classes, 3 blocks
  c.sample.update(sampler="ddim", steps=2, num_images=num_images, batch_size=4, guidance_scale=0.0)
  # Class accuracy is not what these tests measure: a 20-step digits classifier (the default 600
  # steps took most of an eval or sweep call here, once per workdir).
  c.sweep.update(num_images=num_images, fid_kind="none", step_fractions="", classifier_steps=20)
  c.exit.update(**exit_kw)
  return validate(c)


@pytest.fixture(scope="module")
def params():
  module = build(_config().model)
  return jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))


class _Compiles:
  """Counts XLA compilations (and persistent-cache reads of compiled programs) while active."""

  def __init__(self):
    self.count = 0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, *args, **kwargs):
    if self.active and name in COMPILE_EVENTS:
      self.count += 1

  def __enter__(self):
    self.count, self.active = 0, True
    return self

  def __exit__(self, *exc):
    self.active = False


@pytest.fixture(scope="module")
def compiles():
  return _Compiles()


def test_sample_eval_and_sweep_measure_the_same_layer_ratio(tmp_path, params):
  # min_layers 2 overrides static depth 1 in every mode (it used to apply in --mode sample only).
  c = _config(policy="static", depth=1, min_layers=2)
  c.sweep.update(policies="static", depths="1")
  got = {
      "sample": sample_mode.run(c, str(tmp_path / "s"), params=params)["layer_ratio_run"],
      "eval": eval_mode.run(c, str(tmp_path / "e"), params=params)["layer_ratio_run"],
      "sweep": sweep.run(c, str(tmp_path / "w"), params=params, progress=False)[0]["layer_ratio_run"],
  }
  assert got["sample"] == got["eval"] == got["sweep"] == pytest.approx(2 / 3), got


def test_adadiff_patience_off_is_the_same_in_every_mode(tmp_path):
  # exit.patience=False used to reach --mode sample only: the sweep, eval and calibration built
  # their policy values without it, so an in-block exit still waited for a second confident block.
  # Threshold 0: every confidence (a sigmoid) passes, so without patience every sample exits
  # after block 1 of 3; with patience the first in-block only arms and the mid-block exits (2/3).
  c = _config(exit_style="adadiff", policy="adadiff", threshold=0.0, patience=False)
  c.sweep.update(policies="adadiff", confidence_thresholds="0")
  p = jax.jit(lambda r: init_params(build(c.model), r))(jax.random.PRNGKey(0))
  got = {
      "sample": sample_mode.run(c, str(tmp_path / "s"), params=p)["layer_ratio_run"],
      "eval": eval_mode.run(c, str(tmp_path / "e"), params=p)["layer_ratio_run"],
      "sweep": sweep.run(c, str(tmp_path / "w"), params=p, progress=False)[0]["layer_ratio_run"],
  }
  assert got["sample"] == got["eval"] == got["sweep"] == pytest.approx(1 / 3), got
  c.exit.patience = True
  assert sample_mode.run(c, str(tmp_path / "p"), params=p)["layer_ratio_run"] == pytest.approx(2 / 3)


def test_sample_stats_and_sweep_name_the_same_fidelity_sampler(tmp_path, params):
  c = _config(policy="static", depth=2)
  c.sample.update(sampler="ddpm")                 # stochastic: fidelity uses DDIM eta=0 in both
  c.sweep.update(policies="static", depths="2")
  stats = sample_mode.run(c, str(tmp_path / "s"), params=params)
  row = sweep.run(c, str(tmp_path / "w"), params=params, progress=False)[0]
  assert stats["fidelity_sampler"] == row["fidelity_sampler"] == "ddim eta=0"
  assert stats["psnr_vs_full"] == pytest.approx(row["psnr_vs_full"], rel=1e-6)
  # One set of names: every measure the sweep row has under a name, sample_stats has under it too.
  for key in ("seconds", "seconds_full", "speedup", "psnr_vs_full", "psnr_worst5", "psnr_p5", "mse_vs_full",
              "mse_worst5", "mse_p95", "layer_ratio_run", "layer_ratio_per_sample", "policy", "sampler", "steps",
              "aggregate", "min_layers", "guidance_scale", "num_images", "fidelity_sampler"):
    assert key in stats and key in row, key
  assert stats["seconds_full_depth"] == stats["seconds_full"]                  # the old names stay
  assert stats["psnr_vs_full_worst5pct"] == stats["psnr_worst5"]
  assert json.loads((tmp_path / "s" / "sample_stats.json").read_text())["fidelity_sampler"] == "ddim eta=0"


def test_timed_sweep_calls_compile_nothing(tmp_path, params, compiles):
  # 6 images in batches of 4: a full batch and a partial last batch of 2, each its own program.
  ctx = runner.prepare(_config(num_images=6), str(tmp_path), params=params)
  for setting in (settings_lib.Setting("uem", threshold=0.5),
                  settings_lib.Setting("uem", threshold_schedule="0.2,0.6"),   # a per-bucket [2] threshold
                  settings_lib.Setting("none", steps=1, plain=True)):          # a fewer-steps row
    config = runner.with_steps(ctx.config, setting.steps)
    kw = dict(plain=True) if setting.plain else dict(setting=setting)
    runner._warm_up(ctx, config, **kw)
    if not setting.plain:
      kw["pp"] = setting.policy_params(3)
    with compiles:
      images, stats = runner._sample(ctx, config, **kw)
    assert compiles.count == 0, setting.label()
    assert images.shape == (6, 8, 8, 1) and np.asarray(stats["batch_sizes"]).tolist() == [4, 2]


def test_compile_only_runs_nothing_and_the_timed_call_compiles_nothing(params, compiles):
  c = _config()
  rng = jax.random.PRNGKey(3)
  pp = settings_lib.Setting("uem", threshold_schedule="0.1,0.3,0.5").policy_params(3)
  with compiles:
    assert sampling.sample(params, c, rng, 7, policy="uem", policy_params=pp, compile_only=True) is None
  assert compiles.count >= 2                       # a batch of 4 and the remainder of 3
  with compiles:
    images, _ = sampling.sample(params, c, rng, 7, policy="uem", policy_params=pp)
  assert compiles.count == 0 and images.shape[0] == 7


def test_timed_blocks_and_paired_speedup_alternates(monkeypatch):
  """sampling.timed stops the clock after the result is ready; paired_speedup alternates which
  side runs first and reports the median, min and max of the per-pair ratios full / other."""
  clock, calls = [0.0], []
  monkeypatch.setattr(sampling, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
  x = jax.numpy.ones(3)
  blocked = []
  monkeypatch.setattr(sampling.jax, "block_until_ready", lambda out: blocked.append(out) or out)
  assert sampling.timed(lambda a, b=0: a + b, 1, b=2) == (3, 0.0) and blocked == [3]

  def thunk(name, seconds):
    def run():
      calls.append(name)
      clock[0] += seconds.pop(0)
      return x
    return run
  full = thunk("full", [4.0, 6.0, 8.0])
  other = thunk("other", [2.0, 2.0, 1.0])
  got = sampling.paired_speedup(full, other, 3)
  assert calls == ["full", "other", "other", "full", "full", "other"]
  assert got == {"speedup": 3.0, "speedup_min": 2.0, "speedup_max": 8.0}
