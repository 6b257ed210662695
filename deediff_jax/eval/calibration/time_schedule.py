"""A time_schedule (a depth per timestep bucket, noisiest first) calibrated from the oracle's exits:
where in time the model itself needs depth to agree with its full output."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import numpy as np

from deediff_jax import policies
from deediff_jax.early_exit import make_policy_params
from deediff_jax.eval.calibration.batch import Runner
from deediff_jax.eval.calibration.spec import (CalibrationError, CalibrationSpec, schedule_policy, step_buckets,
                                               within)

ORACLE_QUANTILE = 0.9            # a bucket's depth covers this share of the oracle's exits in it
ORACLE_TOLERANCES = (1e-4, 4.0)  # the bracket of the oracle's tolerance (RMS x0 units)
MAX_SCHEDULE_PROBES = 12
_log = logging.getLogger(__name__)


def schedule_from_exits(exit_layer, buckets: np.ndarray, k: int, quantile: float = ORACLE_QUANTILE) -> list:
  """A depth per timestep bucket from per-step exit layers [steps, B]: the `quantile` of the
  exits that fell in the bucket, rounded up (so most samples get the depth they needed)."""
  el = np.asarray(exit_layer)
  out = []
  for b in range(k):
    vals = el[buckets == b].ravel()
    out.append(int(math.ceil(np.quantile(vals, quantile) - 1e-9)) if vals.size else int(el.max()))
  return out


def schedule_ratio(schedule, buckets: np.ndarray, n_blocks: int) -> float:
  """layer_ratio_run of a time_schedule over the sampling steps (steps per bucket may differ)."""
  return float(np.mean(np.asarray(schedule, np.float64)[buckets]) / n_blocks)


def calibrate_time_schedule(params, spec: CalibrationSpec, rng, *, target: float, buckets: int,
                            num: Optional[int] = None, quantile: float = ORACLE_QUANTILE) -> tuple:
  """A time_schedule at `target` layer ratio, measured rather than guessed: the oracle policy
  (every block runs; a sample takes the first layer whose x0 is within tolerance of the final
  layer's) samples a calibration batch, each bucket gets the `quantile` of the oracle's exit
  layers in it, and the tolerance is bisected (in log space) until the schedule's layer ratio is
  within the request's tolerance of `target`.

  So compute goes where the model itself needs depth to agree with its full output. Returns
  (schedule list, report); the schedule is the probe closest to the target, as measured.
  """
  n_blocks = spec.num_blocks
  if not 0.0 < target <= 1.0:
    raise CalibrationError(f"the target layer ratio must be in (0, 1], got {target}")
  if buckets > spec.steps:
    raise CalibrationError(f"{buckets} timestep buckets exceed sample.steps={spec.steps}")
  tol = float(spec.tolerance)
  num = spec.images if num is None else int(num)
  run = Runner(params, spec, spec.sampler, rng, num)
  steps_bucket = step_buckets(spec.sampler, buckets)
  oracle = policies.first(runs_every_block=True).name
  t0 = time.perf_counter()
  probes = []

  def probe(log_tol: float) -> dict:
    tolerance = float(math.exp(log_tol))
    pp = make_policy_params(n_blocks, threshold=tolerance, min_layers=spec.min_layers)
    _, stats = run(policy=oracle, policy_params=pp)
    sched = schedule_from_exits(stats["exit_layer"], steps_bucket, buckets, quantile)
    rec = {"tolerance": tolerance, "schedule": sched,
           "layer_ratio": schedule_ratio(sched, steps_bucket, n_blocks),
           "oracle_layer_ratio_per_sample": float(np.mean(stats["exit_layer"]) / n_blocks)}
    probes.append(rec)
    _log.info("schedule calibration probe %s", rec)
    return rec

  lo, hi = (math.log(v) for v in ORACLE_TOLERANCES)  # ratio falls as the tolerance grows
  best = None
  for _ in range(MAX_SCHEDULE_PROBES):
    mid = 0.5 * (lo + hi)
    rec = probe(mid)
    if best is None or abs(rec["layer_ratio"] - target) < abs(best["layer_ratio"] - target):
      best = rec
    if within(rec["layer_ratio"], target, tol):
      break
    if rec["layer_ratio"] > target:
      lo = mid
    else:
      hi = mid
  report = {"method": "oracle_time_schedule", "policy": schedule_policy(), "buckets": buckets,
            "quantile": quantile, "target": target, "tolerance": tol,
            "schedule": ",".join(str(v) for v in best["schedule"]),
            "achieved": {"layer_ratio_run": best["layer_ratio"], "layer_ratio_per_sample": best["layer_ratio"],
                         "oracle_tolerance": best["tolerance"]},
            "within_tolerance": within(best["layer_ratio"], target, tol),
            "calibration_images": num, "sampler": spec.sampler.sampler, "steps": spec.steps,
            "probes": probes, "seconds": time.perf_counter() - t0}
  return best["schedule"], report


__all__ = ["MAX_SCHEDULE_PROBES", "ORACLE_QUANTILE", "ORACLE_TOLERANCES", "calibrate_time_schedule",
           "schedule_from_exits", "schedule_ratio"]
