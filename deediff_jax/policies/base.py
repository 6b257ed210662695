"""What an exit policy is: `ExitPolicy`, one object that declares everything about one policy.

A policy is a subclass of `ExitPolicy` with its class attributes set and its decision written
once for the early-exit loop (`confident`) and once for the all-layers reference
(`reference_confident`), registered with `deediff_jax.policies.register`. Every other module
(config validation, the early-exit forward, sampling, the sweep, calibration, FLOPs, the reports)
reads these attributes instead of branching on policy names; docs/policies.md shows how to add one.

This module imports nothing of the package (config.py validates with it) and JAX only inside
the decisions, which run while the early-exit forward is traced.
"""
from __future__ import annotations

from typing import Optional

VALUE_KINDS = ("threshold", "depth", "schedule")


class ExitPolicy:
  """One exit policy. Subclasses set the attributes below and write `confident` /
  `reference_confident`; an instance is registered under `name`."""

  name: str = ""
  summary: str = ""                       # one line: the rule (docs/policies.md, error hints)

  # What the policy is swept and calibrated over: its traced value in `policy_params`.
  value: Optional[str] = None             # "threshold" | "depth" | "schedule" | None (no value)
  # The score compared with the threshold, computed by the early-exit loop for the policy:
  # "uncertainty" (u of the model's UEM), "confidence" (mean of an AdaDiff confidence map), "cosine"
  # (cosine of the new and the previous hidden state); None: no score (depth rules, the oracle).
  score: Optional[str] = None
  exits_when: str = ""                    # "below" | "above": the score vs the threshold
  negative_thresholds: bool = False       # may the threshold be < 0 (cosines may)
  cheap_threshold: Optional[float] = None  # warm-up value that exits at once (compiles the program)
  sweep_key: Optional[str] = None         # config.sweep key of its swept thresholds, e.g. "thresholds"
  sweep_example: str = ""                 # an example value of that key, for error messages
  # Calibration: the threshold is `threshold_at[0]` at aggressiveness a = 0 (never exits) and
  # `threshold_at[1]` at a = 1 (exits as early as exit.min_layers allows), linear in between.
  calibratable: bool = False
  threshold_at: tuple = (0.0, 1.0)
  monitor: Optional[str] = None           # FLOPs of its per-block test: "uncertainty" | "lte" | "cosine" | None

  # What the model must have.
  needs_exit_style: Optional[str] = None  # "deediff" (heads + UEMs) | "adadiff" (LTEs) | None (either)
  needs_uem: Optional[str] = None         # a model.uem kind, when the policy needs that one
  needs_exits: bool = True                # trained exits in the checkpoint (heads / UEMs / LTEs)

  # How it runs.
  runnable: bool = True                   # False: measures a ceiling, saves nothing (the oracle)
  runs_every_block: bool = False          # decides after all blocks ran (`first_exits`), no loop
  needs_x0_scale: bool = False            # its decision needs sigma/alpha of the step
  pairs_decide_together: bool = True      # CFG: a row exits only when its partner row does too
  full_depth: bool = False                # the full-depth row: the sweep adds fewer-steps rows to it
  learned: bool = False                   # a learned exit signal (one family per model in reports)
  replaces: Optional[str] = None          # in the default sweep list, takes this policy's place
                                          # on models that can run it but not the replaced one

  # ------------------------------------------------------------------- derived, shared by all

  @property
  def has_threshold(self) -> bool:
    return self.value == "threshold"

  @property
  def is_score(self) -> bool:
    """Exits on a score vs a threshold inside the loop (not the oracle)."""
    return self.score is not None

  def threshold_of(self, a: float) -> float:
    """Aggressiveness a in [0, 1] -> the threshold (calibration bisects over a)."""
    lo, hi = self.threshold_at
    return float(lo + (hi - lo) * a)

  def model_problem(self, cfg) -> Optional[str]:
    """Why a model (`ModelConfig`) cannot run this policy, or None."""
    if self.needs_exit_style is not None and cfg.exit_style != self.needs_exit_style:
      alternatives = [p.name for p in _alternatives(self, cfg)]
      hint = f"; use --config.exit.policy={alternatives[0]}" if alternatives else ""
      return (f"exit policy {self.name!r} needs model.exit_style={self.needs_exit_style}, this model is "
              f"{cfg.exit_style}{hint}")
    if self.needs_uem is not None and cfg.uem != self.needs_uem:
      return f"exit policy {self.name!r} needs a model built with model.uem={self.needs_uem}"
    return None

  def check_threshold(self, value: float) -> Optional[str]:
    """Why a threshold value is not allowed, or None."""
    if value < 0 and not self.negative_thresholds:
      return f"must be >= 0 for exit policy {self.name}, got {value:g}"
    return None

  # ------------------------------------------------------------------- the decision

  def confident(self, s) -> tuple:
    """Inside the early-exit loop, after block `s.layer` ran -> (confident [B] bool, armed [B]).

    `s` (early_exit.LayerView) holds: i (0-based block), layer (1-based), n (blocks), k
    (in-blocks), b (rows), aggregate, cfg_pairs, pp (policy_params), thr (the threshold of each
    row's timestep bucket; one value under aggregate="mean"), sched_depth (per-row depth of a
    "schedule" value), armed (the [B] flags the previous call returned), and the scores:
    s.score(kind) for kind "uncertainty", "confidence" or "cosine". exit.min_layers, the last block and CFG pairs are
    applied by the loop afterwards.
    """
    raise NotImplementedError(f"exit policy {self.name!r} has no loop decision")

  def reference_confident(self, r):
    """The same decision for every layer at once (early_exit.exit_reference) -> [N, B] bool.

    `r` (early_exit.ReferenceView) holds: layers ([N, 1], 1-based), n, k, b, aggregate,
    cfg_pairs, pp, thr, sched_depth, and the scores for all layers: r.uem() [N, B],
    r.confidence() [N, B], r.cosine() [N, B].
    """
    raise NotImplementedError(f"exit policy {self.name!r} has no reference decision")

  def first_exits(self, eps_all, x0_scale, pp):
    """runs_every_block policies: each row's first exit (0-based) from every layer's output."""
    raise NotImplementedError(f"exit policy {self.name!r} does not decide after all blocks")

  def __repr__(self) -> str:
    return f"<exit policy {self.name}>"


def batch_score(score, aggregate: str):
  """aggregate="mean": one decision on the batch mean; else per row."""
  import jax.numpy as jnp
  return jnp.mean(score) if aggregate == "mean" else score


def reference_batch_score(score, aggregate: str):
  """The same over [N, B] scores: each layer's batch mean under aggregate="mean"."""
  import jax.numpy as jnp
  return jnp.mean(score, axis=1, keepdims=True) if aggregate == "mean" else score


def compare(score, thr, exits_when: str):
  return score < thr if exits_when == "below" else score > thr


_REGISTRY: dict = {}


def _alternatives(policy: ExitPolicy, cfg) -> list:
  """Registered policies of the same family that this model can run (for error hints)."""
  out = []
  for p in _REGISTRY.values():
    if p is policy or p.learned != policy.learned or p.value != policy.value:
      continue
    if (p.needs_exit_style in (None, cfg.exit_style)) and (p.needs_uem in (None, cfg.uem)):
      out.append(p)
  return out


class UnknownPolicy(ValueError):
  """A policy name that is not registered (one line, listing the registered ones)."""


def register(policy: ExitPolicy, *, replace: bool = False) -> ExitPolicy:
  """Adds `policy` under `policy.name` (an instance of an ExitPolicy subclass); returns it."""
  if not isinstance(policy, ExitPolicy) or not policy.name:
    raise TypeError(f"register an instance of an ExitPolicy subclass with a name, got {policy!r}")
  if policy.value not in (None,) + VALUE_KINDS:
    raise ValueError(f"exit policy {policy.name!r}: value must be one of {', '.join(VALUE_KINDS)} or None")
  if policy.is_score and policy.exits_when not in ("below", "above"):
    raise ValueError(f"exit policy {policy.name!r}: exits_when must be 'below' or 'above'")
  if policy.has_threshold and policy.cheap_threshold is None:
    raise ValueError(f"exit policy {policy.name!r}: set cheap_threshold (the warm-up value that exits at once)")
  if policy.name in _REGISTRY and not replace:
    raise ValueError(f"exit policy {policy.name!r} is already registered")
  _REGISTRY[policy.name] = policy
  return policy


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def get(name: str) -> ExitPolicy:
  """The registered policy called `name`; UnknownPolicy (a ValueError) otherwise."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise UnknownPolicy(f"unknown exit policy {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def first(**attributes) -> ExitPolicy:
  """The first registered policy with these attribute values, e.g. first(value="schedule")."""
  for p in _REGISTRY.values():
    if all(getattr(p, k) == v for k, v in attributes.items()):
      return p
  raise UnknownPolicy(f"no registered exit policy has {attributes}")


def full_depth() -> ExitPolicy:
  """The full-depth policy: every block through the early-exit loop (the sweep's reference row)."""
  return first(full_depth=True)


def for_value(kind: str) -> ExitPolicy:
  """The first registered runnable policy set by a value of `kind` ("depth" or "schedule"),
  e.g. the static depth and the time schedule that tune searches as fixed families."""
  return first(value=kind, runnable=True, learned=False)


def learned_for(cfg) -> ExitPolicy:
  """The learned exit a model (`ModelConfig`) runs: among the runnable learned policies the
  model can run, the most specific one (a policy that needs this model's UEM kind first)."""
  fits = [p for p in _REGISTRY.values() if p.learned and p.runnable and p.model_problem(cfg) is None]
  if not fits:
    raise UnknownPolicy(f"no registered learned exit policy runs a model with exit_style={cfg.exit_style}, "
                        f"uem={cfg.uem}")
  return min(fits, key=lambda p: (p.needs_uem is None, p.needs_exit_style is None))


def names() -> tuple:
  """The registered names, in registration order."""
  return tuple(_REGISTRY)


def registered() -> tuple:
  """Every registered policy object, in registration order."""
  return tuple(_REGISTRY.values())


class ScoreThreshold(ExitPolicy):
  """A score policy: exit when `score` passes the threshold (`exits_when`), per row or, under
  aggregate="mean", on the batch mean."""

  value = "threshold"

  def confident(self, s) -> tuple:
    import jax.numpy as jnp
    score = batch_score(s.score(self.score), s.aggregate)
    return jnp.broadcast_to(compare(score, s.thr, self.exits_when), (s.b,)), s.armed

  def reference_confident(self, r):
    return compare(reference_batch_score(r.score(self.score), r.aggregate), r.thr, self.exits_when)
