"""The sweep's Learning-to-Cache rows (`sweep.policies` names `l2c` and `l2c+exit`) and the FLOPs of
a cached run.

  l2c        one row per `sweep.cache_thresholds` value: full depth (exit policy none) with the
             router of `cache.router` at that threshold
  l2c+exit   the same thresholds combined with each exit setting of `sweep.cache_exits`
             (';'-separated POLICY[:VALUE], e.g. "uem:0.1;static:9;time_schedule:5,9,13"; empty:
             config.exit's setting): blocks past the exit are not run, the blocks that run may reuse

FLOPs: a cached run costs what its early-exit loop ran (`flops.gflops_per_image` on the exit
layers) minus, for every evaluation, the sublayers it reused, each at its own FLOPs
(`sublayer_flops`: an MLP is most of a block here, so a skipped sublayer is not counted as one
half of a block).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from deediff_jax import caching
from deediff_jax.config import CacheSpec
from deediff_jax.eval import flops as flops_lib
from deediff_jax.eval.flops import ELEMENTWISE, FlopsError
from deediff_jax.model.uvit import ModelConfig

CACHE_ROWS = ("l2c", "l2c+exit")


class CacheSweepError(ValueError):
  """A cache row that cannot run as configured (one line)."""


def thresholds(config) -> list[float]:
  text = str(config.sweep.get("cache_thresholds", ""))
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise CacheSweepError(f"sweep.cache_thresholds must be comma-separated numbers, got {text!r}") from None
  if not values:
    raise CacheSweepError("sweep.cache_thresholds is empty but sweep.policies has l2c; give e.g. 0.5,0.9")
  return list(dict.fromkeys(values))


def exit_specs(config) -> list[tuple[str, Optional[str]]]:
  """sweep.cache_exits -> [(policy, value text or None)]; empty: [] (config.exit's setting)."""
  out = []
  for part in str(config.sweep.get("cache_exits", "")).split(";"):
    part = part.strip()
    if not part:
      continue
    name, _, value = part.partition(":")
    out.append((name.strip(), value.strip() or None))
  return out


def check(config) -> None:
  """The cache rows need a router that fits the sweep's sampler and step count."""
  cfg = ModelConfig.from_config(config.model)
  if not str(config.cache.router).strip():
    raise CacheSweepError("sweep.policies has l2c/l2c+exit but cache.router is empty; pass "
                          "--config.cache.router=ROUTER (train one with --config.train.mode=router)")
  if str(config.sample.sampler) not in caching.CACHE_SAMPLERS:
    raise CacheSweepError(f"the l2c rows need sample.sampler dpm_solver_2s or ddim, got {config.sample.sampler}")
  router = caching.read_router(config.cache.router)
  caching.check_router(router, num_blocks=cfg.num_blocks, sampler=str(config.sample.sampler),
                       steps=int(config.sample.steps), path=str(config.cache.router))


def reuse_for(cache: CacheSpec, cache_threshold: Optional[float], num_blocks: int):
  """The reuse schedule of a row at its threshold (False: no cache)."""
  if cache_threshold is None:
    return False
  return caching.reuse_for(cache, num_blocks, cache_threshold)


def sublayer_flops(cfg, *, matmul_only: bool = False) -> dict:
  """Per image, what a reused sublayer saves (eval/flops.py's conventions): attention = norm1 +
  qkv + scores + softmax + weights@v + proj; MLP = norm2 + fc1 + GELU + fc2. The residual adds
  and an out-block's skip Linear still run."""
  cfg = ModelConfig.from_config(cfg)
  t, d, h = cfg.num_tokens, cfg.embed_dim, cfg.num_heads
  m = int(cfg.embed_dim * cfg.mlp_ratio)
  ew = 0 if matmul_only else 1
  ln = ew * (ELEMENTWISE["layer_norm"] * t * d + ELEMENTWISE["layer_norm_row"] * t)
  attn = (ln + 2 * t * d * 3 * d + ew * int(cfg.qkv_bias) * t * 3 * d + 4 * t * t * d
          + ew * (1 + ELEMENTWISE["softmax"]) * h * t * t + 2 * t * d * d + ew * t * d)
  mlp = ln + 2 * t * d * m + ew * t * m + ew * ELEMENTWISE["gelu"] * t * m + 2 * t * m * d + ew * t * d
  return {"attn": int(attn), "mlp": int(mlp)}


def skipped_flops_per_image(cfg, stats: dict, cfg_factor: int = 1) -> float:
  """FLOPs per image the reused sublayers saved in a `sampling.sample` run with a cache:
  sum over evaluations of (layers run - sublayers computed) x that sublayer's FLOPs, weighted by
  batch size (each batch's loop runs its blocks on all its rows)."""
  cfg = ModelConfig.from_config(cfg)
  if cfg_factor not in (1, 2):
    raise FlopsError(f"cfg_factor must be 1 or 2, got {cfg_factor!r}")
  lr = np.asarray(stats["layers_run"], np.float64)               # [batches, steps]
  att = lr - np.asarray(stats["att_run"], np.float64)
  mlp = lr - np.asarray(stats["mlp_run"], np.float64)
  w = np.asarray(stats["batch_sizes"], np.float64)
  sub = sublayer_flops(cfg)
  per_batch = att.sum(axis=1) * sub["attn"] + mlp.sum(axis=1) * sub["mlp"]
  return float(cfg_factor * np.sum(per_batch * w) / np.sum(w))


def gflops_per_image(cfg, stats: dict, policy: str, cfg_factor: int = 1) -> float:
  """GFLOPs per image of a cached run: the loop's cost minus the reused sublayers."""
  el = np.asarray(stats["exit_layer"])
  sizes = np.asarray(stats["batch_sizes"], np.int64)
  parts = np.split(el, np.cumsum(sizes)[:-1], axis=1)
  per = [flops_lib.gflops_per_image(cfg, p, policy=policy, cfg_factor=cfg_factor) for p in parts]
  loop = float(np.sum(np.asarray(per) * sizes) / np.sum(sizes))
  return loop - skipped_flops_per_image(cfg, stats, cfg_factor) / 1e9
