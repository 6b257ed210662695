"""Fidelity to the full model: PSNR/MSE of hand-made images, the worst-5% definition, the sampler."""
import math

import numpy as np
import pytest

from deediff_jax.config import SamplerSpec, base_config
from deediff_jax.eval import fidelity as F
from deediff_jax.eval import specs


def _offset_images(offsets, shape=(4, 4, 1)):
  """Pairs (zeros, constant images): image i differs by offsets[i] everywhere, so mse_i = offsets[i]^2."""
  offsets = np.asarray(offsets, np.float64)
  full = np.zeros((len(offsets),) + shape, np.float32)
  exit_ = np.broadcast_to(offsets.reshape(-1, 1, 1, 1), full.shape).astype(np.float32)
  return full, exit_


def test_psnr_of_known_mse():
  # Offsets exactly representable in float32, so the MSE is exact.
  full, exit_ = _offset_images([0.5, 0.25, 1.0, 2.0])
  mse = F.per_image_mse(full, exit_)
  np.testing.assert_array_equal(mse, [0.25, 0.0625, 1.0, 4.0])
  psnr = F.per_image_psnr(full, exit_)
  np.testing.assert_allclose(psnr, [10 * math.log10(4 / m) for m in (0.25, 0.0625, 1.0, 4.0)], rtol=1e-12)
  assert psnr[3] == 0.0                       # an error as large as the data range: 0 dB
  np.testing.assert_allclose(psnr[0], 12.041199826559248, rtol=1e-12)
  f = F.fidelity(full, exit_)
  np.testing.assert_allclose(f["psnr_vs_full"], np.mean(psnr), rtol=1e-12)
  np.testing.assert_allclose(f["mse_vs_full"], (0.25 + 0.0625 + 1 + 4) / 4, rtol=1e-12)
  assert f["num_images"] == 4


def test_mse_is_over_every_pixel_and_channel():
  full = np.zeros((2, 2, 2, 3), np.float32)
  exit_ = full.copy()
  exit_[0, 0, 0, 0] = 1.0                      # one of 12 values off by 1 -> mse 1/12
  np.testing.assert_allclose(F.per_image_mse(full, exit_), [1 / 12, 0.0], rtol=1e-12)


def test_worst_five_percent_definition():
  rng = np.random.default_rng(0)
  offsets = rng.permutation(np.linspace(0.01, 0.8, 40))
  full, exit_ = _offset_images(offsets)
  mse = F.per_image_mse(full, exit_)
  psnr = F.psnr_from_mse(mse)
  f = F.fidelity(full, exit_)
  assert F.worst_count(40) == 2                # ceil(5% of 40)
  worst = np.sort(psnr)[:2]                    # the two lowest PSNRs ...
  np.testing.assert_allclose(f["psnr_worst5"], worst.mean(), rtol=1e-12)
  np.testing.assert_allclose(f["mse_worst5"], np.sort(mse)[-2:].mean(), rtol=1e-12)  # ... = largest MSEs
  np.testing.assert_allclose(f["psnr_p5"], np.percentile(psnr, 5), rtol=1e-12)
  np.testing.assert_allclose(f["mse_p95"], np.percentile(mse, 95), rtol=1e-12)
  assert f["psnr_worst5"] < f["psnr_p5"] < f["psnr_vs_full"]
  # Small sets: at least one image; 21 images -> ceil(1.05) = 2.
  assert [F.worst_count(n) for n in (1, 10, 20, 21, 256)] == [1, 1, 1, 2, 13]
  f10 = F.fidelity(*_offset_images([0.1] * 9 + [0.5]))
  np.testing.assert_allclose(f10["psnr_worst5"], 10 * math.log10(4 / 0.25), rtol=1e-6)


def test_identical_images_are_capped_not_infinite():
  full, exit_ = _offset_images([0.0, 0.0, 0.5])
  f = F.fidelity(full, exit_)
  psnr = F.per_image_psnr(full, exit_)
  np.testing.assert_allclose(psnr[:2], F.PSNR_MAX)
  np.testing.assert_allclose(F.PSNR_MAX, 100.0)
  # Float rounding differences (here 1e-6) are capped at the same 100 dB as identical images.
  tiny = F.per_image_psnr(np.zeros((1, 2, 2, 1)), np.full((1, 2, 2, 1), 1e-6))
  np.testing.assert_allclose(tiny, 100.0)
  assert math.isfinite(f["psnr_vs_full"])
  np.testing.assert_allclose(f["psnr_vs_full"], (2 * F.PSNR_MAX + 10 * math.log10(16)) / 3, rtol=1e-12)
  np.testing.assert_allclose(f["psnr_worst5"], 10 * math.log10(16), rtol=1e-6)


def test_bad_input_is_one_line_error():
  a = np.zeros((2, 4, 4, 1))
  with pytest.raises(F.FidelityError, match=r"same shape, got \(2, 4, 4, 1\) and \(3, 4, 4, 1\)"):
    F.fidelity(a, np.zeros((3, 4, 4, 1)))
  bad = a.copy()
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(F.FidelityError, match="NaN or Inf"):
    F.fidelity(a, bad)
  with pytest.raises(F.FidelityError, match="N >= 1"):
    F.fidelity(np.zeros((0, 2, 2, 1)), np.zeros((0, 2, 2, 1)))


def test_deterministic_sampler_for_fidelity():
  c = base_config()
  assert c.sample.sampler == "ddim" and c.sample.eta == 0.0
  spec = SamplerSpec.from_config(c)
  assert F.is_deterministic(c.sample.sampler, c.sample.eta) and F.deterministic_sampler(spec) is spec
  assert specs.deterministic_config(c) is c
  c.sample.sampler = "dpm_solver"
  assert specs.deterministic_config(c) is c
  for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0)):
    c.sample.sampler, c.sample.eta = sampler, eta
    d = specs.deterministic_config(c)
    assert not F.is_deterministic(sampler, eta) and F.is_deterministic(d.sample.sampler, d.sample.eta)
    assert (d.sample.sampler, d.sample.eta, d.sample.steps) == ("ddim", 0.0, c.sample.steps)
    assert (c.sample.sampler, c.sample.eta) == (sampler, eta)        # the original is untouched
    # The core's rule on the typed sampler is the same one.
    assert F.deterministic_sampler(SamplerSpec.from_config(c)) == SamplerSpec.from_config(d)
