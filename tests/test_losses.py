"""DeeDiff loss terms against hand-computed values, and where gradients may (not) flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.diffusion.losses import deediff_loss, pseudo_uncertainty


def hand_made():
  # N = 2 exits, B = 2 samples, 1x2x1 images.
  eps = jnp.array([[[[1.0], [-1.0]]], [[[0.0], [2.0]]]])                # [B, 1, 2, 1]
  eps_all = jnp.stack([eps + jnp.array([[[[1.0], [1.0]]], [[[0.5], [-0.5]]]]),  # exit 1: errors
                       eps + 0.1])                                         # exit 2 (last)
  u_all = jnp.array([[0.2, 0.6], [0.1, 0.3]])
  return eps_all, u_all, eps


def test_terms_equal_hand_computation():
  eps_all, u_all, eps = hand_made()
  total, m = deediff_loss(eps_all, u_all, eps, lambda_u=0.5, beta_ual=2.0, layer_loss=0.25)
  # Per-sample MSE: exit 1 -> [1.0, 0.25]; exit 2 -> [0.01, 0.01].
  l_simple = 0.01
  u_hat = np.tanh([[1.0, 0.5], [0.1, 0.1]])            # mean |eps_i - eps|
  l_u = ((0.2 - u_hat[0, 0]) ** 2 + (0.6 - u_hat[0, 1]) ** 2) / 2 + \
        ((0.1 - u_hat[1, 0]) ** 2 + (0.3 - u_hat[1, 1]) ** 2) / 2
  l_ual = ((1 - 0.2) * 1.0 + (1 - 0.6) * 0.25) / 2      # only i < N
  l_layer = (1.0 + 0.25) / 2
  np.testing.assert_allclose(m["loss_simple"], l_simple, rtol=1e-6)
  np.testing.assert_allclose(m["loss_u"], l_u, rtol=1e-6)
  np.testing.assert_allclose(m["loss_ual"], l_ual, rtol=1e-6)
  np.testing.assert_allclose(m["loss_layer"], l_layer, rtol=1e-6)
  np.testing.assert_allclose(total, l_simple + 0.5 * l_u + 2.0 * l_ual + 0.25 * l_layer, rtol=1e-6)


def test_pseudo_uncertainty_carries_no_gradient():
  eps_all, _, eps = hand_made()
  g = jax.grad(lambda e: jnp.sum(pseudo_uncertainty(e, eps)))(eps_all)
  assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("stop", [True, False])
def test_ual_weight_gradient_switch(stop):
  eps_all, u_all, eps = hand_made()
  def ual(u):
    return deediff_loss(eps_all, u, eps, lambda_u=0.0, beta_ual=1.0, stop_grad_ual_weight=stop)[0]
  g = jax.grad(ual)(u_all)
  if stop:
    assert float(jnp.abs(g).max()) == 0.0      # L_UAL gives the UEM nothing
  else:
    # d/du_i of mean_b (1 - u_ib) mse_ib = -mse_ib / B; the last exit is not in L_UAL.
    np.testing.assert_allclose(g, [[-0.5, -0.125], [0.0, 0.0]], rtol=1e-6)


def test_lu_gradient_reaches_u_but_not_through_target():
  eps_all, u_all, eps = hand_made()
  g_eps = jax.grad(lambda e: deediff_loss(e, u_all, eps, lambda_u=1.0, beta_ual=0.0)[1]["loss_u"])(eps_all)
  assert float(jnp.abs(g_eps).max()) == 0.0
  g_u = jax.grad(lambda u: deediff_loss(eps_all, u, eps)[1]["loss_u"])(u_all)
  u_hat = pseudo_uncertainty(eps_all, eps)
  np.testing.assert_allclose(g_u, (u_all - u_hat), rtol=1e-5)   # d/du (u - u_hat)^2 / B with B = 2


def test_min_snr_weights_equal_hand_computation():
  from deediff_jax.diffusion.losses import time_weights
  # SNR = alpha^2 / sigma^2: 0.25/0.75 = 1/3, 0.64/0.36 = 16/9, 0.99/0.01 = 99, and alpha = 0.
  alpha = jnp.sqrt(jnp.array([0.25, 0.64, 0.99, 0.0]))
  sigma = jnp.sqrt(1.0 - jnp.square(alpha))
  np.testing.assert_allclose(time_weights("min_snr", alpha, sigma, gamma=5.0),
                             [1.0, 1.0, 5.0 / 99.0, 1.0], rtol=1e-5)
  np.testing.assert_allclose(time_weights("uniform", alpha, sigma), [1.0] * 4)
  with pytest.raises(ValueError, match="time_weighting"):
    time_weights("snr", alpha, sigma)


def test_sample_weight_scales_each_samples_eps_terms_but_not_the_uem_regression():
  eps_all, u_all, eps = hand_made()
  w = jnp.array([2.0, 0.5])
  _, m = deediff_loss(eps_all, u_all, eps, layer_loss=1.0, sample_weight=w)
  _, m0 = deediff_loss(eps_all, u_all, eps, layer_loss=1.0)
  # Per-sample MSE: exit 1 -> [1.0, 0.25]; exit 2 -> [0.01, 0.01] (see the hand computation above).
  np.testing.assert_allclose(m["loss_simple"], (2.0 * 0.01 + 0.5 * 0.01) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["loss_layer"], (2.0 * 1.0 + 0.5 * 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["loss_ual"], ((1 - 0.2) * 2.0 * 1.0 + (1 - 0.6) * 0.5 * 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(m["loss_u"], m0["loss_u"], rtol=1e-7)
