"""Samplers that run on device over a plain noise predictor (they know nothing of networks).

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
- `dpm_solver_2s`: DPM-Solver++ singlestep order 2 (Learning-to-Cache's U-ViT sampler): `steps`
  network evaluations (NFE, even) in steps / 2 solver steps on t = linspace(1, 1/N, steps/2 + 1),
  the intermediate time inverse_lambda(lambda_s + h/2), the network at t * N.

`ddim` and `dpm_solver_2s` also take `cache=(state, reuse)` (Learning-to-Cache, see
`deediff_jax.caching`): the noise predictor is then called as `eps_fn(x, t_model, time_frac,
cache=state, reuse=reuse_row)`, reports the new state in `stats["cache"]`, and the state rides in
the scan carry; `reuse` [solver_steps, N, 2] says which sublayers reuse at each step's first
evaluation (intermediate evaluations reuse nothing).

x0 predictions are clipped to [-1, 1] only for DDPM/DDIM and only when asked (`clip`;
`deediff_jax.sampling.sample` turns it on for pixel models, off for latent ones).

`guide` is U-ViT's classifier-free guidance, eps = (1 + s) eps_cond - s eps_null, on a
[conditional rows; null rows] prediction. Building the noise predictor from a network (guidance,
early exit, batching) is `deediff_jax.sampling`'s job.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deediff_jax.config import SAMPLERS
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.diffusion.schedule import Schedule

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


def _predict_cached(eps_fn, x, t_model, time_frac, state, reuse):
  """(eps, stats, new cache state); state None: the plain call and None."""
  if state is None:
    eps, st = eps_fn(x, t_model, time_frac)
    return eps.astype(x.dtype), dict(st), None
  eps, st = eps_fn(x, t_model, time_frac, cache=state, reuse=reuse)
  st = dict(st)
  return eps.astype(x.dtype), st, st.pop("cache")


def _x0_from_eps(x, eps, alpha, sigma, clip):
  x0 = (x - sigma * eps) / alpha
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - alpha * x0) / sigma  # keep eps consistent with the clipped x0 (as diffusers does)
  return x0, eps


# ----------------------------------------------------------------------------- samplers

def ddim(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng=None, *, eta=0.0, clip=False,
         cache=None):
  """DDIM: x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, c = eta sigma_s/sigma_t sqrt(1 - a_t^2/a_s^2).
  `cache=(state, reuse [steps, N, 2])`: Learning-to-Cache (module doc)."""
  state0, reuse = (None, None) if cache is None else cache

  def step(carry, s):
    x, state = carry
    a, sg, an, sn = (_bcast(s[k], x) for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    eps, st, state = _predict_cached(eps_fn, x, s["t_model"], s["time_frac"], state,
                                     None if reuse is None else reuse[s["index"]])
    x0, eps = _x0_from_eps(x, eps, a, sg, clip)
    c = eta * (sn / sg) * jnp.sqrt(jnp.maximum(1.0 - (a / an) ** 2, 0.0))
    z = jax.random.normal(s["key"], x.shape, x.dtype)
    x = an * x0 + jnp.sqrt(jnp.maximum(sn ** 2 - c ** 2, 0.0)) * eps + c * z
    return (x, state), st
  return _scan_steps(step, schedule, steps, x_init, rng, state0)


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
  (noise level alpha_bar[n-1] in our 0-based indexing), and so do we (`schedule.model_time`):
  1000 at t = 1. `time_frac` (1 = noisiest) is the 0-based index t * N - 1 over N - 1, as
  `grid_arrays` gives the other samplers; the VPSDE uses 999 t and t.

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
    label = t * n
    frac = (label - 1.0) / (n - 1)
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


# ----------------------------------------------------------------------------- DPM-Solver-2S

def _inverse_lambda(schedule: Schedule, lam: np.ndarray) -> np.ndarray:
  """Continuous time of half-logSNR `lam` (float64, host): DPM-Solver's NoiseScheduleVP.inverse_lambda."""
  log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
  if schedule.continuous:
    b0, b1 = schedule.beta_min, schedule.beta_max
    tmp = 2.0 * (b1 - b0) * np.logaddexp(-2.0 * lam, 0.0)
    delta = b0 ** 2 + tmp
    return tmp / (np.sqrt(delta) + b0) / (b1 - b0)
  n = schedule.num_timesteps
  table = 0.5 * np.log(np.asarray(schedule.alphas_cumprod, np.float64))
  knots = np.arange(1, n + 1, dtype=np.float64) / n
  return np.interp(log_alpha, table[::-1], knots[::-1])


def dpm_solver_2s_grid(schedule: Schedule, steps: int) -> dict:
  """DPM-Solver++ singlestep order 2 on the host in float64, as U-ViT/L2C call it:
  `DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), predict_x0=True).sample(x, steps=NFE,
  eps=1/N, T=1, order=2, method='singlestep')`: K = NFE/2 solver steps on the time-uniform grid
  t = linspace(1, 1/N, K + 1) (VPSDE: linspace(1, 1e-3, K + 1)); step k goes from s = t[k] to
  t[k+1] with h = lambda_t - lambda_s and the intermediate time s1 = inverse_lambda(lambda_s + h/2)
  (r1 = 1/2). With x0_s = x0(x, s):
    u    = sigma_s1/sigma_s x - alpha_s1 expm1(-h/2) x0_s
    x_t  = sigma_t/sigma_s x - alpha_t expm1(-h) x0_s - (0.5/r1) alpha_t expm1(-h) (x0(u, s1) - x0_s)
  The network sees t * N (U-ViT's 1-based labels; VPSDE 999 t). Arrays are [K] per solver step,
  first (`*_s`) and intermediate (`*_s1`) evaluation.
  """
  if steps < 2 or steps % 2:
    raise SamplerError(f"sample.sampler=dpm_solver_2s takes an even sample.steps >= 2 (network "
                       f"evaluations, two per solver step), got {steps}")
  k = steps // 2
  if schedule.continuous:
    t = np.linspace(1.0, sched_lib.VPSDE_T_EPS, k + 1, dtype=np.float64)
  else:
    t = np.linspace(1.0, 1.0 / schedule.num_timesteps, k + 1, dtype=np.float64)
  la = _fast_log_alpha(schedule, t)
  alpha, sigma = np.exp(la), np.sqrt(-np.expm1(2.0 * la))
  lam = la - np.log(sigma)
  h = lam[1:] - lam[:-1]
  r1 = 0.5
  s1 = _inverse_lambda(schedule, lam[:-1] + r1 * h)
  la1 = _fast_log_alpha(schedule, s1)
  a1, sg1 = np.exp(la1), np.sqrt(-np.expm1(2.0 * la1))

  def label(tt):
    return 999.0 * tt if schedule.continuous else tt * schedule.num_timesteps

  def frac(tt):
    return tt if schedule.continuous else (label(tt) - 1.0) / (schedule.num_timesteps - 1)

  phi = np.expm1(-h)
  return {"t": t, "s1": s1, "alpha": alpha, "sigma": sigma, "lam": lam,
          "t_model_s": label(t[:-1]), "time_frac_s": frac(t[:-1]),
          "t_model_s1": label(s1), "time_frac_s1": frac(s1),
          "alpha_s": alpha[:-1], "sigma_s": sigma[:-1], "alpha_s1": a1, "sigma_s1": sg1,
          "u_x": sg1 / sigma[:-1], "u_0": -a1 * np.expm1(-r1 * h),
          "x_x": sigma[1:] / sigma[:-1], "x_0": -alpha[1:] * phi * (1.0 - 0.5 / r1),
          "x_1": -alpha[1:] * phi * (0.5 / r1)}


def dpm_solver_2s(eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng=None, *, cache=None):
  """DPM-Solver++ singlestep order 2 (`dpm_solver_2s_grid`): `steps` evaluations (even), one
  `lax.scan` iteration per solver step; deterministic (`rng` unused). `cache=(state, reuse
  [steps/2, N, 2])`: Learning-to-Cache: the first evaluation of step k reuses per reuse[k] what the
  intermediate evaluation of step k-1 produced; the intermediate evaluation reuses nothing.
  Stats are per evaluation ([steps]: first, intermediate, first, ...)."""
  del rng
  g = dpm_solver_2s_grid(schedule, steps)
  keys = ("t_model_s", "time_frac_s", "t_model_s1", "time_frac_s1", "alpha_s", "sigma_s",
          "alpha_s1", "sigma_s1", "u_x", "u_0", "x_x", "x_0", "x_1")
  per_step = {k: jnp.asarray(g[k], jnp.float32) for k in keys}
  per_step["index"] = jnp.arange(steps // 2)
  state0, reuse = (None, None) if cache is None else cache

  def step(carry, s):
    x, state = carry
    c = lambda k: _bcast(s[k], x).astype(x.dtype)
    eps, st0, state = _predict_cached(eps_fn, x, s["t_model_s"], s["time_frac_s"], state,
                                      None if reuse is None else reuse[s["index"]])
    x0 = (x - c("sigma_s") * eps) / c("alpha_s")
    u = c("u_x") * x + c("u_0") * x0
    eps1, st1, state = _predict_cached(eps_fn, u, s["t_model_s1"], s["time_frac_s1"], state,
                                       None if reuse is None else jnp.zeros_like(reuse[0]))
    x01 = (u - c("sigma_s1") * eps1) / c("alpha_s1")
    x = c("x_x") * x + c("x_0") * x0 + c("x_1") * x01
    return (x, state), jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), st0, st1)

  (x, _), stats = lax.scan(step, (x_init, state0), per_step)
  stats = jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), stats)
  return x, stats


def run_sampler(name: str, eps_fn: EpsFn, schedule: Schedule, steps: int, x_init, rng, *,
                eta=0.0, clip=False, cache=None):
  if cache is not None and name not in ("ddim", "dpm_solver_2s"):
    raise SamplerError(f"cache.policy=l2c works with sample.sampler ddim or dpm_solver_2s, got {name!r}")
  if name == "ddim":
    return ddim(eps_fn, schedule, steps, x_init, rng, eta=eta, clip=clip, cache=cache)
  if name == "dpm_solver_2s":
    return dpm_solver_2s(eps_fn, schedule, steps, x_init, rng, cache=cache)
  if name == "ddpm":
    return ddpm(eps_fn, schedule, steps, x_init, rng, clip=clip)
  if name == "dpm_solver":
    return dpm_solver(eps_fn, schedule, steps, x_init, rng)
  if name == "euler_maruyama":
    return euler_maruyama(eps_fn, schedule, steps, x_init, rng)
  if name == "dpm_solver_fast":
    return dpm_solver_fast(eps_fn, schedule, steps, x_init, rng)
  raise SamplerError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


# ----------------------------------------------------------------------------- guidance and x0 scale

def guide(eps_pair, guidance_scale):
  """U-ViT's classifier-free guidance on a [cond rows; null rows] prediction."""
  half = eps_pair.shape[0] // 2
  s = jnp.asarray(guidance_scale, eps_pair.dtype)
  return (1.0 + s) * eps_pair[:half] - s * eps_pair[half:]


def x0_scale_fn(schedule: Schedule):
  """time_frac -> sigma/alpha of that time: how much an eps error grows in the sampler's x0."""
  def fn(time_frac):
    frac = jnp.asarray(time_frac, jnp.float32)
    t = frac if schedule.continuous else jnp.round(frac * (schedule.num_timesteps - 1)).astype(jnp.int32)
    alpha, sigma = sched_lib.alpha_sigma(schedule, t)
    return sigma / alpha
  return fn
