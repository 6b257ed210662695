"""`--mode eval`: one row of the sweep for the configured exit setting only.

  python -m deediff_jax.main --config configs/mnist.py --workdir DIR --mode eval \
      [--config.exit.policy=uem --config.exit.threshold=0.1 | --config.exit.target_layer_ratio=0.6]

Evaluates `config.exit` (policy with its threshold, depth or schedule; or a calibrated threshold
when exit.target_layer_ratio / exit.max_psnr_drop / exit.min_psnr ask for one) exactly as
`--mode sweep` evaluates each of its settings (`runner.prepare` + `runner.evaluate`: the same
`sweep.num_images` images, the timed plain full-depth baseline, fidelity, GFLOPs, FID of
`sweep.fid_kind` and class accuracy), writes the row to DIR/eval.json with a `run` entry (the
machine, checkpoint, baseline and FID facts of `report.run_info`) and prints it as a Markdown table.
"""
from __future__ import annotations

import os

from deediff_jax.eval import specs
from deediff_jax.eval.calibration import spec as cal_spec
from deediff_jax.eval.calibration.resolve import calibrated_schedule
from deediff_jax.eval import report as report_lib
from deediff_jax.eval import runner
from deediff_jax.eval.settings import Setting, setting_from_exit_config


def run(config, workdir: str, *, params=None) -> dict:
  """Evaluates the configured setting; writes DIR/eval.json; returns the row (+ `run`)."""
  tuned = tune_path = None
  if str(config.tune.file).strip():
    # tune.file: the tuned setting, against the untuned full model (the config's own steps).
    from deediff_jax.eval.tune import apply_file, tuned_setting
    base_steps, tune_path = int(config.sample.steps), str(config.tune.file)
    config, tuned = apply_file(config)
    tuned_steps_setting = tuned_setting(config, base_steps)
    config = runner.with_steps(config, base_steps)
  setting = setting_from_exit_config(config) if tuned is None else tuned_steps_setting
  # Calibrates the configured policy itself: for a depth policy that is an error, not a switch.
  ctx = runner.start(config, workdir, [setting], params=params, calibration_policy=config.exit.policy)
  request = specs.calibration_spec(config)
  if cal_spec.calibrates_schedule(request):
    schedule, report = calibrated_schedule(ctx.params, request, num=min(int(config.sample.batch_size), ctx.num))
    setting = Setting(cal_spec.schedule_policy(), schedule=schedule, calibration=report)
  elif cal_spec.wanted(request):
    setting = runner.calibrated_setting(ctx, policy=config.exit.policy)
  row, _, _ = runner.evaluate(ctx, setting)
  runner.retime_baseline(ctx, [row])
  info = report_lib.run_info(ctx)
  if setting.calibration is not None:
    info["calibration"] = setting.calibration
  out = dict(row, run=info)
  if tuned is not None:
    out.update(tune_file=tune_path, tune_overrides=tuned["overrides"])
  os.makedirs(str(workdir), exist_ok=True)
  report_lib.write_json(os.path.join(str(workdir), "eval.json"), out)
  print(report_lib.header_md(info, title="Early-exit evaluation") + "\n" + report_lib.table_md([row]))
  return out


__all__ = ["run"]
