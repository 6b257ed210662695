"""`CalibrationSpec`: a calibration request, typed and frozen, and the rules that read it.

`eval/specs.calibration_spec(config)` builds it once from the ConfigDict at the edge; everything
in `eval/calibration/` takes it and nothing else. What comes from files (the held-out captions of
a text model, a Learning-to-Cache router, an autoencoder) is bound at the edge as functions that
read only when a calibration needs them, so building a spec costs nothing and fails on nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from deediff_jax import policies
from deediff_jax.config import ModelConfig, SamplerSpec
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.early_exit import by_bucket

METRICS = ("layer_ratio_run", "layer_ratio_per_sample")
CALIBRATION_STREAM = 0xCA1B      # fold_in id of the calibration batch's noise
PSNR_8BIT = 10.0 * math.log10(4.0 / ((2.0 / 255.0) ** 2 / 12.0))
DEFAULT_SCHEDULE_BUCKETS = 4     # timestep buckets of a calibrated time_schedule (exit.calibration_buckets > 1 overrides)


class CalibrationError(ValueError):
  """A calibration request that cannot be met or is inconsistent (one line, with the fix)."""


def _no_conditioning(num: int) -> tuple:
  return None, None, None


def _no_reuse(sampler: SamplerSpec):
  return False


def _no_decoder():
  return None


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
  """What a calibration reads: the model, the sampler, config.exit's request, the calibration
  batch and its seed. The three functions at the end are the edge's lazy readers of files."""
  model: ModelConfig
  sampler: SamplerSpec
  policy: str                       # exit.policy
  aggregate: str = "all"
  min_layers: int = 1
  patience: bool = True
  target_layer_ratio: float = 0.0   # > 0: the layer-ratio target
  calibrate: str = "policy"         # what the ratio target calibrates: policy | time_schedule | guided
  max_psnr_drop: float = 0.0
  min_psnr: float = 0.0
  metric: str = "layer_ratio_run"
  tolerance: float = 0.02
  images: int = 0                   # the calibration batch: exit.calibration_images, else one sampling batch
  buckets: int = 1                  # exit.calibration_buckets (1 = one scalar threshold)
  seed: int = 1                     # sweep.calibration_seed
  # num -> (labels, context, null_context) of `num` evaluation images (data/eval_context.py).
  conditioning: Callable[[int], tuple] = dataclasses.field(default=_no_conditioning, compare=False)
  # a sampler -> its Learning-to-Cache reuse schedule, or False (no cache).
  reuse: Callable[[SamplerSpec], Any] = dataclasses.field(default=_no_reuse, compare=False)
  # () -> latents-to-images decoder of a latent model (eval/decode.py), or None.
  decoder: Callable[[], Optional[Callable]] = dataclasses.field(default=_no_decoder, compare=False)

  @property
  def num_blocks(self) -> int:
    return self.model.num_blocks

  @property
  def steps(self) -> int:
    return int(self.sampler.steps)


def calibratable() -> tuple:
  """The policies whose threshold calibration can pick (`ExitPolicy.calibratable`)."""
  return tuple(p.name for p in policies.registered() if p.calibratable)


def schedule_policy() -> str:
  """The policy a calibrated depth schedule is for (`time_schedule.calibrate_time_schedule`)."""
  return policies.first(value="schedule").name


def psnr_floor(spec: CalibrationSpec) -> Optional[float]:
  """The PSNR floor (dB) this request asks for, or None (see the package doc)."""
  if spec.min_psnr > 0 and spec.max_psnr_drop > 0:
    raise CalibrationError("set only one of exit.min_psnr and exit.max_psnr_drop")
  if spec.min_psnr > 0:
    return float(spec.min_psnr)
  if spec.max_psnr_drop > 0:
    return PSNR_8BIT - float(spec.max_psnr_drop)
  return None


def wanted(spec: CalibrationSpec) -> bool:
  """True when the request asks for a calibrated threshold."""
  return spec.target_layer_ratio > 0 or psnr_floor(spec) is not None


def calibrates_schedule(spec: CalibrationSpec) -> bool:
  """True when the calibration makes a time_schedule (`time_schedule.calibrate_time_schedule`): for
  exit.policy=time_schedule, and with exit.calibrate=time_schedule (not the default) when
  exit.target_layer_ratio is set for a score policy (uem, adadiff, ...). A PSNR floor always
  calibrates the policy's own threshold."""
  if spec.target_layer_ratio <= 0:
    return False
  return spec.policy == schedule_policy() or (spec.policy in calibratable() and psnr_floor(spec) is None
                                              and spec.calibrate == "time_schedule")


def guided(spec: CalibrationSpec) -> bool:
  """True for exit.calibrate=guided with exit.target_layer_ratio (see `resolve.calibrate_guided`)."""
  return spec.target_layer_ratio > 0 and psnr_floor(spec) is None and spec.calibrate == "guided"


def buckets_of(spec: CalibrationSpec) -> int:
  """exit.calibration_buckets (1 = one scalar threshold)."""
  k = int(spec.buckets)
  if k < 1:
    raise CalibrationError(f"exit.calibration_buckets must be >= 1 (1 = one threshold), got {k}")
  return k


def schedule_buckets(spec: CalibrationSpec) -> int:
  """Timestep buckets of a calibrated time_schedule: exit.calibration_buckets when > 1, else
  DEFAULT_SCHEDULE_BUCKETS; never more than sample.steps."""
  k = buckets_of(spec)
  return min(k if k > 1 else DEFAULT_SCHEDULE_BUCKETS, spec.steps)


def calibration_rng(seed: int):
  """The key of the calibration noise: `sweep.calibration_seed` folded with a fixed stream id, so
  never the held-out noise of `sample.seed`, and unchanged when sample.seed changes. Every choice
  (calibration, best row per family, --mode tune) is made on it."""
  return jax.random.fold_in(jax.random.PRNGKey(int(seed)), CALIBRATION_STREAM)


def threshold_of(policy: str, a: float) -> float:
  """Aggressiveness a in [0, 1] -> the policy's threshold (`ExitPolicy.threshold_of`): a = 0
  never exits, a = 1 exits as early as exit.min_layers allows."""
  return policies.get(policy).threshold_of(a)


def check_request(spec: CalibrationSpec, policy: Optional[str] = None) -> tuple:
  """Validates a calibration request before any sampling -> (policy, target, floor, metric, tol).

  Raises CalibrationError (one line) for a policy without a threshold, two targets at once, no
  target, a target outside (0, 1], an unknown metric or a non-positive tolerance.
  """
  policy = spec.policy if policy is None else policy
  if policy not in calibratable():
    names = calibratable()
    raise CalibrationError(f"calibration picks a threshold, but exit.policy is {policy!r}; use "
                           f"--config.exit.policy={names[0]} (or {', '.join(names[1:])})")
  target = float(spec.target_layer_ratio)
  floor = psnr_floor(spec)
  if target > 0 and floor is not None:
    raise CalibrationError("set only one of exit.target_layer_ratio and exit.max_psnr_drop/min_psnr")
  if target <= 0 and floor is None:
    raise CalibrationError("nothing to calibrate: set --config.exit.target_layer_ratio=0.6 or "
                           "--config.exit.max_psnr_drop=20")
  if target > 1:
    raise CalibrationError(f"exit.target_layer_ratio must be in (0, 1], got {target}")
  if spec.metric not in METRICS:
    raise CalibrationError(f"exit.calibration_metric is {spec.metric!r}; choose one of {', '.join(METRICS)}")
  tol = float(spec.tolerance)
  if tol <= 0:
    raise CalibrationError(f"exit.calibration_tolerance must be positive, got {tol}")
  k = buckets_of(spec)
  if k > spec.steps:
    raise CalibrationError(f"exit.calibration_buckets={k} exceeds sample.steps={spec.steps}, "
                           f"so some buckets hold no sampling step; use at most {spec.steps}")
  return policy, target, floor, spec.metric, tol


def step_buckets(sampler: SamplerSpec, k: int) -> np.ndarray:
  """[sampler.steps] the timestep bucket of each sampling step: early_exit's own bucketing of a
  per-bucket threshold, applied to every step's time_frac at once (values[b] = b)."""
  schedule = sched_lib.make_schedule(sampler.schedule, int(sampler.timesteps))
  frac = samplers.grid_arrays(schedule, int(sampler.steps))["time_frac"][:-1]
  return np.asarray(by_bucket(jnp.arange(k), frac, frac.shape[0], "step_buckets"), np.int64)


def within(value: float, target: float, tol: float) -> bool:
  """|value - target| <= tol, with a hair of slack so that e.g. 0.48 counts as within 0.02 of 0.5
  despite float rounding."""
  return abs(value - target) <= tol + 1e-9


__all__ = ["CALIBRATION_STREAM", "CalibrationError", "CalibrationSpec", "DEFAULT_SCHEDULE_BUCKETS",
           "METRICS", "PSNR_8BIT", "buckets_of", "calibratable", "calibrates_schedule", "calibration_rng",
           "check_request", "guided", "psnr_floor", "schedule_buckets", "schedule_policy", "step_buckets",
           "threshold_of", "wanted", "within"]
