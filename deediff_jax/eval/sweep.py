"""`--mode sweep`: policies x thresholds on one checkpoint -> cost, speed, fidelity and FID.

  python -m deediff_jax.main --config configs/mnist.py --workdir DIR --mode sweep

For every setting built from `config.sweep` (`settings_from_config`):

  uem / uem_no_time   one row per `sweep.thresholds` value                  (key `threshold`)
  static              one row per `sweep.depths` (empty: every depth 1..N)  (key `depth`)
  time_schedule       one row per `sweep.time_schedules` (';'-separated; empty: a few noisy-
                      shallow schedules derived from N, `default_time_schedules`) (key `schedule`)
  state_cosine        one row per `sweep.cosine_thresholds` value           (key `threshold`)
  adadiff             one row per `sweep.confidence_thresholds` value (exit_style=adadiff models;
                      in the default policy list it takes uem's place for them) (key `threshold`)
  oracle              one row per `sweep.oracle_tolerances` value: the ceiling of any exit policy
                      on this model (every block runs; cost = the depth it would stop at;
                      `runnable` is False: these rows are not savings you can have)
  none                one row (full depth through the early-exit loop), plus one plain
                      full-depth row per `sweep.step_fractions` value with that share of
                      `sample.steps` (fewer sampler steps: what a user tries first; PSNR against
                      the full-step samples from the same noise), and `sweep.combo_depths` static
                      depths at each of those step counts >= 60% (early exit on top of fewer steps)

plus, when `exit.target_layer_ratio` / `exit.max_psnr_drop` / `exit.min_psnr` ask for it, one
calibrated row (`eval/calibration/`) of exit.policy (uem unless it is another score policy;
adadiff for adadiff models), and with `exit.calibration_buckets` = K > 1 a second one right after
it, calibrated per timestep bucket (key `threshold_schedule`, one threshold per bucket, noisiest
first). With `exit.target_layer_ratio` and time_schedule in the policies, also a time_schedule
calibrated from the oracle's exits to the same target (`calibration.time_schedule.calibrate_time_schedule`): the
strongest fixed rule, no guessed schedule.

Every setting samples the same `sweep.num_images` images: the same initial noise, sampler noise
and labels (`sampling.sample` derives them from `sample.seed` and the batch index only), with
the configured sampler. Each run is timed after its program is compiled (a warm-up with cheap
policy values: thresholds and depths are traced, so one compile serves all of a policy's
values), and the plain full-depth sampler (`module.apply`, no exit machinery) is timed in the
same process, before and after the settings (the mean of both; `retime_baseline`):
`speedup = seconds_full / seconds`. Fidelity (`psnr_vs_full` ...) compares each
setting's images with the plain full-depth images from the same noise under a deterministic
sampler: the configured one if it is deterministic (then the same runs serve both), else DDIM
with eta=0 in an extra, untimed run. `gflops_per_image` is `eval/flops.gflops_per_image` on
the exit layers each batch really had (the loop's real cost: the deepest exit of the batch).
Quality is the FID of `sweep.fid_kind` against real-image statistics cached under
DIR/fid_stats/, and, for class-conditional models, `class_accuracy`: how often the dataset
classifier (`eval/classifier.py`, cached in DIR/classifier/, trained on the train split, its
accuracy measured on the test split when there is one) predicts the requested label.

Files in DIR/sweep/:
  sweep.json      one row per setting (`ROW_KEYS`; docs/design.md "Stable names")
  sweep.csv       the scalar fields of the same rows
  sweep.md        a header paragraph (machine, checkpoint step, images, FID kind, baseline) and
                  the table (also printed)
  run.json        that header's facts as data (machine, baseline, calibration, grids, the
                  held-out protocol's seeds and image counts)
  per_image_psnr.npz  each row's per-image PSNR vs full ("row_000", ...; "setting"), for paired
                  bootstrap intervals (eval/bootstrap.py)

With sweep.calibration_images = M > 0 every setting is measured again on M calibration images
(sweep.calibration_seed's noise; eval/heldout.py) and its row gets the `choice_*` columns:
benchmarks/pareto_budgets.py picks each family's point at a budget on them and reports the
held-out columns.
  pareto_fid.png  FID vs GFLOPs per image, one curve per policy (not written for fid_kind=none)
  pareto_psnr.png PSNR vs full depth vs GFLOPs per image (rows at the 100 dB cap, i.e. every
                  image identical up to float rounding, are left out and named in a note)
  exit_heatmap.png  timestep x exit layer for the chosen UEM row: the calibrated one if any,
                  else the row with exit.threshold, else the middle threshold of the list
  exit_heatmap_per_bucket.png  the same for the per-bucket calibrated row, when there is one
  grid_<policy>.png samples of each policy's row whose layer_ratio_run is closest to the
                  chosen UEM row's (matched compute); text models: one row per caption
  captions.{md,json}  text models with labelled held-out captions: class accuracy per caption,
                  full depth and the chosen UEM row

The work is split by job, data flowing one way: `settings.py` (config -> `Setting`s) ->
`quality.py` (FID and class accuracy) -> `runner.py` (the shared context, compiled and timed
sampling, one row per setting) -> `report.py` (the files above); this module only runs the mode. `evaluate.py` (`--mode eval`) reuses `runner.start`/`runner.evaluate`
for the configured setting alone.
"""
from __future__ import annotations

import os

from tqdm import tqdm

from deediff_jax.eval import specs
from deediff_jax.eval.calibration import spec as cal_spec
from deediff_jax.eval.calibration.describe import describe
from deediff_jax.eval.calibration.time_schedule import calibrate_time_schedule
from deediff_jax.eval import heldout
from deediff_jax.eval.report import SWEEP_DIR, run_info, write_outputs
from deediff_jax.eval.runner import calibrated_setting, evaluate, retime_baseline, start
from deediff_jax.eval.settings import Setting, settings_from_config
from deediff_jax.model.uvit import ModelConfig


def run(config, workdir: str, *, params=None, progress: bool = True) -> list[dict]:
  """`--mode sweep`: evaluates every setting and writes DIR/sweep/*; returns the rows."""
  cfg = ModelConfig.from_config(config.model)
  settings = settings_from_config(config, cfg.num_blocks)
  ctx = start(config, workdir, settings, params=params)
  calibration = calibration_per_bucket = None
  request = specs.calibration_spec(config)
  if cal_spec.wanted(request):
    # The scalar calibration always; with exit.calibration_buckets = K > 1 the per-bucket one
    # too, right after it, so the table compares the two at the same target.
    cs = calibrated_setting(ctx, buckets=1)
    calibration = cs.calibration
    extra = [cs]
    if cal_spec.buckets_of(request) > 1:
      extra.append(calibrated_setting(ctx))
      calibration_per_bucket = extra[-1].calibration
    last = max((i for i, s in enumerate(settings) if s.policy == cs.policy), default=len(settings) - 1)
    settings[last + 1:last + 1] = extra
    target = request.target_layer_ratio
    scheduled = cal_spec.schedule_policy()   # what calibrate_time_schedule makes
    if target > 0 and any(s.policy == scheduled for s in settings):
      sched, report = calibrate_time_schedule(
          ctx.params, request, cal_spec.calibration_rng(request.seed), target=target,
          buckets=cal_spec.schedule_buckets(request), num=min(int(config.sample.batch_size), ctx.num))
      print(describe(report))
      last = max(i for i, s in enumerate(settings) if s.policy == scheduled)
      settings.insert(last + 1, Setting(scheduled, schedule=",".join(str(v) for v in sched),
                                        calibration=report))
  rows, images, stats = [], [], []
  bar = tqdm(settings, desc="sweep", unit="setting", disable=not progress)
  for s in bar:
    bar.set_postfix_str(s.label())
    row, imgs, st = evaluate(ctx, s)
    rows.append(row)
    images.append(imgs)
    stats.append(st)
  choice_num = int(config.sweep.calibration_images)
  if choice_num > 0:  # the held-out protocol: every row measured again on calibration noise
    cctx = heldout.calibration_context(ctx, choice_num)
    for s, r in zip(tqdm(settings, desc="choice", unit="setting", disable=not progress), rows):
      r.update(heldout.choice_columns(evaluate(cctx, s)[0], cctx))
  retime_baseline(ctx, rows)
  info = run_info(ctx)
  info["heldout"] = {"heldout_seed": int(config.sample.seed), "heldout_images": ctx.num,
                     "calibration_seed": request.seed,
                     "calibration_images": choice_num, "batch_size": int(config.sample.batch_size)}
  if calibration is not None:
    info["calibration"] = calibration
  if calibration_per_bucket is not None:
    info["calibration_per_bucket"] = calibration_per_bucket
  out_dir = os.path.join(str(workdir), SWEEP_DIR)
  write_outputs(out_dir, rows, images, stats, ctx, info)
  heldout.write_per_image_psnr(os.path.join(out_dir, heldout.PER_IMAGE_FILE), rows, stats)
  with open(os.path.join(out_dir, "sweep.md")) as f:
    print(f.read())
  return rows
