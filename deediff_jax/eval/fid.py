"""Fréchet distance between Gaussians fitted to features (FID and its feature-net variants).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

Everything runs on the host in float64: the trace of a matrix square root of a product of
two 2048x2048 covariances loses digits fast in float32, and FID differences that matter
are often a few tenths. The square root follows the standard recipe (pytorch-fid / TTUR)
so numbers are comparable with published ones:

- `scipy.linalg.sqrtm(S1 @ S2)`; if the result is not finite, or does not square back to
  S1 S2 (near-singular covariances, e.g. fewer samples than dimensions), retry with
  eps*I added to both covariances;
- round-off gives a complex result with tiny imaginary parts: they are dropped; a large
  imaginary part means an input is not a covariance (not PSD) and is an error.

The feature extractor (Inception v3 or a small classifier) is separate: this module only
sees feature arrays, so the same code serves every `fid_kind`.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Union

import numpy as np
import scipy.linalg

# Relative residual |X X - A|_F / |A|_F above which a square root is not trusted.
_SQRTM_RTOL = 1e-6
# After the eps ridge, accept what pytorch-fid would accept (finite) unless clearly wrong.
_SQRTM_RTOL_FALLBACK = 1e-3
# Imaginary parts of the square root's diagonal above this (relative to its real scale)
# cannot be round-off.
_IMAG_RTOL = 1e-3


class FIDError(ValueError):
  """Bad statistics or features (shapes, NaN, non-PSD covariance, unusable cache file)."""


def _as_stats(mu, sigma, which: str):
  mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
  if mu.ndim != 1:
    raise FIDError(f"mu{which} must be a vector [F], got shape {mu.shape}")
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise FIDError(f"sigma{which} must be [F, F] = {(mu.shape[0],) * 2} to match mu{which}, "
                   f"got shape {sigma.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise FIDError(f"mu{which}/sigma{which} contain NaN or Inf; the features they came from are broken")
  return mu, sigma


def _sqrtm_product(sigma1, sigma2, rtol):
  """sqrtm(sigma1 @ sigma2), or None when it is not finite or does not square back within rtol."""
  a = sigma1 @ sigma2
  with warnings.catch_warnings():
    # scipy warns on singular input (dead feature units, N < F); the residual check below
    # decides whether the result is usable, so the warning is only noise.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    x = scipy.linalg.sqrtm(a)
  if not np.isfinite(x).all():
    return None
  scale = max(np.linalg.norm(a), np.finfo(np.float64).tiny)
  if np.linalg.norm(x @ x - a) / scale > rtol:
    return None
  return x


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  `eps` is the ridge added to both covariances when the plain square root fails (the
  pytorch-fid default). Raises FIDError for mismatched shapes, NaN/Inf, or a square root
  with a large imaginary part (an input that is not a covariance matrix).
  """
  mu1, sigma1 = _as_stats(mu1, sigma1, "1")
  mu2, sigma2 = _as_stats(mu2, sigma2, "2")
  if mu1.shape != mu2.shape:
    raise FIDError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; compute both "
                   "statistics with the same feature network")
  diff = mu1 - mu2

  covmean = _sqrtm_product(sigma1, sigma2, _SQRTM_RTOL)
  if covmean is None:
    # Near-singular product: a small ridge makes the square root well defined. The bias it
    # adds to the distance is O(eps * F), far below what FID can resolve.
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm_product(sigma1 + offset, sigma2 + offset, _SQRTM_RTOL_FALLBACK)
    if covmean is None:
      raise FIDError("the matrix square root of sigma1 @ sigma2 failed even with eps*I added; the "
                     "covariances are degenerate (constant or NaN-like features?); use more samples "
                     "or a larger eps")

  if np.iscomplexobj(covmean):
    diag = np.diagonal(covmean)
    scale = max(1.0, float(np.max(np.abs(diag.real))))
    worst = float(np.max(np.abs(diag.imag)))
    if worst > _IMAG_RTOL * scale:
      raise FIDError(f"the matrix square root of sigma1 @ sigma2 has a large imaginary component "
                     f"({worst:.3g}); a covariance is not positive semi-definite (pass np.cov of "
                     "real features, not an arbitrary matrix)")
    covmean = covmean.real

  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean [F], covariance [F, F]) of features [N, F] in float64 (unbiased, like np.cov)."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2:
    raise FIDError(f"features must be [N, F], got shape {f.shape}; flatten or pool them first")
  if f.shape[0] < 2:
    raise FIDError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
  if not np.isfinite(f).all():
    raise FIDError("features contain NaN or Inf; check the images fed to the feature network")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_features(features1, features2) -> float:
  """Fréchet distance between the Gaussians fitted to two feature sets [N1, F] and [N2, F]."""
  return frechet_distance(*statistics(features1), *statistics(features2))


StatsOrFeatures = Union[tuple, np.ndarray]


def cached_statistics(path: str, compute_fn: Callable[[], StatsOrFeatures],
                      key: str = "") -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) from the npz at `path`, or computed once by `compute_fn()` and saved there.

  `compute_fn()` returns either features [N, F] or a (mu, sigma) pair. `key` identifies
  what the statistics were computed with (dataset, split, feature network and its
  weights): a file whose stored key differs is stale, and is recomputed and overwritten,
  so changing the feature network never silently reuses old statistics.
  """
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as z:
        stored_key = str(z["key"]) if "key" in z.files else ""
        mu, sigma = z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError) as e:
      raise FIDError(f"cannot read cached statistics {path} ({e}); delete the file to recompute it") from None
    if stored_key == key:
      return _as_stats(mu, sigma, "")

  out = compute_fn()
  if isinstance(out, (tuple, list)) and len(out) == 2:
    mu, sigma = _as_stats(out[0], out[1], "")
  else:
    mu, sigma = statistics(out)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # Write then rename: a run killed mid-write must not leave a truncated cache behind.
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, mu=mu, sigma=sigma, key=np.asarray(key))
  os.replace(tmp, path)
  return mu, sigma


__all__ = ["FIDError", "frechet_distance", "statistics", "fid_from_features", "cached_statistics"]
