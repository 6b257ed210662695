"""A calibration request -> the values it chose (`Calibrated`) and its report: the one path of
--mode sample (`eval/specs.calibrated` writes them into a new config) and --mode eval. Nothing is
mutated: the spec is frozen and the result is a new value."""
from __future__ import annotations

import dataclasses
from typing import Optional

from deediff_jax.eval.calibration import threshold as threshold_lib
from deediff_jax.eval.calibration import time_schedule as schedule_lib
from deediff_jax.eval.calibration.describe import describe, schedule_text, switch_note
from deediff_jax.eval.calibration.spec import (CalibrationError, CalibrationSpec, calibrates_schedule,
                                               calibration_rng, guided, schedule_buckets, schedule_policy,
                                               wanted)


@dataclasses.dataclass(frozen=True)
class Calibrated:
  """What a calibration chose, as the config.exit keys it sets: the policy and one of a threshold,
  a threshold per timestep bucket (exit.threshold_schedule text) or a depth schedule."""
  policy: str
  threshold: Optional[float] = None
  threshold_schedule: Optional[str] = None
  schedule: Optional[str] = None

  def exit_keys(self) -> dict:
    """{config.exit key: value} of the chosen values (the policy always; the others when set)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def calibrate_guided(params, spec: CalibrationSpec, rng, *, policy: Optional[str] = None,
                     num: Optional[int] = None) -> tuple:
  """exit.calibrate=guided: the policy's threshold per timestep bucket, each bucket held to the
  share of blocks that the oracle-calibrated time_schedule (`calibrate_time_schedule`) spends
  there -> (thresholds, report).

  The schedule decides where in time the compute goes (the oracle knows that error made at the
  noisy steps compounds); the learned exit only decides, within each bucket's budget, which
  steps and samples leave early. A bucket the schedule runs at full depth exits nowhere.
  """
  target = float(spec.target_layer_ratio)
  k = schedule_buckets(spec)
  schedule, schedule_report = schedule_lib.calibrate_time_schedule(params, spec, rng, target=target, buckets=k,
                                                                   num=num)
  bucket_targets = [d / spec.num_blocks for d in schedule]
  thresholds, report = threshold_lib.calibrate_threshold(params, spec, rng, policy=policy, num=num,
                                                         bucket_targets=bucket_targets)
  report.update(method="guided_per_bucket", target=target, bucket_targets=bucket_targets,
                schedule=schedule_report["schedule"], schedule_calibration=schedule_report)
  return thresholds, report


def calibrated_schedule(params, spec: CalibrationSpec, *, num: Optional[int] = None) -> tuple:
  """The time_schedule that exit.target_layer_ratio asks for (`calibrates_schedule`) -> (schedule
  text, report); prints what was chosen, and why, when it replaces a score policy's threshold."""
  schedule, report = schedule_lib.calibrate_time_schedule(params, spec, calibration_rng(spec.seed),
                                                          target=float(spec.target_layer_ratio),
                                                          buckets=schedule_buckets(spec), num=num)
  print(describe(report))
  if spec.policy != schedule_policy():
    print(switch_note(spec.policy))
  return ",".join(str(v) for v in schedule), report


def resolve(params, spec: CalibrationSpec) -> tuple:
  """(Calibrated, report) when the request asks for a calibration (prints one line), else
  (None, None)."""
  if not wanted(spec):
    return None, None
  if spec.policy == schedule_policy() and spec.target_layer_ratio <= 0:
    raise CalibrationError("exit.policy=time_schedule calibrates to exit.target_layer_ratio only; set "
                           "--config.exit.target_layer_ratio=0.55 instead of a PSNR floor")
  if calibrates_schedule(spec):
    schedule, report = calibrated_schedule(params, spec)
    return Calibrated(schedule_policy(), schedule=schedule), report
  rng = calibration_rng(spec.seed)
  if guided(spec):
    threshold, report = calibrate_guided(params, spec, rng)
  else:
    threshold, report = threshold_lib.calibrate_threshold(params, spec, rng)
  if isinstance(threshold, (list, tuple)):
    chosen = Calibrated(spec.policy, threshold_schedule=schedule_text(threshold))
  else:
    chosen = Calibrated(spec.policy, threshold=float(threshold))
  print(describe(report))
  return chosen, report


__all__ = ["Calibrated", "calibrate_guided", "calibrated_schedule", "resolve"]
