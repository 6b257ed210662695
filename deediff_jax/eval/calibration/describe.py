"""The one-line reports of a calibration (what was chosen and what it achieved), and the text of
its values as config keys."""
from __future__ import annotations


def switch_note(policy: str) -> str:
  """The line printed when exit.target_layer_ratio calibrates a time_schedule for a score policy."""
  # Not the default: on the Quickstart model this schedule was the worst row of its sweep, below the
  # calibrated UEM threshold (exit.calibrate=policy, the default); --mode tune measures both.
  return (f"exit.target_layer_ratio calibrated a time_schedule instead of exit.policy={policy}'s threshold "
          "(exit.calibrate=time_schedule); --config.exit.calibrate=policy (the default) calibrates the "
          "threshold, and --mode tune measures which wins on this model")


def schedule_text(thresholds) -> str:
  """[0.25, 0.125] -> '0.25,0.125': the exit.threshold_schedule text, exact (repr) values."""
  return ",".join(repr(float(v)) for v in thresholds)


def describe(report: dict) -> str:
  """One line: what was chosen and what it achieved."""
  a = report["achieved"]
  if report["method"] == "oracle_time_schedule":
    return (f"calibrated time_schedule {report['schedule']} from the oracle's exits (tolerance "
            f"{a['oracle_tolerance']:.3g} RMS x0, {report['quantile']:g} quantile per bucket): layer ratio "
            f"{a['layer_ratio_run']:.3f}; target {report['target']:g} ± {report['tolerance']:g}"
            + ("" if report["within_tolerance"] else " NOT met (closest measured)")
            + f"; {report['calibration_images']} calibration images, {report['sampler']} {report['steps']} "
            f"steps, {len(report['probes'])} probes, {report['seconds']:.1f}s")
  ratios = (f"layer_ratio_run {a['layer_ratio_run']:.3f}, layer_ratio_per_sample "
            f"{a['layer_ratio_per_sample']:.3f}")
  if report["method"] == "guided_per_bucket":
    goal = (f"target {report['metric']} {report['target']:g}, each bucket held to the time_schedule "
            f"{report['schedule']}'s share (measured " + "/".join(f"{v:.3f}" for v in a["per_bucket"])
            + ", noisiest first)" + ("" if report["within_tolerance"] else " NOT met (closest measured)"))
  elif report["method"] in ("target_layer_ratio", "target_layer_ratio_per_bucket"):
    goal = f"target {report['metric']} {report['target']:g} ± {report['tolerance']:g}"
    if report["method"] == "target_layer_ratio_per_bucket":
      goal += (f" in each of {report['buckets']} timestep buckets (measured "
               + "/".join(f"{v:.3f}" for v in a["per_bucket"]) + ", noisiest first)")
    if not report["within_tolerance"]:
      goal += " NOT met (closest measured)"
  else:
    goal = (f"psnr_vs_full {a['psnr_vs_full']:.2f} dB >= floor {report['psnr_floor']:.2f} dB "
            f"(worst 5%: {a['psnr_worst5']:.2f} dB)")
  thr = report["threshold"]
  chosen = (f"exit.threshold_schedule={','.join(f'{v:.4g}' for v in thr)}" if isinstance(thr, (list, tuple))
            else f"exit.threshold={thr:.6g}")
  return (f"calibrated {chosen} ({report['policy']}): {ratios}; "
          f"{goal}; {report['calibration_images']} calibration images, {report['sampler']} "
          f"{report['steps']} steps, {len(report['probes'])} probes, {report['seconds']:.1f}s")


__all__ = ["describe", "schedule_text", "switch_note"]
