"""The sweep's settings: `Setting` (one exit policy and the value it is swept over) and the parsing
of `config.sweep` (`settings_from_config`) and `config.exit` (`setting_from_exit_config`) into
settings, with each setting's traced policy values (`Setting.policy_params`, and `cheap_params` for
the compiling warm-up). Nothing here samples; what each policy sweeps over is eval/sweep.py's doc.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from deediff_jax.config import (POLICIES, SCORE_POLICIES, UEM_POLICIES, parse_depth_schedule, parse_floats,
                                parse_threshold_schedule)
from deediff_jax.early_exit import make_policy_params, policy_params_for
from deediff_jax.eval import cache_rows
from deediff_jax.eval import calibrate as cal_lib
from deediff_jax.eval.cache_rows import CACHE_ROWS
from deediff_jax.model.uvit import ModelConfig

DEFAULT_POLICIES = "uem,static,time_schedule,state_cosine,oracle,none"   # base_config's sweep.policies
THRESHOLD_KEYS = {             # policy -> (its sweep values key, an example)
    "uem": ("sweep.thresholds", "0.05,0.1,0.2"), "uem_no_time": ("sweep.thresholds", "0.05,0.1,0.2"),
    "state_cosine": ("sweep.cosine_thresholds", "0.9,0.95,0.99"),
    "adadiff": ("sweep.confidence_thresholds", "0.85,0.9,0.95"),
    "oracle": ("sweep.oracle_tolerances", "0.01,0.03,0.1"),
}


class SweepError(ValueError):
  """A sweep that cannot run as configured (one line naming the problem and the fix)."""


@dataclasses.dataclass
class Setting:
  """One exit setting: a policy and the value it is swept over."""
  policy: str
  threshold: Optional[float] = None      # uem / uem_no_time / state_cosine
  threshold_schedule: Optional[str] = None  # the same, one threshold per timestep bucket ("0.1,0.2")
  depth: Optional[int] = None            # static
  schedule: Optional[str] = None         # time_schedule, e.g. "3,5,6,9" (noisiest bucket first)
  calibration: Optional[dict] = None     # the calibration report, for a calibrated threshold
  steps: Optional[int] = None            # sampler steps when not sample.steps (fewer-steps rows)
  plain: bool = False                    # the plain full-depth forward (fewer-steps rows)
  cache_threshold: Optional[float] = None  # Learning-to-Cache rows (eval/cache_rows.py): cache.threshold

  @property
  def family(self) -> str:
    """The row's curve: the exit policy, or l2c / l2c+exit for Learning-to-Cache rows."""
    if self.cache_threshold is None:
      return self.policy
    return "l2c" if self.policy == "none" else "l2c+exit"

  @property
  def runnable(self) -> bool:
    """False for the oracle: its cost is what it would run, but it runs every block."""
    return self.policy != "oracle"

  def label(self) -> str:
    if self.policy in SCORE_POLICIES or self.policy == "oracle":
      if self.threshold_schedule is not None:
        text = (f"{self.policy} per bucket "
                + "/".join(f"{v:.3g}" for v in parse_floats(self.threshold_schedule, "threshold_schedule")))
      else:
        text = f"{self.policy} {self.threshold:g}"
      if self.policy == "oracle":
        text += " (ceiling)"
    elif self.policy == "static":
      text = f"static {self.depth}"
    elif self.policy == "time_schedule":
      text = f"time_schedule {self.schedule}"
    else:
      text = self.policy
    if self.cache_threshold is not None:
      text = (f"l2c {self.cache_threshold:g}" if self.policy == "none"
              else f"{text} + l2c {self.cache_threshold:g}")
    if self.calibration is not None:
      text += " (calibrated)"
    if self.steps is not None:
      text += f" @ {self.steps} steps"
    return text

  def policy_params(self, num_blocks: int, min_layers: int = 1) -> dict:
    """The traced policy parameters: `early_exit.policy_params_for`, the one path from a setting
    to them that every mode uses (exit.min_layers applies to every policy, as in --mode sample)."""
    threshold = None
    if self.policy in SCORE_POLICIES or self.policy == "oracle":
      threshold = (parse_threshold_schedule(self.threshold_schedule, self.policy)
                   if self.threshold_schedule is not None else float(self.threshold))
    return policy_params_for(self.policy, num_blocks, threshold=threshold, depth=self.depth,
                             schedule=schedule_depths(self.schedule) if self.schedule else None,
                             min_layers=min_layers)


def schedule_depths(text: str) -> list[int]:
  """The depths of a time-schedule text, e.g. "3,5,6,9" -> [3, 5, 6, 9]."""
  return [int(v) for v in str(text).split(",") if v.strip()]


def default_time_schedules(num_blocks: int) -> list[str]:
  """A few ASE-style schedules, shallow at noisy steps: fractions of N per bucket, noisiest first."""
  n = num_blocks

  def d(frac):
    return max(1, min(n, math.ceil(frac * n - 1e-9)))

  # The last two are DuoDiff switches: a shallow network above a switch time, full depth below.
  candidates = [[d(1 / 3), d(1 / 2), d(2 / 3), n], [d(1 / 2), d(2 / 3), n, n],
                [d(1 / 4), d(1 / 3), d(1 / 2), d(2 / 3), n], [d(1 / 2), n], [d(1 / 3), n]]
  out = []
  for c in candidates:
    text = ",".join(str(v) for v in c)
    if text not in out:
      out.append(text)
  return out


def parse_policies(config, cfg: ModelConfig) -> list[str]:
  names = []
  text = str(config.sweep.policies)
  if cfg.exit_style == "adadiff" and text == DEFAULT_POLICIES:
    text = text.replace("uem,", "adadiff,")  # the default list, for a model whose exits are AdaDiff's
  for name in (s.strip() for s in text.split(",")):
    if not name:
      continue
    if name in CACHE_ROWS:  # Learning-to-Cache rows, not exit policies (eval/cache_rows.py)
      names += [name] if name not in names else []
      continue
    if name not in POLICIES:
      raise SweepError(f"sweep.policies has unknown policy {name!r}; choose among {', '.join(POLICIES)}")
    if name not in names:
      names.append(name)
  if not names:
    raise SweepError(f"sweep.policies is empty; give e.g. --config.sweep.policies=uem,static,none")
  bad = [p for p in names if p in UEM_POLICIES] if cfg.exit_style == "adadiff" else (
      ["adadiff"] if "adadiff" in names else [])
  if bad:
    raise SweepError(f"sweep.policies has {bad[0]}, which this model (model.exit_style={cfg.exit_style}) "
                     f"cannot run; use {'adadiff' if bad[0] != 'adadiff' else 'uem'} instead")
  if "uem_no_time" in names and cfg.uem != "token_linear_no_time":
    raise SweepError("sweep.policies has uem_no_time, which needs a model trained with "
                     "model.uem=token_linear_no_time; drop it from sweep.policies")
  return names


def settings_from_config(config, num_blocks: Optional[int] = None) -> list[Setting]:
  """The sweep's settings, in the order of sweep.policies (see eval/sweep.py's doc)."""
  cfg = ModelConfig.from_config(config.model)
  n = cfg.num_blocks if num_blocks is None else num_blocks
  w = config.sweep
  out: list[Setting] = []
  for policy in parse_policies(config, cfg):
    if policy in CACHE_ROWS:
      out += cache_settings(config, policy)
      continue
    if policy in SCORE_POLICIES or policy == "oracle":
      key, example = THRESHOLD_KEYS[policy]
      values = parse_floats(w[key.split(".")[1]], key)
      if not values:
        raise SweepError(f"{key} is empty but sweep.policies has {policy}; give values like {example}")
      if policy != "state_cosine" and min(values) < 0:
        raise SweepError(f"{key} must be >= 0, got {min(values)}")
      out += [Setting(policy, threshold=float(v)) for v in dict.fromkeys(values)]
    elif policy == "static":
      depths = (list(range(1, n + 1)) if not str(w.depths).strip()
                else parse_depth_schedule(w.depths, n, key="sweep.depths"))
      out += [Setting("static", depth=int(v)) for v in dict.fromkeys(depths)]
    elif policy == "time_schedule":
      texts = ([t for t in str(w.time_schedules).split(";") if t.strip()]
               or default_time_schedules(n))
      scheds = [",".join(str(v) for v in parse_depth_schedule(t, n, key="sweep.time_schedules"))
                for t in texts]
      out += [Setting("time_schedule", schedule=s) for s in dict.fromkeys(scheds)]
    else:
      out.append(Setting("none"))
      out += fewer_steps_settings(config, n)
  return out


def cache_settings(config, family: str) -> list[Setting]:
  """The l2c / l2c+exit rows (eval/cache_rows.py): sweep.cache_thresholds, alone or on top of each
  exit setting of sweep.cache_exits (empty: config.exit's)."""
  cache_rows.check(config)
  thresholds = cache_rows.thresholds(config)
  if family == "l2c":
    return [Setting("none", cache_threshold=v) for v in thresholds]
  cfg = ModelConfig.from_config(config.model)
  exits = []
  for name, value in cache_rows.exit_specs(config) or [(None, None)]:
    if name is None:
      exits.append(setting_from_exit_config(config))
    elif name not in POLICIES:
      raise SweepError(f"sweep.cache_exits has unknown policy {name!r}; choose among {', '.join(POLICIES)}")
    elif name in SCORE_POLICIES or name == "oracle":
      exits.append(Setting(name, threshold=parse_floats(value or "", "sweep.cache_exits")[0]))
    elif name == "static":
      exits.append(Setting(name, depth=parse_depth_schedule(value or "", cfg.num_blocks, key="sweep.cache_exits")[0]))
    elif name == "time_schedule":
      exits.append(Setting(name, schedule=",".join(
          str(v) for v in parse_depth_schedule(value or "", cfg.num_blocks, key="sweep.cache_exits"))))
    else:
      exits.append(Setting(name))
  return [dataclasses.replace(e, cache_threshold=v) for e in exits for v in thresholds]


def fewer_steps_settings(config, num_blocks: int) -> list[Setting]:
  """Plain full-depth rows at sweep.step_fractions of sample.steps, and sweep.combo_depths static
  depths at those step counts that keep >= 60% of the steps (exit on top of fewer steps)."""
  steps = int(config.sample.steps)
  fracs = parse_floats(config.sweep.get("step_fractions", ""), "sweep.step_fractions")
  if any(not 0 < f < 1 for f in fracs):
    raise SweepError(f"sweep.step_fractions must be in (0, 1), got {config.sweep.step_fractions!r}")
  counts = list(dict.fromkeys(max(1, int(round(f * steps))) for f in fracs))
  counts = [c for c in counts if c < steps]
  out = [Setting("none", steps=c, plain=True) for c in counts]
  combo = str(config.sweep.get("combo_depths", "")).strip()
  if combo:
    depths = parse_depth_schedule(combo, num_blocks, key="sweep.combo_depths")
    out += [Setting("static", depth=d, steps=c) for c in counts if c >= 0.6 * steps for d in depths]
  return out


def setting_from_exit_config(config) -> Setting:
  """The one setting config.exit describes (for `--mode eval`)."""
  cfg = ModelConfig.from_config(config.model)
  e = config.exit
  if e.policy in SCORE_POLICIES or e.policy == "oracle":
    if str(e.get("threshold_schedule", "")).strip():
      return Setting(e.policy, threshold_schedule=cal_lib.schedule_text(
          parse_threshold_schedule(e.threshold_schedule, e.policy)))
    return Setting(e.policy, threshold=float(e.threshold))
  if e.policy == "static":
    return Setting("static", depth=int(e.depth) if e.depth > 0 else cfg.num_blocks)
  if e.policy == "time_schedule":
    if not str(e.schedule).strip():  # calibrated later (exit.target_layer_ratio)
      return Setting("time_schedule", schedule=str(cfg.num_blocks))
    return Setting("time_schedule",
                   schedule=",".join(str(v) for v in parse_depth_schedule(e.schedule, cfg.num_blocks)))
  return Setting("none")


CHEAP_THRESHOLD = {"uem": 2.0, "uem_no_time": 2.0,      # u < 2 always
                   "state_cosine": -2.0, "adadiff": -1.0,   # cos > -2, confidence > -1 always
                   "oracle": 1e30}                           # every layer within tolerance


def cheap_params(setting: Setting, n: int, min_layers: int) -> dict:
  """Policy values of the same shapes (a per-bucket threshold stays an array of its length) that
  exit as early as possible: a fast warm-up run that compiles the timed program."""
  if setting.policy in CHEAP_THRESHOLD:
    value = CHEAP_THRESHOLD[setting.policy]
    if setting.threshold_schedule is not None:
      value = [value] * len(parse_floats(setting.threshold_schedule, "threshold_schedule"))
    return make_policy_params(n, threshold=value, min_layers=min_layers)
  if setting.policy == "static":
    return make_policy_params(n, depth=1, min_layers=min_layers)
  if setting.policy == "time_schedule":
    return make_policy_params(n, schedule=[1] * len(schedule_depths(setting.schedule)), min_layers=min_layers)
  return make_policy_params(n, min_layers=min_layers)
