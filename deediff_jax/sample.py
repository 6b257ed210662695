"""`--mode sample`: images from the latest checkpoint with early exit, timed against full depth.

Writes into the workdir:
  samples.png        a grid (one row per class for class-conditional models, one row per
                     held-out caption, written beside it, for text models)
  samples.npz        `images` float32 [-1, 1] NHWC and `labels` (-1 where there is none); latent
                     models with data.autoencoder: `images` decoded, the raw samples in `latents`
  sample_stats.json  policy, threshold, sampler, steps, layers_total, layer_ratio_run,
                     layer_ratio_per_sample, seconds, seconds_full, speedup, psnr_vs_full,
                     psnr_worst5, psnr_p5, mse_vs_full, mse_worst5, mse_p95 (the sweep rows' names),
                     plus the per-step arrays (layers run, mean exit layer, exit histogram) for the
                     heatmap; seconds_full_depth and psnr_vs_full_worst5pct are kept as aliases

Both paths are compiled before they are timed, use the same seed (so the same initial noise),
and are timed in the same process: `seconds_full_depth` is the plain scan forward (no while
loop), so `speedup` is what early exit buys in wall-clock time.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np

from deediff_jax import sampling
from deediff_jax.data.eval_context import conditioning, load_eval_captions
from deediff_jax.config import ExitSpec
from deediff_jax.early_exit import exit_params
from deediff_jax.eval import plots
from deediff_jax.eval.decode import decoder_for
from deediff_jax.eval.fidelity import KEYS as FIDELITY_KEYS
from deediff_jax.eval.fidelity import fidelity
from deediff_jax.model.uvit import ModelConfig


def _load_params(workdir, config):
  if str(config.sample.params_file).strip():  # a flat params file instead of a checkpoint
    from deediff_jax.train import params_file
    return params_file.load_for(config)
  from deediff_jax.train.checkpoint import load_params  # the training package owns checkpoints
  return load_params(workdir, config, use_ema=config.sample.use_ema)


def run(config, workdir, params=None) -> dict:
  """Samples `sample.num_images` with the configured sampler/policy; writes files; returns the stats."""
  os.makedirs(workdir, exist_ok=True)
  cfg = ModelConfig.from_config(config.model)
  # tune.file (--mode tune's tuned.json): its overrides for the early-exit run; full depth stays
  # the untuned model (its own steps), and the stats carry gflops_ratio against it.
  full_config, tuned = config, None
  if str(config.tune.file).strip():
    from deediff_jax.eval.tune import apply_file
    config, tuned = apply_file(config)
  n = cfg.num_blocks
  if params is None:
    params = _load_params(workdir, config)
  # The evaluation edge (calibration, quality) loads only when a run samples, not with --mode train.
  from deediff_jax.eval.specs import calibrated, deterministic_config
  # A new config with the calibrated exit values when asked (prints one line); the caller's stays.
  exit_config, calibration = calibrated(params, config)
  full_config = exit_config if full_config is config else full_config
  config = exit_config
  num = int(config.sample.num_images)
  policy, policy_params = exit_params(ExitSpec.from_config(config, n), n)
  labels, context, null_context = conditioning(config, num)
  kw = dict(labels=labels, context=context, null_context=null_context)
  rng = jax.random.PRNGKey(int(config.sample.seed))
  decode = decoder_for(config)  # latent models with data.autoencoder: decoded, untimed, after sampling

  exit_kw, full_kw = dict(policy=policy, policy_params=policy_params, **kw), dict(plain=True, **kw)
  sampling.compile_ahead(functools.partial(sampling.sample, params, config, rng, num), exit_kw, full_kw)
  if full_config is not config:
    sampling.compile_ahead(functools.partial(sampling.sample, params, full_config, rng, num), full_kw)
  (images, stats), seconds = sampling.timed(sampling.sample, params, config, rng, num, progress=True, **exit_kw)
  (full_images, _), seconds_full = sampling.timed(sampling.sample, params, full_config, rng, num, progress=True,
                                                  **full_kw)
  extra = {}
  if decode is not None:
    extra["latents"] = images.astype(np.float32)
    images, full_images = decode(images), decode(full_images)

  out_labels = np.full((num,), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
  captions = load_eval_captions(config, num) if cfg.context_dim > 0 else None
  if captions is not None:  # what each text-conditional sample was drawn for (fixed-width str, no pickle)
    extra["captions"] = np.asarray(captions, dtype=str)
  np.savez(os.path.join(workdir, "samples.npz"), images=images.astype(np.float32), labels=out_labels, **extra)
  plots.sample_grid(os.path.join(workdir, "samples.png"), images, labels=labels if cfg.num_classes > 0 else None,
                    num_classes=cfg.num_classes, captions=captions)
  summary = sampling.summarize(stats, n)
  e, s = config.exit, config.sample
  # One rule for fidelity in every mode (the sweep's): the same noise through a deterministic
  # sampler, the configured one when it is deterministic, else DDIM eta=0 in extra untimed runs.
  fidelity_config = deterministic_config(config)
  if fidelity_config is not config:
    images_det, _ = sampling.sample(params, fidelity_config, rng, num, policy=policy, policy_params=policy_params, **kw)
    full_det, _ = sampling.sample(params, deterministic_config(full_config), rng, num, plain=True, **kw)
    if decode is not None:
      images_det, full_det = decode(images_det), decode(full_det)
    measured = fidelity(full_det, images_det)
  else:
    measured = fidelity(full_images, images)
  fidelity_sampler = fidelity_config.sample.sampler + (" eta=0" if fidelity_config.sample.sampler == "ddim" else "")
  result = {
      "policy": policy, "threshold": float(e.threshold),
      "threshold_schedule": str(e.threshold_schedule), "aggregate": e.aggregate,
      "depth": int(e.depth) if e.depth > 0 else n, "schedule": e.schedule, "min_layers": int(e.min_layers),
      "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
      "guidance_scale": float(s.guidance_scale), "num_images": num, "batch_size": int(s.batch_size),
      "seed": int(s.seed), "use_ema": bool(s.use_ema), "layers_total": n,
      "layer_ratio_run": summary["layer_ratio_run"],
      "layer_ratio_per_sample": summary["layer_ratio_per_sample"],
      "seconds": seconds, "seconds_full": seconds_full, "speedup": seconds_full / seconds,
      **{k: measured[k] for k in FIDELITY_KEYS},    # the sweep rows' names for the same measures
      "fidelity_sampler": fidelity_sampler, "calibration": calibration,
      # Older names of the same measures (stable keys): seconds_full, psnr_worst5.
      "seconds_full_depth": seconds_full, "psnr_vs_full_worst5pct": measured["psnr_worst5"],
      "layers_run_per_step": summary["layers_run_per_step"],
      "mean_exit_layer_per_step": summary["mean_exit_layer_per_step"],
      "exit_histogram": summary["exit_histogram"],
      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
  }
  if tuned is not None:
    from deediff_jax.eval import flops
    from deediff_jax.eval.runner import gflops_from_stats
    factor = 2 if float(s.guidance_scale) != 0.0 else 1
    full_gflops = flops.full_depth_flops_per_image(cfg, int(full_config.sample.steps), cfg_factor=factor) / 1e9
    result.update(gflops_ratio=gflops_from_stats(cfg, stats, policy, factor) / full_gflops,
                  steps_full_depth=int(full_config.sample.steps), tune_file=str(full_config.tune.file),
                  tune_overrides=tuned["overrides"])
  if "att_run" in stats:  # Learning-to-Cache (docs/caching.md): what was reused, and the GFLOPs
    from deediff_jax.eval import cache_rows, flops
    factor = 2 if float(s.guidance_scale) != 0.0 else 1
    lr = np.asarray(stats["layers_run"], np.float64)
    result["cache"] = {
        "policy": "l2c", "router": str(config.cache.router), "threshold": float(config.cache.threshold),
        "attention_reused_fraction": float(1 - np.sum(stats["att_run"]) / np.sum(lr)),
        "mlp_reused_fraction": float(1 - np.sum(stats["mlp_run"]) / np.sum(lr)),
        "gflops_per_image": cache_rows.gflops_per_image(cfg, stats, policy, factor),
        "gflops_full_depth": flops.full_depth_flops_per_image(cfg, int(s.steps), cfg_factor=factor) / 1e9}
  with open(os.path.join(workdir, "sample_stats.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
