"""Calibrated exit thresholds: pick the threshold from a target instead of guessing a number.

Two targets (set one):

* `exit.target_layer_ratio` = r in (0, 1]: the threshold whose **layer_ratio_run** (blocks the
  early-exit loop actually ran / full depth, averaged over sampling steps: the real compute,
  see `sampling.summarize`) on the calibration batch is within `tolerance` of r. Set
  `exit.calibration_metric=layer_ratio_per_sample` to target the paper's per-sample ratio
  instead. The run ratio depends on the batch (with aggregate="all" the loop runs until the
  slowest sample exits), so the calibration batch is by default one batch of
  min(sample.batch_size, sample.num_images) images, the batch the sampler will really use
  (`exit.calibration_images` overrides). The ratio is measured with the configured sampler.
* a PSNR floor: the LARGEST (most aggressive) threshold whose `psnr_vs_full` (mean per-image
  PSNR against the full-depth samples from the same noise, `eval/fidelity.py`) on the
  calibration batch stays >= the floor, measured with a deterministic sampler (the configured
  one if it is deterministic, else DDIM eta=0). The floor is `exit.min_psnr` (dB) when set,
  else `PSNR_8BIT - exit.max_psnr_drop`: PSNR_8BIT = 10*log10(4 / ((2/255)^2 / 12)) ≈ 58.9 dB
  is the PSNR of 8-bit quantisation noise, i.e. the level at which early-exit samples are, on
  average, the full-depth samples as saved in a PNG. `max_psnr_drop=20` allows samples ~20 dB
  worse than that (floor ≈ 38.9 dB). (PSNR against the full model is infinite at full depth,
  so a "drop" needs a finite reference; this is the one that means "visibly the same".)

The search. Every policy here exits more as its threshold moves one way (uem / uem_no_time:
u < threshold, so larger exits more; state_cosine: cos > threshold, so smaller exits more), so
it runs over an *aggressiveness* a in [0, 1] (threshold = a for the UEM policies, 1 - 2a for
the cosine) by bisection: a = 0 is full depth (never run, known exactly), a = 1 exits as early
as `exit.min_layers` allows. Each probe is one sampling run of the calibration batch with the
real sampler; the threshold is a traced array, so all probes share one compiled program.
Across a whole sampling run the ratio and the PSNR are monotone in a only approximately (an
early exit changes the next step's input), so the result is what was *measured* at the
returned threshold, never an interpolation: `achieved` in the report is that measurement.

The calibration batch uses its own noise (`calibration_rng`: sweep.calibration_seed folded with a
fixed stream id, independent of sample.seed), so the images that are finally evaluated are not
the ones it was tuned on.

Per-timestep-bucket thresholds (`exit.calibration_buckets` = K > 1, with target_layer_ratio
only). One scalar threshold compares the UEM's u across timesteps, and u (an error estimate in
eps space) is not comparable across them: on MNIST 14x14 a scalar threshold sends every sample
out after block 1 at the noisy half of the steps and runs all blocks at the clean end
(benchmarks/results/mnist14_scratch/exit_heatmap.png). With K buckets (bucketed like
`time_schedule`: bucket = floor((1 - time_frac) * K), noisiest first) the second criterion is
"every bucket spends the target": K bisections on a_k run side by side, each moved by its own
bucket's measured ratio, and every probe measures all K at once (one sampling run, one compiled
program: the threshold is a traced [K] array). The buckets interact (an exit at a noisy step
changes the input of the later ones), so the result is the probe whose worst bucket is closest
to the target, as measured. A bucket that stays above the target even at a = 1 stays at a = 1
and the report says the target is not met there. The result is a `threshold_schedule`
("t_0,...,t_{K-1}", noisiest first: the `exit.threshold_schedule` key), not `exit.threshold`.

API: `calibrate_threshold(params, config, rng) -> (threshold, report)` (threshold: a float, or a
list of K floats with calibration_buckets = K > 1), `wanted(config)`, `calibrated(params,
config) -> (config, report)` (calibrates when asked and returns a new config with
exit.threshold or .threshold_schedule set -- or, for exit.target_layer_ratio with
exit.calibrate=time_schedule, exit.policy switched to a time_schedule calibrated from the
oracle's exits --, prints one line; the given config is never changed), `calibration_rng(config)`,
`step_buckets(config, k)`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from deediff_jax import sampling
from deediff_jax.data.eval_context import conditioning
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax import policies
from deediff_jax.early_exit import by_bucket, make_policy_params
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval.decode import decoder_for
from deediff_jax.model.uvit import ModelConfig

METRICS = ("layer_ratio_run", "layer_ratio_per_sample")
CALIBRATION_STREAM = 0xCA1B      # fold_in id of the calibration batch's noise
PSNR_8BIT = 10.0 * math.log10(4.0 / ((2.0 / 255.0) ** 2 / 12.0))
DEFAULT_TOLERANCE = 0.02
MAX_PROBES = 14                  # sampling runs per calibration, at most
MAX_BUCKET_PROBES = 24           # the same with calibration_buckets > 1 (K bisections at once)
PSNR_RESOLUTION = 1e-3           # the PSNR search stops when the bracket on a is this narrow
_log = logging.getLogger(__name__)


class CalibrationError(ValueError):
  """A calibration request that cannot be met or is inconsistent (one line, with the fix)."""


def calibratable() -> tuple:
  """The policies whose threshold calibration can pick (`ExitPolicy.calibratable`)."""
  return tuple(p.name for p in policies.registered() if p.calibratable)


def schedule_policy() -> str:
  """The policy a calibrated depth schedule is for (`calibrate_time_schedule`)."""
  return policies.first(value="schedule").name


def psnr_floor(config) -> Optional[float]:
  """The PSNR floor (dB) this config asks for, or None (see the module doc)."""
  min_psnr = float(config.exit.min_psnr)
  drop = float(config.exit.max_psnr_drop)
  if min_psnr > 0 and drop > 0:
    raise CalibrationError("set only one of exit.min_psnr and exit.max_psnr_drop")
  if min_psnr > 0:
    return min_psnr
  if drop > 0:
    return PSNR_8BIT - drop
  return None


def wanted(config) -> bool:
  """True when the config asks for a calibrated threshold."""
  return float(config.exit.target_layer_ratio) > 0 or psnr_floor(config) is not None


def calibrates_schedule(config) -> bool:
  """True when the config's calibration makes a time_schedule (calibrate_time_schedule): for
  exit.policy=time_schedule, and with exit.calibrate=time_schedule (not the default) when
  exit.target_layer_ratio is set for a score policy (uem, adadiff, ...). A PSNR floor always
  calibrates the policy's own threshold."""
  if float(config.exit.target_layer_ratio) <= 0:
    return False
  e = config.exit
  return e.policy == schedule_policy() or (e.policy in calibratable() and psnr_floor(config) is None
                                         and str(config.exit.calibrate) == "time_schedule")


def guided(config) -> bool:
  """True for exit.calibrate=guided with exit.target_layer_ratio (see `calibrate_guided`)."""
  return (float(config.exit.target_layer_ratio) > 0 and psnr_floor(config) is None
          and str(config.exit.calibrate) == "guided")


def switch_note(policy: str) -> str:
  """The line printed when exit.target_layer_ratio calibrates a time_schedule for a score policy."""
  # Not the default: on the Quickstart model this schedule was the worst row of its sweep, below the
  # calibrated UEM threshold (exit.calibrate=policy, the default); --mode tune measures both.
  return (f"exit.target_layer_ratio calibrated a time_schedule instead of exit.policy={policy}'s threshold "
          "(exit.calibrate=time_schedule); --config.exit.calibrate=policy (the default) calibrates the "
          "threshold, and --mode tune measures which wins on this model")


def calibrated_schedule(params, config, *, num: Optional[int] = None) -> tuple:
  """The time_schedule that exit.target_layer_ratio asks for (`calibrates_schedule`) -> (schedule
  text, report); prints what was chosen, and why, when it replaces a score policy's threshold.
  One path for --mode sample (`calibrated`) and --mode eval."""
  schedule, report = calibrate_time_schedule(params, config, calibration_rng(config),
                                             target=float(config.exit.target_layer_ratio),
                                             buckets=schedule_buckets(config), num=num)
  print(describe(report))
  if config.exit.policy != schedule_policy():
    print(switch_note(config.exit.policy))
  return ",".join(str(v) for v in schedule), report


def schedule_buckets(config) -> int:
  """Timestep buckets of a calibrated time_schedule: exit.calibration_buckets when > 1, else
  DEFAULT_SCHEDULE_BUCKETS; never more than sample.steps."""
  k = buckets_of(config)
  return min(k if k > 1 else DEFAULT_SCHEDULE_BUCKETS, int(config.sample.steps))


def calibration_rng(config):
  """The key of the calibration noise: `sweep.calibration_seed` folded with a fixed stream id, so
  never the held-out noise of `sample.seed`, and unchanged when sample.seed changes (see the
  module doc). Every choice (calibration, best row per family, --mode tune) is made on it."""
  seed = int(config.sweep.get("calibration_seed", 1)) if hasattr(config, "sweep") else 1
  return jax.random.fold_in(jax.random.PRNGKey(seed), CALIBRATION_STREAM)


def threshold_of(policy: str, a: float) -> float:
  """Aggressiveness a in [0, 1] -> the policy's threshold (`ExitPolicy.threshold_of`): a = 0
  never exits, a = 1 exits as early as exit.min_layers allows."""
  return policies.get(policy).threshold_of(a)


def calibration_size(config) -> int:
  n = int(config.exit.calibration_images)
  return n if n > 0 else min(int(config.sample.batch_size), int(config.sample.num_images))


def check_request(config, policy: Optional[str] = None) -> tuple:
  """Validates a calibration request before any sampling -> (policy, target, floor, metric, tol).

  Raises CalibrationError (one line) for a policy without a threshold, two targets at once, no
  target, a target outside (0, 1], an unknown metric or a non-positive tolerance.
  """
  e = config.exit
  policy = e.policy if policy is None else policy
  if policy not in calibratable():
    names = calibratable()
    raise CalibrationError(f"calibration picks a threshold, but exit.policy is {policy!r}; use "
                           f"--config.exit.policy={names[0]} (or {', '.join(names[1:])})")
  target = float(config.exit.target_layer_ratio)
  floor = psnr_floor(config)
  if target > 0 and floor is not None:
    raise CalibrationError("set only one of exit.target_layer_ratio and exit.max_psnr_drop/min_psnr")
  if target <= 0 and floor is None:
    raise CalibrationError("nothing to calibrate: set --config.exit.target_layer_ratio=0.6 or "
                           "--config.exit.max_psnr_drop=20")
  if target > 1:
    raise CalibrationError(f"exit.target_layer_ratio must be in (0, 1], got {target}")
  metric = str(config.exit.calibration_metric)
  if metric not in METRICS:
    raise CalibrationError(f"exit.calibration_metric is {metric!r}; choose one of {', '.join(METRICS)}")
  tol = float(config.exit.calibration_tolerance)
  if tol <= 0:
    raise CalibrationError(f"exit.calibration_tolerance must be positive, got {tol}")
  k = buckets_of(config)
  if k > int(config.sample.steps):
    raise CalibrationError(f"exit.calibration_buckets={k} exceeds sample.steps={int(config.sample.steps)}, "
                           f"so some buckets hold no sampling step; use at most {int(config.sample.steps)}")
  return policy, target, floor, metric, tol


def buckets_of(config) -> int:
  """exit.calibration_buckets (1 = one scalar threshold)."""
  k = int(config.exit.calibration_buckets)
  if k < 1:
    raise CalibrationError(f"exit.calibration_buckets must be >= 1 (1 = one threshold), got {k}")
  return k


def step_buckets(config, k: int) -> np.ndarray:
  """[sample.steps] the timestep bucket of each sampling step: early_exit's own bucketing of a
  per-bucket threshold, applied to every step's time_frac at once (values[b] = b)."""
  schedule = sched_lib.from_config(config.diffusion)
  frac = samplers.grid_arrays(schedule, int(config.sample.steps))["time_frac"][:-1]
  return np.asarray(by_bucket(jnp.arange(k), frac, frac.shape[0], "step_buckets"), np.int64)


def bucket_ratios(summary: dict, n_blocks: int, buckets: np.ndarray, k: int, metric: str) -> list:
  """The metric (layer_ratio_run or layer_ratio_per_sample) of each bucket's sampling steps."""
  key = "layers_run_per_step" if metric == "layer_ratio_run" else "mean_exit_layer_per_step"
  per_step = np.asarray(summary[key], np.float64) / n_blocks
  return [float(np.mean(per_step[buckets == b])) for b in range(k)]


def calibrate_threshold(params, config, rng, *, policy: Optional[str] = None,
                        num: Optional[int] = None, buckets: Optional[int] = None,
                        bucket_targets: Optional[list] = None) -> tuple:
  """The threshold that meets config.exit's target on a calibration batch -> (threshold, report).

  `policy` defaults to config.exit.policy (uem, uem_no_time or state_cosine); `num` (the batch
  size) to `exit.calibration_images`, else min(sample.batch_size, sample.num_images). The report
  holds the method, target, tolerance or floor, the threshold, what it achieved (`achieved`),
  every probe, the sampler and the seconds spent. Raises CalibrationError when the target cannot
  be met by any threshold. `buckets` overrides exit.calibration_buckets; with K > 1 the
  threshold is a list of K floats, noisiest bucket first, and `achieved` has `per_bucket`.
  `bucket_targets` (K layer ratios, noisiest first) gives each bucket its own target instead
  of exit.target_layer_ratio (see `calibrate_guided`).
  """
  e = config.exit
  policy, target, floor, metric, tol = check_request(config, policy)
  cfg = ModelConfig.from_config(config.model)
  n_blocks = cfg.num_blocks
  num = calibration_size(config) if num is None else int(num)
  labels, context, null_context = conditioning(config, num)
  cond = dict(labels=labels, context=context, null_context=null_context)
  # Ratio targets use the real sampler; PSNR needs the deterministic one (module doc).
  run_config = config if floor is None else fidelity_lib.deterministic_config(config)
  t0 = time.perf_counter()
  reference = None
  # A PSNR floor is about images: latent models with data.autoencoder are scored decoded, as
  # --mode sample and the sweep score them.
  decode = (decoder_for(config) if floor is not None else None) or (lambda x: x)
  if floor is not None:
    reference, _ = sampling.sample(params, run_config, rng, num, plain=True, **cond)
    reference = decode(reference)
  probes = []
  k = buckets_of(config) if buckets is None else int(buckets)
  if bucket_targets is not None:
    k, target = len(bucket_targets), [float(v) for v in bucket_targets]
  steps_bucket = step_buckets(config, k) if k > 1 else None

  def probe(a) -> dict:
    """One sampling run at aggressiveness a: a float, or a [K] array with buckets."""
    if k > 1:
      thr = [threshold_of(policy, float(v)) for v in a]
    else:
      thr = threshold_of(policy, a)
    pp = make_policy_params(n_blocks, threshold=thr, min_layers=int(e.min_layers), patience=bool(e.patience))
    images, stats = sampling.sample(params, run_config, rng, num, policy=policy, policy_params=pp, **cond)
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
    best = _search_psnr_buckets(probe, floor, k, steps_per_bucket)
  elif k > 1:
    best = _search_ratio_buckets(probe, target, tol, metric, policy, k)
  elif floor is None:
    best = _search_ratio(probe, target, tol, metric, policy)
  else:
    best = _search_psnr(probe, floor)
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
      "sampler": run_config.sample.sampler, "steps": int(config.sample.steps),
      "aggregate": e.aggregate, "min_layers": int(e.min_layers),
      "probes": [{key: v for key, v in p.items() if key != "_a"} for p in probes],
      "seconds": time.perf_counter() - t0,
  }
  if floor is None:
    within = (_within(achieved[metric], target, tol) if k == 1
              else all(_within(v, t, tol) for v, t in zip(achieved["per_bucket"], np.broadcast_to(target, (k,)))))
    report.update(metric=metric, target=target, tolerance=tol, within_tolerance=within)
  else:
    report.update(metric="psnr_vs_full", psnr_floor=floor,
                  max_psnr_drop=float(config.exit.max_psnr_drop) or None,
                  min_psnr=float(config.exit.min_psnr) or None)
  return threshold, report


def _full_depth_record(policy: str) -> dict:
  """a = 0: nothing exits before the last block, known without sampling."""
  return {"threshold": threshold_of(policy, 0.0), "layer_ratio_run": 1.0,
          "layer_ratio_per_sample": 1.0, "_a": 0.0}


def _within(value: float, target: float, tol: float) -> bool:
  # A hair of slack so that e.g. 0.48 counts as within 0.02 of 0.5 despite float rounding.
  return abs(value - target) <= tol + 1e-9


def _search_ratio(probe, target: float, tol: float, metric: str, policy: str) -> dict:
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
  while not _within(records[-1][metric], target, tol) and len(records) < MAX_PROBES:
    mid = 0.5 * (lo + hi)
    records.append(probe(mid))
    if records[-1][metric] > target:
      lo = mid
    else:
      hi = mid
  if _within(records[-1][metric], target, tol):
    return records[-1]
  # No probe within tolerance (the ratio jumps over the target): the closest one measured.
  return min(records, key=lambda r: (abs(r[metric] - target), -r[metric]))


def _search_ratio_buckets(probe, target, tol: float, metric: str, policy: str, k: int) -> dict:
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
    return [b for b in searched if not _within(rec["per_bucket"][b], targets[b], tol)]

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


def _search_psnr(probe, floor: float) -> dict:
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


def _search_psnr_buckets(probe, floor: float, k: int, steps_per_bucket) -> dict:
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


# ----------------------------------------------------------------------------- depth schedules

DEFAULT_SCHEDULE_BUCKETS = 4    # timestep buckets of a calibrated time_schedule (exit.calibration_buckets > 1 overrides)
ORACLE_QUANTILE = 0.9            # a bucket's depth covers this share of the oracle's exits in it
ORACLE_TOLERANCES = (1e-4, 4.0)  # the bracket of the oracle's tolerance (RMS x0 units)
MAX_SCHEDULE_PROBES = 12


def calibrate_guided(params, config, rng, *, policy: Optional[str] = None, num: Optional[int] = None) -> tuple:
  """exit.calibrate=guided: the policy's threshold per timestep bucket, each bucket held to the
  share of blocks that the oracle-calibrated time_schedule (`calibrate_time_schedule`) spends
  there -> (thresholds, report).

  The schedule decides where in time the compute goes (the oracle knows that error made at the
  noisy steps compounds); the learned exit only decides, within each bucket's budget, which
  steps and samples leave early. A bucket the schedule runs at full depth exits nowhere.
  """
  target = float(config.exit.target_layer_ratio)
  k = schedule_buckets(config)
  schedule, schedule_report = calibrate_time_schedule(params, config, rng, target=target, buckets=k, num=num)
  n_blocks = ModelConfig.from_config(config.model).num_blocks
  bucket_targets = [d / n_blocks for d in schedule]
  thresholds, report = calibrate_threshold(params, config, rng, policy=policy, num=num,
                                           bucket_targets=bucket_targets)
  report.update(method="guided_per_bucket", target=target, bucket_targets=bucket_targets,
                schedule=schedule_report["schedule"], schedule_calibration=schedule_report)
  return thresholds, report


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


def calibrate_time_schedule(params, config, rng, *, target: float, buckets: int,
                            num: Optional[int] = None, quantile: float = ORACLE_QUANTILE) -> tuple:
  """A time_schedule (depth per timestep bucket, noisiest first) at `target` layer ratio, measured
  rather than guessed: the oracle policy (every block runs; a sample takes the first layer whose
  x0 is within tolerance of the final layer's) samples a calibration batch, each bucket gets the
  `quantile` of the oracle's exit layers in it, and the tolerance is bisected (in log space) until
  the schedule's layer ratio is within exit.calibration_tolerance of `target`.

  So compute goes where the model itself needs depth to agree with its full output. Returns
  (schedule list, report); the schedule is the probe closest to the target, as measured.
  """
  cfg = ModelConfig.from_config(config.model)
  n_blocks = cfg.num_blocks
  if not 0.0 < target <= 1.0:
    raise CalibrationError(f"the target layer ratio must be in (0, 1], got {target}")
  if buckets > int(config.sample.steps):
    raise CalibrationError(f"{buckets} timestep buckets exceed sample.steps={int(config.sample.steps)}")
  tol = float(config.exit.calibration_tolerance)
  num = calibration_size(config) if num is None else int(num)
  labels, context, null_context = conditioning(config, num)
  cond = dict(labels=labels, context=context, null_context=null_context)
  steps_bucket = step_buckets(config, buckets)
  t0 = time.perf_counter()
  probes = []

  def probe(log_tol: float) -> dict:
    tolerance = float(math.exp(log_tol))
    pp = make_policy_params(n_blocks, threshold=tolerance, min_layers=int(config.exit.min_layers))
    _, stats = sampling.sample(params, config, rng, num, policy=policies.first(runs_every_block=True).name,
                               policy_params=pp, **cond)
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
    if _within(rec["layer_ratio"], target, tol):
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
            "within_tolerance": _within(best["layer_ratio"], target, tol),
            "calibration_images": num, "sampler": config.sample.sampler, "steps": int(config.sample.steps),
            "probes": probes, "seconds": time.perf_counter() - t0}
  return best["schedule"], report


def calibrated(params, config) -> tuple:
  """(config, report): when the config asks for a calibration, a NEW config whose exit.threshold
  (or .threshold_schedule; for a depth schedule, exit.policy and the oracle-calibrated
  .schedule) holds the calibrated value, and the report; else (config, None). `config` itself is
  never changed."""
  if not wanted(config):
    return config, None
  if config.exit.policy == schedule_policy() and float(config.exit.target_layer_ratio) <= 0:
    raise CalibrationError("exit.policy=time_schedule calibrates to exit.target_layer_ratio only; set "
                           "--config.exit.target_layer_ratio=0.55 instead of a PSNR floor")
  out = config.copy_and_resolve_references()
  if calibrates_schedule(config):
    schedule, report = calibrated_schedule(params, config)
    out.exit.policy = schedule_policy()
    out.exit.schedule = schedule
    return out, report
  if guided(config):
    threshold, report = calibrate_guided(params, config, calibration_rng(config))
  else:
    threshold, report = calibrate_threshold(params, config, calibration_rng(config))
  if isinstance(threshold, (list, tuple)):
    out.exit.threshold_schedule = schedule_text(threshold)
  else:
    out.exit.threshold = float(threshold)
  print(describe(report))
  return out, report


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


__all__ = ["CalibrationError", "calibrate_guided", "calibrated_schedule", "guided", "calibrates_schedule", "schedule_buckets", "switch_note", "PSNR_8BIT", "bucket_ratios", "buckets_of", "calibrate_threshold",
           "calibrate_time_schedule", "schedule_from_exits", "schedule_ratio",
           "calibration_rng", "check_request", "describe", "calibrated", "psnr_floor",
           "schedule_text", "step_buckets", "wanted"]
