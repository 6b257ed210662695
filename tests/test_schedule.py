"""Noise schedules and q_sample."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.diffusion import schedule as S


def test_linear_schedule_matches_ddpm():
  s = S.make_schedule("linear", 1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)


def test_stable_schedule_is_squared_linspace_of_roots():
  betas = S.discrete_betas("stable", 1000)
  assert math.isclose(betas[0], 0.00085, rel_tol=1e-9) and math.isclose(betas[-1], 0.012, rel_tol=1e-9)
  np.testing.assert_allclose(np.sqrt(betas[1:]) - np.sqrt(betas[:-1]),
                             (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)


def test_cosine_schedule_alpha_bar_follows_cos_squared():
  s = S.make_schedule("cosine", 1000)
  f = lambda n: math.cos((n / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  for n in (0, 250, 500):
    np.testing.assert_allclose(s.alphas_cumprod[n], f(n + 1) / f(0), rtol=1e-4)


def test_vpsde_alpha_sigma_and_time_input():
  s = S.make_schedule("vpsde")
  t = jnp.array([0.25, 1.0])
  alpha, sigma = S.alpha_sigma(s, t)
  log_mean = -0.25 * np.array([0.25, 1.0]) ** 2 * 19.9 - 0.5 * np.array([0.25, 1.0]) * 0.1
  np.testing.assert_allclose(alpha, np.exp(log_mean), rtol=1e-6)
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(S.model_time(s, t), [249.75, 999.0])
  ts = S.sample_train_times(s, jax.random.PRNGKey(0), 1000)
  assert float(ts.min()) >= S.VPSDE_T_EPS and float(ts.max()) <= 1.0


def test_q_sample_per_sample_times():
  s = S.make_schedule("linear")
  x0 = jnp.ones((2, 2, 2, 1))
  noise = -jnp.ones((2, 2, 2, 1))
  xt = S.q_sample(s, x0, jnp.array([0, 999]), noise)
  abar = np.asarray(s.alphas_cumprod)
  np.testing.assert_allclose(xt[0], np.sqrt(abar[0]) - np.sqrt(1 - abar[0]), rtol=1e-6)
  np.testing.assert_allclose(xt[1], np.sqrt(abar[999]) - np.sqrt(1 - abar[999]), rtol=1e-5)


def test_sampling_grid_ends_clean():
  s = S.make_schedule("linear")
  g = S.sampling_grid(s, 4)
  np.testing.assert_array_equal(g, [999, 666, 333, 0, -1])
  a, sg = S.grid_alpha_sigma(s, g)
  assert float(a[-1]) == 1.0 and float(sg[-1]) == 0.0
  with pytest.raises(ValueError, match="sample.steps \\(2000\\) exceeds diffusion.timesteps \\(1000\\)"):
    S.sampling_grid(s, 2000)


def test_discrete_time_input_is_uvits_one_based_label():
  """U-ViT trains its discrete models on labels n = 1..N (alpha_bar[n - 1]) and DPM-Solver calls
  them at t * N: step index 0 (the least noisy) is label 1, index N - 1 is label N."""
  s = S.make_schedule("linear", 1000)
  np.testing.assert_allclose(S.model_time(s, jnp.array([0, 499, 999])), [1.0, 500.0, 1000.0])


def test_checkpoint_from_before_the_time_label_change_is_refused():
  """A discrete-schedule checkpoint saved without diffusion.time_labels fed the 0-based index:
  refused with one line naming the fix, never sampled one label off in silence."""
  import pytest
  from deediff_jax.train.checkpoint import check_time_labels
  from deediff_jax.tensor_files import CheckpointError
  old = {"diffusion": {"schedule": "cosine", "timesteps": 1000}}
  with pytest.raises(CheckpointError, match="0-based time labels.*retrain") as e:
    check_time_labels(old, "checkpoint /w/checkpoints/500")
  assert "\n" not in str(e.value)
  check_time_labels({"diffusion": {"schedule": "cosine", "timesteps": 1000, "time_labels": "uvit"}}, "x")
  check_time_labels({"diffusion": {"schedule": "vpsde", "timesteps": 1000}}, "x")  # 999 t: unchanged
