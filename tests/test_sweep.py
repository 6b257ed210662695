"""`--mode sweep` and `--mode eval` on a tiny random-weights checkpoint: every file, every field,
numbers that follow from their definitions (speedup, depth ratios, FLOPs, full-depth PSNR), the
fewer-steps rows, the oracle rows and the oracle-calibrated time_schedule row."""
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from deediff_jax import policies, sampling
from deediff_jax.config import base_config, validate
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import make_schedule
from deediff_jax.eval import fidelity as F
from deediff_jax.eval import flops
from deediff_jax.eval import runner
from deediff_jax.eval import sweep as S
from deediff_jax.eval import quality as quality_lib
from deediff_jax.eval import specs
from deediff_jax.eval import report as report_lib
from deediff_jax.eval import settings as settings_lib
from deediff_jax.model import build, init_params
from deediff_jax.train.checkpoint import export_params

N = 5          # depth 4 -> 5 blocks
STEPS = 4
NUM = 16
FEWER_STEPS = 3         # sweep.step_fractions 0.75 of STEPS
BUCKETS = 3             # exit.calibration_buckets (the time_schedules have 3 buckets too: one compile)
HUGE = 1e6              # an oracle tolerance every layer meets
POLICY_FILES = ("grid_uem.png", "grid_static.png", "grid_time_schedule.png", "grid_state_cosine.png",
                "grid_oracle.png", "grid_none.png")


def _config():
  c = base_config()                      # digits-shaped: 8x8x1, 10 classes
  c.model.update(embed_dim=32, depth=4, num_heads=2)
  c.sample.update(steps=STEPS, batch_size=8, num_images=8)
  c.sweep.update(num_images=NUM, thresholds="0,0.5", depths="", cosine_thresholds="0.9",
                 time_schedules="2,3,5;3,4,5", oracle_tolerances=f"0,{HUGE:g}", step_fractions="0.75",
                 classifier_steps=100)      # a quicker classifier: same code path
  return validate(c)


@pytest.fixture(scope="module")
def digits_caches(tmp_path_factory):
  """The digits classifier and its real-image statistics, trained once for every sweep here (both
  sweeps score digits-shaped images with sweep.classifier_steps=100: the same cache keys)."""
  workdir = str(tmp_path_factory.mktemp("caches"))
  quality_lib.build_quality(specs.quality_spec(_config()), workdir)
  return workdir


def _with_caches(caches: str, workdir: str) -> None:
  for name in ("classifier", "fid_stats"):
    shutil.copytree(os.path.join(caches, name), os.path.join(workdir, name))


PLAIN_SECONDS, POLICY_SECONDS = 4.0, 1.0


def fake_clock(mp):
  """The sweep's clock reads a virtual time that only sampling advances: PLAIN_SECONDS per
  full-depth call, POLICY_SECONDS per policy call. Timings then follow from what was timed
  (the sampling call, not its compilation or scoring), and speedups are exact."""
  clock = [0.0]
  real_sample = runner._sample        # eval/runner.py samples and times every setting

  def sample(ctx, config, *, plain=False, **kw):
    out = real_sample(ctx, config, plain=plain, **kw)
    clock[0] += PLAIN_SECONDS if plain else POLICY_SECONDS
    return out
  mp.setattr(runner, "_sample", sample)
  # sampling.timed is the one clock of every timed call.
  mp.setattr(sampling, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, digits_caches):
  workdir = str(tmp_path_factory.mktemp("sweep_wd"))
  c = _config()
  module = build(c.model)
  export_params(workdir, jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0)), c)
  _with_caches(digits_caches, workdir)
  # Adds a calibrated uem row (chosen for heatmap and grids), a per-bucket calibrated one and a
  # time_schedule calibrated from the oracle's exits.
  c.exit.update(target_layer_ratio=0.6, calibration_buckets=BUCKETS)
  out = io.StringIO()
  seen = {}                              # setting -> what `evaluate` gave the sweep: images, stats
  real_evaluate = runner.evaluate

  def spy(ctx, setting):
    row, images, stats = real_evaluate(ctx, setting)
    seen[row["setting"]] = dict(images=images, stats=stats, ctx=ctx)
    return row, images, stats

  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    mp.setattr(S, "evaluate", spy)
    fake_clock(mp)
    rows = S.run(c, workdir, progress=False)
  return dict(config=c, workdir=workdir, rows=rows, stdout=out.getvalue(), seen=seen,
              out_dir=os.path.join(workdir, "sweep"))


def test_every_file_and_every_field(swept):
  rows, out_dir = swept["rows"], swept["out_dir"]
  expected = (["sweep.json", "sweep.csv", "sweep.md", "run.json", "pareto_fid.png", "pareto_psnr.png",
               "exit_heatmap.png", "exit_heatmap_per_bucket.png", "per_image_psnr.npz"] + list(POLICY_FILES))
  assert sorted(os.listdir(out_dir)) == sorted(expected)
  # Each row's per-image PSNR (the held-out images), whose mean is the row's psnr_vs_full.
  with np.load(os.path.join(out_dir, "per_image_psnr.npz")) as z:
    assert [str(s) for s in z["setting"]] == [r["setting"] for r in rows]
    for i, r in enumerate(rows):
      assert z[f"row_{i:03d}"].shape == (NUM,)
      assert float(np.mean(z[f"row_{i:03d}"])) == pytest.approx(r["psnr_vs_full"], rel=1e-9)
  # One row per setting: 2 thresholds + 5 depths + 2 schedules + 1 cosine + 2 oracle tolerances
  # + none + 1 fewer-steps row; + 2 calibrated uem rows and 1 calibrated time_schedule.
  settings = settings_lib.settings_from_config(swept["config"])
  assert len(settings) == 14 and len(rows) == 17
  assert [r["setting"] for r in rows if not r["calibrated"]] == [s.label() for s in settings]
  assert [r["setting"] for r in rows if " @ " in r["setting"]] == [f"none @ {FEWER_STEPS} steps"]
  steps_of = {s.label(): s.steps or STEPS for s in settings}      # calibrated rows: sample.steps
  for r in rows:
    assert tuple(r) == runner.ROW_KEYS
    assert r["runnable"] is (r["policy"] != "oracle")
  with open(os.path.join(out_dir, "sweep.json")) as f:
    assert json.load(f) == rows
  assert not swept["seen"]["none"]["ctx"].quality.classifier.trained   # the shared cached classifier
  with open(os.path.join(out_dir, "sweep.csv")) as f:   # the CSV holds the same rows
    table = list(csv.DictReader(f))
  assert [t["setting"] for t in table] == [r["setting"] for r in rows]
  assert [float(t["psnr_vs_full"]) for t in table] == pytest.approx([r["psnr_vs_full"] for r in rows])
  for r in rows:
    for k in ("layer_ratio_run", "layer_ratio_per_sample", "gflops_per_image", "seconds", "speedup",
              "psnr_vs_full", "psnr_worst5", "mse_vs_full", "fid", "class_accuracy"):
      assert isinstance(r[k], float) and math.isfinite(r[k]), (r["setting"], k, r[k])
    assert r["fid_kind"] == "classifier-FID (small CNN features; not comparable to Inception FID)"
    assert r["num_images"] == NUM and r["checkpoint_step"] == 0
    assert r["steps"] == steps_of.get(r["setting"], STEPS)
    # Class accuracy is a fraction of the 16 requested labels.
    assert r["class_accuracy"] * NUM == pytest.approx(round(r["class_accuracy"] * NUM))
    assert len(r["layers_run_per_step"]) == r["steps"]
  keys = {r["policy"]: policies.get(r["policy"]).value for r in rows}   # the key each row fills
  for r in rows:
    if r["threshold_schedule"] is not None:    # the per-bucket row: a schedule instead of one threshold
      assert r["threshold"] is None and r["policy"] == "uem" and r["calibrated"]
      r = dict(r, threshold=0.0)
    for k in ("threshold", "depth", "schedule"):
      assert (r[k] is not None) == (keys[r["policy"]] == k), (r["setting"], k)


def test_numbers_follow_their_definitions(swept):
  rows = swept["rows"]
  cfg = build(swept["config"].model).cfg
  full_gflops = flops.full_depth_flops_per_image(cfg, STEPS) / 1e9
  info = json.load(open(os.path.join(swept["out_dir"], "run.json")))
  # Only the sampling calls are timed: the full-depth run before and after the settings, and one
  # call per row (fake_clock's virtual seconds).
  assert info["seconds_full_runs"] == [PLAIN_SECONDS, PLAIN_SECONDS]
  for r in rows:
    # Fewer-steps rows run the plain full-depth sampler (at fewer steps); the rest an exit policy.
    seconds = PLAIN_SECONDS if r["setting"].startswith("none @") else POLICY_SECONDS
    assert (r["seconds"], r["seconds_full"]) == (seconds, PLAIN_SECONDS), r["setting"]
    assert r["speedup"] == PLAIN_SECONDS / seconds
    assert r["gflops_ratio"] == pytest.approx(r["gflops_per_image"] / full_gflops, rel=1e-12)
  by = {r["setting"]: r for r in rows}
  # Full depth (policy none, threshold 0, static N): the full model's images up to float rounding.
  for name in ("none", "uem 0", f"static {N}"):
    assert by[name]["psnr_vs_full"] == pytest.approx(100.0) and by[name]["mse_vs_full"] < 1e-10
    assert by[name]["layer_ratio_run"] == 1.0
  # Static rows: exactly depth / N, and the analytic cost of `depth` blocks and one head per step.
  for d in range(1, N + 1):
    r = by[f"static {d}"]
    assert r["layer_ratio_run"] == d / N and r["layer_ratio_per_sample"] == d / N
    assert r["gflops_per_image"] == pytest.approx(
        flops.early_exit_flops_per_image(cfg, d, policy="static", steps=STEPS) / 1e9, rel=1e-12)
  assert by[f"static {N}"]["gflops_per_image"] == pytest.approx(full_gflops, rel=1e-9)
  # The uem loop at threshold 0 pays for a UEM after every block on top of the full forward.
  assert by["uem 0"]["gflops_per_image"] == pytest.approx(
      flops.early_exit_flops_per_image(cfg, N, policy="uem", steps=STEPS) / 1e9, rel=1e-12)
  # time_schedule 2,3,5: step s runs the depth of its time bucket floor((1 - time_frac) * 3).
  frac = np.asarray(samplers.grid_arrays(make_schedule("linear", 1000), STEPS)["time_frac"])[:-1]
  want = [[2, 3, 5][min(int(np.floor((1 - f) * 3)), 2)] for f in frac]
  ts = by["time_schedule 2,3,5"]
  assert ts["layers_run_per_step"] == want
  assert ts["layer_ratio_run"] == pytest.approx(np.mean(want) / N, rel=1e-12)
  # The same noise everywhere: the uem-0 row and the none row drew identical images.
  assert by["uem 0"]["fid"] == pytest.approx(by["none"]["fid"], rel=1e-6)
  assert by["uem 0"]["class_accuracy"] == by["none"]["class_accuracy"]


def test_calibrated_row_heatmap_and_grids(swept):
  rows = swept["rows"]
  cal = [r for r in rows if r["calibrated"] and r["policy"] == "uem"]
  assert len(cal) == 2 and len([r for r in rows if r["calibrated"]]) == 3
  cal, per_bucket = cal
  assert cal["policy"] == "uem" and cal["threshold"] == cal["calibration"]["threshold"]
  rep = cal["calibration"]
  assert rep["method"] == "target_layer_ratio" and rep["target"] == 0.6 and rep["buckets"] == 1
  # The per-bucket row: three thresholds (noisiest first), as exit.threshold_schedule text.
  rep2 = per_bucket["calibration"]
  assert rep2["method"] == "target_layer_ratio_per_bucket" and rep2["buckets"] == BUCKETS
  assert len(rep2["threshold"]) == BUCKETS and len(rep2["achieved"]["per_bucket"]) == BUCKETS
  assert [float(v) for v in per_bucket["threshold_schedule"].split(",")] == rep2["threshold"]
  assert per_bucket["setting"] == ("uem per bucket " + "/".join(f"{v:.3g}" for v in rep2["threshold"])
                                   + " (calibrated)")
  # Placed after the other uem rows, scalar first.
  assert [r["policy"] for r in rows[:4]] == ["uem"] * 4 and rows[2] is cal and rows[3] is per_bucket
  with open(os.path.join(swept["out_dir"], "run.json")) as f:
    info = json.load(f)
  assert info["calibration"] == rep and info["heatmap_setting"] == cal["setting"]
  assert info["calibration_per_bucket"] == rep2
  assert info["heatmap_per_bucket_setting"] == per_bucket["setting"]
  # The baseline is timed before and after the settings; rows use the mean.
  assert len(info["seconds_full_runs"]) == 2
  assert info["seconds_full"] == np.mean(info["seconds_full_runs"]) == rows[0]["seconds_full"]
  # Grids at matched compute: each policy's row with layer_ratio_run closest to the calibrated one.
  grids = {g["policy"]: g for g in info["grids"]}
  assert sorted(grids) == sorted(f[5:-4] for f in POLICY_FILES)
  for policy, g in grids.items():
    candidates = [r for r in rows if r["policy"] == policy]
    best = min(abs(r["layer_ratio_run"] - cal["layer_ratio_run"]) for r in candidates)
    assert abs(g["layer_ratio_run"] - cal["layer_ratio_run"]) == best
  # PNG sizes: plots are 800x500 / 800x600; a grid of 16 8x8 digits at scale 4, 10 per row
  # under a band of column labels, 1 px padding.
  out = swept["out_dir"]
  assert Image.open(os.path.join(out, "pareto_fid.png")).size == (800, 500)
  assert Image.open(os.path.join(out, "pareto_psnr.png")).size == (800, 500)
  assert Image.open(os.path.join(out, "exit_heatmap.png")).size == (800, 600)
  grid = Image.open(os.path.join(out, "grid_uem.png"))
  assert grid.mode == "L" and grid.size == (1 + 10 * (32 + 1), 14 + 1 + 2 * (32 + 1))


def test_fewer_steps_rows(swept):
  """Plain full-depth sampling with fewer steps: the very images of sampling.sample(plain=True) at
  that step count and seed, PSNR against the full-step images, GFLOPs in proportion to the steps."""
  c, seen = swept["config"], swept["seen"]
  ctx = seen["none"]["ctx"]
  rng = jax.random.PRNGKey(int(c.sample.seed))
  full, _ = sampling.sample(ctx.params, c, rng, NUM, plain=True)
  np.testing.assert_array_equal(full, ctx.images_full)
  k = FEWER_STEPS
  r = next(r for r in swept["rows"] if r["setting"] == f"none @ {k} steps")
  ck = c.copy_and_resolve_references()
  ck.sample.steps = k
  images, _ = sampling.sample(ctx.params, ck, rng, NUM, plain=True)
  np.testing.assert_array_equal(seen[r["setting"]]["images"], images)
  assert r["policy"] == "none" and r["steps"] == k and r["runnable"] and not r["calibrated"]
  assert r["psnr_vs_full"] == F.fidelity(full, images)["psnr_vs_full"] < 100.0
  assert r["gflops_ratio"] == pytest.approx(k / STEPS, rel=1e-12)
  assert r["layer_ratio_run"] == r["layer_ratio_per_sample"] == 1.0 and r["layers_run_per_step"] == [N] * k


def test_oracle_rows(swept):
  """The oracle (not runnable): tolerance 0 exits every sample at the last layer (the full model's
  images), a huge one at exit.min_layers (layer 1, as static 1 costs); with min_layers 3, at 3."""
  rows, seen = swept["rows"], swept["seen"]
  by = {r["setting"]: r for r in rows}
  oracle = [r for r in rows if r["policy"] == "oracle"]
  assert [r["setting"] for r in oracle] == ["oracle 0 (ceiling)", f"oracle {HUGE:g} (ceiling)"]
  zero, huge = oracle
  assert not zero["runnable"] and not huge["runnable"]
  assert (seen[zero["setting"]]["stats"]["exit_layer"] == N).all()
  assert zero["layer_ratio_per_sample"] == zero["layer_ratio_run"] == 1.0
  assert zero["psnr_vs_full"] == pytest.approx(100.0) and zero["mse_vs_full"] < 1e-10
  assert zero["gflops_per_image"] == pytest.approx(by[f"static {N}"]["gflops_per_image"], rel=1e-12)
  assert (seen[huge["setting"]]["stats"]["exit_layer"] == 1).all()
  assert huge["layer_ratio_per_sample"] == huge["layer_ratio_run"] == 1 / N
  assert huge["gflops_per_image"] == pytest.approx(by["static 1"]["gflops_per_image"], rel=1e-12)
  # Layer 1's outputs at every step: static 1's images (the loop's head vs the all-exits one).
  np.testing.assert_allclose(seen[huge["setting"]]["images"], seen["static 1"]["images"], atol=1e-4)
  ctx = seen["none"]["ctx"]
  c3 = ctx.config.copy_and_resolve_references()
  c3.exit.min_layers = 3
  row, _, stats = runner.evaluate(dataclasses.replace(ctx, config=c3, fidelity_config=c3),
                             settings_lib.Setting("oracle", threshold=HUGE))
  assert (stats["exit_layer"] == 3).all() and row["min_layers"] == 3 and not row["runnable"]


def test_calibrated_time_schedule_row(swept):
  """With exit.target_layer_ratio, a time_schedule calibrated from the oracle's exits, right after
  the other time_schedule rows, running its schedule (the layer ratio its report measured)."""
  rows = swept["rows"]
  ts = [i for i, r in enumerate(rows) if r["policy"] == "time_schedule"]
  assert [rows[i]["calibrated"] for i in ts] == [False, False, True] and ts[-1] == ts[-2] + 1
  row = rows[ts[-1]]
  rep = row["calibration"]
  assert rep["method"] == "oracle_time_schedule" and rep["target"] == 0.6 and rep["buckets"] == BUCKETS
  assert row["schedule"] == rep["schedule"] and row["runnable"]
  assert row["setting"] == f"time_schedule {rep['schedule']} (calibrated)"
  sched = [int(v) for v in rep["schedule"].split(",")]
  assert len(sched) == BUCKETS and all(1 <= d <= N for d in sched)
  assert any(p["schedule"] == sched for p in rep["probes"])
  frac = np.asarray(samplers.grid_arrays(make_schedule("linear", 1000), STEPS)["time_frac"])[:-1]
  want = [sched[min(int(np.floor((1 - f) * BUCKETS)), BUCKETS - 1)] for f in frac]
  assert row["layers_run_per_step"] == want
  assert row["layer_ratio_run"] == pytest.approx(rep["achieved"]["layer_ratio_run"], rel=1e-12)
  assert row["layer_ratio_run"] == pytest.approx(np.mean(want) / N, rel=1e-12)


def test_csv_and_markdown(swept):
  rows, out_dir = swept["rows"], swept["out_dir"]
  with open(os.path.join(out_dir, "sweep.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows)
  assert "calibration" not in table[0] and "layers_run_per_step" not in table[0]
  for r, t in zip(rows, table):
    assert t["policy"] == r["policy"] and float(t["layer_ratio_run"]) == r["layer_ratio_run"]
    assert float(t["fid"]) == r["fid"] and (t["depth"] == "") == (r["depth"] is None)
  with open(os.path.join(out_dir, "sweep.md")) as f:
    md = f.read()
  assert f"{os.cpu_count()} CPUs" in md and "backend `cpu`" in md
  assert "Checkpoint: step 0" in md and f"{NUM} images per setting" in md
  assert "classifier-FID (small CNN features; not comparable to Inception FID)" in md
  assert "Calibration: calibrated exit.threshold=" in md
  assert "Per-bucket calibration: calibrated exit.threshold_schedule=" in md
  # The schedule is a scalar CSV field; the per-bucket row has no single threshold.
  assert [t["threshold_schedule"] for t in table] == [r["threshold_schedule"] or "" for r in rows]
  lines = [l for l in md.splitlines() if l.startswith("|")]
  assert len(lines) == 2 + len(rows)
  assert lines[0].startswith("| setting | layers run |") and "class acc." in lines[0]
  assert md.strip() in swept["stdout"]           # the table is printed at the end


def test_eval_mode_repeats_the_sweep_row(swept):
  from deediff_jax.eval import evaluate
  c = swept["config"].copy_and_resolve_references()   # (sweep.classifier_steps: the cached classifier)
  c.exit.target_layer_ratio = 0.0
  c.exit.update(policy="static", depth=3)
  with contextlib.redirect_stdout(io.StringIO()) as out, pytest.MonkeyPatch.context() as mp:
    fake_clock(mp)
    row = evaluate.run(c, swept["workdir"])
  with open(os.path.join(swept["workdir"], "eval.json")) as f:
    assert json.load(f) == row
  assert tuple(row) == runner.ROW_KEYS + ("run",)
  assert row["run"]["checkpoint_step"] == 0 and row["run"]["fid_kind"].startswith("classifier-FID")
  ref = next(r for r in swept["rows"] if r["setting"] == "static 3")
  # Same images as the sweep's row (same noise, same program): every non-timing number agrees.
  for k in runner.ROW_KEYS:
    if k not in ("seconds", "seconds_full", "speedup"):
      assert row[k] == ref[k], k
  assert (row["seconds"], row["seconds_full"], row["speedup"]) == (
      POLICY_SECONDS, PLAIN_SECONDS, PLAIN_SECONDS / POLICY_SECONDS)
  assert row["run"]["seconds_full_runs"] == [PLAIN_SECONDS, PLAIN_SECONDS]
  assert "| static 3 |" in out.getvalue()


def test_stochastic_sampler_measures_fidelity_with_ddim(swept):
  """With ddpm the rows are timed and scored with ddpm, but PSNR comes from DDIM eta=0 runs from the
  same noise: the very numbers of the (DDIM) sweep above."""
  c = _config()
  c.sample.sampler = "ddpm"
  from deediff_jax.train.checkpoint import load_params
  params = load_params(swept["workdir"], c)
  ctx = runner.prepare(c, swept["workdir"], params=params, quality=quality_lib.Quality("none", "none"))
  assert not ctx.deterministic and ctx.fidelity_config.sample.sampler == "ddim"
  by = {r["setting"]: r for r in swept["rows"]}
  for depth in (1, N):
    row, images, _ = runner.evaluate(ctx, settings_lib.Setting("static", depth=depth))
    assert row["sampler"] == "ddpm" and row["fidelity_sampler"] == "ddim eta=0"
    assert row["psnr_vs_full"] == by[f"static {depth}"]["psnr_vs_full"]
    assert row["fid"] is None and row["layer_ratio_run"] == depth / N


def test_settings_and_defaults():
  c = _config()
  c.sweep.update(depths="", time_schedules="")
  s = settings_lib.settings_from_config(c)
  assert [x.depth for x in s if x.policy == "static"] == [1, 2, 3, 4, 5]
  assert [x.schedule for x in s if x.policy == "time_schedule"] == settings_lib.default_time_schedules(N)
  # The last two are DuoDiff switches (shallow above a switch time, full depth below).
  assert settings_lib.default_time_schedules(9) == ["3,5,6,9", "5,6,9,9", "3,3,5,6,9", "5,9", "3,9"]
  assert settings_lib.default_time_schedules(13) == ["5,7,9,13", "7,9,13,13", "4,5,7,9,13", "7,13", "5,13"]
  # Fewer steps: round(fraction * 4) = 1, 2, 2, 3 (each count once, below sample.steps); combo
  # depths only at counts >= 60% of the steps.
  c.sweep.update(step_fractions="0.3,0.45,0.6,0.75", combo_depths="3")
  extra = settings_lib.fewer_steps_settings(c, N)
  assert [x.label() for x in extra] == ["none @ 1 steps", "none @ 2 steps", "none @ 3 steps",
                                        "static 3 @ 3 steps"]
  assert [x.plain for x in extra] == [True, True, True, False] and [x.steps for x in extra] == [1, 2, 3, 3]
  assert [x.label() for x in settings_lib.settings_from_config(c) if x.steps] == [x.label() for x in extra]
  c.sweep.step_fractions = "0.5,1"
  with pytest.raises(settings_lib.SweepError, match=r"sweep.step_fractions must be in \(0, 1\), got '0.5,1'"):
    settings_lib.settings_from_config(c)
  c.sweep.update(step_fractions="", combo_depths="")
  # An adadiff model: the default policy list sweeps adadiff (sweep.confidence_thresholds) for uem.
  c.model.exit_style = "adadiff"
  c.sweep.update(policies=settings_lib.DEFAULT_POLICIES, confidence_thresholds="0.9,0.95")
  s = settings_lib.settings_from_config(c)
  assert [(x.policy, x.threshold) for x in s[:2]] == [("adadiff", 0.9), ("adadiff", 0.95)]
  c.model.exit_style = "deediff"
  c.sweep.policies = "uem,bogus"
  with pytest.raises(settings_lib.SweepError, match="sweep.policies has unknown policy 'bogus'"):
    settings_lib.settings_from_config(c)
  c.sweep.policies = "uem_no_time"
  with pytest.raises(settings_lib.SweepError, match="needs a model built with model.uem=token_linear_no_time"):
    settings_lib.settings_from_config(c)
  c.sweep.update(policies="static", depths="2,9")
  with pytest.raises(Exception, match=r"sweep.depths': depth 9 is outside \[1, 5\]"):
    settings_lib.settings_from_config(c)
  c.exit.update(policy="time_schedule", schedule="2,5")
  assert settings_lib.setting_from_exit_config(c).label() == "time_schedule 2,5"
  c.exit.update(policy="oracle", threshold=0.1)
  s = settings_lib.setting_from_exit_config(c)
  assert s.label() == "oracle 0.1 (ceiling)" and not s.runnable
  assert float(s.policy_params(N)["threshold"]) == pytest.approx(0.1)
  c.exit.update(policy="static", depth=0)
  assert settings_lib.setting_from_exit_config(c).depth == N
  # A per-bucket threshold schedule from the config: its label and its traced [K] threshold.
  c.exit.update(policy="uem", threshold_schedule="0.2, 0.1,0.05")
  s = settings_lib.setting_from_exit_config(c)
  assert s.threshold is None and s.threshold_schedule == "0.2,0.1,0.05"
  assert s.label() == "uem per bucket 0.2/0.1/0.05"
  np.testing.assert_allclose(np.asarray(s.policy_params(N)["threshold"]), [0.2, 0.1, 0.05], rtol=1e-6)
  from deediff_jax.config import ExitSpec
  from deediff_jax.early_exit import exit_params
  _, pp = exit_params(ExitSpec.from_config(c, N), N)
  np.testing.assert_allclose(np.asarray(pp["threshold"]), [0.2, 0.1, 0.05], rtol=1e-6)
  _, pp = exit_params(ExitSpec.from_config(c, N, policy="static"), N)       # the depth policies ignore it
  assert np.asarray(pp["threshold"]).shape == ()


def test_chosen_row_without_calibration():
  c = _config()
  rows = [dict(policy="uem", threshold=t, calibrated=False, layer_ratio_run=1 - t) for t in (0.3, 0.1, 0.2)]
  rows.append(dict(policy="static", threshold=None, calibrated=False, layer_ratio_run=0.75))
  assert report_lib.chosen_index(rows, c) == 1                     # exit.threshold = 0.1 is in the list
  c.exit.threshold = 0.15
  assert report_lib.chosen_index(rows, c) == 2                     # else the middle threshold (0.2)
  assert report_lib.matched_indices(rows, 2) == {"uem": 2, "static": 3}


def test_gflops_weights_batches_by_size():
  cfg = build(_config().model).cfg
  el = np.array([[5, 5, 5, 1, 1, 1, 1, 1, 2, 2, 2, 2],
                 [3, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])      # [steps=2, 12 images] in batches 8 + 4
  stats = {"exit_layer": el, "batch_sizes": np.array([8, 4])}
  first = flops.gflops_per_image(cfg, el[:, :8], policy="uem")
  second = flops.gflops_per_image(cfg, el[:, 8:], policy="uem")
  assert runner.gflops_from_stats(cfg, stats, "uem") == pytest.approx((8 * first + 4 * second) / 12, rel=1e-12)
  # The first batch ran 5 then 3 blocks (its deepest exits), evaluating 2 then 2 heads.
  assert first == pytest.approx(flops.early_exit_flops_per_image(
      cfg, [5, 3], policy="uem", heads_per_step=[2, 2]) / 1e9, rel=1e-12)


def test_fid_configuration_errors(tmp_path):
  c = _config()
  with pytest.raises(settings_lib.SweepError, match="write their files to a local directory, got --workdir gs://b/run"):
    S.run(c, "gs://b/run")
  c.sweep.fid_kind = "inception"
  with pytest.raises(settings_lib.SweepError, match="needs --config.sweep.inception_weights=PATH to "
                                         "pt_inception-2015-12-05-6726825d.pth"):
    quality_lib.build_quality(specs.quality_spec(c), str(tmp_path))
  c.sweep.inception_weights = str(tmp_path / "missing.pth")
  with pytest.raises(settings_lib.SweepError, match=r"missing.pth' does not exist; download https://github.com/"):
    quality_lib.build_quality(specs.quality_spec(c), str(tmp_path))
  c.sweep.fid_kind = "classifier"
  c.data.latent = True
  with pytest.raises(settings_lib.SweepError, match="data.latent=True .* use --config.sweep.fid_kind=none"):
    quality_lib.build_quality(specs.quality_spec(c), str(tmp_path))


def test_bad_calibration_request_fails_before_loading(tmp_path):
  from deediff_jax.eval import evaluate
  from deediff_jax.eval.calibration.spec import CalibrationError
  c = _config()
  c.exit.update(policy="static", target_layer_ratio=0.5)
  # The workdir has no checkpoint: the calibration error must come first.
  with pytest.raises(CalibrationError, match="exit.policy is 'static'; use --config.exit.policy=uem"):
    evaluate.run(c, str(tmp_path / "empty"))
  c.exit.update(policy="uem", target_layer_ratio=1.5)
  with pytest.raises(CalibrationError, match=r"target_layer_ratio must be in \(0, 1\], got 1.5"):
    S.run(c, str(tmp_path / "empty"))


def test_text_model_sweep_reports_accuracy_per_caption(tmp_path, digits_caches):
  # A tiny random text model with three labelled held-out captions: the sweep writes caption-row
  # grids and captions.{md,json}, whose accuracies are the classifier's on each caption's images.
  path = str(tmp_path / "caps.npz")
  rng = np.random.default_rng(0)
  caps = np.array(["a handwritten seven", "number one", "a four"])
  np.savez(path, eval_features=rng.normal(size=(3, 3, 6)).astype(np.float32), eval_labels=np.array([7, 1, 4]),
           eval_captions=caps, null_features=np.zeros((3, 6), np.float32))
  c = base_config()                      # images and labels from digits, for the classifier and FID
  c.model.update(embed_dim=32, depth=2, num_heads=2, num_classes=0, context_dim=6, context_len=3)
  c.data.context_file = path
  c.sample.update(steps=2, batch_size=12, num_images=12, guidance_scale=1.0)
  c.sweep.update(num_images=12, policies="uem,none", thresholds="0.5", classifier_steps=100,
                 step_fractions="")
  c = validate(c)
  workdir = str(tmp_path / "wd")
  module = build(c.model)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  export_params(workdir, params, c)
  _with_caches(digits_caches, workdir)
  with contextlib.redirect_stdout(io.StringIO()):
    rows = S.run(c, workdir, progress=False)
  out_dir = os.path.join(workdir, "sweep")
  with open(os.path.join(out_dir, "captions.json")) as f:
    report = json.load(f)
  assert [r["caption"] for r in report["per_caption"]] == list(caps)
  assert [r["label"] for r in report["per_caption"]] == [7, 1, 4]
  assert [r["images"] for r in report["per_caption"]] == [4, 4, 4]   # 12 images cycle 3 captions
  # Recompute the full-depth images (same seed, same noise) and classify them by hand.
  clf = quality_lib.build_quality(specs.quality_spec(c), workdir).classifier       # the cached classifier
  labels = np.array([7, 1, 4] * 4)
  ctx_feats = np.load(path)["eval_features"][np.arange(12) % 3]
  full, _ = sampling.sample(params, c, jax.random.PRNGKey(0), 12, plain=True, labels=labels,
                            context=ctx_feats, null_context=np.zeros((3, 6), np.float32))
  pred = clf.predict(full)
  for k, r in enumerate(report["per_caption"]):
    assert r["accuracy_full"] == np.mean(pred[k::3] == labels[k::3])
  assert report["overall_accuracy"]["full"] == np.mean(pred == labels)
  assert [r["setting"] for r in rows] == ["uem 0.5", "none"]      # no calibration asked, no fewer steps
  assert rows[-1]["class_accuracy"] == report["overall_accuracy"]["full"]
  assert report["chance"] == 0.1
  md = open(os.path.join(out_dir, "captions.md")).read()
  assert "| number one | 1 | 4 |" in md
  assert "per caption in `captions.md`" in open(os.path.join(out_dir, "sweep.md")).read()
  # The grid holds one row per caption: 3 rows of 4 tiles (8x8 digits shown at 4x, 1 px padding).
  grid = Image.open(os.path.join(out_dir, "grid_none.png"))
  assert grid.size[1] == 3 * (32 + 1) + 1
