"""Noise schedules: discrete (linear, cosine, "stable") and the continuous VPSDE.

One interface serves both, so losses and samplers never branch on the kind:
  - a *time* t: the integer step index n in [0, T-1] for discrete schedules (n = 0 is the least
    noisy step, alpha_bar_0 = 1 - beta_0), a float in (0, 1] for the VPSDE;
  - `alpha_sigma(s, t)` -> (alpha_t, sigma_t) with x_t = alpha_t x_0 + sigma_t eps;
  - `model_time(s, t)`: what the network sees, exactly as U-ViT: the 1-based label n + 1 in
    1..N for discrete schedules (U-ViT trains on n in 1..N and DPM-Solver calls it at t * N),
    999 * t for the VPSDE (the official CIFAR-10/CelebA checkpoints);
  - `sampling_grid(s, steps)`: times from noisiest to cleanest for a sampler.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

VPSDE_BETA_MIN = 0.1
VPSDE_BETA_MAX = 20.0
VPSDE_T_EPS = 1e-3  # smallest time used in training and sampling (the SDE is singular at 0).


@flax.struct.dataclass
class Schedule:
  name: str = flax.struct.field(pytree_node=False)
  continuous: bool = flax.struct.field(pytree_node=False)
  num_timesteps: int = flax.struct.field(pytree_node=False)
  alphas_cumprod: jax.Array  # [T] for discrete schedules; unused (length 1) for the VPSDE.
  beta_min: float = flax.struct.field(pytree_node=False, default=VPSDE_BETA_MIN)
  beta_max: float = flax.struct.field(pytree_node=False, default=VPSDE_BETA_MAX)


def discrete_betas(name: str, timesteps: int) -> np.ndarray:
  if name == "linear":   # DDPM (Ho et al.): 1e-4 -> 0.02 scaled to 1000 steps.
    scale = 1000.0 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
  if name == "stable":   # Latent diffusion / U-ViT latent and text models.
    return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), timesteps, dtype=np.float64) ** 2
  if name == "cosine":   # Nichol & Dhariwal, s = 0.008, betas clipped at 0.999.
    s = 0.008
    f = lambda u: np.cos((u / timesteps + s) / (1 + s) * np.pi / 2) ** 2
    n = np.arange(timesteps + 1, dtype=np.float64)
    return np.clip(1 - f(n[1:]) / f(n[:-1]), 0.0, 0.999)
  raise ValueError(f"diffusion.schedule: unknown discrete schedule {name!r}; choose linear, cosine or stable")


def make_schedule(name: str, timesteps: int = 1000) -> Schedule:
  if name == "vpsde":
    return Schedule(name=name, continuous=True, num_timesteps=timesteps,
                    alphas_cumprod=jnp.ones((1,), jnp.float32))
  betas = discrete_betas(name, timesteps)
  return Schedule(name=name, continuous=False, num_timesteps=timesteps,
                  alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def from_config(diffusion_config) -> Schedule:
  return make_schedule(diffusion_config.schedule, diffusion_config.timesteps)


def vpsde_log_mean_coeff(s: Schedule, t):
  return -0.25 * t ** 2 * (s.beta_max - s.beta_min) - 0.5 * t * s.beta_min


def vpsde_beta(s: Schedule, t):
  return s.beta_min + t * (s.beta_max - s.beta_min)


def alpha_sigma(s: Schedule, t):
  """(alpha_t, sigma_t) for times t (any shape)."""
  if s.continuous:
    log_alpha = vpsde_log_mean_coeff(s, jnp.asarray(t, jnp.float32))
    alpha = jnp.exp(log_alpha)
    return alpha, jnp.sqrt(-jnp.expm1(2.0 * log_alpha))
  abar = s.alphas_cumprod[jnp.asarray(t, jnp.int32)]
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


# The network's time-input convention, recorded in every saved config as diffusion.time_labels.
# "uvit": U-ViT's own, 1-based labels n = 1..N for discrete schedules (what its official discrete
# checkpoints were trained on). Checkpoints saved before the key existed fed the 0-based index
# and are refused (train.checkpoint.check_time_labels) rather than sampled one label off.
TIME_LABELS = "uvit"


def model_time(s: Schedule, t):
  """The network's time input: 999 t for the VPSDE; for discrete schedules U-ViT's 1-based label
  n + 1 of the 0-based step index n (alpha_bar[n]), i.e. t * N in DPM-Solver's continuous time."""
  t = jnp.asarray(t, jnp.float32)
  return t * 999.0 if s.continuous else t + 1.0


def sample_train_times(s: Schedule, rng, batch: int):
  if s.continuous:
    return jax.random.uniform(rng, (batch,), minval=VPSDE_T_EPS, maxval=1.0)
  return jax.random.randint(rng, (batch,), 0, s.num_timesteps)


def q_sample(s: Schedule, x0, t, noise):
  """x_t = alpha_t x0 + sigma_t noise (per-sample t, NHWC x0)."""
  alpha, sigma = alpha_sigma(s, t)
  expand = lambda a: a.reshape(a.shape + (1,) * (x0.ndim - a.ndim))
  return expand(alpha) * x0 + expand(sigma) * noise


def sampling_grid(s: Schedule, steps: int) -> np.ndarray:
  """steps + 1 times from noisiest to cleanest; the sampler steps from grid[i] to grid[i+1].

  Discrete: evenly spaced indices from T-1 down to 0, and a final entry -1 meaning "the clean
  image" (alpha = 1, sigma = 0). VPSDE: U-ViT's / AdaDiff's Euler-Maruyama grid, the network
  evaluated at linspace(1, eps, steps) and a last step from eps to t = 0 (alpha = 1, sigma = 0;
  Euler-Maruyama adds no noise on it), so official checkpoints see the times they were sampled at.
  """
  if steps < 1:
    raise ValueError(f"sample.steps must be >= 1, got {steps}")
  if s.continuous:
    if steps == 1:
      return np.array([1.0, 0.0], np.float32)
    return np.concatenate([np.linspace(1.0, VPSDE_T_EPS, steps), [0.0]]).astype(np.float32)
  if steps > s.num_timesteps:
    raise ValueError(f"sample.steps ({steps}) exceeds diffusion.timesteps ({s.num_timesteps})")
  idx = np.round(np.linspace(s.num_timesteps - 1, 0, steps)).astype(np.int32)
  return np.concatenate([idx, np.array([-1], np.int32)])


def grid_alpha_sigma(s: Schedule, grid):
  """alpha/sigma on a sampling grid, with the discrete sentinel -1 mapped to (1, 0)."""
  if s.continuous:
    return alpha_sigma(s, grid)
  grid = jnp.asarray(grid, jnp.int32)
  alpha, sigma = alpha_sigma(s, jnp.maximum(grid, 0))
  clean = grid < 0
  return jnp.where(clean, 1.0, alpha), jnp.where(clean, 0.0, sigma)
