"""The threshold searches: the threshold that meets a calibration request's target on the
calibration batch (see the package doc for the targets).

Every policy here exits more as its threshold moves one way (uem / uem_no_time: u < threshold, so
larger exits more; state_cosine: cos > threshold, so smaller exits more), so the search runs over
an *aggressiveness* a in [0, 1] (`spec.threshold_of`) by bisection: a = 0 is full depth (never
run, known exactly), a = 1 exits as early as `exit.min_layers` allows. Each probe is one sampling
run of the calibration batch with the real sampler; the threshold is a traced array, so all
probes share one compiled program. Across a whole sampling run the ratio and the PSNR are
monotone in a only approximately (an early exit changes the next step's input), so the result is
what was *measured* at the returned threshold, never an interpolation: `achieved` in the report
is that measurement.

Per-timestep-bucket thresholds (`exit.calibration_buckets` = K > 1). One scalar threshold
compares the UEM's u across timesteps, and u (an error estimate in eps space) is not comparable
across them: on MNIST 14x14 a scalar threshold sends every sample out after block 1 at the noisy
half of the steps and runs all blocks at the clean end
(benchmarks/results/mnist14_scratch/exit_heatmap.png). With K buckets (bucketed like
`time_schedule`: bucket = floor((1 - time_frac) * K), noisiest first) the ratio criterion is
"every bucket spends the target": K bisections on a_k run side by side, each moved by its own
bucket's measured ratio, and every probe measures all K at once (one sampling run, one compiled
program: the threshold is a traced [K] array). The buckets interact (an exit at a noisy step
changes the input of the later ones), so the result is the probe whose worst bucket is closest to
the target, as measured. A bucket that stays above the target even at a = 1 stays at a = 1 and
the report says the target is not met there. With a PSNR floor, each bucket's own fidelity curve
is measured and an MSE budget is spent where it saves the most compute (`allocate_levels`). The
result is a list of K thresholds, noisiest first (the `exit.threshold_schedule` key).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np

from deediff_jax import sampling
from deediff_jax.early_exit import make_policy_params
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval.calibration.batch import Runner, fidelity_sampler
from deediff_jax.eval.calibration.spec import (CalibrationError, CalibrationSpec, buckets_of, check_request,
                                               step_buckets, threshold_of, within)

MAX_PROBES = 14                  # sampling runs per calibration, at most
MAX_BUCKET_PROBES = 24           # the same with calibration_buckets > 1 (K bisections at once)
PSNR_RESOLUTION = 1e-3           # the PSNR search stops when the bracket on a is this narrow
_log = logging.getLogger(__name__)


def calibrate_threshold(params, spec: CalibrationSpec, rng, *, policy: Optional[str] = None,
                        num: Optional[int] = None, buckets: Optional[int] = None,
                        bucket_targets: Optional[list] = None) -> tuple:
  """The threshold that meets the request's target on a calibration batch -> (threshold, report).

  `policy` defaults to the request's exit.policy (uem, uem_no_time, state_cosine, adadiff); `num`
  (the batch size) to `spec.images`. The report holds the method, target, tolerance or floor, the
  threshold, what it achieved (`achieved`), every probe, the sampler and the seconds spent. Raises
  CalibrationError when the target cannot be met by any threshold. `buckets` overrides
  exit.calibration_buckets; with K > 1 the threshold is a list of K floats, noisiest bucket
  first, and `achieved` has `per_bucket`. `bucket_targets` (K layer ratios, noisiest first)
  gives each bucket its own target instead of exit.target_layer_ratio (see
  `resolve.calibrate_guided`).
  """
  policy, target, floor, metric, tol = check_request(spec, policy)
  n_blocks = spec.num_blocks
  num = spec.images if num is None else int(num)
  # Ratio targets use the real sampler; PSNR needs the deterministic one (package doc).
  run = Runner(params, spec, spec.sampler if floor is None else fidelity_sampler(spec), rng, num)
  t0 = time.perf_counter()
  reference = None
  # A PSNR floor is about images: latent models with data.autoencoder are scored decoded, as
  # --mode sample and the sweep score them.
  decode = (spec.decoder() if floor is not None else None) or (lambda x: x)
  if floor is not None:
    reference, _ = run(plain=True)
    reference = decode(reference)
  probes = []
  k = buckets_of(spec) if buckets is None else int(buckets)
  if bucket_targets is not None:
    k, target = len(bucket_targets), [float(v) for v in bucket_targets]
  steps_bucket = step_buckets(spec.sampler, k) if k > 1 else None

  def probe(a) -> dict:
    """One sampling run at aggressiveness a: a float, or a [K] array with buckets."""
    if k > 1:
      thr = [threshold_of(policy, float(v)) for v in a]
    else:
      thr = threshold_of(policy, a)
    pp = make_policy_params(n_blocks, threshold=thr, min_layers=spec.min_layers, patience=spec.patience)
    images, stats = run(policy=policy, policy_params=pp)
    summary = sampling.summarize(stats, n_blocks)
    rec = {"threshold": thr, "layer_ratio_run": summary["layer_ratio_run"],
           "layer_ratio_per_sample": summary["layer_ratio_per_sample"]}
    if k > 1:
      rec["per_bucket"] = bucket_ratios(summary, n_blocks, steps_bucket, k, metric)
    if reference is not None:
      f = fidelity_lib.fidelity(reference, decode(images))
      rec.update(psnr_vs_full=f["psnr_vs_full"], psnr_worst5=f["psnr_worst5"], mse_vs_full=f["mse_vs_full"])
    rec["_a"] = a
    probes.append(rec)
    _log.info("calibration probe %s", rec)
    return rec

  if k > 1 and floor is not None:
    steps_per_bucket = np.bincount(steps_bucket, minlength=k)
    best = search_psnr_buckets(probe, floor, k, steps_per_bucket)
  elif k > 1:
    best = search_ratio_buckets(probe, target, tol, metric, policy, k)
  elif floor is None:
    best = search_ratio(probe, target, tol, metric, policy)
  else:
    best = search_psnr(probe, floor)
  threshold = best["threshold"]
  achieved = {key: v for key, v in best.items() if key not in ("threshold", "_a")}
  report = {
      "method": ("target_layer_ratio" if k == 1 else "target_layer_ratio_per_bucket") if floor is None
                else ("psnr_floor" if k == 1 else "psnr_floor_per_bucket"),
      "buckets": k,
      "policy": policy,
      "threshold": threshold,
      "achieved": achieved,
      "calibration_images": num,
      "sampler": run.sampler.sampler, "steps": spec.steps,
      "aggregate": spec.aggregate, "min_layers": spec.min_layers,
      "probes": [{key: v for key, v in p.items() if key != "_a"} for p in probes],
      "seconds": time.perf_counter() - t0,
  }
  if floor is None:
    met = (within(achieved[metric], target, tol) if k == 1
           else all(within(v, t, tol) for v, t in zip(achieved["per_bucket"], np.broadcast_to(target, (k,)))))
    report.update(metric=metric, target=target, tolerance=tol, within_tolerance=met)
  else:
    report.update(metric="psnr_vs_full", psnr_floor=floor,
                  max_psnr_drop=float(spec.max_psnr_drop) or None,
                  min_psnr=float(spec.min_psnr) or None)
  return threshold, report


def bucket_ratios(summary: dict, n_blocks: int, buckets: np.ndarray, k: int, metric: str) -> list:
  """The metric (layer_ratio_run or layer_ratio_per_sample) of each bucket's sampling steps."""
  key = "layers_run_per_step" if metric == "layer_ratio_run" else "mean_exit_layer_per_step"
  per_step = np.asarray(summary[key], np.float64) / n_blocks
  return [float(np.mean(per_step[buckets == b])) for b in range(k)]


def _full_depth_record(policy: str) -> dict:
  """a = 0: nothing exits before the last block, known without sampling."""
  return {"threshold": threshold_of(policy, 0.0), "layer_ratio_run": 1.0,
          "layer_ratio_per_sample": 1.0, "_a": 0.0}


def search_ratio(probe, target: float, tol: float, metric: str, policy: str) -> dict:
  """Bisection on a for metric(a) within tol of target (the metric falls as a grows)."""
  if target >= 1.0 - tol:
    return _full_depth_record(policy)
  records = [probe(1.0)]
  least = records[0][metric]
  if least > target + tol + 1e-9:
    raise CalibrationError(
        f"exit.target_layer_ratio={target:g} is below the smallest {metric} policy {policy} reaches "
        f"on this model ({least:.3f} at threshold {records[0]['threshold']:g}, with exit.min_layers); "
        f"choose a target >= {least:.3f}")
  lo, hi = 0.0, 1.0
  while not within(records[-1][metric], target, tol) and len(records) < MAX_PROBES:
    mid = 0.5 * (lo + hi)
    records.append(probe(mid))
    if records[-1][metric] > target:
      lo = mid
    else:
      hi = mid
  if within(records[-1][metric], target, tol):
    return records[-1]
  # No probe within tolerance (the ratio jumps over the target): the closest one measured.
  return min(records, key=lambda r: (abs(r[metric] - target), -r[metric]))


def search_ratio_buckets(probe, target, tol: float, metric: str, policy: str, k: int) -> dict:
  """K bisections on a_k side by side, each bucket's metric within tol of its target (module doc).

  `target` is one ratio for every bucket or K of them (noisiest first); a bucket whose target is
  full depth keeps a = 0 (nothing exits there) and is not searched."""
  targets = np.broadcast_to(np.asarray(target, np.float64), (k,)).copy()
  full = targets >= 1.0 - tol
  if full.all():
    rec = _full_depth_record(policy)
    return dict(rec, threshold=[rec["threshold"]] * k, per_bucket=[1.0] * k, _a=np.zeros(k))
  records = [probe(np.where(full, 0.0, 1.0))]
  least = np.asarray(records[0]["per_bucket"])
  # A bucket that is above its target even at a = 1 cannot be helped: it stays there.
  stuck = ~full & (least > targets + tol + 1e-9)
  if (stuck | full).all():
    raise CalibrationError(
        f"exit.target_layer_ratio={float(np.min(targets)):g} is below the smallest {metric} policy {policy} "
        f"reaches in every timestep bucket on this model (at least {least[~full].min():.3f}, with "
        f"exit.min_layers); choose a target >= {least[~full].min():.3f}")
  lo, hi = np.zeros(k), np.ones(k)
  searched = [b for b in range(k) if not stuck[b] and not full[b]]

  def off(rec):
    return [b for b in searched if not within(rec["per_bucket"][b], targets[b], tol)]

  while off(records[-1]) and len(records) < MAX_BUCKET_PROBES:
    last = records[-1]
    a = np.array(last["_a"], np.float64)
    for b in off(last):
      if last["per_bucket"][b] > targets[b]:
        lo[b] = a[b]
      else:
        hi[b] = a[b]
      if hi[b] - lo[b] < PSNR_RESOLUTION:
        # The other buckets moved under this one: its old bracket no longer holds; reopen it.
        lo[b], hi[b] = 0.0, 1.0
      a[b] = 0.5 * (lo[b] + hi[b])
    records.append(probe(a))

  def worst(rec):
    return max([abs(rec["per_bucket"][b] - targets[b]) for b in searched])

  # The measured probe with the smallest worst-bucket miss (the latest among equals).
  return min(reversed(records), key=worst)


def search_psnr(probe, floor: float) -> dict:
  """Bisection on a for the largest a with psnr_vs_full(a) >= floor."""
  top = probe(1.0)
  if top["psnr_vs_full"] >= floor:
    return top
  lo, hi, ok, probes = 0.0, 1.0, None, 1
  while hi - lo > PSNR_RESOLUTION and probes < MAX_PROBES:
    mid = 0.5 * (lo + hi)
    rec = probe(mid)
    probes += 1
    if rec["psnr_vs_full"] >= floor:
      lo, ok = mid, rec
    else:
      hi = mid
  if ok is None:
    # Only a = 0 (full depth through the loop) is known to pass: measure it for the report.
    ok = probe(0.0)
  return ok


PSNR_BUCKET_LADDER = (0.25, 0.5, 0.75, 1.0)   # aggressiveness levels measured per bucket
MAX_PSNR_VERIFY = 4                           # combined probes before falling back


def allocate_levels(costs, mses, budget: float, full_costs) -> list:
  """The level per bucket (an index into its measured ladder, -1 = full depth) with the least
  total cost whose summed MSE stays within `budget`: greedy on the most cost saved per MSE added.

  costs[b][l], mses[b][l]: bucket b's compute (its steps times its layer ratio) and the MSE vs
  full when only bucket b exits at ladder level l; full_costs[b]: its compute at full depth. MSEs
  of different buckets are treated as additive, an approximation the caller verifies.
  """
  level = [-1] * len(costs)
  spent = 0.0
  while True:
    best = None
    for b, (cb, mb) in enumerate(zip(costs, mses)):
      cur_c = cb[level[b]] if level[b] >= 0 else full_costs[b]
      cur_m = mb[level[b]] if level[b] >= 0 else 0.0
      for l in range(level[b] + 1, len(cb)):
        dc, dm = cur_c - cb[l], mb[l] - cur_m
        if dc <= 0 or spent + dm > budget:
          continue
        score = dc / max(dm, 1e-12)
        if best is None or score > best[0]:
          best = (score, b, l, dm)
    if best is None:
      return level
    _, b, l, dm = best
    level[b] = l
    spent += dm


def search_psnr_buckets(probe, floor: float, k: int, steps_per_bucket) -> dict:
  """Least compute with psnr_vs_full >= floor, allocated per timestep bucket by measured fidelity.

  Each bucket's own curve is measured (only that bucket exits, at each ladder level, until its
  PSNR alone falls below the floor); `allocate_levels` spends an MSE budget (the floor's MSE)
  where it saves the most compute per MSE; a combined probe verifies it and the budget shrinks
  until the measured PSNR meets the floor. The result is a measured probe, never a prediction.
  """
  mse_floor = float(fidelity_lib.PEAK_POWER / 10.0 ** (floor / 10.0))
  costs, mses, levels_a, passing = [], [], [], []
  for b in range(k):
    cb, mb, ab = [], [], []
    for a in PSNR_BUCKET_LADDER:
      vec = np.zeros(k)
      vec[b] = a
      rec = probe(vec)
      if rec["psnr_vs_full"] < floor:
        break  # more aggressive levels of this bucket only lose more
      passing.append(rec)
      cb.append(rec["per_bucket"][b] * steps_per_bucket[b])
      mb.append(rec["mse_vs_full"])
      ab.append(a)
    costs.append(cb), mses.append(mb), levels_a.append(ab)
  full_costs = [float(n) for n in steps_per_bucket]
  budget = mse_floor
  for _ in range(MAX_PSNR_VERIFY):
    level = allocate_levels(costs, mses, budget, full_costs)
    vec = np.array([levels_a[b][l] if l >= 0 else 0.0 for b, l in enumerate(level)])
    if np.count_nonzero(vec) < 2:
      break  # one bucket alone was measured already
    rec = probe(vec)
    if rec["psnr_vs_full"] >= floor:
      passing.append(rec)
      break
    budget *= 0.7 * min(1.0, budget / max(rec["mse_vs_full"], 1e-12))
  if not passing:
    return probe(np.zeros(k))  # full depth through the loop: known to pass
  return min(passing, key=lambda r: r["layer_ratio_run"])  # the cheapest measured pass


__all__ = ["MAX_BUCKET_PROBES", "MAX_PROBES", "PSNR_BUCKET_LADDER", "allocate_levels", "bucket_ratios",
           "calibrate_threshold", "search_psnr", "search_psnr_buckets", "search_ratio", "search_ratio_buckets"]
