"""`--mode tune`: for this model and this budget, which setting to use, measured.

  python -m deediff_jax.main --config C --workdir DIR --mode tune --config.tune.budget=0.55
  python -m deediff_jax.main --config C --workdir DIR --mode tune --config.tune.min_psnr=35
  python -m deediff_jax.main --config C --workdir DIR --mode tune --config.tune.budgets=0.4,0.55,0.7
  python -m deediff_jax.main --config C --workdir DIR --mode sample --config.tune.file=DIR/tuned.json

Input: `tune.budget` b, a fraction of the GFLOPs of the plain full-depth sampler at sample.steps
(GFLOPs measured at sample.batch_size: the layers a batch runs depend on its size; a point is
admitted when its ratio is <= b, no slack), or `tune.min_psnr` (dB): the cheapest setting whose
PSNR vs full is at least that. `tune.budgets` (comma-separated) tunes several budgets in one run:
the full-depth references are computed once and a candidate that two budgets both reach (a step
count, a depth, a cache threshold) is measured once, so each budget's file is what a run of that
budget alone writes, for less time; `tune.out` then holds `{budget}` (default DIR/tuned_{budget}.json,
with DIR/tune_candidates_{budget}.json).

The search (on `tune.calibration_images` images of the calibration noise, sweep.calibration_seed;
eval/heldout.py) covers every runnable family, each fitted to the budget (a calibrated family is
calibrated at a layer-ratio target, measured, and calibrated again lower while its measured GFLOPs
ratio exceeds b, at most `MAX_FITS` times):

  learned exit      the model's score policy (uem, or adadiff for exit_style=adadiff), threshold
                    calibrated to the budget, one scalar and one per timestep bucket
                    (tune.buckets), each with exit.aggregate all and last
  time_schedule     a depth per timestep bucket calibrated from the oracle's exits
  static            the deepest fixed depth within the budget
  fewer steps       the plain full-depth sampler with the most steps within the budget
  static + fewer    a fixed depth on top of fewer steps (60-90% of the steps)
  l2c               Learning-to-Cache when cache.router is set and deediff_jax.caching exists
                    (`_l2c_candidates`: the hook the caching family plugs into)

It picks the best calibration PSNR among admitted points (min_psnr: the lowest GFLOPs among
points that reach it) and the runner-up (the best admitted point of another family), then
validates both on `tune.heldout_images` images of the held-out noise (sample.seed): PSNR vs full
with its bootstrap 95% interval (eval/bootstrap.py), classifier-FID and class accuracy when the
data have a classifier, the GFLOPs ratio, and the wall-clock speedup over full depth at
sample.batch_size (one batch; `tune.timing_repeats` paired runs, alternating which goes first,
after compilation; the median ratio and its min-max).

Writes DIR/tuned.json (or `tune.out`: write it where it will be kept, since the router path in it is
relative to the file):
  {"overrides": {config key: resolved value}, "setting", "gflops_ratio",
   "heldout": {"psnr", "psnr_ci", "fid", "class_accuracy", "speedup", "speedup_min",
               "speedup_max", "num_images", "seed"},
   "runner_up": {"overrides", "setting", "gflops_ratio", "heldout": {...},
                 "diff": pick - runner-up PSNR, "diff_ci": [lo, hi]},
   "full": {"fid", "class_accuracy"}, "budget", "min_psnr", "batch_size", "steps",
   "calibration_images", "heldout_images", "calibration_seed", "heldout_seed"}
and DIR/tune_candidates.json (every candidate with its calibration measurement); prints one line.
Each finished search task and held-out validation is also written to DIR/tune_journal.json
(eval/tune_journal.py): rerunning an interrupted command resumes where it stopped.
Overrides are resolved values (a threshold or schedule, never a target to recalibrate); paths
(a router) are relative to the tuned file. `--config.tune.file=PATH` (`apply_file`) applies them
to --mode sample|eval and zeroes every calibration target, so nothing is recalibrated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Optional

import numpy as np
from tqdm import tqdm

from deediff_jax import policies
from deediff_jax import sampling
from deediff_jax.config import CacheSpec
from deediff_jax.eval import bootstrap
from deediff_jax.eval import specs
from deediff_jax.eval.calibration import spec as cal_spec
from deediff_jax.eval.calibration.describe import schedule_text
from deediff_jax.eval.calibration.threshold import calibrate_threshold
from deediff_jax.eval.calibration.time_schedule import calibrate_time_schedule
from deediff_jax.eval import flops as flops_lib
from deediff_jax.eval import heldout
from deediff_jax.eval import runner
from deediff_jax.eval import tune_journal
from deediff_jax.eval.settings import Setting, setting_from_exit_config
from deediff_jax.model.uvit import ModelConfig

TUNED_FILE = "tuned.json"
CANDIDATES_FILE = "tune_candidates.json"
MAX_FITS = 4                  # calibrations per calibrated family while its GFLOPs exceed the budget
COMBO_STEP_FRACTIONS = (0.6, 0.7, 0.8, 0.9)
CALIBRATION_TARGET_KEYS = ("exit.target_layer_ratio", "exit.min_psnr", "exit.max_psnr_drop")
MIN_PSNR_BISECTIONS = 5
# The fixed families are named after the registered policies they run.
FULL_DEPTH = policies.full_depth().name
STATIC = policies.for_value("depth").name
TIME_SCHEDULE = policies.for_value("schedule").name
FAMILIES = ("learned", TIME_SCHEDULE, STATIC, "fewer_steps", f"{STATIC}_fewer_steps", "l2c")


def _threshold_policy(policy: str) -> bool:
  """True for a runnable policy set by a threshold."""
  p = policies.get(policy)
  return p.has_threshold and p.runnable


class TuneError(ValueError):
  """A tune request that cannot be met or a tuned file that cannot be applied (one line)."""


@dataclasses.dataclass(frozen=True)
class TuneRequest:
  """What --mode tune reads from the config, once, at its edge."""
  budget: float
  min_psnr: float
  calibration_images: int
  heldout_images: int
  buckets: int
  timing_repeats: int
  calibration_seed: int
  heldout_seed: int
  batch_size: int
  steps: int
  families: tuple = ()
  budgets: tuple = ()         # tune.budgets (several in one run), else (budget,) or () for min_psnr
  out: str = ""               # tune.out (may hold {budget})

  @classmethod
  def from_config(cls, config) -> "TuneRequest":
    t = config.tune
    budget, min_psnr = float(t.budget), float(t.min_psnr)
    budgets = _parse_budgets(str(t.get("budgets", "") or ""))
    if sum((budget > 0, min_psnr > 0, bool(budgets))) != 1:
      raise TuneError("--mode tune needs exactly one of tune.budget (a GFLOPs fraction, e.g. "
                      "--config.tune.budget=0.55), tune.budgets (several, e.g. --config.tune.budgets=0.4,0.55,0.7) "
                      "and tune.min_psnr (dB, e.g. --config.tune.min_psnr=35)")
    if budget > 1:
      raise TuneError(f"tune.budget is a fraction of the full-depth GFLOPs in (0, 1], got {budget}")
    if budgets and len(budgets) > 1 and str(t.out).strip() and "{budget}" not in str(t.out):
      raise TuneError(f"tune.out={t.out!r} would hold every budget's file in one; put {{budget}} in it "
                      "(e.g. --config.tune.out=results/tuned_{budget}.json)")
    if budget > 0:
      budgets = (budget,)
    held = int(t.heldout_images) or int(config.sweep.num_images)
    families = tuple(f.strip() for f in str(t.families).split(",") if f.strip())
    bad = [f for f in families if f not in FAMILIES]
    if bad:
      raise TuneError(f"tune.families has {bad[0]!r}; choose among {', '.join(FAMILIES)} (empty: all)")
    cal = int(t.calibration_images)
    if cal < 2 or held < 2:
      raise TuneError(f"tune.calibration_images and the held-out count must be >= 2, got {cal} and {held}")
    return cls(budget=budget, min_psnr=min_psnr, calibration_images=cal, heldout_images=held,
               buckets=max(1, min(int(t.buckets), int(config.sample.steps))),
               timing_repeats=max(1, int(t.timing_repeats)),
               calibration_seed=int(config.sweep.calibration_seed),
               heldout_seed=int(config.sample.seed), batch_size=int(config.sample.batch_size),
               steps=int(config.sample.steps), families=families, budgets=budgets, out=str(t.out).strip())


def _parse_budgets(text: str) -> tuple:
  """tune.budgets: distinct fractions in (0, 1], in the order given."""
  out = []
  for item in (v.strip() for v in text.split(",")):
    if not item:
      continue
    try:
      b = float(item)
    except ValueError:
      raise TuneError(f"tune.budgets has {item!r}, not a number; give fractions like 0.4,0.55,0.7") from None
    if not 0 < b <= 1:
      raise TuneError(f"tune.budgets holds fractions of the full-depth GFLOPs in (0, 1], got {b:g}")
    if b not in out:
      out.append(b)
  return tuple(out)


@dataclasses.dataclass
class Candidate:
  """One point of the search: a setting, the config keys that reproduce it, its measurement."""
  family: str                 # coarse family: learned, time_schedule, static, fewer_steps, static_fewer_steps, l2c
  setting: Setting
  overrides: dict
  aggregate: str = "all"
  extra: dict = dataclasses.field(default_factory=dict)   # other config keys the run needs (l2c)
  psnr: Optional[float] = None                           # on the calibration images
  gflops_ratio: Optional[float] = None
  layer_ratio_run: Optional[float] = None

  def label(self) -> str:
    text = self.setting.label()
    if self.family == "learned":
      text += f" aggregate={self.aggregate}"
    return text

  def key(self) -> str:
    """What the candidate runs, as text: two candidates with the same key give the same images."""
    return json.dumps([self.overrides, self.aggregate, self.extra], sort_keys=True, default=str)

  def to_json(self) -> dict:
    """Everything that rebuilds this candidate with its measurement (eval/tune_journal.py)."""
    return {"family": self.family, "setting": dataclasses.asdict(self.setting), "overrides": self.overrides,
            "aggregate": self.aggregate, "extra": self.extra, "psnr": self.psnr,
            "gflops_ratio": self.gflops_ratio, "layer_ratio_run": self.layer_ratio_run}

  @classmethod
  def from_json(cls, d: dict) -> "Candidate":
    return cls(d["family"], Setting(**d["setting"]), dict(d["overrides"]), aggregate=d["aggregate"],
               extra=dict(d["extra"]), psnr=d["psnr"], gflops_ratio=d["gflops_ratio"],
               layer_ratio_run=d["layer_ratio_run"])

  def record(self) -> dict:
    return {"family": self.family, "setting": self.label(), "overrides": self.overrides,
            "calibration_psnr": self.psnr, "calibration_gflops_ratio": self.gflops_ratio,
            "calibration_layer_ratio_run": self.layer_ratio_run}


# ----------------------------------------------------------------------------- overrides

def overrides_of(setting: Setting, aggregate: str, steps: int, min_layers: int) -> dict:
  """The config keys (resolved values) that make --mode sample run `setting`."""
  out: dict[str, Any] = {"exit.policy": setting.policy, "sample.steps": int(setting.steps or steps)}
  if _threshold_policy(setting.policy):
    if setting.threshold_schedule is not None:
      out.update({"exit.threshold_schedule": setting.threshold_schedule})
    else:
      out.update({"exit.threshold": float(setting.threshold), "exit.threshold_schedule": ""})
    out["exit.aggregate"] = aggregate
  elif policies.get(setting.policy).value == "depth":
    out["exit.depth"] = int(setting.depth)
  elif policies.get(setting.policy).value == "schedule":
    out["exit.schedule"] = setting.schedule
  out["exit.min_layers"] = int(min_layers)
  return out


def _set(config, key: str, value, where: str) -> None:
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    if p not in node:
      raise TuneError(f"{where} has unknown config key {key!r}; it was written for another version")
    node = node[p]
  if leaf not in node:
    raise TuneError(f"{where} has unknown config key {key!r}; it was written for another version")
  default = node[leaf]
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise TuneError(f"{where}: {key}={value!r} does not fit the config ({' '.join(str(e).split())})") from None


def apply_overrides(config, overrides: dict, *, where: str = "tune.file", base_dir: str = ""):
  """A copy of `config` with `overrides` applied and every calibration target zeroed (a tuned
  setting is resolved: nothing is recalibrated). Keys ending in `.router` are paths relative to
  `base_dir`. Raises TuneError for a key the config does not have."""
  from deediff_jax.config import validate
  out = config.copy_and_resolve_references()
  for key in CALIBRATION_TARGET_KEYS:
    _set(out, key, 0.0, where)
  for key, value in overrides.items():
    if key.endswith(".router") and value and base_dir and not os.path.isabs(str(value)):
      value = os.path.normpath(os.path.join(base_dir, str(value)))
    _set(out, key, value, where)
  out.tune.file = ""
  return validate(out)


def read_file(path: str) -> dict:
  if not os.path.isfile(path):
    raise TuneError(f"tune.file {path!r} does not exist; write it with --mode tune (DIR/{TUNED_FILE})")
  try:
    with open(path) as f:
      tuned = json.load(f)
  except ValueError as e:
    raise TuneError(f"tune.file {path} is not JSON ({' '.join(str(e).split())})") from None
  if not isinstance(tuned, dict) or not isinstance(tuned.get("overrides"), dict):
    raise TuneError(f"tune.file {path} has no 'overrides' object; write it with --mode tune")
  return tuned


def wanted(config) -> bool:
  return bool(str(config.tune.file).strip())


def apply_file(config):
  """(config with tune.file's overrides applied, the tuned file's contents); see the module doc."""
  path = str(config.tune.file)
  tuned = read_file(path)
  return apply_overrides(config, tuned["overrides"], where=f"tune.file {path}",
                         base_dir=os.path.dirname(os.path.abspath(path))), tuned


def tuned_setting(tuned_config, base_steps: int) -> Setting:
  """The sweep Setting a tuned config runs (fewer steps: `steps`; policy none: the plain forward)."""
  s = setting_from_exit_config(tuned_config)
  steps = int(tuned_config.sample.steps)
  if steps != int(base_steps):
    s = dataclasses.replace(s, steps=steps, plain=s.policy == FULL_DEPTH)
  return s


# ----------------------------------------------------------------------------- measuring

class _Measure:
  """Runs candidates on one Context (calibration or held-out), one context per aggregate."""

  def __init__(self, ctx: runner.Context):
    self.base = ctx
    self.by_aggregate: dict = {str(ctx.config.exit.aggregate): ctx}

  def ctx_for(self, cand: Candidate) -> runner.Context:
    if cand.extra:
      return self._variant(cand.aggregate, cand.extra)
    if cand.aggregate not in self.by_aggregate:
      self.by_aggregate[cand.aggregate] = self._variant(cand.aggregate, {})
    return self.by_aggregate[cand.aggregate]

  def _variant(self, aggregate: str, extra: dict) -> runner.Context:
    c = self.base.config.copy_and_resolve_references()
    c.exit.aggregate = aggregate
    for key, value in extra.items():
      _set(c, key, value, "the tune search")
    return dataclasses.replace(self.base, config=c, fidelity_config=specs.deterministic_config(c)
                               if self.base.fidelity_config is not self.base.config else c, compiled=set())

  def __call__(self, cand: Candidate) -> tuple:
    row, images, stats = runner.evaluate(self.ctx_for(cand), cand.setting)
    return row, images, stats


def _measure_calibration(measure: _Measure, cand: Candidate, memo: Optional[dict] = None) -> Candidate:
  """Measures `cand` on the calibration images (once per `Candidate.key` when given a memo: the
  runs are deterministic, so a repeat would give the same numbers)."""
  key = cand.key()
  if memo is None or key not in memo:
    row, _, _ = measure(cand)
    got = (row["psnr_vs_full"], row["gflops_ratio"], row["layer_ratio_run"])
    if memo is None:
      cand.psnr, cand.gflops_ratio, cand.layer_ratio_run = got
      return cand
    memo[key] = got
  cand.psnr, cand.gflops_ratio, cand.layer_ratio_run = memo[key]
  return cand


def paired_speedup(params, config, cand: Candidate, cond: dict, rng, repeats: int) -> dict:
  """Wall clock of the candidate against the plain full-depth sampler at config.sample.steps on
  one batch of sample.batch_size images: compiled first, then `repeats` pairs, alternating which
  runs first. Returns the median of full/candidate and its min and max."""
  from deediff_jax.eval.runner import with_steps
  num = int(config.sample.batch_size)
  cond = {k: (None if v is None else (v[:num] if k != "null_context" else v)) for k, v in cond.items()}
  cfg_c = config.copy_and_resolve_references()
  cfg_c.exit.aggregate = cand.aggregate
  for key, value in cand.extra.items():
    _set(cfg_c, key, value, "the tune timing")
  cfg_c = with_steps(cfg_c, cand.setting.steps)
  n = ModelConfig.from_config(config.model).num_blocks
  if cand.setting.plain:
    kw_c = dict(plain=True)
  else:
    kw_c = dict(policy=cand.setting.policy,
                policy_params=cand.setting.policy_params(n, int(config.exit.min_layers)))
    if cand.setting.cache_threshold is not None:   # Learning-to-Cache: its reuse schedule
      from deediff_jax.eval import cache_rows
      kw_c["reuse"] = cache_rows.reuse_for(CacheSpec.from_config(cfg_c), cand.setting.cache_threshold, n)
  runs = [(config, dict(plain=True)), (cfg_c, kw_c)]
  for c, kw in runs:
    sampling.sample(params, c, rng, num, compile_only=True, **kw, **cond)
    sampling.sample(params, c, rng, num, **kw, **cond)   # one untimed run: caches, allocations
  full, candidate = [lambda c=c, kw=kw: sampling.sample(params, c, rng, num, **kw, **cond) for c, kw in runs]
  return {**sampling.paired_speedup(full, candidate, repeats), "timing_batch_size": num,
          "timing_repeats": repeats}


# ----------------------------------------------------------------------------- the search

def _layer_target(cfg: ModelConfig, budget: float, steps: int, policy: str, cfg_factor: int) -> float:
  """The layer ratio whose predicted GFLOPs ratio (every step running that share of the blocks,
  with the policy's monitors and one head) is the budget."""
  full = flops_lib.full_depth_flops_per_image(cfg, steps, cfg_factor=cfg_factor)
  n = cfg.num_blocks

  def ratio(t):
    return flops_lib.early_exit_flops_per_image(cfg, t * n, policy=policy, steps=steps,
                                                cfg_factor=cfg_factor) / full
  lo, hi = 1.0 / n, 1.0
  if ratio(lo) > budget:
    return lo
  for _ in range(30):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if ratio(mid) <= budget else (lo, mid)
  return lo


def _static_ratio(cfg: ModelConfig, depth: int, steps: int, full_steps: int, cfg_factor: int) -> float:
  full = flops_lib.full_depth_flops_per_image(cfg, full_steps, cfg_factor=cfg_factor)
  return flops_lib.early_exit_flops_per_image(cfg, depth, policy=STATIC, steps=steps,
                                              cfg_factor=cfg_factor) / full


def _fit(make: Callable[[float], Optional[Candidate]], measure: Callable[[Candidate], Candidate],
         budget: float, t0: float, tried: list) -> None:
  """Calibrates at layer-ratio target t, measures; while over the budget, lowers t by the overshoot."""
  t = t0
  for _ in range(MAX_FITS):
    if t <= 0:
      return
    try:
      cand = make(t)
    except cal_spec.CalibrationError:
      return
    if cand is None:
      return
    measure(cand)
    tried.append(cand)
    if cand.gflops_ratio <= budget:
      return
    t -= (cand.gflops_ratio - budget) + 0.01


def _target_request(request: cal_spec.CalibrationSpec, target: float, aggregate: str) -> cal_spec.CalibrationSpec:
  """The calibration request of one learned candidate: its own layer-ratio target and aggregate."""
  return dataclasses.replace(request, target_layer_ratio=float(target), min_psnr=0.0, max_psnr_drop=0.0,
                             calibrate="policy", aggregate=aggregate, metric="layer_ratio_run")


def _l2c_candidates(config, steps: int, min_layers: int) -> list:
  """The caching family (Learning-to-Cache), searched when cache.router is set: one full-depth
  candidate per sweep.cache_thresholds value (else cache.threshold), each a fixed cost, measured
  like the sweep's l2c rows (the runner builds the reuse schedule of `Setting.cache_threshold`)."""
  if not str(config.cache.router).strip():
    return []
  router = os.path.abspath(str(config.cache.router))
  text = str(config.sweep.cache_thresholds) or str(config.cache.threshold)
  out = []
  for t in dict.fromkeys(float(v) for v in text.split(",") if v.strip()):
    keys = {"cache.policy": "l2c", "cache.router": router, "cache.threshold": t}
    s = Setting(FULL_DEPTH, cache_threshold=t)
    out.append(Candidate("l2c", s, {"exit.policy": FULL_DEPTH, "sample.steps": int(steps),
                                    "exit.min_layers": int(min_layers), **keys},
                         extra={"cache.router": router}))
  return out


def search_tasks(config, params, req: TuneRequest, budget: float, cctx: runner.Context,
                 measure_fn: Callable[[Candidate], Candidate]) -> list:
  """[(name, task)]: each task appends its candidates (measured on calibration noise) to a list;
  only the families in tune.families when it is set."""
  cfg = ModelConfig.from_config(config.model)
  n, steps = cfg.num_blocks, req.steps
  cf = 2 if float(config.sample.guidance_scale) != 0.0 else 1
  min_layers = int(config.exit.min_layers)
  cal_num = min(req.batch_size, req.calibration_images)
  request = specs.calibration_spec(config)
  rng = cal_spec.calibration_rng(request.seed)
  tasks = []

  def plain_steps(k):
    s = Setting(FULL_DEPTH, steps=k, plain=True)
    return Candidate("fewer_steps", s, overrides_of(s, "all", steps, min_layers))

  def fewer(tried):
    k = int(math.floor(budget * steps + 1e-9))
    for kk in sorted({k, k - 1} & set(range(1, steps))):
      tried.append(measure_fn(plain_steps(kk)))
  tasks.append(("fewer_steps", "fewer steps", fewer))

  def deepest(k):
    ds = [d for d in range(max(1, min_layers), n + 1) if _static_ratio(cfg, d, k, steps, cf) <= budget + 1e-12]
    return max(ds) if ds else None

  def static(tried):
    d = deepest(steps)
    if d is not None and d < n:
      s = Setting(STATIC, depth=d)
      tried.append(measure_fn(Candidate(STATIC, s, overrides_of(s, "all", steps, min_layers))))
  tasks.append((STATIC, STATIC, static))

  def combo(tried):
    ks = sorted({int(round(f * steps)) for f in COMBO_STEP_FRACTIONS} - {steps})
    for k in ks:
      if k < 1 or k <= budget * steps:
        continue
      d = deepest(k)
      if d is not None:
        s = Setting(STATIC, depth=d, steps=k)
        tried.append(measure_fn(Candidate(f"{STATIC}_fewer_steps", s, overrides_of(s, "all", steps, min_layers))))
  tasks.append((f"{STATIC}_fewer_steps", f"{STATIC} + fewer steps", combo))

  def schedule(tried):
    def make(t):
      t = min(1.0, t)
      sched, report = calibrate_time_schedule(params, request, rng, target=t, buckets=req.buckets, num=cal_num)
      s = Setting(TIME_SCHEDULE, schedule=",".join(str(v) for v in sched), calibration=report)
      return Candidate(TIME_SCHEDULE, s, overrides_of(s, "all", steps, min_layers))
    _fit(make, measure_fn, budget, _layer_target(cfg, budget, steps, TIME_SCHEDULE, cf), tried)
  tasks.append((TIME_SCHEDULE, f"{TIME_SCHEDULE} (calibrated)", schedule))

  if "exit_heads" in params or "ltes" in params:
    policy = policies.learned_for(cfg).name
    for aggregate in ("all", "last"):
      for buckets in sorted({1, req.buckets}):
        def learned(tried, aggregate=aggregate, buckets=buckets):
          def make(t):
            target = _target_request(request, min(1.0, t), aggregate)
            thr, report = calibrate_threshold(params, target, rng, policy=policy, num=cal_num, buckets=buckets)
            s = (Setting(policy, threshold_schedule=schedule_text(thr), calibration=report)
                 if isinstance(thr, (list, tuple)) else Setting(policy, threshold=float(thr), calibration=report))
            return Candidate("learned", s, overrides_of(s, aggregate, steps, min_layers), aggregate=aggregate)
          t0 = _layer_target(cfg, budget, steps, policy, cf) - float(config.exit.calibration_tolerance)
          _fit(make, measure_fn, budget, t0, tried)
        tasks.append(("learned", f"{policy} {'per bucket' if buckets > 1 else 'scalar'} aggregate={aggregate}",
                      learned))

  l2c = _l2c_candidates(config, steps, min_layers)
  if l2c:
    # One task for every threshold, named by the thresholds: the journal keys a task by (budget,
    # name), so one task per threshold under one name would replay the first threshold's result
    # for all of them, and another threshold list must not replay this one's (the journal's
    # fingerprint leaves sweep.cache_thresholds out so that only this task is measured anew).
    name = "l2c thresholds " + ",".join(f"{c.setting.cache_threshold:g}" for c in l2c)
    tasks.append(("l2c", name, lambda tried: tried.extend(measure_fn(c) for c in l2c)))
  names = [name for _, name, _ in tasks]
  assert len(set(names)) == len(names), f"tune task names must be unique (the journal's keys): {names}"
  return [(name, task) for family, name, task in tasks if not req.families or family in req.families]


def pick(cands: list, budget: float, min_psnr: float) -> tuple:
  """(best, runner-up) among measured candidates: the highest calibration PSNR with GFLOPs ratio
  <= budget (min_psnr: the lowest GFLOPs ratio with PSNR >= min_psnr); the runner-up is the best
  point of another family (else the next best). (None, None) when nothing qualifies."""
  if min_psnr > 0:
    ok = [c for c in cands if c.psnr is not None and c.psnr >= min_psnr]
    key = lambda c: (-c.gflops_ratio, c.psnr)
  else:
    ok = [c for c in cands if heldout.admits(c.gflops_ratio, budget)]
    key = lambda c: (c.psnr, -c.gflops_ratio)
  if not ok:
    return None, None
  ok = sorted(ok, key=key, reverse=True)
  best = ok[0]
  others = [c for c in ok[1:] if c.family != best.family] or ok[1:]
  return best, (others[0] if others else None)


def _search(config, params, req: TuneRequest, budget: float, cmeasure, bar, label: str,
            journal: Optional[tune_journal.Journal] = None) -> list:
  """Every search task at `budget`; a task the journal holds is replayed, any other is run and recorded."""
  tried: list = []
  tasks = search_tasks(config, params, req, budget, None, cmeasure)
  bar.total = (bar.total or 0) + len(tasks)
  bar.refresh()
  for name, task in tasks:
    bar.set_postfix_str(f"{label}{name}")
    done = journal.task(budget, name) if journal is not None else None
    if done is not None:
      tried += [Candidate.from_json(d) for d in done]
    else:
      got: list = []
      task(got)
      tried += got
      if journal is not None:
        journal.record_task(budget, name, [c.to_json() for c in got])
    bar.update(1)
  return tried


# ----------------------------------------------------------------------------- the mode

def _validate(measure: _Measure, cand: Candidate, ctx: runner.Context) -> tuple:
  row, _, stats = measure(cand)
  per_image = np.asarray(stats["per_image_psnr"], np.float64)
  mean, lo, hi = bootstrap.mean_ci(per_image)
  out = {"psnr": mean, "psnr_ci": [lo, hi], "fid": row["fid"], "class_accuracy": row["class_accuracy"],
         "gflops_ratio": row["gflops_ratio"], "layer_ratio_run": row["layer_ratio_run"],
         "num_images": int(ctx.num), "seed": int(ctx.config.sample.seed)}
  return out, per_image


def _describe(cand: Candidate) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in cand.overrides.items())


def run(config, workdir: str, *, params=None, progress: bool = True) -> dict:
  """Searches, picks, validates; writes DIR/tuned.json and DIR/tune_candidates.json; returns the
  tuned dict. With tune.budgets: one file pair per budget, and {budget: tuned dict}."""
  req = TuneRequest.from_config(config)
  runner.check_local(workdir)
  cfg = ModelConfig.from_config(config.model)
  cf = 2 if float(config.sample.guidance_scale) != 0.0 else 1
  floor = _static_ratio(cfg, int(config.exit.min_layers), 1, req.steps, cf)
  low = [b for b in req.budgets if b < floor]
  if low:
    key = f"tune.budgets has {low[0]:g}, which" if len(req.budgets) > 1 else f"tune.budget={low[0]:g}"
    raise TuneError(f"{key} is below the cheapest runnable setting ({floor:.4f} of the full GFLOPs: "
                    f"{int(config.exit.min_layers)} block(s) at 1 step); raise it")
  several = len(req.budgets) > 1
  step = None
  if params is None:
    params, step = runner.load_checkpoint(config, workdir)
  journal = tune_journal.Journal(workdir, tune_journal.fingerprint(params, config))
  if journal.replaced:
    tqdm.write(f"tune: {journal.path} is from other parameters or settings; starting the search over")
  elif journal.resumed:
    tqdm.write(f"tune: resuming from {journal.path}: {len(journal.tasks)} search task(s) and "
               f"{len(journal.heldout)} held-out validation(s) are done")
  bar = tqdm(total=2 + max(1, len(req.budgets)), desc="tune", unit="task", disable=not progress)
  bar.set_postfix_str("held-out full depth and scorer")
  ctx = runner.prepare(config, workdir, num=req.heldout_images, params=params, step=step)
  bar.update(1)
  bar.set_postfix_str("calibration full depth")
  cctx = heldout.calibration_context(ctx, req.calibration_images)
  cmeasure_, calibration_memo = _Measure(cctx), {}
  cmeasure = lambda cand: _measure_calibration(cmeasure_, cand, calibration_memo)
  bar.update(1)
  validate = _HeldOut(params, config, ctx, req.timing_repeats, journal)

  if req.min_psnr > 0:
    tried = _search_min_psnr(config, params, req, cmeasure, bar, journal)
    out = _finish(workdir, req, None, tried, validate, ctx, bar)
  else:
    out = {}
    for b in req.budgets:
      tried = _search(config, params, req, b, cmeasure, bar, f"budget {b:g}: " if several else "", journal)
      out[b] = _finish(workdir, req, b, tried, validate, ctx, bar)
    out = out if several else out[req.budgets[0]]
  bar.close()
  return out


class _HeldOut:
  """Validates a candidate on the held-out images (PSNR with its interval, FID, accuracy) and times
  it against full depth, once per `Candidate.key` (tune.budgets: a runner-up shared by budgets)."""

  def __init__(self, params, config, ctx: runner.Context, repeats: int,
               journal: Optional[tune_journal.Journal] = None):
    self.params, self.config, self.ctx, self.repeats = params, config, ctx, repeats
    self.measure = _Measure(ctx)
    self.journal = journal
    self.done: dict = {}

  def __call__(self, cand: Candidate) -> tuple:
    key = cand.key()
    if key not in self.done and self.journal is not None and self.journal.validation(key) is not None:
      self.done[key] = self.journal.validation(key)
    if key not in self.done:
      h, per_image = _validate(self.measure, cand, self.ctx)
      h.update(paired_speedup(self.params, self.config, cand, self.ctx.cond, self.ctx.rng, self.repeats))
      self.done[key] = (h, per_image)
      if self.journal is not None:
        self.journal.record_validation(key, h, per_image)
    h, per_image = self.done[key]
    return dict(h), per_image


def _out_path(out: str, workdir: str, budget: Optional[float], several: bool) -> tuple:
  """(tuned file, candidates file) of one budget."""
  tag = f"{budget:g}" if budget is not None else ""
  if out:
    path = out.replace("{budget}", tag)
  else:
    path = os.path.join(str(workdir), f"tuned_{tag}.json" if several else TUNED_FILE)
  cands = os.path.join(str(workdir), f"tune_candidates_{tag}.json" if several else CANDIDATES_FILE)
  return path, cands


def _finish(workdir: str, req: TuneRequest, budget: Optional[float], tried: list,
            validate: _HeldOut, ctx: runner.Context, bar) -> dict:
  """Picks among `tried`, validates the pick and its runner-up on held-out noise, writes the files."""
  several = len(req.budgets) > 1
  best, second = pick(tried, budget or 0.0, req.min_psnr)
  if best is None:
    bar.close()
    cheapest = min((c.gflops_ratio for c in tried if c.gflops_ratio is not None), default=float("nan"))
    if req.min_psnr > 0:
      top = max((c.psnr for c in tried if c.psnr is not None), default=float("nan"))
      raise TuneError(f"no setting reaches tune.min_psnr={req.min_psnr:g} dB on the calibration images "
                      f"(the best reached {top:.1f} dB); lower tune.min_psnr")
    raise TuneError(f"no runnable setting fits tune.budget={budget:g} of the full GFLOPs (the cheapest "
                    f"candidate needs {cheapest:.3f}); raise tune.budget" + ("s" if several else ""))

  bar.set_postfix_str((f"budget {budget:g}: " if several else "") + "held-out validation")
  best_h, best_pi = validate(best)
  runner_up = None
  if second is not None:
    second_h, second_pi = validate(second)
    diff, lo, hi = bootstrap.paired_diff_ci(best_pi, second_pi)
    runner_up = {"overrides": second.overrides, "setting": second.label(), "family": second.family,
                 "gflops_ratio": second_h.pop("gflops_ratio"), "heldout": second_h,
                 "calibration": {"psnr": second.psnr, "gflops_ratio": second.gflops_ratio},
                 "diff": diff, "diff_ci": [lo, hi]}
  bar.update(1)
  tuned = {
      "overrides": best.overrides, "setting": best.label(), "family": best.family,
      "gflops_ratio": best_h.pop("gflops_ratio"), "heldout": best_h, "runner_up": runner_up,
      "calibration": {"psnr": best.psnr, "gflops_ratio": best.gflops_ratio},
      "full": {"fid": ctx.quality_full.get("fid"), "class_accuracy": ctx.quality_full.get("class_accuracy")},
      "budget": budget, "min_psnr": req.min_psnr or None,
      "batch_size": req.batch_size, "steps": req.steps,
      "calibration_images": req.calibration_images, "heldout_images": req.heldout_images,
      "calibration_seed": req.calibration_seed, "heldout_seed": req.heldout_seed,
  }
  path, cands_path = _out_path(req.out, workdir, budget, several)
  _write_json(path, _relative_paths(tuned, os.path.dirname(os.path.abspath(path))))
  _write_json(cands_path, [c.record() for c in tried])
  h = tuned["heldout"]
  tqdm.write(f"tune: {f'at {budget:g} of the GFLOPs, ' if several else ''}use {_describe(best)} ({best.label()}): "
             f"{tuned['gflops_ratio']:.0%} of the full GFLOPs, "
             f"{h['speedup']:.2f}x faster at batch {req.batch_size}, PSNR vs full {h['psnr']:.1f} dB "
             f"[{h['psnr_ci'][0]:.1f}, {h['psnr_ci'][1]:.1f}] on {h['num_images']} held-out images"
             + (f", classifier-FID {h['fid']:.2f}" if h.get("fid") is not None else "")
             + (f", accuracy {h['class_accuracy']:.3f}" if h.get("class_accuracy") is not None else "")
             + f"; written to {path} (apply with --config.tune.file={path})")
  return tuned


def _search_min_psnr(config, params, req: TuneRequest, cmeasure, bar,
                     journal: Optional[tune_journal.Journal] = None) -> list:
  """The smallest budget whose best calibration PSNR reaches min_psnr, by bisection on the budget;
  every candidate measured on the way is returned (pick() then takes the cheapest that reaches it)."""
  tried: list = []
  lo, hi = 0.0, 1.0
  for i in range(MIN_PSNR_BISECTIONS):
    mid = 0.5 * (lo + hi)
    got = _search(config, params, req, mid, cmeasure, bar, f"budget {mid:.2f}: ", journal)
    tried += got
    best = max((c.psnr for c in got if heldout.admits(c.gflops_ratio, mid)), default=-math.inf)
    lo, hi = (lo, mid) if best >= req.min_psnr else (mid, hi)
  return tried


def _relative_paths(obj, base_dir: str):
  if isinstance(obj, dict):
    return {k: (os.path.relpath(v, base_dir) if k.endswith(".router") and isinstance(v, str) and v
                else _relative_paths(v, base_dir)) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_relative_paths(v, base_dir) for v in obj]
  return obj


def _write_json(path: str, obj) -> None:
  from deediff_jax.eval.report import write_json
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_json(path, obj)


__all__ = ["apply_file", "apply_overrides", "Candidate", "overrides_of", "paired_speedup", "pick", "read_file",
           "run", "search_tasks", "TuneError", "TuneRequest", "tuned_setting", "wanted", "TUNED_FILE"]
