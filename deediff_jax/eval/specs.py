"""The edge of the evaluation core: the ConfigDict read once into its typed, frozen specs.

--mode sample, eval, the sweep and tune call these; `eval/calibration/`, `eval/quality.py` and
`eval/fidelity.py` take the specs and never a ConfigDict. What comes from files (captions, a
Learning-to-Cache router, an autoencoder, the real images) is bound here as functions that read
only when the core asks, so building a spec reads nothing and fails on nothing.

  calibration_spec(config)    -> calibration.spec.CalibrationSpec
  quality_spec(config)        -> quality.QualitySpec
  deterministic_config(config) the config itself, or a copy with the fidelity sampler
  calibrated(params, config)  -> (a new config with the calibrated exit values, report)
"""
from __future__ import annotations

import dataclasses
import functools

from deediff_jax import caching
from deediff_jax.config import CacheSpec, ModelConfig, SamplerSpec
from deediff_jax.data.eval_context import conditioning
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval.calibration import resolve
from deediff_jax.eval.calibration.spec import CalibrationSpec
from deediff_jax.eval.decode import decoder_for
from deediff_jax.eval.quality import QualitySpec
from deediff_jax.eval.real_data import real_images


def _reuse(cache: CacheSpec, num_blocks: int, sampler: SamplerSpec):
  """The Learning-to-Cache reuse schedule for `sampler` (cache.policy=l2c), else False: what
  `sampling.sample(params, config, ...)` uses, for the sampler a calibration runs."""
  if not cache.enabled:
    return False
  return caching.reuse_for(dataclasses.replace(cache, sampler=sampler.sampler, steps=int(sampler.steps)),
                           num_blocks)


def calibration_spec(config) -> CalibrationSpec:
  """config.exit's calibration request, the model, the sampler and the calibration batch."""
  e, s = config.exit, config.sample
  model = ModelConfig.from_config(config.model)
  images = int(e.calibration_images)
  return CalibrationSpec(
      model=model, sampler=SamplerSpec.from_config(config), policy=str(e.policy),
      aggregate=str(e.aggregate), min_layers=int(e.min_layers), patience=bool(e.patience),
      target_layer_ratio=float(e.target_layer_ratio), calibrate=str(e.calibrate),
      max_psnr_drop=float(e.max_psnr_drop), min_psnr=float(e.min_psnr),
      metric=str(e.calibration_metric), tolerance=float(e.calibration_tolerance),
      # 0: one sampling batch, the batch the sampler will really use (its run ratio depends on it).
      images=images if images > 0 else min(int(s.batch_size), int(s.num_images)),
      buckets=int(e.calibration_buckets), seed=int(config.sweep.calibration_seed),
      conditioning=functools.partial(conditioning, config),
      reuse=functools.partial(_reuse, CacheSpec.from_config(config), model.num_blocks),
      decoder=functools.partial(decoder_for, config))


def quality_spec(config) -> QualitySpec:
  """sweep.fid_kind and its files, the model, and the reader of config.data's real images."""
  return QualitySpec(
      fid_kind=str(config.sweep.fid_kind), model=ModelConfig.from_config(config.model),
      source=str(config.data.source), latent=bool(config.data.latent),
      autoencoder=str(config.data.autoencoder), inception_weights=str(config.sweep.inception_weights),
      classifier_steps=int(config.sweep.classifier_steps),
      real_images=functools.partial(real_images, config))


def deterministic_config(config):
  """`config` itself when its sampler is deterministic, else a copy that samples with DDIM, eta=0
  (`fidelity.deterministic_sampler`: same steps, guidance and seed)."""
  if fidelity_lib.is_deterministic(str(config.sample.sampler), float(config.sample.eta)):
    return config
  out = config.copy_and_resolve_references()
  out.sample.sampler = fidelity_lib.DETERMINISTIC_SAMPLER
  out.sample.eta = 0.0
  return out


def calibrated(params, config) -> tuple:
  """(config, report): when the config asks for a calibration, a NEW config whose exit.threshold
  (or .threshold_schedule; for a depth schedule, exit.policy and the oracle-calibrated .schedule)
  holds the calibrated value, and the report; else (config, None). `config` is never changed."""
  chosen, report = resolve.resolve(params, calibration_spec(config))
  if chosen is None:
    return config, None
  out = config.copy_and_resolve_references()
  out.exit.update(chosen.exit_keys())
  return out, report


__all__ = ["calibrated", "calibration_spec", "deterministic_config", "quality_spec"]
