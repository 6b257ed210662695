"""DeeDiff training losses on the outputs of every exit.

With eps_i the noise prediction of block i (i = 1..N), u_i its uncertainty and eps the true noise:
  L_simple = mean (eps_N - eps)^2                                  (the ordinary diffusion loss)
  u_hat_i  = tanh(mean_pixels |eps_i - eps|)                       (pseudo ground truth, no gradient)
  L_u      = sum_i mean_batch (u_i - u_hat_i)^2
  L_UAL    = sum_{i<N} mean_batch [(1 - u_i) * mean_pixels (eps_i - eps)^2]
  L_layer  = sum_{i<N} mean (eps_i - eps)^2                        (optional, unweighted)
  L        = L_simple + lambda_u L_u + beta_ual L_UAL + layer_loss L_layer

"||eps_i - eps||^2" is taken as a per-sample *mean* over pixels, the same normalisation as
L_simple, so that lambda = beta = 1 keeps every term on one scale whatever the image size.
By default the UAL weight (1 - u_i) is a constant to the optimiser (stop_grad_ual_weight):
otherwise the model could lower L_UAL just by claiming to be uncertain.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def per_sample_mse(pred, target):
  """[..., B, H, W, C] -> [..., B]."""
  return jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))


def pseudo_uncertainty(eps_all, eps):
  """u_hat [N, B] = tanh(mean |eps_i - eps|); a target only, so its gradient is stopped."""
  return jax.lax.stop_gradient(jnp.tanh(jnp.mean(jnp.abs(eps_all - eps[None]), axis=(-3, -2, -1))))


def deediff_loss(eps_all, u_all, eps, *, lambda_u=1.0, beta_ual=1.0, stop_grad_ual_weight=True,
                 layer_loss=0.0):
  """Total loss and each term, from eps_all [N, B, H, W, C], u_all [N, B] and eps [B, H, W, C]."""
  eps_all = eps_all.astype(jnp.float32)
  u_all = u_all.astype(jnp.float32)
  mse = per_sample_mse(eps_all, eps[None])             # [N, B]
  l_simple = jnp.mean(mse[-1])
  u_hat = pseudo_uncertainty(eps_all, eps)
  l_u = jnp.sum(jnp.mean(jnp.square(u_all - u_hat), axis=-1))
  weight = 1.0 - u_all[:-1]
  if stop_grad_ual_weight:
    weight = jax.lax.stop_gradient(weight)
  l_ual = jnp.sum(jnp.mean(weight * mse[:-1], axis=-1))
  l_layer = jnp.sum(jnp.mean(mse[:-1], axis=-1))
  total = l_simple + lambda_u * l_u + beta_ual * l_ual + layer_loss * l_layer
  metrics = {"loss": total, "loss_simple": l_simple, "loss_u": l_u, "loss_ual": l_ual,
             "loss_layer": l_layer, "u_mean": jnp.mean(u_all), "u_hat_mean": jnp.mean(u_hat)}
  return total, metrics


def loss_from_config(eps_all, u_all, eps, loss_config):
  return deediff_loss(eps_all, u_all, eps, lambda_u=loss_config.lambda_u, beta_ual=loss_config.beta_ual,
                      stop_grad_ual_weight=loss_config.stop_grad_ual_weight,
                      layer_loss=loss_config.layer_loss)
