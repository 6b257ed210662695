"""Samplers that run on device, with the early-exit forward as their noise predictor.

Every sampler is a `lax.scan` over the steps of `schedule.sampling_grid` and takes a noise
predictor `eps_fn(x, t_model, time_frac) -> (eps, stats)` (stats: `exit_layer` [B], `layers_run`
scalar). It returns `(x, {"layers_run": [steps], "exit_layer": [steps, B]})`: the per-step
statistics give the exit heatmap (timestep x layer).

- `ddpm`: ancestral sampling with the exact posterior q(x_s | x_t, x0) of the strided chain
  (alpha_bar_t / alpha_bar_s as the step's alpha, as in improved-diffusion's respacing); with
  steps == timesteps it is Ho et al.'s DDPM.
- `ddim`: Song et al., with eta (0: deterministic; 1: the strided ancestral variance).
- `dpm_solver`: DPM-Solver++ 2M (Lu et al. 2022), multistep in data prediction, on
  alpha/sigma/lambda = log(alpha/sigma) of the grid, for discrete and VPSDE schedules. The first
  step is first order, and so is a step into sigma = 0 (the discrete grid's clean sentinel),
  where lambda is infinite and the second-order correction vanishes.
- `euler_maruyama`: the reverse VPSDE dx = [f - g^2 score] dt + g dW with score = -eps/sigma,
  as in U-ViT's CIFAR-10/CelebA sampler; the last step adds no noise.
- `dpm_solver_fast`: U-ViT's latent-model evaluation sampler, DPM-Solver++ singlestep in its
  "fast" mode (order 3, lower orders at the end, uniform time steps), see `dpm_solver_fast_grid`.

x0 predictions are clipped to [-1, 1] only for DDPM/DDIM and only when asked (`clip`; the
top-level `sample` turns it on for pixel models, off for latent ones).

Classifier-free guidance uses U-ViT's convention eps = (1 + s) eps_cond - s eps_null, with the
conditional and null rows in one batch of 2B that share exit decisions (`cfg_pairs`); s = 0 uses
the conditional prediction alone and does not double the batch.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

from deediff_jax.config import SAMPLERS
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.diffusion.schedule import Schedule
from deediff_jax.early_exit import check_policy, early_exit_forward, make_policy_params, policy_from_config
from deediff_jax.model.deediff import DeeDiffUViT
from deediff_jax.model.uvit import ModelConfig

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], tuple]


# ----------------------------------------------------------------------------- the grid

class SamplerError(ValueError):
  """Bad sampler input (one line; the CLI prints it and exits 2)."""


def grid_arrays(schedule: Schedule, steps: int) -> dict:
  """Per-grid-point arrays ([steps + 1]) every sampler reads."""
  grid = sched_lib.sampling_grid(schedule, steps)
  alpha, sigma = sched_lib.grid_alpha_sigma(schedule, grid)
  safe = np.maximum(grid, 0)
  if schedule.continuous:
    frac = np.asarray(grid, np.float32)
  else:
    frac = safe.astype(np.float32) / float(schedule.num_timesteps - 1)
  return {"grid": grid, "t_model": sched_lib.model_time(schedule, safe), "time_frac": jnp.asarray(frac),
          "alpha": jnp.asarray(alpha, jnp.float32), "sigma": jnp.asarray(sigma, jnp.float32)}


def _bcast(a, x):
  return jnp.reshape(a, (1,) * x.ndim)


def _scan_steps(step_fn, schedule, steps, x_init, rng, carry_extra=None):
  """Scans `step_fn(carry, per_step) -> (carry, stats)` over the grid's steps."""
  g = grid_arrays(schedule, steps)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  per_step = {
      "index": jnp.arange(steps),
      "t": jnp.asarray(g["grid"][:-1], jnp.float32),
      "t_next": jnp.asarray(g["grid"][1:], jnp.float32),
      "t_model": g["t_model"][:-1], "time_frac": g["time_frac"][:-1],
      "alpha": g["alpha"][:-1], "sigma": g["sigma"][:-1],
      "alpha_next": g["alpha"][1:], "sigma_next": g["sigma"][1:],
      "key": jax.random.split(rng, steps),
  }
  (x, _), stats = lax.scan(step_fn, (x_init, carry_extra), per_step)
  return x, stats


def _predict(eps_fn, x, s):
  eps, st = eps_fn(x, s["t_model"], s["time_frac"])
  return eps.astype(x.dtype), dict(st)  # exit_layer, layers_run (+ whatever else eps_fn reports)


def _x0_from_eps(x, eps, alpha, sigma, clip):
  x0 = (x - sigma * eps) / alpha
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - alpha * x0) / sigma  # keep eps consistent with the clipped x0 (as diffusers does)
  return x0, eps


# ----------------------------------------------------------------------------- samplers

def ddim(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng=None, *, eta=0.0, clip=False):
  """DDIM: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, c = eta sigma_s/sigma_t sqrt(1 - a_t^2/a_s^2)."""
  def step(carry, s):
    x, _ = carry
    a, sg, an, sn = (_bcast(s[k], x) for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    eps, st = _predict(eps_fn, x, s)
    x0, eps = _x0_from_eps(x, eps, a, sg, clip)
    c = eta * (sn / sg) * jnp.sqrt(jnp.maximum(1.0 - (a / an) ** 2, 0.0))
    z = jax.random.normal(s["key"], x.shape, x.dtype)
    x = an * x0 + jnp.sqrt(jnp.maximum(sn ** 2 - c ** 2, 0.0)) * eps + c * z
    return (x, None), st
  return _scan_steps(step, schedule, steps, x_init, rng)


def ddpm(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng, *, clip=False):
  """Ancestral sampling from the exact posterior q(x_s | x_t, x0) of the (strided) chain."""
  def step(carry, s):
    x, _ = carry
    a, sg, an, sn = (_bcast(s[k], x) for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    eps, st = _predict(eps_fn, x, s)
    x0, _ = _x0_from_eps(x, eps, a, sg, clip)
    alpha_step = (a / an) ** 2                 # alpha_bar_t / alpha_bar_s
    beta_step = 1.0 - alpha_step
    mean = (an * beta_step / sg ** 2) * x0 + (jnp.sqrt(alpha_step) * sn ** 2 / sg ** 2) * x
    var = beta_step * sn ** 2 / sg ** 2        # zero on the step into the clean image
    z = jax.random.normal(s["key"], x.shape, x.dtype)
    return (mean + jnp.sqrt(var) * z, None), st
  return _scan_steps(step, schedule, steps, x_init, rng)


def dpm_solver(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng=None, *, clip=False):
  """DPM-Solver++ 2M (data prediction, multistep); first step and a step to sigma = 0 are first order."""
  def step(carry, s):
    x, (x0_prev, lam_prev) = carry
    a, sg, an, sn = (_bcast(s[k], x) for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    eps, st = _predict(eps_fn, x, s)
    x0, _ = _x0_from_eps(x, eps, a, sg, clip)
    lam = jnp.log(s["alpha"]) - jnp.log(s["sigma"])
    lam_next = jnp.log(s["alpha_next"]) - jnp.log(s["sigma_next"])  # +inf into the clean image
    h = lam_next - lam
    second = (s["index"] > 0) & jnp.isfinite(h)
    r = jnp.where(second, (lam - lam_prev) / jnp.where(second, h, 1.0), 1.0)
    d = jnp.where(second, x0 + (0.5 / r) * (x0 - x0_prev), x0)
    x = (sn / sg) * x + (-an * jnp.expm1(-h)) * d
    return (x, (x0, lam)), st
  extra = (jnp.zeros_like(x_init), jnp.zeros((), jnp.float32))
  return _scan_steps(step, schedule, steps, x_init, rng, extra)


def euler_maruyama(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng):
  """Reverse-time Euler-Maruyama for the VPSDE (U-ViT's CIFAR-10/CelebA sampler)."""
  if not schedule.continuous:
    raise SamplerError("sample.sampler 'euler_maruyama' needs diffusion.schedule=vpsde")
  def step(carry, s):
    x, _ = carry
    sg = _bcast(s["sigma"], x)
    eps, st = _predict(eps_fn, x, s)
    dt = s["t"] - s["t_next"]
    beta = sched_lib.vpsde_beta(schedule, s["t"])
    score = -eps / sg
    drift = -0.5 * beta * x - beta * score     # f - g^2 score, the reverse drift in forward time
    mean = x - drift * dt
    z = jax.random.normal(s["key"], x.shape, x.dtype)
    noise_scale = jnp.where(s["index"] == steps - 1, 0.0, jnp.sqrt(beta * dt))
    return (mean + noise_scale * z, None), st
  return _scan_steps(step, schedule, steps, x_init, rng)


# ----------------------------------------------------------------------------- DPM-Solver-fast

def dpm_solver_fast_orders(steps: int) -> list:
  """The orders of DPM-Solver-fast's outer steps for `steps` network evaluations (they sum to it).

  K = steps // 3 + 1 outer steps: third order, then the remainder as lower orders at the end:
  steps % 3 == 0 -> [3]*(K-2) + [2, 1]; == 1 -> [3]*(K-1) + [1]; == 2 -> [3]*(K-1) + [2].
  """
  if steps < 1:
    raise SamplerError(f"sample.steps must be >= 1, got {steps}")
  k = steps // 3 + 1
  tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
  return [3] * (k - len(tail)) + tail


def _fast_log_alpha(schedule: Schedule, t: np.ndarray) -> np.ndarray:
  """log alpha at continuous times t (float64): the VPSDE's own, or for a discrete schedule the
  piecewise-linear interpolation of 0.5 log alpha_bar[n] placed at t_n = (n + 1) / N."""
  if schedule.continuous:
    return np.asarray(sched_lib.vpsde_log_mean_coeff(schedule, t), np.float64)
  n = schedule.num_timesteps
  log_alpha = 0.5 * np.log(np.asarray(schedule.alphas_cumprod, np.float64))
  return np.interp(t, np.arange(1, n + 1, dtype=np.float64) / n, log_alpha)


def dpm_solver_fast_grid(schedule: Schedule, steps: int) -> dict:
  """Everything DPM-Solver-fast needs, on the host in float64 (the schedule must be concrete).

  U-ViT's call: `DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), predict_x0=True)
  .sample(x, steps, eps=1/N, T=1)` with the defaults method='fast', order=3,
  skip_type='time_uniform', solver_type='dpm_solver', denoise=False. Its grid is
  t = linspace(1, 1/N, steps + 1) (continuous time; the VPSDE uses linspace(1, 1e-3, steps + 1)),
  and an outer step of order k goes from t[i] to t[i+k] with its intermediate points at
  t[i+1], t[i+2] (r1, r2 from lambda), so network evaluation j is at t[j], j < steps, and its
  result moves x to t[j+1]. The sampler ends at t = 1/N (no final denoising).

  The network's time input: U-ViT passes t * N to a network trained on 1-based labels n = 1..N
  (noise level alpha_bar[n-1] in our 0-based indexing); in this library's 0-based label
  convention (`schedule.model_time`) that is t * N - 1 = (t - 1/N) N, i.e. 999 at t = 1.
  `time_frac` (1 = noisiest) is that label / (N - 1), as `grid_arrays` gives the other samplers;
  the VPSDE uses 999 t and t.

  Returns orders, t [steps + 1], log_alpha / alpha / sigma / lam [steps + 1], t_model and
  time_frac [steps], and the per-evaluation update coefficients `cx`, `c0`, `c1`, `start`
  [steps]: x[t_{j+1}] = cx x_s + c0 x0_s + c1 x0_j, where x_s / x0_s are the state and the x0
  prediction at the start of the current outer step (`start` marks evaluations that begin one).
  """
  orders = dpm_solver_fast_orders(steps)
  if schedule.continuous:
    t = np.linspace(1.0, sched_lib.VPSDE_T_EPS, steps + 1, dtype=np.float64)
    label = 999.0 * t
    frac = t
  else:
    n = schedule.num_timesteps
    t = np.linspace(1.0, 1.0 / n, steps + 1, dtype=np.float64)
    label = t * n - 1.0
    frac = label / (n - 1)
  log_alpha = _fast_log_alpha(schedule, t)
  alpha = np.exp(log_alpha)
  sigma = np.sqrt(-np.expm1(2.0 * log_alpha))
  lam = log_alpha - np.log(sigma)
  cx, c0, c1 = np.zeros(steps), np.zeros(steps), np.zeros(steps)
  start = np.zeros(steps, bool)
  i = 0
  for order in orders:
    h = lam[i + order] - lam[i]
    start[i] = True
    # stage 0 (every order): the first-order DPM-Solver++ step from t[i] to t[i+1]
    cx[i] = sigma[i + 1] / sigma[i]
    c0[i] = -alpha[i + 1] * np.expm1(-(lam[i + 1] - lam[i]))
    if order == 2:
      r1 = (lam[i + 1] - lam[i]) / h
      e = -alpha[i + 2] * np.expm1(-h)
      cx[i + 1] = sigma[i + 2] / sigma[i]
      c0[i + 1], c1[i + 1] = e * (1.0 - 0.5 / r1), e * (0.5 / r1)
    elif order == 3:
      r1, r2 = (lam[i + 1] - lam[i]) / h, (lam[i + 2] - lam[i]) / h
      phi22 = np.expm1(-r2 * h) / (r2 * h) + 1.0
      cx[i + 1] = sigma[i + 2] / sigma[i]
      d = (r2 / r1) * alpha[i + 2] * phi22
      c0[i + 1], c1[i + 1] = -alpha[i + 2] * np.expm1(-r2 * h) - d, d
      phi2 = np.expm1(-h) / h + 1.0
      cx[i + 2] = sigma[i + 3] / sigma[i]
      d = alpha[i + 3] * phi2 / r2
      c0[i + 2], c1[i + 2] = -alpha[i + 3] * np.expm1(-h) - d, d
    i += order
  assert i == steps
  return {"orders": orders, "t": t, "log_alpha": log_alpha, "alpha": alpha, "sigma": sigma, "lam": lam,
          "t_model": label[:-1], "time_frac": frac[:-1], "cx": cx, "c0": c0, "c1": c1, "start": start}


def dpm_solver_fast(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng=None):
  """U-ViT's DPM-Solver-fast (DPM-Solver++ singlestep, orders 3/2/1, uniform time): `steps`
  network evaluations in one `lax.scan` (one eval per iteration, coefficients from
  `dpm_solver_fast_grid`); deterministic, so `rng` is unused."""
  del rng
  g = dpm_solver_fast_grid(schedule, steps)
  f32 = lambda k: jnp.asarray(g[k], jnp.float32)
  per_step = {"t_model": f32("t_model"), "time_frac": f32("time_frac"),
              "alpha": f32("alpha")[:-1], "sigma": f32("sigma")[:-1],
              "cx": f32("cx"), "c0": f32("c0"), "c1": f32("c1"), "start": jnp.asarray(g["start"])}

  def step(carry, s):
    x, x_s, x0_s = carry
    a, sg = _bcast(s["alpha"], x), _bcast(s["sigma"], x)
    eps, st = _predict(eps_fn, x, s)
    x0 = (x - sg * eps) / a
    x_s = jnp.where(s["start"], x, x_s)
    x0_s = jnp.where(s["start"], x0, x0_s)
    cx, c0, c1 = (_bcast(s[k], x).astype(x.dtype) for k in ("cx", "c0", "c1"))
    return (cx * x_s + c0 * x0_s + c1 * x0, x_s, x0_s), st

  (x, _, _), stats = lax.scan(step, (x_init, x_init, jnp.zeros_like(x_init)), per_step)
  return x, stats


def run_sampler(name: str, eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng, *,
                eta=0.0, clip=False):
  if name == "ddim":
    return ddim(eps_fn, schedule, steps, x_init, rng, eta=eta, clip=clip)
  if name == "ddpm":
    return ddpm(eps_fn, schedule, steps, x_init, rng, clip=clip)
  if name == "dpm_solver":
    return dpm_solver(eps_fn, schedule, steps, x_init, rng)
  if name == "euler_maruyama":
    return euler_maruyama(eps_fn, schedule, steps, x_init, rng)
  if name == "dpm_solver_fast":
    return dpm_solver_fast(eps_fn, schedule, steps, x_init, rng)
  raise SamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


# ----------------------------------------------------------------------------- noise predictors

def guide(eps_pair, guidance_scale):
  """U-ViT's classifier-free guidance on a [cond rows; null rows] prediction."""
  half = eps_pair.shape[0] // 2
  s = jnp.asarray(guidance_scale, eps_pair.dtype)
  return (1.0 + s) * eps_pair[:half] - s * eps_pair[half:]


def _is_zero(scale) -> bool:
  return isinstance(scale, (int, float)) and float(scale) == 0.0


def _conditioning(cfg: ModelConfig, y, context, null_y, null_context, doubled: bool):
  """(y, context) for the model call; for CFG the null rows follow the conditional ones."""
  if not doubled:
    return y, context
  if cfg.num_classes == 0 and cfg.context_dim == 0:
    raise SamplerError("sample.guidance_scale > 0 needs a conditional model (model.num_classes or "
                     "model.context_dim); set sample.guidance_scale=0")
  if cfg.num_classes > 0:
    b = y.shape[0]
    null_y = jnp.full((b,), cfg.num_classes, jnp.int32) if null_y is None else jnp.asarray(null_y, jnp.int32)
    y = jnp.concatenate([jnp.asarray(y, jnp.int32), jnp.broadcast_to(null_y, (b,))], axis=0)
  if cfg.context_dim > 0:
    if null_context is None:
      raise SamplerError("classifier-free guidance for a text model needs the null caption's features "
                       "(null_context); set sample.guidance_scale=0 or provide them")
    null_context = jnp.broadcast_to(jnp.asarray(null_context, context.dtype), context.shape)
    context = jnp.concatenate([context, null_context], axis=0)
  return y, context


def x0_scale_fn(schedule: Schedule):
  """time_frac -> sigma/alpha of that time: how much an eps error grows in the sampler's x0."""
  def fn(time_frac):
    frac = jnp.asarray(time_frac, jnp.float32)
    t = frac if schedule.continuous else jnp.round(frac * (schedule.num_timesteps - 1)).astype(jnp.int32)
    alpha, sigma = sched_lib.alpha_sigma(schedule, t)
    return sigma / alpha
  return fn


def make_eps_fn(params, cfg, policy: str = "none", policy_params=None, y=None, context=None,
                guidance_scale=0.0, null_y=None, null_context=None, *, aggregate: str = "all",
                plain: bool = False, x0_scale_of=None) -> EpsFn:
  """The noise predictor a sampler calls: early exit (default) or the plain full-depth forward.

  `plain=True` is the real baseline: `module.apply` (the scan forward, no while loop, no exit
  machinery); its stats report every sample at full depth. `guidance_scale` may be traced, but a
  Python 0 (the default) means no guidance and no doubled batch. policy="oracle" needs
  `x0_scale_of` (`x0_scale_fn(schedule)`).
  """
  cfg = ModelConfig.from_config(cfg)
  n = cfg.num_blocks
  module = DeeDiffUViT(cfg)
  doubled = not _is_zero(guidance_scale)
  y_in, ctx_in = _conditioning(cfg, y, context, null_y, null_context, doubled)
  if not plain:
    check_policy(policy, cfg, aggregate)
    if policy_params is None:
      policy_params = make_policy_params(n)

  def eps_fn(x, t_model, time_frac):
    b = x.shape[0]
    xin = jnp.concatenate([x, x], axis=0) if doubled else x
    t = jnp.broadcast_to(jnp.asarray(t_model, jnp.float32), (xin.shape[0],))
    if plain:
      eps = module.apply({"params": params}, xin, t, y_in, ctx_in)
      stats = {"exit_layer": jnp.full((xin.shape[0],), n, jnp.int32), "layers_run": jnp.asarray(n, jnp.int32)}
    else:
      extra = {}
      if policy == "oracle":
        if x0_scale_of is None:
          raise SamplerError("exit policy 'oracle' needs x0_scale_of (samplers.x0_scale_fn(schedule))")
        extra = dict(x0_scale=x0_scale_of(time_frac), guidance_scale=guidance_scale if doubled else None)
      eps, stats = early_exit_forward(params, cfg, xin, t, y_in, ctx_in, policy=policy,
                                      policy_params=policy_params, time_frac=time_frac,
                                      cfg_pairs=doubled, aggregate=aggregate, **extra)
    if doubled:
      eps = guide(eps, guidance_scale)
    return eps, {"exit_layer": stats["exit_layer"][:b], "layers_run": stats["layers_run"]}
  return eps_fn


def make_plain_eps_fn(params, cfg, y=None, context=None, guidance_scale=0.0, null_y=None,
                      null_context=None) -> EpsFn:
  """The plain full-depth noise predictor (the scan forward), same interface as `make_eps_fn`."""
  return make_eps_fn(params, cfg, y=y, context=context, guidance_scale=guidance_scale, null_y=null_y,
                     null_context=null_context, plain=True)


# ----------------------------------------------------------------------------- top level

@functools.lru_cache(maxsize=64)
def _compiled(cfg: ModelConfig, schedule_name: str, timesteps: int, sampler: str, steps: int,
              policy: str, aggregate: str, doubled: bool, clip: bool, plain: bool):
  """One jitted sampler per static setting; thresholds, depths, eta and guidance are traced."""
  schedule = sched_lib.make_schedule(schedule_name, timesteps)

  def fn(params, x_init, rng, y, context, null_context, policy_params, guidance_scale, eta):
    eps_fn = make_eps_fn(params, cfg, policy, policy_params, y, context,
                         guidance_scale if doubled else 0.0, None, null_context,
                         aggregate=aggregate, plain=plain, x0_scale_of=x0_scale_fn(schedule))
    x, stats = run_sampler(sampler, eps_fn, schedule, steps, x_init, rng, eta=eta, clip=clip)
    return x, stats
  return jax.jit(fn)


_EXECUTABLES: dict = {}   # (jitted fn, argument shapes) -> its ahead-of-time compiled executable


def _signature(args) -> tuple:
  leaves, treedef = jax.tree_util.tree_flatten(args)
  return (treedef,) + tuple((tuple(np.shape(v)), str(getattr(v, "dtype", type(v)))) for v in leaves)


def _executable(fn, args):
  """The compiled program for these argument shapes: `lower(...).compile()` once, never inside a
  call that is being timed (warm-ups call `sample(..., compile_only=True)`)."""
  key = (fn, _signature(args))
  if key not in _EXECUTABLES:
    if len(_EXECUTABLES) >= 256:
      _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
    _EXECUTABLES[key] = fn.lower(*args).compile()
  return _EXECUTABLES[key]


def initial_noise(rng, batch_index: int, shape):
  """The starting noise of one batch: a function of the seed and the batch index only."""
  return jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, batch_index), 0), shape, jnp.float32)


def sample(params, config, rng, num: int, *, policy: Optional[str] = None, policy_params=None,
           labels=None, context=None, null_context=None, plain: bool = False,
           aggregate: Optional[str] = None, progress: bool = False, compile_only: bool = False):
  """Samples `num` images in batches of `config.sample.batch_size` -> (images, stats).

  images: [num, H, W, C] float32 (clipped to [-1, 1] for pixel models; raw for latent models).
  stats (NumPy): `layers_run` [batches, steps], `exit_layer` [steps, num], `batch_sizes` [batches].
  The policy defaults to `config.exit`; `plain=True` uses the plain full-depth forward. The
  initial noise and the sampler's noise depend only on `rng` and the batch index, so early exit
  and full depth start from the same noise. `compile_only=True` compiles the program of every
  batch shape (ahead of time, nothing runs) and returns None: a timed call after it compiles
  nothing.
  """
  cfg = ModelConfig.from_config(config.model)
  n = cfg.num_blocks
  if policy is None or policy_params is None:
    policy, cfg_params = policy_from_config(config, n, policy)
    policy_params = cfg_params if policy_params is None else policy_params
  aggregate = config.exit.aggregate if aggregate is None else aggregate
  if not plain:
    check_policy(policy, cfg, aggregate)
  s = config.sample
  if s.sampler not in SAMPLERS:
    raise SamplerError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
  scale = float(s.guidance_scale)
  doubled = scale != 0.0
  clip = s.sampler in ("ddpm", "ddim") and not bool(config.data.get("latent", False))
  if cfg.num_classes == 0:
    labels = None  # e.g. the caption labels of a text model: metadata, not a model input
  elif labels is None:
    labels = np.arange(num) % cfg.num_classes
  if cfg.context_dim > 0 and context is None:
    raise SamplerError(f"this text model needs context [num, {cfg.context_len}, {cfg.context_dim}] "
                     "(set data.context_file to caption features with 'eval_features')")
  if doubled and cfg.num_classes == 0 and cfg.context_dim == 0:
    raise SamplerError("sample.guidance_scale > 0 needs a conditional model; set sample.guidance_scale=0")
  if doubled and cfg.context_dim > 0 and null_context is None:
    raise SamplerError("sample.guidance_scale > 0 on a text model needs the null caption's features "
                     "('null_features' in data.context_file); set sample.guidance_scale=0 or add them")
  fn = _compiled(cfg, config.diffusion.schedule, int(config.diffusion.timesteps), s.sampler,
                 int(s.steps), "none" if plain else policy, aggregate, doubled, clip, bool(plain))
  shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
  bs = int(s.batch_size)
  starts = list(range(0, num, bs))
  images, layers_run, exit_layer, sizes = [], [], [], []
  if compile_only:  # one batch of each distinct size: shapes are all that matter
    starts = list({min(st + bs, num) - st: st for st in reversed(starts)}.values())
  for bi, start in enumerate(tqdm(starts, desc="sampling", disable=not progress or compile_only, leave=False)):
    stop = min(start + bs, num)
    x_init = initial_noise(rng, bi, (stop - start,) + shape)
    step_rng = jax.random.fold_in(jax.random.fold_in(rng, bi), 1)
    y = None if labels is None else jnp.asarray(np.asarray(labels)[start:stop], jnp.int32)
    ctx = None if context is None else jnp.asarray(np.asarray(context)[start:stop], jnp.float32)
    nctx = None if null_context is None else jnp.asarray(null_context, jnp.float32)
    args = (params, x_init, step_rng, y, ctx, nctx, policy_params, jnp.float32(scale), jnp.float32(s.eta))
    program = _executable(fn, args)
    if compile_only:
      continue
    x, st = program(*args)
    images.append(x)
    layers_run.append(st["layers_run"])
    exit_layer.append(st["exit_layer"])
    sizes.append(stop - start)
  if compile_only:
    return None
  # Host-side assembly: eager jnp ops on new shapes would compile inside a timed call.
  images = np.concatenate([np.asarray(v, np.float32) for v in images], axis=0)
  if not bool(config.data.get("latent", False)):
    images = np.clip(images, -1.0, 1.0)
  stats = {"layers_run": np.stack([np.asarray(v) for v in layers_run]),
           "exit_layer": np.concatenate([np.asarray(v) for v in exit_layer], axis=1),
           "batch_sizes": np.asarray(sizes, np.int64)}
  return images, stats


def summarize(stats: dict, num_blocks: int) -> dict:
  """Layer ratios and per-step arrays from `sample`'s stats.

  layer_ratio_run: blocks actually executed / full depth, averaged over steps and weighted by
  batch size (the real compute); layer_ratio_per_sample: mean per-sample exit depth / full depth
  (the paper's "layer ratio").
  """
  lr = np.asarray(stats["layers_run"], np.float64)             # [batches, steps]
  el = np.asarray(stats["exit_layer"], np.float64)             # [steps, num]
  w = np.asarray(stats["batch_sizes"], np.float64)[:, None]
  hist = np.stack([np.bincount(row.astype(np.int64), minlength=num_blocks + 1)[1:] for row in el])
  return {
      "layer_ratio_run": float(np.sum(lr * w) / (np.sum(w) * lr.shape[1] * num_blocks)),
      "layer_ratio_per_sample": float(np.mean(el) / num_blocks),
      "layers_run_per_step": (np.sum(lr * w, axis=0) / np.sum(w)).tolist(),
      "mean_exit_layer_per_step": np.mean(el, axis=1).tolist(),
      "exit_histogram": hist.astype(int).tolist(),               # [steps, num_blocks]
  }
