"""The held-out protocol: choices on calibration noise, reported numbers on held-out noise.

Two noise sets, never the same images:
  calibration  `calibration.spec.calibration_rng(seed)`: sweep.calibration_seed folded with a
               fixed stream id. Every choice is made on it: threshold and schedule calibration, the
               best row per family at a budget (`choice_*` columns of the sweep, read by
               benchmarks/pareto_budgets.py) and --mode tune's pick.
  held-out     `PRNGKey(sample.seed)`: every reported number (PSNR vs full, FID, class accuracy,
               GFLOPs, wall clock) is measured on it.
Image i's initial noise depends on the seed and i only (`sampling.initial_noise`), so the first
images of a run are the same whatever the batch size and the image count.

`calibration_context(ctx, num)` is a copy of a sweep `Context` on `num` calibration images (its
own full-depth reference, no FID scorer); `runner.evaluate` on it measures a setting for a
choice. `choice_columns(row)` are the columns a sweep row gets from that measurement. A budget b
admits a point when its GFLOPs ratio is <= b, with no slack; GFLOPs are measured at
sample.batch_size (the layers a batch runs depend on its size).

`write_per_image_psnr(path, rows, stats)` stores each row's per-image PSNR vs full (held-out)
as `sweep/per_image_psnr.npz` ({"row_000": [N], ..., "setting": [rows]}), from which anyone can
recompute a paired bootstrap interval (`eval/bootstrap.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from deediff_jax import sampling
from deediff_jax.data.eval_context import conditioning
from deediff_jax.eval.calibration.spec import calibration_rng
from deediff_jax.eval.quality import Quality
from deediff_jax.eval.runner import Context

CHOICE_KEYS = ("choice_psnr", "choice_gflops_ratio", "choice_layer_ratio_run", "choice_num_images",
               "choice_seed")
PER_IMAGE_FILE = "per_image_psnr.npz"


def admits(gflops_ratio: Optional[float], budget: float) -> bool:
  """A budget b admits a point when its GFLOPs ratio is <= b (no slack)."""
  return gflops_ratio is not None and float(gflops_ratio) <= float(budget)


def calibration_context(ctx: Context, num: int) -> Context:
  """`ctx` on `num` calibration images: the calibration noise, its own full-depth reference
  (deterministic sampler), no FID or classifier (choices are made on PSNR and GFLOPs)."""
  config = ctx.config
  num = int(num)
  rng = calibration_rng(int(config.sweep.calibration_seed))
  cond = dict(zip(("labels", "context", "null_context"), conditioning(config, num)))
  c = dataclasses.replace(ctx, num=num, rng=rng, cond=cond,
                          quality=Quality(fid_kind="none", fid_kind_name="none"),
                          compiled=set(), seconds_full=float("nan"), seconds_full_runs=[],
                          images_full=None, images_full_fidelity=None, quality_full={})
  sampling.sample(ctx.params, c.fidelity_config, rng, num, plain=True, compile_only=True, **cond)
  full, _ = sampling.sample(ctx.params, c.fidelity_config, rng, num, plain=True, **cond)
  c.images_full_fidelity = c.decoded(full)
  if c.deterministic:
    c.images_full = c.images_full_fidelity
  return c


def choice_columns(row: dict, ctx: Context) -> dict:
  """The calibration measurement of a setting, as the `choice_*` columns of its sweep row."""
  return {"choice_psnr": row["psnr_vs_full"], "choice_gflops_ratio": row["gflops_ratio"],
          "choice_layer_ratio_run": row["layer_ratio_run"], "choice_num_images": int(ctx.num),
          "choice_seed": int(ctx.config.sweep.calibration_seed)}


def write_per_image_psnr(path: str, rows, stats) -> str:
  """{"row_000": per-image PSNR [N], ..., "setting": [labels]} (no pickle)."""
  arrays = {f"row_{i:03d}": np.asarray(st.get("per_image_psnr"), np.float64)
            for i, st in enumerate(stats) if st.get("per_image_psnr") is not None}
  arrays["setting"] = np.asarray([r["setting"] for r in rows], dtype=str)
  with open(path, "wb") as f:
    np.savez_compressed(f, **arrays)
  return path


def read_per_image_psnr(path: str) -> dict:
  """{row index: per-image PSNR [N]} of a sweep's per_image_psnr.npz (row i of sweep.json)."""
  with np.load(path, allow_pickle=False) as z:
    return {int(k[4:]): np.asarray(z[k], np.float64) for k in z.files if k.startswith("row_")}


__all__ = ["admits", "calibration_context", "choice_columns", "CHOICE_KEYS", "PER_IMAGE_FILE",
           "read_per_image_psnr", "write_per_image_psnr"]
