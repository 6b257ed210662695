"""DeeDiff training losses on the outputs of every exit.

With eps_i the noise prediction of block i (i = 1..N), u_i its uncertainty and eps the true noise:
  L_simple = mean (eps_N - eps)^2                                  (the ordinary diffusion loss)
  u_hat_i  = tanh(mean_pixels |eps_i - eps|)                       (pseudo ground truth, no gradient)
  L_u      = sum_i mean_batch (u_i - u_hat_i)^2
  L_UAL    = sum_{i<N} mean_batch [(1 - u_i) * mean_pixels (eps_i - eps)^2]
  L_layer  = sum_{i<N} mean (eps_i - eps)^2                        (optional, unweighted)
  L        = L_simple + lambda_u L_u + beta_ual L_UAL + layer_loss L_layer

`uem_target` picks what u_hat measures (`loss.uem_target`):
  eps       tanh(mean |eps_i - eps|)                               (the paper; saturates early)
  x0        squash(mean (sigma/alpha) |eps_i - eps|)               (the error of the x0 the sampler
                                                                    derives, x0 = (x - sigma eps)/alpha)
  fidelity  squash(mean (sigma/alpha) |eps_i - sg(eps_N)|)         (distance from the model's own final
                                                                    prediction: what PSNR vs full measures)
with squash(e) = e / (1 + e): monotone, 0.5 at an x0 error of 1, and still resolving errors of
several units, where tanh is already flat (at high noise sigma/alpha is large).

`adadiff_loss` is the official AdaDiff objective (Tangshengku/AdaDiff `sde.py`), with per-pixel
confidence maps c_i [N, B, H, W, C] and the backbone's shared head for every eps_i:
  L_simple = mean (eps_N - eps)^2
  L_conf   = sum_i (1/N) mean_batch mean_pixels (c_i - sg(1 - tanh|eps_i - eps|))^2
  L_layer  = sum_i w_i mean_batch mean_pixels (eps_i - eps)^2,  w_i = mean(c_i) / sum_j mean(c_j)
(w is NOT detached: the layer-wise loss also trains the confidence modules.)

"||eps_i - eps||^2" is taken as a per-sample *mean* over pixels, the same normalisation as
L_simple, so that lambda = beta = 1 keeps every term on one scale whatever the image size.
By default the UAL weight (1 - u_i) is a constant to the optimiser (stop_grad_ual_weight):
otherwise the model could lower L_UAL just by claiming to be uncertain.

`loss.time_weighting` weights every per-sample eps-MSE (L_simple, L_UAL, L_layer; not L_u, whose
target is already per-sample) by a function of the sample's noise level (`time_weights`):
  uniform   1                                   (the paper, DDPM's L_simple)
  min_snr   min(SNR, gamma) / SNR,  SNR = alpha^2 / sigma^2     (Min-SNR-gamma, Hang et al. 2023,
            for eps-prediction: weight 1 wherever SNR <= gamma, less at low noise)
Uniform eps-MSE weights the x0 error by SNR (||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2), so the
high-noise steps where a sample's shape is decided barely move the gradient; min_snr tilts the
gradient back toward them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


TIME_WEIGHTINGS = ("uniform", "min_snr")


def time_weights(name: str, alpha, sigma, gamma: float = 5.0):
  """Per-sample loss weights [B] for `loss.time_weighting` from alpha_t, sigma_t [B]."""
  alpha = jnp.asarray(alpha, jnp.float32)
  if name == "uniform":
    return jnp.ones_like(alpha)
  if name == "min_snr":
    snr = jnp.square(alpha) / jnp.square(jnp.asarray(sigma, jnp.float32))
    return jnp.where(snr <= gamma, 1.0, gamma / jnp.maximum(snr, gamma))  # no 0/0 where alpha = 0
  raise ValueError(f"unknown loss.time_weighting {name!r}; choose one of {', '.join(TIME_WEIGHTINGS)}")


def per_sample_mse(pred, target):
  """[..., B, H, W, C] -> [..., B]."""
  return jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))


def pseudo_uncertainty(eps_all, eps):
  """u_hat [N, B] = tanh(mean |eps_i - eps|); a target only, so its gradient is stopped."""
  return jax.lax.stop_gradient(jnp.tanh(jnp.mean(jnp.abs(eps_all - eps[None]), axis=(-3, -2, -1))))


UEM_TARGETS = ("eps", "x0", "fidelity")


def squash(e):
  """[0, inf) -> [0, 1): e / (1 + e)."""
  return e / (1.0 + e)


def uem_target_values(eps_all, eps, target: str = "eps", x0_scale=None):
  """u_hat [N, B] for `loss.uem_target`; gradient stopped. x0_scale: sigma/alpha per sample [B]."""
  if target == "eps":
    return pseudo_uncertainty(eps_all, eps)
  if target not in UEM_TARGETS:
    raise ValueError(f"unknown loss.uem_target {target!r}; choose one of {', '.join(UEM_TARGETS)}")
  if x0_scale is None:
    raise ValueError(f"loss.uem_target={target} needs sigma/alpha per sample (x0_scale)")
  ref = eps if target == "x0" else eps_all[-1]
  err = jnp.mean(jnp.abs(eps_all - ref[None]), axis=(-3, -2, -1)) * jnp.asarray(x0_scale, jnp.float32)[None]
  return jax.lax.stop_gradient(squash(err))


def deediff_loss(eps_all, u_all, eps, *, lambda_u=1.0, beta_ual=1.0, stop_grad_ual_weight=True,
                 layer_loss=0.0, uem_target="eps", x0_scale=None, sample_weight=None):
  """Total loss and each term, from eps_all [N, B, H, W, C], u_all [N, B] and eps [B, H, W, C];
  sample_weight [B] (`time_weights`) scales each sample's eps-MSE terms."""
  eps_all = eps_all.astype(jnp.float32)
  u_all = u_all.astype(jnp.float32)
  mse = per_sample_mse(eps_all, eps[None])             # [N, B]
  if sample_weight is not None:
    mse = mse * jnp.asarray(sample_weight, jnp.float32)[None]
  l_simple = jnp.mean(mse[-1])
  u_hat = uem_target_values(eps_all, eps, uem_target, x0_scale)
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


def adadiff_loss(eps_all, conf_all, eps, *, lambda_u=1.0, beta_ual=1.0, sample_weight=None):
  """The official AdaDiff loss from eps_all and conf_all [N, B, H, W, C]; lambda_u and beta_ual
  weight the confidence and layer-wise terms (1 and 1 in the official code); sample_weight [B]
  scales each sample's eps-MSE terms."""
  eps_all = eps_all.astype(jnp.float32)
  conf_all = conf_all.astype(jnp.float32)
  n = eps_all.shape[0]
  mse = per_sample_mse(eps_all, eps[None])             # [N, B]
  if sample_weight is not None:
    mse = mse * jnp.asarray(sample_weight, jnp.float32)[None]
  l_simple = jnp.mean(mse[-1])
  target = jax.lax.stop_gradient(1.0 - jnp.tanh(jnp.abs(eps_all - eps[None])))
  l_conf = jnp.sum(jnp.mean(per_sample_mse(conf_all, target), axis=-1)) / n
  layer_conf = jnp.mean(conf_all, axis=(1, 2, 3, 4))   # [N]: batch and pixel mean, not detached
  weights = layer_conf / jnp.sum(layer_conf)
  l_layer = jnp.sum(weights * jnp.mean(mse, axis=-1))
  total = l_simple + lambda_u * l_conf + beta_ual * l_layer
  metrics = {"loss": total, "loss_simple": l_simple, "loss_confidence": l_conf,
             "loss_layerwise": l_layer, "confidence_mean": jnp.mean(conf_all),
             "confidence_target_mean": jnp.mean(target)}
  return total, metrics


def configured_loss(eps_all, scores, eps, spec, *, ltes: bool = False, x0_scale=None, sample_weight=None):
  """The configured loss (`spec`: a `config.LossSpec`); `scores` are u [N, B] (DeeDiff's UEMs) or,
  with `ltes` (the official AdaDiff exits, `ModelConfig.has_ltes`), confidence maps."""
  if ltes:
    return adadiff_loss(eps_all, scores, eps, lambda_u=spec.lambda_u, beta_ual=spec.beta_ual,
                        sample_weight=sample_weight)
  return deediff_loss(eps_all, scores, eps, lambda_u=spec.lambda_u, beta_ual=spec.beta_ual,
                      stop_grad_ual_weight=spec.stop_grad_ual_weight, layer_loss=spec.layer_loss,
                      uem_target=spec.uem_target, x0_scale=x0_scale, sample_weight=sample_weight)
