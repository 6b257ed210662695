"""The sweep's settings: `Setting` (one exit policy and the value it is swept over) and the parsing
of `config.sweep` (`settings_from_config`) and `config.exit` (`setting_from_exit_config`) into
settings, with each setting's traced policy values (`Setting.policy_params`, and `cheap_params` for
the compiling warm-up). Nothing here samples; what each policy sweeps over is eval/sweep.py's doc.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from deediff_jax import policies
from deediff_jax.config import base_config, parse_depth_schedule, parse_floats, parse_threshold_schedule
from deediff_jax.early_exit import make_policy_params, policy_params_for
from deediff_jax.eval import cache_rows
from deediff_jax.eval.calibration.describe import schedule_text
from deediff_jax.eval.cache_rows import CACHE_ROWS
from deediff_jax.model.uvit import ModelConfig

DEFAULT_POLICIES = str(base_config().sweep.policies)


class SweepError(ValueError):
  """A sweep that cannot run as configured (one line naming the problem and the fix)."""


@dataclasses.dataclass
class Setting:
  """One exit setting: a policy and the value it is swept over."""
  policy: str
  threshold: Optional[float] = None      # a policy whose value is a threshold
  threshold_schedule: Optional[str] = None  # the same, one threshold per timestep bucket ("0.1,0.2")
  depth: Optional[int] = None            # a policy whose value is a depth
  schedule: Optional[str] = None         # a depth schedule, e.g. "3,5,6,9" (noisiest bucket first)
  calibration: Optional[dict] = None     # the calibration report, for a calibrated threshold
  steps: Optional[int] = None            # sampler steps when not sample.steps (fewer-steps rows)
  plain: bool = False                    # the plain full-depth forward (fewer-steps rows)
  cache_threshold: Optional[float] = None  # Learning-to-Cache rows (eval/cache_rows.py): cache.threshold

  @property
  def family(self) -> str:
    """The row's curve: the exit policy, or l2c / l2c+exit for Learning-to-Cache rows."""
    if self.cache_threshold is None:
      return self.policy
    return "l2c" if policies.get(self.policy).full_depth else "l2c+exit"

  @property
  def exit_policy(self) -> policies.ExitPolicy:
    return policies.get(self.policy)

  @property
  def runnable(self) -> bool:
    """False for the oracle: its cost is what it would run, but it runs every block."""
    return self.exit_policy.runnable

  def label(self) -> str:
    value = self.exit_policy.value
    if value == "threshold":
      if self.threshold_schedule is not None:
        text = (f"{self.policy} per bucket "
                + "/".join(f"{v:.3g}" for v in parse_floats(self.threshold_schedule, "threshold_schedule")))
      else:
        text = f"{self.policy} {self.threshold:g}"
      if not self.runnable:
        text += " (ceiling)"
    elif value == "depth":
      text = f"{self.policy} {self.depth}"
    elif value == "schedule":
      text = f"{self.policy} {self.schedule}"
    else:
      text = self.policy
    if self.cache_threshold is not None:
      text = (f"l2c {self.cache_threshold:g}" if policies.get(self.policy).full_depth
              else f"{text} + l2c {self.cache_threshold:g}")
    if self.calibration is not None:
      text += " (calibrated)"
    if self.steps is not None:
      text += f" @ {self.steps} steps"
    return text

  def policy_params(self, num_blocks: int, min_layers: int = 1, patience: bool = True) -> dict:
    """The traced policy parameters: `early_exit.policy_params_for`, the one path from a setting
    to them that every mode uses (exit.min_layers and exit.patience apply to every policy, as in
    --mode sample)."""
    threshold = None
    if self.exit_policy.value == "threshold":
      threshold = (parse_threshold_schedule(self.threshold_schedule, self.policy)
                   if self.threshold_schedule is not None else float(self.threshold))
    return policy_params_for(self.policy, num_blocks, threshold=threshold, depth=self.depth,
                             schedule=schedule_depths(self.schedule) if self.schedule else None,
                             min_layers=min_layers, patience=patience)


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


def _default_for(name: str, cfg: ModelConfig) -> str:
  """In the default sweep list: a policy this model cannot run gives way to the one that
  `replaces` it and that the model can run (AdaDiff's for an adadiff model's uem)."""
  if policies.get(name).model_problem(cfg) is None:
    return name
  subs = [p.name for p in policies.registered() if p.replaces == name and p.model_problem(cfg) is None]
  return subs[0] if subs else name


def parse_policies(config, cfg: ModelConfig) -> list[str]:
  names = []
  text = str(config.sweep.policies)
  for name in (s.strip() for s in text.split(",")):
    if not name:
      continue
    if name in CACHE_ROWS:  # Learning-to-Cache rows, not exit policies (eval/cache_rows.py)
      names += [name] if name not in names else []
      continue
    if name not in policies.names():
      raise SweepError(f"sweep.policies has unknown policy {name!r}; choose among {', '.join(policies.names())}")
    if text == DEFAULT_POLICIES:
      name = _default_for(name, cfg)
    if name not in names:
      names.append(name)
  if not names:
    raise SweepError(f"sweep.policies is empty; give e.g. --config.sweep.policies=uem,static,none")
  for name in names:
    if name in CACHE_ROWS:
      continue
    problem = policies.get(name).model_problem(cfg)
    if problem:
      raise SweepError(f"sweep.policies has {name}, which this model cannot run ({problem}); drop it "
                       "from sweep.policies")
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
    pol = policies.get(policy)
    if pol.value == "threshold":
      key, example = f"sweep.{pol.sweep_key}", pol.sweep_example
      values = parse_floats(w[pol.sweep_key], key)
      if not values:
        raise SweepError(f"{key} is empty but sweep.policies has {policy}; give values like {example}")
      if not pol.negative_thresholds and min(values) < 0:
        raise SweepError(f"{key} must be >= 0, got {min(values)}")
      out += [Setting(policy, threshold=float(v)) for v in dict.fromkeys(values)]
    elif pol.value == "depth":
      depths = (list(range(1, n + 1)) if not str(w.depths).strip()
                else parse_depth_schedule(w.depths, n, key="sweep.depths"))
      out += [Setting(policy, depth=int(v)) for v in dict.fromkeys(depths)]
    elif pol.value == "schedule":
      texts = ([t for t in str(w.time_schedules).split(";") if t.strip()]
               or default_time_schedules(n))
      scheds = [",".join(str(v) for v in parse_depth_schedule(t, n, key="sweep.time_schedules"))
                for t in texts]
      out += [Setting(policy, schedule=s) for s in dict.fromkeys(scheds)]
    else:
      out.append(Setting(policy))
      if pol.full_depth:
        out += fewer_steps_settings(config, n, policy)
  return out


def cache_settings(config, family: str) -> list[Setting]:
  """The l2c / l2c+exit rows (eval/cache_rows.py): sweep.cache_thresholds, alone or on top of each
  exit setting of sweep.cache_exits (empty: config.exit's)."""
  cache_rows.check(config)
  thresholds = cache_rows.thresholds(config)
  if family == "l2c":
    return [Setting(policies.full_depth().name, cache_threshold=v) for v in thresholds]
  cfg = ModelConfig.from_config(config.model)
  exits = []
  for name, value in cache_rows.exit_specs(config) or [(None, None)]:
    if name is None:
      exits.append(setting_from_exit_config(config))
      continue
    if name not in policies.names():
      raise SweepError(f"sweep.cache_exits has unknown policy {name!r}; choose among {', '.join(policies.names())}")
    kind = policies.get(name).value
    if kind == "threshold":
      exits.append(Setting(name, threshold=parse_floats(value or "", "sweep.cache_exits")[0]))
    elif kind == "depth":
      exits.append(Setting(name, depth=parse_depth_schedule(value or "", cfg.num_blocks, key="sweep.cache_exits")[0]))
    elif kind == "schedule":
      exits.append(Setting(name, schedule=",".join(
          str(v) for v in parse_depth_schedule(value or "", cfg.num_blocks, key="sweep.cache_exits"))))
    else:
      exits.append(Setting(name))
  return [dataclasses.replace(e, cache_threshold=v) for e in exits for v in thresholds]


def fewer_steps_settings(config, num_blocks: int, full_depth_policy: Optional[str] = None) -> list[Setting]:
  """Plain full-depth rows at sweep.step_fractions of sample.steps, and sweep.combo_depths static
  depths at those step counts that keep >= 60% of the steps (exit on top of fewer steps)."""
  full = full_depth_policy or next(p.name for p in policies.registered() if p.full_depth)
  fixed_depth = next(p.name for p in policies.registered() if p.value == "depth")
  steps = int(config.sample.steps)
  fracs = parse_floats(config.sweep.step_fractions, "sweep.step_fractions")
  if any(not 0 < f < 1 for f in fracs):
    raise SweepError(f"sweep.step_fractions must be in (0, 1), got {config.sweep.step_fractions!r}")
  counts = list(dict.fromkeys(max(1, int(round(f * steps))) for f in fracs))
  counts = [c for c in counts if c < steps]
  out = [Setting(full, steps=c, plain=True) for c in counts]
  combo = str(config.sweep.combo_depths).strip()
  if combo:
    depths = parse_depth_schedule(combo, num_blocks, key="sweep.combo_depths")
    out += [Setting(fixed_depth, depth=d, steps=c) for c in counts if c >= 0.6 * steps for d in depths]
  return out


def setting_from_exit_config(config) -> Setting:
  """The one setting config.exit describes (for `--mode eval`)."""
  cfg = ModelConfig.from_config(config.model)
  e = config.exit
  pol = policies.get(e.policy)
  if pol.value == "threshold":
    if str(e.threshold_schedule).strip():
      return Setting(e.policy, threshold_schedule=schedule_text(
          parse_threshold_schedule(e.threshold_schedule, e.policy)))
    return Setting(e.policy, threshold=float(e.threshold))
  if pol.value == "depth":
    return Setting(e.policy, depth=int(e.depth) if e.depth > 0 else cfg.num_blocks)
  if pol.value == "schedule":
    if not str(e.schedule).strip():  # calibrated later (exit.target_layer_ratio)
      return Setting(e.policy, schedule=str(cfg.num_blocks))
    return Setting(e.policy,
                   schedule=",".join(str(v) for v in parse_depth_schedule(e.schedule, cfg.num_blocks)))
  return Setting(e.policy)


def cheap_params(setting: Setting, n: int, min_layers: int, patience: bool = True) -> dict:
  """Policy values of the same shapes (a per-bucket threshold stays an array of its length) that
  exit as early as possible (the policy's `cheap_threshold`, depth 1): a fast warm-up run that
  compiles the timed program."""
  pol = setting.exit_policy
  kw = dict(min_layers=min_layers, patience=patience)
  if pol.value == "threshold":
    value = pol.cheap_threshold
    if setting.threshold_schedule is not None:
      value = [value] * len(parse_floats(setting.threshold_schedule, "threshold_schedule"))
    return make_policy_params(n, threshold=value, **kw)
  if pol.value == "depth":
    return make_policy_params(n, depth=1, **kw)
  if pol.value == "schedule":
    return make_policy_params(n, schedule=[1] * len(schedule_depths(setting.schedule)), **kw)
  return make_policy_params(n, **kw)
