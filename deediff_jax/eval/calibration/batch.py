"""One sampling run of the calibration batch, from a `CalibrationSpec`: the same call as
`sampling.sample(params, config, ...)` with the config's exit aggregate and Learning-to-Cache
schedule, made through `sampling.sample_with` on the spec's typed values."""
from __future__ import annotations

from typing import Optional

from deediff_jax import sampling
from deediff_jax.config import SamplerSpec
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval.calibration.spec import CalibrationSpec


def conditioning(spec: CalibrationSpec, num: int) -> dict:
  """The labels / captions of the `num` calibration images (`data/eval_context.conditioning`)."""
  labels, context, null_context = spec.conditioning(num)
  return dict(labels=labels, context=context, null_context=null_context)


def fidelity_sampler(spec: CalibrationSpec) -> SamplerSpec:
  """The deterministic sampler a PSNR is measured with (`fidelity.deterministic_sampler`)."""
  return fidelity_lib.deterministic_sampler(spec.sampler)


class Runner:
  """Samples the calibration batch (`num` images, the noise of `rng`) with one sampler: every
  probe of a search is one call, and the Learning-to-Cache schedule is read once."""

  def __init__(self, params, spec: CalibrationSpec, sampler: SamplerSpec, rng, num: int,
               cond: Optional[dict] = None):
    self.params, self.spec, self.sampler, self.rng, self.num = params, spec, sampler, rng, int(num)
    self.cond = conditioning(spec, self.num) if cond is None else cond
    self._reuse = None

  def reuse(self):
    if self._reuse is None:
      self._reuse = self.spec.reuse(self.sampler)
    return self._reuse

  def __call__(self, *, policy: Optional[str] = None, policy_params=None, plain: bool = False) -> tuple:
    """(images, stats) of `sampling.sample_with`: the policy with its traced values, or the plain
    full-depth forward (`plain=True`, never cached)."""
    return sampling.sample_with(self.params, self.spec.model, self.sampler, self.rng, self.num,
                                policy=policy, policy_params=policy_params, aggregate=self.spec.aggregate,
                                plain=plain, reuse=False if plain else self.reuse(), **self.cond)


__all__ = ["Runner", "conditioning", "fidelity_sampler"]
