"""Bootstrap confidence intervals over images (percentile method, fixed seed).

  paired_diff_ci(a, b)  a and b: per-image values of two policies on the SAME images (e.g. the
                        per-image PSNR vs full depth in sweep/per_image_psnr.npz): the mean of
                        a - b and its 95% interval from resampling images (pairs stay together)
  mean_ci(a)            the mean of a and its interval the same way

Each of `resamples` (10,000) draws n image indices with replacement (NumPy's default_rng(seed),
`integers(0, n, size=n)` per resample, in order) and takes the mean of the differences over
them; the interval is the (1 - level)/2 and (1 + level)/2 percentiles of those means (NumPy's
linear interpolation). Same inputs, same seed: the same interval on every machine.
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
_CHUNK = 500          # resamples drawn at once (memory: _CHUNK * n indices)


def bootstrap_means(values, *, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
  """[resamples] means of `values` over images drawn with replacement (see the module doc)."""
  v = np.asarray(values, np.float64).reshape(-1)
  n = v.size
  if n == 0:
    raise ValueError("bootstrap needs at least one image")
  rng = np.random.default_rng(seed)
  out = np.empty(int(resamples), np.float64)
  for start in range(0, int(resamples), _CHUNK):
    k = min(_CHUNK, int(resamples) - start)
    idx = rng.integers(0, n, size=(k, n))
    out[start:start + k] = v[idx].mean(axis=1)
  return out


def mean_ci(values, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple:
  """(mean, lo, hi): the mean of `values` and its percentile bootstrap interval."""
  v = np.asarray(values, np.float64).reshape(-1)
  means = bootstrap_means(v, resamples=resamples, seed=seed)
  lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
  return float(np.mean(v)), float(lo), float(hi)


def paired_diff_ci(a, b, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple:
  """(mean of a - b, lo, hi) over the same images, resampled in pairs."""
  a = np.asarray(a, np.float64).reshape(-1)
  b = np.asarray(b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same images, got {a.size} and {b.size}")
  return mean_ci(a - b, resamples=resamples, seed=seed, level=level)


__all__ = ["RESAMPLES", "SEED", "LEVEL", "bootstrap_means", "mean_ci", "paired_diff_ci"]
