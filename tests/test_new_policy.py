"""Adding an exit policy is one class and one `register` call (docs/policies.md): a policy
defined here alone runs through --mode sample, the sweep, eval and calibration, and its loop
decision matches its all-layers reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import early_exit as ee
from deediff_jax import policies
from deediff_jax import sample as sample_mode
from deediff_jax.config import base_config, validate
from deediff_jax.eval import specs
from deediff_jax.eval.calibration import spec as cal_spec
from deediff_jax.eval.calibration import threshold as cal_threshold
from deediff_jax.eval import evaluate as eval_mode
from deediff_jax.eval import flops
from deediff_jax.eval import sweep
from deediff_jax.model import build, init_params
from deediff_jax.model.uvit import ModelConfig


class SteadyUEM(policies.ScoreThreshold):
  """Exit when the UEM's u is below the threshold at two consecutive blocks."""
  name = "steady_uem"
  summary = "exit when u < threshold at this block and the one before"
  score = "uncertainty"
  exits_when = "below"
  cheap_threshold = 2.0
  sweep_key = "thresholds"
  sweep_example = "0.3,0.5"
  calibratable = True
  threshold_at = (0.0, 1.0)
  monitor = "uncertainty"
  needs_exit_style = "deediff"
  learned = True

  def confident(self, s):
    below, _ = super().confident(s)
    return below & s.armed, below          # `armed`: this block was below; the next may exit

  def reference_confident(self, r):
    below = super().reference_confident(r)                                # [N, B]
    before = jnp.concatenate([jnp.zeros_like(below[:1]), below[:-1]], axis=0)
    return below & before


@pytest.fixture(scope="module", autouse=True)
def steady_uem():
  policies.register(SteadyUEM())
  yield
  policies.unregister("steady_uem")


def _config(**exit_kw):
  c = base_config()                                   # digits-shaped: 8x8x1, 10 classes
  c.model.update(embed_dim=32, depth=4, num_heads=2)  # 5 blocks
  c.sample.update(sampler="ddim", steps=3, num_images=4, batch_size=4, guidance_scale=0.0)
  c.sweep.update(num_images=4, fid_kind="none", step_fractions="", classifier_steps=20,
                 policies="steady_uem,none", thresholds="0.45,0.6")
  c.exit.update(policy="steady_uem", **exit_kw)
  return validate(c)


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda r: init_params(build(_config().model), r))(jax.random.PRNGKey(0))


def test_the_loop_matches_the_reference(params):
  c = _config()
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  t = jnp.full((6,), 500.0)
  y = jnp.arange(6) % 10
  for thr in (0.3, 0.5, 0.55, 0.7):
    pp = ee.make_policy_params(5, threshold=thr)
    kw = dict(policy="steady_uem", policy_params=pp)
    _, st = ee.early_exit_forward(params, c.model, x, t, y, **kw)
    _, ref = ee.exit_reference(params, c.model, x, t, y, **kw)
    np.testing.assert_array_equal(st["exit_layer"], ref["exit_layer"])
    assert int(np.min(st["exit_layer"])) >= 2                     # never before two blocks
  assert flops.monitor_flops(ModelConfig.from_config(c.model), "steady_uem") > 0


def test_sample_sweep_and_eval(tmp_path, params):
  c = _config(threshold=0.6)
  stats = sample_mode.run(c, str(tmp_path / "s"), params=params)
  rows = sweep.run(c, str(tmp_path / "w"), params=params, progress=False)
  assert [r["setting"] for r in rows] == ["steady_uem 0.45", "steady_uem 0.6", "none"]
  row = eval_mode.run(c, str(tmp_path / "e"), params=params)
  assert stats["policy"] == row["policy"] == "steady_uem"
  assert stats["layer_ratio_run"] == rows[1]["layer_ratio_run"] == row["layer_ratio_run"]
  assert rows[2]["layer_ratio_run"] == 1.0


def test_calibration(tmp_path, params):
  c = _config(target_layer_ratio=0.8, calibration_tolerance=0.2, calibrate="policy")
  request = specs.calibration_spec(c)
  threshold, report = cal_threshold.calibrate_threshold(params, request, cal_spec.calibration_rng(request.seed))
  assert report["policy"] == "steady_uem" and 0.0 <= threshold <= 1.0
  assert abs(report["achieved"]["layer_ratio_run"] - 0.8) <= 0.2 or not report["within_tolerance"]
  stats = sample_mode.run(c, str(tmp_path / "s"), params=params)   # --mode sample calibrates it too
  assert stats["calibration"]["policy"] == "steady_uem"


# The same words with another meaning: these files may say them without naming an exit policy.
OTHER_MEANINGS = {
    "none": {"deediff_jax/caching.py": "cache.policy=none",
             "deediff_jax/eval/quality.py": "sweep.fid_kind=none",
             "deediff_jax/eval/heldout.py": "the held-out view's fid kind none",
             "deediff_jax/eval/plots.py": "matplotlib's linestyle 'none'"},
}


def test_a_policy_name_lives_in_at_most_three_package_files():
  """Everything else reaches a policy through the registry (its attributes, `full_depth()`,
  `for_value`, `learned_for`), not through its name."""
  import pathlib
  import re
  root = pathlib.Path(__file__).resolve().parents[1]
  files = sorted((root / "deediff_jax").rglob("*.py"))
  for name in policies.names():
    pattern = re.compile(rf"[\"']{re.escape(name)}[\"']")
    where = [str(f.relative_to(root)) for f in files if pattern.search(f.read_text())]
    named = [w for w in where if w not in OTHER_MEANINGS.get(name, {})]
    assert len(named) <= 3, f"{name!r} is named in {named}"
