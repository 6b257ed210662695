"""Fréchet distance: exact cases, an independent float64 reference, singular covariances, the cache."""
import numpy as np
import pytest

from deediff_jax.eval import fid


def _reference(mu1, s1, mu2, s2):
  """Independent route: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  lam = np.linalg.eigvalsh(root1 @ s2 @ root1)
  d = mu1 - mu2
  return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


def _random_gaussian(rng, dim):
  a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=dim), a @ a.T + 0.1 * np.eye(dim)


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(0)
  mu, s = _random_gaussian(rng, 48)
  assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-6
  feats = rng.normal(size=(200, 32))
  assert abs(fid.fid_from_features(feats, feats)) < 1e-6


@pytest.mark.parametrize("dim", [16, 33, 64])
def test_matches_independent_float64_reference(dim):
  rng = np.random.default_rng(dim)
  mu1, s1 = _random_gaussian(rng, dim)
  mu2, s2 = _random_gaussian(rng, dim)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  want = _reference(mu1, s1, mu2, s2)
  assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
  # float32 inputs are promoted: the answer must not change beyond float32 input rounding.
  got32 = fid.frechet_distance(mu1.astype(np.float32), s1.astype(np.float32),
                               mu2.astype(np.float32), s2.astype(np.float32))
  assert got32 == pytest.approx(want, rel=1e-5)


def test_diagonal_gaussians_closed_form():
  # For diagonal covariances: sum (m1-m2)^2 + sum (sqrt(a) - sqrt(b))^2.
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
  a, b = np.array([4.0, 1.0, 9.0]), np.array([1.0, 1.0, 16.0])
  # by hand: means 1 + 0 + 4 = 5; sqrt terms (2-1)^2 + 0 + (3-4)^2 = 2
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(7.0, abs=1e-12)
  # 1-d: FID of N(0, 1) and N(3, 4) is 9 + (1 - 2)^2 = 10.
  assert fid.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, abs=1e-12)


def test_singular_covariances_fewer_samples_than_dims():
  rng = np.random.default_rng(1)
  f1 = rng.normal(size=(10, 64))
  f2 = rng.normal(size=(12, 64)) + 0.5
  mu1, s1 = fid.statistics(f1)
  mu2, s2 = fid.statistics(f2)
  assert np.linalg.matrix_rank(s1) < 64
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  assert got == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_fallback_adds_eps_when_sqrtm_is_not_finite(monkeypatch):
  rng = np.random.default_rng(2)
  mu1, s1 = _random_gaussian(rng, 16)
  mu2, s2 = _random_gaussian(rng, 16)
  real_sqrtm = fid.scipy.linalg.sqrtm
  seen = []

  def flaky(a):
    seen.append(a.copy())
    return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

  monkeypatch.setattr(fid.scipy.linalg, "sqrtm", flaky)
  got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  assert len(seen) == 2
  eye = np.eye(16) * 1e-6
  np.testing.assert_allclose(seen[1], (s1 + eye) @ (s2 + eye), rtol=1e-12)
  assert got == pytest.approx(_reference(mu1, s1, mu2, s2), rel=1e-5)


def test_small_imaginary_part_dropped_large_one_raises():
  # Not PSD: sqrtm(diag(-1, 1)) = diag(i, 1), an imaginary part that is not round-off.
  with pytest.raises(fid.FIDError, match="large imaginary component"):
    fid.frechet_distance([0, 0], np.diag([-1.0, 1.0]), [0, 0], np.eye(2))
  # Round-off level negatives (-1e-14) still give the real answer.
  got = fid.frechet_distance([0, 0], np.diag([-1e-14, 1.0]), [0, 0], np.diag([1.0, 4.0]))
  assert got == pytest.approx(1.0 + 1.0, abs=1e-6)  # tr = 0 + 1 + 1 + 4 - 2*(0 + 2) = 2


def test_bad_inputs_raise_one_line_errors():
  with pytest.raises(fid.FIDError, match="feature dimensions differ: 3 vs 2"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(fid.FIDError, match=r"sigma1 must be \[F, F\]"):
    fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(fid.FIDError, match="NaN or Inf"):
    fid.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))
  with pytest.raises(fid.FIDError, match=r"features must be \[N, F\]"):
    fid.statistics(np.zeros((4, 2, 2)))
  with pytest.raises(fid.FIDError, match="at least 2 feature vectors"):
    fid.statistics(np.zeros((1, 5)))
  assert issubclass(fid.FIDError, ValueError)


def test_statistics_are_float64_mean_and_unbiased_cov():
  rng = np.random.default_rng(3)
  f = rng.normal(size=(50, 5)).astype(np.float32)
  mu, sigma = fid.statistics(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  x = f.astype(np.float64)
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  centred = x - x.mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def test_cached_statistics_written_once_and_reused(tmp_path):
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(40, 6))
  calls = []

  def compute():
    calls.append(1)
    return feats

  path = str(tmp_path / "stats" / "digits_train.npz")
  mu, sigma = fid.cached_statistics(path, compute, key="digits/classifier-abc")
  assert len(calls) == 1 and (tmp_path / "stats" / "digits_train.npz").exists()
  mu2, sigma2 = fid.cached_statistics(path, compute, key="digits/classifier-abc")
  assert len(calls) == 1  # reused, not recomputed
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  ref_mu, ref_sigma = fid.statistics(feats)
  np.testing.assert_array_equal(mu2, ref_mu)
  np.testing.assert_array_equal(sigma2, ref_sigma)
  # A different key (another feature net) is stale: recomputed and overwritten.
  fid.cached_statistics(path, lambda: (np.zeros(6), np.eye(6)), key="other")
  mu3, sigma3 = fid.cached_statistics(path, compute, key="other")
  assert len(calls) == 1
  np.testing.assert_array_equal(mu3, np.zeros(6))
  np.testing.assert_array_equal(sigma3, np.eye(6))


def test_cached_statistics_unreadable_file_names_it(tmp_path):
  path = tmp_path / "broken.npz"
  path.write_bytes(b"not an npz")
  with pytest.raises(fid.FIDError, match="broken.npz.*delete the file"):
    fid.cached_statistics(str(path), lambda: np.zeros((3, 2)))
