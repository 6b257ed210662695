"""--mode tune, the held-out protocol, bootstrap intervals and params files, on tiny random models."""
import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from deediff_jax import main as cli
from deediff_jax import sample as sample_mode
from deediff_jax import sampling
from deediff_jax.config import base_config, validate
from deediff_jax.eval import bootstrap, tune
from deediff_jax.eval.settings import Setting
from deediff_jax.model import build, init_params
from deediff_jax.tensor_files import CheckpointError
from deediff_jax.train import params_file


def _config(**tune_keys):
  c = base_config()                       # digits-shaped: 8x8x1, 10 classes
  c.model.update(embed_dim=32, depth=4, num_heads=2)
  c.sample.update(steps=4, batch_size=4, num_images=4)
  c.sweep.update(num_images=4, fid_kind="none", classifier_steps=20)   # a quick classifier: same code path
  c.tune.update(**{"calibration_images": 4, "heldout_images": 4, "buckets": 2, "timing_repeats": 1, **tune_keys})
  return validate(c)


@pytest.fixture(scope="module")
def params():
  return init_params(build(_config().model), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_matches_a_hand_computation():
  a = np.array([30.0, 31.5, 29.0, 35.0, 33.0, 28.5, 32.0])
  b = np.array([29.0, 31.0, 30.0, 33.0, 31.0, 28.0, 30.5])
  d = a - b
  rng = np.random.default_rng(3)
  idx = rng.integers(0, d.size, size=(1200, d.size))     # one draw per resample, in order
  means = np.array([d[row].mean() for row in idx])
  lo, hi = np.percentile(means, [2.5, 97.5])
  got = bootstrap.paired_diff_ci(a, b, resamples=1200, seed=3)
  assert got == (pytest.approx(d.mean(), abs=1e-12), pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
  assert bootstrap.mean_ci(d, resamples=1200, seed=3) == got
  # The defaults: 10,000 resamples, seed 0, 95%.
  assert bootstrap.paired_diff_ci(a, b) == bootstrap.mean_ci(d, resamples=10_000, seed=0, level=0.95)


def test_image_noise_does_not_depend_on_the_batch():
  rng = jax.random.PRNGKey(5)
  whole = np.asarray(sampling.initial_noise(rng, 0, (8, 8, 8, 1)))
  assert np.array_equal(whole[3:8], np.asarray(sampling.initial_noise(rng, 3, (5, 8, 8, 1))))


# ----------------------------------------------------------------------------- the pick

def _cand(family, psnr, ratio, depth=1):
  s = Setting("static", depth=depth)
  return tune.Candidate(family, s, {"exit.policy": "static", "exit.depth": depth}, psnr=psnr, gflops_ratio=ratio)


def test_pick_takes_the_best_under_the_budget_and_the_runner_up_of_another_family():
  cands = [_cand("fewer_steps", 30.0, 0.40), _cand("learned", 33.0, 0.50), _cand("learned", 36.0, 0.501),
           _cand("static", 31.0, 0.45), _cand("learned", 32.0, 0.30)]
  best, second = tune.pick(cands, 0.5, 0.0)          # 0.501 is over 0.5: no slack
  assert (best.psnr, best.gflops_ratio) == (33.0, 0.50)
  assert (second.family, second.psnr) == ("static", 31.0)
  assert tune.pick(cands, 0.2, 0.0) == (None, None)
  best, _ = tune.pick(cands, 0.0, 31.5)              # min_psnr: the cheapest that reaches it
  assert (best.psnr, best.gflops_ratio) == (32.0, 0.30)


def test_an_impossible_budget_is_one_line_exit_2(tmp_path):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(["deediff", "--config", "configs/digits.py", "--workdir", str(tmp_path), "--mode", "tune",
                     "--config.tune.budget=0.001"])
  assert code == 2
  lines = err.getvalue().strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: tune.budget=0.001 is below the cheapest"), lines
  with pytest.raises(tune.TuneError, match="exactly one of tune.budget"):
    tune.TuneRequest.from_config(_config())


# ----------------------------------------------------------------------------- --mode tune

def _tuned(tmp_path, params, name, seed):
  c = _config(budget=0.6, families="fewer_steps,static,learned", buckets=1)
  c.sample.seed = seed
  workdir = str(tmp_path / name)
  out = tune.run(c, workdir, params=params, progress=False)
  with open(os.path.join(workdir, "tune_candidates.json")) as f:
    return out, json.load(f), workdir


def test_tune_picks_on_calibration_noise_and_validates_on_held_out(tmp_path, params):
  a, cands_a, workdir = _tuned(tmp_path, params, "a", seed=0)
  b, cands_b, _ = _tuned(tmp_path, params, "b", seed=7)
  # The held-out seed changes the reported numbers, never the search or the pick.
  assert cands_a == cands_b
  assert a["overrides"] == b["overrides"] and a["runner_up"]["overrides"] == b["runner_up"]["overrides"]
  assert a["heldout"]["seed"] == 0 and b["heldout"]["seed"] == 7
  # The pick is the best calibration PSNR among candidates within the budget (no slack).
  admitted = [c for c in cands_a if c["calibration_gflops_ratio"] <= 0.6]
  assert a["calibration"]["psnr"] == max(c["calibration_psnr"] for c in admitted)
  assert {c["family"] for c in cands_a} >= {"fewer_steps", "static", "learned"}
  with open(os.path.join(workdir, "tuned.json")) as f:
    saved = json.load(f)
  assert saved["overrides"] == a["overrides"]
  assert {"overrides", "gflops_ratio", "heldout", "runner_up", "batch_size", "steps", "calibration_images",
          "heldout_images"} <= set(saved)
  h = saved["heldout"]
  assert h["psnr_ci"][0] <= h["psnr"] <= h["psnr_ci"][1] and h["speedup"] > 0 and h["num_images"] == 4
  assert "exit.target_layer_ratio" not in saved["overrides"]     # resolved values, not targets


_TIMING_KEYS = ("speedup", "speedup_min", "speedup_max")


def _without_timing(tuned: dict) -> dict:
  out = json.loads(json.dumps(tuned))
  for part in (out["heldout"], (out.get("runner_up") or {}).get("heldout", {})):
    for k in _TIMING_KEYS:
      part.pop(k, None)
  return out


def test_several_budgets_in_one_run_write_what_each_budget_alone_writes(tmp_path, params):
  keys = dict(families="fewer_steps,static", buckets=1)
  alone = {b: tune.run(_config(budget=b, **keys), str(tmp_path / f"alone_{b}"), params=params, progress=False)
           for b in (0.6, 0.8)}
  c = _config(budgets="0.8,0.6", **keys)
  calls = []
  measure = tune._Measure.__call__
  tune._Measure.__call__ = lambda self, cand: calls.append((id(self), cand.key())) or measure(self, cand)
  try:
    both = tune.run(c, str(tmp_path / "both"), params=params, progress=False)
  finally:
    tune._Measure.__call__ = measure
  assert sorted(both) == [0.6, 0.8]
  for b in (0.6, 0.8):
    assert _without_timing(both[b]) == _without_timing(alone[b])
    with open(tmp_path / "both" / f"tuned_{b:g}.json") as f:
      assert json.load(f)["overrides"] == alone[b]["overrides"]
    with open(tmp_path / "both" / f"tune_candidates_{b:g}.json") as f, \
         open(tmp_path / f"alone_{b}" / "tune_candidates.json") as g:
      assert json.load(f) == json.load(g)
  # Shared work is done once: no candidate is measured twice on the same noise, and the two budgets
  # share one (2 of 4 steps is fewer steps for both).
  assert len(calls) == len(set(calls))
  searched = [json.load(open(tmp_path / "both" / f"tune_candidates_{b:g}.json")) for b in (0.6, 0.8)]
  keys_searched = [json.dumps(c["overrides"], sort_keys=True) for cands in searched for c in cands]
  assert len(set(keys_searched)) < len(keys_searched)
  with pytest.raises(tune.TuneError, match=r"put \{budget\} in it"):
    tune.TuneRequest.from_config(_config(budgets="0.4,0.6", out="x.json"))
  with pytest.raises(tune.TuneError, match="exactly one of"):
    tune.TuneRequest.from_config(_config(budgets="0.4", budget=0.5))
  with pytest.raises(tune.TuneError, match="tune.budgets holds fractions"):
    tune.TuneRequest.from_config(_config(budgets="0.4,1.5"))


def test_an_interrupted_tune_resumes_from_its_journal_and_writes_the_same_files(tmp_path, params, capsys):
  from deediff_jax.eval import tune_journal
  c = _config(budget=0.6, families="fewer_steps,static,learned", buckets=1)
  workdir = str(tmp_path / "t")
  whole = tune.run(c, workdir, params=params, progress=False)
  files = {n: open(os.path.join(workdir, n)).read() for n in ("tuned.json", "tune_candidates.json")}
  path = os.path.join(workdir, tune_journal.JOURNAL_FILE)
  saved = json.load(open(path))
  # "Interrupted" before the last search task and before any held-out validation.
  names = list(saved["tasks"])
  assert len(names) >= 3 and len(saved["heldout"]) == 2
  lost = names[-1]
  redo = len(saved["tasks"].pop(lost))
  saved["heldout"] = {}
  json.dump(saved, open(path, "w"))
  calls = []
  measure = tune._Measure.__call__
  tune._Measure.__call__ = lambda self, cand: calls.append(cand.key()) or measure(self, cand)
  try:
    resumed = tune.run(c, workdir, params=params, progress=False)
  finally:
    tune._Measure.__call__ = measure
  assert "resuming from" in "".join(capsys.readouterr())
  # Only the lost task's candidates run on calibration noise (plus its repeats while fitting), then
  # the two held-out validations; every file is what the whole run wrote, timing aside.
  assert 2 <= len(calls) <= redo + 2 and redo >= 1
  assert _without_timing(resumed) == _without_timing(whole)
  assert open(os.path.join(workdir, "tune_candidates.json")).read() == files["tune_candidates.json"]
  # A third run replays everything: nothing is measured, and even the timings are the recorded ones.
  tune._Measure.__call__ = lambda self, cand: pytest.fail("measured a candidate the journal holds")
  try:
    again = tune.run(c, workdir, params=params, progress=False)
  finally:
    tune._Measure.__call__ = measure
  assert again == resumed
  # Other parameters: the journal is set aside, not mixed in.
  other = jax.tree_util.tree_map(lambda x: x * 1.01, params)
  assert tune_journal.Journal(workdir, tune_journal.fingerprint(other, c)).replaced
  assert not tune_journal.Journal(workdir, tune_journal.fingerprint(params, c)).replaced
  c2 = _config(budget=0.6, families="fewer_steps,static,learned", buckets=1)
  c2.sample.guidance_scale = 3.0
  assert tune_journal.fingerprint(params, c2) != tune_journal.fingerprint(params, c)
  c3 = _config(budget=0.7, families="fewer_steps,static,learned", buckets=1, out="x.json")
  assert tune_journal.fingerprint(params, c3) == tune_journal.fingerprint(params, c)   # report-only keys


def test_sampling_with_tune_file_equals_the_overrides_by_hand(tmp_path, params):
  overrides = {"exit.policy": "uem", "exit.threshold": 0.3, "exit.threshold_schedule": "", "exit.aggregate": "last",
               "sample.steps": 3, "exit.min_layers": 1}
  path = tmp_path / "tuned.json"
  path.write_text(json.dumps({"overrides": overrides}))
  c = _config()
  c.tune.file = str(path)
  tuned = sample_mode.run(c, str(tmp_path / "tuned"), params=params)
  by_hand = _config()
  by_hand.exit.update(policy="uem", threshold=0.3, aggregate="last")
  by_hand.sample.steps = 3
  sample_mode.run(by_hand, str(tmp_path / "hand"), params=params)
  with np.load(tmp_path / "tuned" / "samples.npz") as x, np.load(tmp_path / "hand" / "samples.npz") as y:
    assert np.array_equal(x["images"], y["images"])
  assert tuned["steps"] == 3 and tuned["steps_full_depth"] == 4 and 0 < tuned["gflops_ratio"] < 1
  path.write_text(json.dumps({"overrides": {"exit.no_such_key": 1}}))
  with pytest.raises(tune.TuneError, match="unknown config key 'exit.no_such_key'"):
    sample_mode.run(c, str(tmp_path / "bad"), params=params)


# ----------------------------------------------------------------------------- params files

def test_params_file_round_trip_and_refusals(tmp_path, params):
  c = _config()
  path = str(tmp_path / "params.npz")
  params_file.save(path, params, c, float16=True)
  loaded = params_file.load(path, c)
  for (ka, va), (kb, vb) in zip(sorted(params_file.flatten(params).items()), sorted(params_file.flatten(loaded).items())):
    assert ka == kb and vb.dtype == np.float32 and np.array_equal(vb, va.astype(np.float16).astype(np.float32))
  other = _config()
  other.model.embed_dim = 64
  with pytest.raises(CheckpointError, match=r"another model: it has model.embed_dim=32 but the config says 64"):
    params_file.load(path, other)
  flat = {k: v for k, v in np.load(path).items() if k != params_file.CONFIG_KEY}   # no recorded config
  first = sorted(flat)[0]
  flat[first] = np.zeros((3,), np.float32)
  np.savez(str(tmp_path / "bad.npz"), **flat)
  with pytest.raises(CheckpointError, match=f"{first} has shape \\(3,\\)"):
    params_file.load(str(tmp_path / "bad.npz"), c)
  flat = dict(np.load(path).items())
  flat[first] = np.full_like(flat[first], np.nan)
  np.savez(str(tmp_path / "nan.npz"), **flat)
  with pytest.raises(CheckpointError, match=f"{first} holds NaN or Inf"):
    params_file.load(str(tmp_path / "nan.npz"), c)
  # Through the CLI: one line, exit code 2.
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = cli.main(["deediff", "--config", "configs/digits.py", "--workdir", str(tmp_path / "w"), "--mode", "sample",
                     f"--config.sample.params_file={path}"])
  lines = err.getvalue().strip().splitlines()
  assert code == 2 and len(lines) == 1 and "is for another model" in lines[0], lines


def test_export_writes_a_params_file_sampling_reads(tmp_path, params):
  from deediff_jax import export
  from deediff_jax.train.checkpoint import export_params
  c = _config()
  export_params(str(tmp_path / "run"), params, c)
  out = str(tmp_path / "p.npz")
  assert export.main(["--workdir", str(tmp_path / "run"), "--out", out]) == 0
  c.exit.update(policy="static", depth=2)
  direct = sample_mode.run(c, str(tmp_path / "direct"), params=params)
  c.sample.params_file = out
  from_file = sample_mode.run(c, str(tmp_path / "file"))
  with np.load(tmp_path / "direct" / "samples.npz") as x, np.load(tmp_path / "file" / "samples.npz") as y:
    assert np.array_equal(x["images"], y["images"])
  assert from_file["psnr_vs_full"] == direct["psnr_vs_full"]


# ----------------------------------------------------------------------------- pareto_budgets --json

def test_pareto_budgets_json_chooses_on_calibration_and_reports_held_out(tmp_path, capsys):
  import importlib.util
  spec = importlib.util.spec_from_file_location("pareto_budgets", os.path.join(
      os.path.dirname(__file__), "..", "benchmarks", "pareto_budgets.py"))
  pb = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(pb)

  def row(policy, setting, ratio, psnr, choice_ratio, choice_psnr, steps=10):
    return {"policy": policy, "setting": setting, "runnable": True, "gflops_ratio": ratio, "psnr_vs_full": psnr,
            "choice_gflops_ratio": choice_ratio, "choice_psnr": choice_psnr, "steps": steps, "num_images": 5,
            "fid": 3.0, "class_accuracy": 0.9}
  rows = [row("none", "none", 1.0, 100.0, 1.0, 100.0),
          row("uem", "uem 0.2", 0.50, 33.0, 0.49, 30.0), row("uem", "uem 0.3", 0.39, 34.0, 0.41, 35.0),
          row("static", "static 5", 0.45, 31.0, 0.45, 31.0), row("none", "none @ 4 steps", 0.4, 29.0, 0.4, 29.0, 4)]
  rows[0]["psnr_vs_full"] = None
  path = tmp_path / "sweep.json"
  path.write_text(json.dumps(rows))
  per_image = {f"row_{i:03d}": np.array([30.0, 31.0, 32.0, 29.0, 33.0]) + i for i in range(1, len(rows))}
  np.savez(tmp_path / "per_image_psnr.npz", setting=np.array([r["setting"] for r in rows]), **per_image)
  assert pb.main([str(path), "--budgets", "0.4,0.5", "--json", "-"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["heldout"] is True and out["full"] == {"num_images": 5, "fid": 3.0, "class_accuracy": 0.9}
  b40, b50 = out["budgets"]
  # At 0.40 "uem 0.3" is out (its calibration ratio 0.41 > 0.40, no slack) and "uem 0.2" too.
  assert b40["learned"] is None and b40["fixed"]["setting"] == "none @ 4 steps" and b40["diff_ci"] is None
  # At 0.50 the choice is made on calibration PSNR (uem 0.3: 35 dB) and reported held-out (34 dB).
  assert b50["learned"]["setting"] == "uem 0.3" and b50["learned"]["psnr"] == 34.0
  assert b50["fixed"]["setting"] == "static 5"
  diff, lo, hi = bootstrap.paired_diff_ci(per_image["row_002"], per_image["row_003"])
  assert b50["diff"] == pytest.approx(diff) and b50["diff_ci"] == [pytest.approx(lo), pytest.approx(hi)]
  # The Markdown view of the same held-out sweep makes the same choices (no slack) and says the verdict.
  assert pb.main([str(path), "--budgets", "0.4,0.5", "--markdown"]) == 0
  text = capsys.readouterr().out
  assert "| — | 34.0 dB (uem 0.3, 0.39) |" in text   # the uem family: out at 0.40 (calibration 0.41)
  assert "- ≤ 40%: no learned row chosen within the budget" in text
  assert (f"- ≤ 50%: best learned uem 0.3 34.00 dB vs best fixed static 5 31.00 dB: {diff:+.2f} dB, "
          f"95% CI [{lo:+.2f}, {hi:+.2f}]: goal (≥ +1 dB, CI above 0) **missed**") in text  # the paired diff is -1


def test_every_cache_threshold_is_measured_in_its_own_right():
  # Regression: one journal task per threshold under one name replayed the first threshold's
  # result (threshold 0: full cost) for all of them, so the caching family never fitted a budget.
  c = _config(budget=0.55)
  c.cache.router = "router.npz"                     # only its path is read when the tasks are built
  c.sweep.cache_thresholds = "0,0.5,0.9"
  req = tune.TuneRequest.from_config(c)
  tasks = tune.search_tasks(c, {"exit_heads": None}, req, 0.55, cctx=None, measure_fn=lambda cand: cand)
  names = [name for name, _ in tasks]
  assert len(set(names)) == len(names)
  tried = []
  dict(tasks)["l2c thresholds 0,0.5,0.9"](tried)
  assert [cand.setting.cache_threshold for cand in tried] == [0.0, 0.5, 0.9]
  assert [cand.overrides["cache.threshold"] for cand in tried] == [0.0, 0.5, 0.9]
  assert len({cand.key() for cand in tried}) == 3
  # Another threshold list keeps the journal (its fingerprint) and re-measures only this task.
  from deediff_jax.eval import tune_journal
  other = c.copy_and_resolve_references()
  other.sweep.cache_thresholds = "0.7"
  p = {"w": np.ones(2, np.float32)}
  assert tune_journal.fingerprint(p, other) == tune_journal.fingerprint(p, c)
  other_tasks = tune.search_tasks(other, {"exit_heads": None}, req, 0.55, cctx=None, measure_fn=lambda cand: cand)
  assert [n for n, _ in other_tasks if n.startswith("l2c")] == ["l2c thresholds 0.7"]
