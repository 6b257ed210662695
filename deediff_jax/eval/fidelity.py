"""Fidelity to the full model: how far early-exit samples land from the full-depth ones.

Both runs start from the same initial noise and use a deterministic sampler (DDIM with eta=0
or DPM-Solver), so with no exits they would produce the same images; any difference is what
exiting costs, not sampling noise. This is the cleanest single number for an exit policy;
FID (which compares distributions) is reported beside it in the sweep.

Definitions, per image i of N (images in [-1, 1], so the data range is 2 and the peak signal
power is 2^2 = 4):

  mse_i   = mean over pixels and channels of (full_i - exit_i)^2          (in float64)
  psnr_i  = 10 * log10(4 / max(mse_i, MSE_FLOOR))                         (dB)

`MSE_FLOOR` = 4e-10 caps every per-image PSNR at PSNR_MAX = 100 dB. Two execution paths of
the same computation (the early-exit loop at full depth vs the plain forward) agree bit for bit
on some platforms (PSNR infinite) and to float32 rounding on others (about 130-150 dB); both are
"the same image", and the cap makes them the same number everywhere, keeps means finite, and
leaves every real difference (anything visible is far below 100 dB; 8-bit quantisation noise is
58.9 dB) untouched. A mean of 100 dB means every image matched up to rounding.

Reported statistics (`fidelity(images_full, images_exit)`):

  psnr_vs_full   mean of psnr_i
  psnr_worst5    mean of psnr_i over the worst 5% of images: the k = max(1, ceil(0.05 N))
                 images with the LOWEST PSNR (equivalently the highest MSE)
  psnr_p5        the 5th percentile of psnr_i (NumPy's linear interpolation)
  mse_vs_full    mean of mse_i
  mse_worst5     mean of mse_i over the same k worst images
  mse_p95        the 95th percentile of mse_i
  num_images     N

`deterministic_sampler(sampler_spec)` gives the sampler to measure this with: the configured one
when it is deterministic (DDIM with eta=0, DPM-Solver), else DDIM with eta=0 (same steps,
guidance and seed); `eval/specs.deterministic_config` is the same rule on a ConfigDict.

For latent models the "images" are latents: the numbers are still a distance to the full
model, but the data range 2 is then a convention, not the latents' range.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

PEAK_POWER = 4.0        # (max - min)^2 for images in [-1, 1]
MSE_FLOOR = 4e-10        # -> PSNR_MAX = 10 log10(4 / 4e-10) = 100 dB
PSNR_MAX = 10.0 * math.log10(PEAK_POWER / MSE_FLOOR)
WORST_FRACTION = 0.05
KEYS = ("psnr_vs_full", "psnr_worst5", "psnr_p5", "mse_vs_full", "mse_worst5", "mse_p95")


class FidelityError(ValueError):
  """Images that cannot be compared (shapes differ, NaN/Inf, no images)."""


def _check(images_full, images_exit) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(images_full, np.float64)
  b = np.asarray(images_exit, np.float64)
  if a.shape != b.shape:
    raise FidelityError(f"full-depth and early-exit images must have the same shape, got {a.shape} "
                        f"and {b.shape}; sample both with the same num_images and seed")
  if a.ndim < 2 or a.shape[0] == 0:
    raise FidelityError(f"images must be [N, ...] with N >= 1 (e.g. NHWC), got shape {a.shape}")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise FidelityError("images contain NaN or Inf; check the sampler output")
  return a, b


def per_image_mse(images_full, images_exit) -> np.ndarray:
  """mse_i [N] (float64): mean squared difference over every non-batch axis."""
  a, b = _check(images_full, images_exit)
  return np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))


def psnr_from_mse(mse) -> np.ndarray:
  """10 * log10(4 / mse) in dB, with mse floored at MSE_FLOOR (so at most PSNR_MAX)."""
  mse = np.asarray(mse, np.float64)
  return 10.0 * np.log10(PEAK_POWER / np.maximum(mse, MSE_FLOOR))


def per_image_psnr(images_full, images_exit) -> np.ndarray:
  """psnr_i [N] (dB) for images in [-1, 1]."""
  return psnr_from_mse(per_image_mse(images_full, images_exit))


def worst_count(n: int) -> int:
  """How many images the 'worst 5%' averages over: max(1, ceil(0.05 n))."""
  return max(1, int(math.ceil(WORST_FRACTION * n - 1e-9)))


def fidelity_from_mse(mse) -> dict:
  """The statistics of the module doc from per-image MSEs [N]."""
  mse = np.asarray(mse, np.float64).reshape(-1)
  if mse.size == 0:
    raise FidelityError("fidelity needs at least one image")
  psnr = psnr_from_mse(mse)
  k = worst_count(mse.size)
  worst = np.argsort(-mse, kind="stable")[:k]   # the k largest MSEs = the k lowest PSNRs
  return {
      "psnr_vs_full": float(np.mean(psnr)),
      "psnr_worst5": float(np.mean(psnr[worst])),
      "psnr_p5": float(np.percentile(psnr, 5)),
      "mse_vs_full": float(np.mean(mse)),
      "mse_worst5": float(np.mean(mse[worst])),
      "mse_p95": float(np.percentile(mse, 95)),
      "num_images": int(mse.size),
  }


def fidelity(images_full, images_exit) -> dict:
  """PSNR/MSE of early-exit images against full-depth ones (same noise); see the module doc."""
  return fidelity_from_mse(per_image_mse(images_full, images_exit))


# ----------------------------------------------------------------------------- the sampler

DETERMINISTIC_SAMPLER = "ddim"  # with eta = 0; used when the configured sampler is stochastic


def is_deterministic(sampler: str, eta: float) -> bool:
  """True for a sampler with no noise after the initial one (DPM-Solver, or DDIM with eta=0)."""
  return sampler in ("dpm_solver", "dpm_solver_fast") or (sampler == "ddim" and float(eta) == 0.0)


def deterministic_sampler(spec):
  """A `config.SamplerSpec`: itself when its sampler is deterministic, else the same spec with DDIM,
  eta=0.

  Same steps, guidance and batches: only the sampler's per-step noise is removed, so that the
  full-depth and early-exit runs differ only by what exiting changed.
  """
  if is_deterministic(spec.sampler, spec.eta):
    return spec
  return dataclasses.replace(spec, sampler=DETERMINISTIC_SAMPLER, eta=0.0)


__all__ = ["FidelityError", "KEYS", "MSE_FLOOR", "PSNR_MAX", "fidelity", "fidelity_from_mse",
           "per_image_mse", "per_image_psnr", "psnr_from_mse", "worst_count", "is_deterministic",
           "deterministic_sampler", "DETERMINISTIC_SAMPLER"]
