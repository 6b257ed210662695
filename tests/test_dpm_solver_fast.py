"""`dpm_solver_fast`: U-ViT's latent-model sampler (DPM-Solver++ singlestep, "fast" mode).

The noise predictor is analytic: for Gaussian data x0 ~ N(mu, s^2 I) the exact noise prediction is
eps(x_t, t) = (x_t - alpha_t mu) sigma_t / (alpha_t^2 s^2 + sigma_t^2), and the probability-flow
ODE is the affine map between the Gaussian marginals, so the solver has a closed-form target.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.config import SAMPLERS, base_config, validate
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import VPSDE_T_EPS, discrete_betas, make_schedule

MU, S = 0.3, 0.5
SHAPE = (1024, 2, 2, 1)  # one shape everywhere: each (schedule, steps) compiles once


# ----------------------------------------------------------------------------- analytic model

def log_alpha_np(name, n, t):
  """float64 log alpha at continuous t: U-ViT's discrete 'NoiseScheduleVP' (knots t_k = (k+1)/N).

  The knot values are the schedule's own float32 alpha_bar (what training noises with): near
  alpha_bar = 1 their rounding moves sigma by ~1e-4 relative, more than the 1e-5 checked here.
  """
  t = np.asarray(t, np.float64)
  if name == "vpsde":
    return -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
  table = 0.5 * np.log(np.asarray(make_schedule(name, n).alphas_cumprod, np.float64))
  return np.interp(t, np.arange(1, n + 1) / n, table)


def alpha_sigma_np(name, n, t):
  la = log_alpha_np(name, n, t)
  return np.exp(la), np.sqrt(-np.expm1(2 * la))


def exact_eps(x, alpha, sigma):
  return (x - alpha * MU) * sigma / (alpha ** 2 * S ** 2 + sigma ** 2)


def make_eps_fn(name, n=1000):
  """Our eps_fn: label -> continuous t (U-ViT's 1-based labels: t = label / N; VPSDE: label / 999)."""
  if name == "vpsde":
    la_fn = lambda t: -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
    to_t = lambda lab: lab / 999.0
  else:
    table = jnp.asarray(0.5 * np.log(np.asarray(make_schedule(name, n).alphas_cumprod, np.float64)),
                        jnp.float32)
    knots = jnp.arange(1, n + 1, dtype=jnp.float32) / n
    la_fn = lambda t: jnp.interp(t, knots, table)
    to_t = lambda lab: lab / n

  def eps_fn(x, t_model, time_frac):
    la = la_fn(to_t(jnp.asarray(t_model, jnp.float32)))
    a, sg = jnp.exp(la), jnp.sqrt(-jnp.expm1(2 * la))
    b = x.shape[0]
    return exact_eps(x, a, sg), {"exit_layer": jnp.full((b,), 3, jnp.int32), "layers_run": jnp.int32(3)}
  return eps_fn


@functools.lru_cache(maxsize=None)
def _jitted(name, steps, timesteps=1000):
  sched = make_schedule(name, timesteps)
  eps_fn = make_eps_fn(name, timesteps)
  return jax.jit(lambda x: samplers.run_sampler("dpm_solver_fast", eps_fn, sched, steps, x, None))


def run(name, steps, x, timesteps=1000):
  xo, st = _jitted(name, steps, timesteps)(jnp.asarray(x, jnp.float32))
  return np.asarray(xo, np.float64), {k: np.asarray(v) for k, v in st.items()}


def x_init(seed=0, shape=SHAPE):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape), np.float64)


# ----------------------------------------------------------------------------- (a) paper formulas

def expected_orders(steps):
  k = steps // 3 + 1
  if steps % 3 == 0:
    return [3] * (k - 2) + [2, 1]
  if steps % 3 == 1:
    return [3] * (k - 1) + [1]
  return [3] * (k - 1) + [2]


def time_grid(name, steps, n=1000):
  end = VPSDE_T_EPS if name == "vpsde" else 1.0 / n
  return np.linspace(1.0, end, steps + 1)


def ref_dpmpp_singlestep(name, steps, x, n=1000):
  """DPM-Solver++ singlestep (Lu et al. 2022, data prediction), written out stage by stage.

  With phi1(h) = 1 - e^-h and phi2(h) = (e^-h - 1 + h) / h, from s to t = s + h in lambda:
    1S: x_t = sig_t/sig_s x_s + a_t phi1(h) x0(x_s)
    2S: u = 1S to s1 (lambda_s + r1 h); x_t = sig_t/sig_s x_s + a_t phi1(h) [x0_s + (x0(u) - x0_s) / (2 r1)]
    3S: u1 = 1S to s1; D1 = (x0(u1) - x0_s) / r1;
        u2 = sig_s2/sig_s x_s + a_s2 phi1(r2 h) x0_s + a_s2 r2 phi2(r2 h) D1;
        x_t = sig_t/sig_s x_s + a_t phi1(h) x0_s + a_t phi2(h) (x0(u2) - x0_s) / r2
  The intermediate times are the next grid points (r from lambda), as in U-ViT's fast mode.
  """
  ts = time_grid(name, steps, n)
  a, sg = alpha_sigma_np(name, n, ts)
  lam = np.log(a) - np.log(sg)
  phi1 = lambda h: 1.0 - np.exp(-h)
  phi2 = lambda h: (np.exp(-h) - 1.0 + h) / h
  x0_at = lambda u, k: (u - sg[k] * exact_eps(u, a[k], sg[k])) / a[k]
  x = np.asarray(x, np.float64)
  i = 0
  for order in expected_orders(steps):
    j = i + order
    h = lam[j] - lam[i]
    x0s = x0_at(x, i)
    if order == 1:
      x = sg[j] / sg[i] * x + a[j] * phi1(h) * x0s
    elif order == 2:
      r1 = (lam[i + 1] - lam[i]) / h
      u = sg[i + 1] / sg[i] * x + a[i + 1] * phi1(r1 * h) * x0s
      x = sg[j] / sg[i] * x + a[j] * phi1(h) * (x0s + (x0_at(u, i + 1) - x0s) / (2 * r1))
    else:
      r1, r2 = (lam[i + 1] - lam[i]) / h, (lam[i + 2] - lam[i]) / h
      u1 = sg[i + 1] / sg[i] * x + a[i + 1] * phi1(r1 * h) * x0s
      d1 = (x0_at(u1, i + 1) - x0s) / r1
      u2 = sg[i + 2] / sg[i] * x + a[i + 2] * phi1(r2 * h) * x0s + a[i + 2] * r2 * phi2(r2 * h) * d1
      x = sg[j] / sg[i] * x + a[j] * phi1(h) * x0s + a[j] * phi2(h) * (x0_at(u2, i + 2) - x0s) / r2
    i = j
  return x


@pytest.mark.parametrize("name,steps", [("stable", 50), ("stable", 6), ("stable", 7), ("linear", 8),
                                        ("cosine", 20), ("vpsde", 10)])
def test_matches_paper_reference(name, steps):
  x = x_init(1)
  out, _ = run(name, steps, x)
  ref = ref_dpmpp_singlestep(name, steps, x)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- (b) the grid

def _record(name, steps):
  """(t_model, time_frac) of every eps_fn call, in call order."""
  calls = []
  inner = make_eps_fn(name)
  def eps_fn(x, t_model, time_frac):
    jax.debug.callback(lambda a, b: calls.append((float(a), float(b))), t_model, time_frac, ordered=True)
    return inner(x, t_model, time_frac)
  sched = make_schedule(name, 1000)
  out, st = samplers.dpm_solver_fast(eps_fn, sched, steps, jnp.zeros(SHAPE, jnp.float32))
  jax.block_until_ready(out)
  jax.effects_barrier()
  return np.asarray(calls), st


def test_orders_rule():
  assert samplers.dpm_solver_fast_orders(50) == [3] * 16 + [2]           # K = 17
  assert samplers.dpm_solver_fast_orders(51) == [3] * 16 + [2, 1]        # K = 18
  assert samplers.dpm_solver_fast_orders(49) == [3] * 16 + [1]           # K = 17
  assert samplers.dpm_solver_fast_orders(6) == [3, 2, 1]
  assert samplers.dpm_solver_fast_orders(7) == [3, 3, 1]
  assert samplers.dpm_solver_fast_orders(1) == [1]
  assert samplers.dpm_solver_fast_orders(2) == [2]
  for steps in range(1, 60):
    assert sum(samplers.dpm_solver_fast_orders(steps)) == steps
  with pytest.raises(samplers.SamplerError):
    samplers.dpm_solver_fast_orders(0)


def test_grid_and_time_inputs_steps_6_and_7():
  # t = linspace(1, 1/1000, steps + 1); the network sees 1000 t (U-ViT's t * N: 1000 at t = 1),
  # time_frac = the 0-based index (1000 t - 1) / 999.
  g6 = samplers.dpm_solver_fast_grid(make_schedule("linear", 1000), 6)
  assert g6["orders"] == [3, 2, 1]
  np.testing.assert_allclose(g6["t"], [1.0, 0.8335, 0.667, 0.5005, 0.334, 0.1675, 0.001], atol=1e-12)
  labels6 = [1000.0, 833.5, 667.0, 500.5, 334.0, 167.5]
  calls, st = _record("linear", 6)
  np.testing.assert_allclose(calls[:, 0], labels6, atol=2e-3)
  np.testing.assert_allclose(calls[:, 1], (np.asarray(labels6) - 1.0) / 999.0, atol=1e-6)
  assert st["exit_layer"].shape == (6, SHAPE[0]) and st["layers_run"].shape == (6,)

  g7 = samplers.dpm_solver_fast_grid(make_schedule("linear", 1000), 7)
  assert g7["orders"] == [3, 3, 1]
  labels7 = [1000.0, 857.2857, 714.5714, 571.8571, 429.1429, 286.4286, 143.7143]
  calls, _ = _record("linear", 7)
  np.testing.assert_allclose(calls[:, 0], labels7, atol=2e-3)
  np.testing.assert_allclose(calls[:, 1], (np.asarray(labels7) - 1.0) / 999.0, atol=1e-6)
  np.testing.assert_allclose(g7["t"][-1], 0.001)
  # log alpha on the grid is the linear interpolation between the knots t_k = (k + 1) / 1000
  abar = np.asarray(make_schedule("linear", 1000).alphas_cumprod, np.float64)  # the table it interpolates
  w = 0.5  # 832.5 is halfway between labels 832 and 833
  np.testing.assert_allclose(g6["log_alpha"][1], 0.5 * ((1 - w) * np.log(abar[832]) + w * np.log(abar[833])),
                             rtol=1e-6)
  np.testing.assert_allclose(g6["log_alpha"][0], 0.5 * np.log(abar[999]), rtol=1e-6)
  np.testing.assert_allclose(g6["log_alpha"][-1], 0.5 * np.log(abar[0]), rtol=1e-6)


def test_vpsde_grid():
  g = samplers.dpm_solver_fast_grid(make_schedule("vpsde"), 4)
  np.testing.assert_allclose(g["t"], np.linspace(1.0, VPSDE_T_EPS, 5))
  np.testing.assert_allclose(g["t_model"], 999.0 * g["t"][:-1])
  np.testing.assert_allclose(g["time_frac"], g["t"][:-1])


# ----------------------------------------------------------------------------- (c) distribution

def test_output_distribution_is_the_data_gaussian():
  """The ODE from x_T at t = 1 to t = 1/N is the affine map between the Gaussian marginals:
  x = a0 mu + sqrt(v0 / v1) (x_T - a1 mu), v = a^2 s^2 + sigma^2; x_T ~ N(0, I) gives ~N(a0 mu, v0)."""
  x = x_init(5)
  (a1, a0), (s1, s0) = alpha_sigma_np("stable", 1000, [1.0, 1e-3])
  v1, v0 = a1 ** 2 * S ** 2 + s1 ** 2, a0 ** 2 * S ** 2 + s0 ** 2
  exact = a0 * MU + np.sqrt(v0 / v1) * (x - a1 * MU)
  out, _ = run("stable", 50, x)
  # 50 time-uniform steps leave a visible discretisation error (the last steps span a large
  # lambda range and log alpha is only piecewise linear in t): ~0.025 per sample, ~1.5% in std.
  np.testing.assert_allclose(out, exact, atol=0.05)
  # loose: 4096 draws (std error ~1.1% in std) plus that ~1.5% bias
  assert abs(out.mean() - a0 * MU) < 0.03
  assert abs(out.std() / np.sqrt(v0) - 1) < 0.06
  # ... and it converges to the exact ODE solution
  fine, _ = run("stable", 500, x)
  np.testing.assert_allclose(fine, exact, atol=1e-3)


# ----------------------------------------------------------------------------- (d) dispatch

def test_run_sampler_dispatch_and_stats():
  assert "dpm_solver_fast" in SAMPLERS
  steps, b = 5, SHAPE[0]
  sched = make_schedule("stable", 1000)
  inner = make_eps_fn("stable")
  def eps_fn(x, t_model, time_frac):
    eps, _ = inner(x, t_model, time_frac)
    layer = jnp.int32(1) + (t_model > 500).astype(jnp.int32)
    return eps, {"exit_layer": jnp.full((x.shape[0],), layer), "layers_run": layer * 2}
  x, st = samplers.run_sampler("dpm_solver_fast", eps_fn, sched, steps, jnp.asarray(x_init(2)),
                               jax.random.PRNGKey(0), eta=0.3, clip=True)
  assert x.shape == SHAPE and x.dtype == jnp.float32
  assert st["layers_run"].shape == (steps,) and st["exit_layer"].shape == (steps, b)
  assert st["exit_layer"].dtype == jnp.int32
  # labels 1000, 800.2, 600.4 > 500 then 400.6, 200.8
  np.testing.assert_array_equal(np.asarray(st["layers_run"]), [4, 4, 4, 2, 2])
  with pytest.raises(samplers.SamplerError, match="dpm_solver_fast"):
    samplers.run_sampler("nope", eps_fn, sched, steps, jnp.asarray(x_init(2)), None)


def test_config_accepts_and_latent_configs_use_it():
  c = base_config()
  c.sample.sampler = "dpm_solver_fast"
  validate(c)
  from configs import imagenet256_uvit_large, mscoco_uvit_small
  for mod in (imagenet256_uvit_large, mscoco_uvit_small):
    cfg = mod.get_config()
    assert cfg.sample.sampler == "dpm_solver_fast" and cfg.sample.steps == 50


# ----------------------------------------------------------------------------- (e) U-ViT's call

def test_parity_with_uvit_style_torch_solver():
  """An independent float32 torch rendering of U-ViT's `DPM_Solver(model_fn, NoiseScheduleVP(
  'discrete', betas), predict_x0=True).sample(x, steps=50, eps=1/N, T=1)` (method 'fast',
  order 3, 'time_uniform', solver_type 'dpm_solver'): intermediate times through inverse_lambda,
  and a network fed t * N on U-ViT's 1-based labels."""
  torch = pytest.importorskip("torch")
  n, steps = 1000, 50
  betas = torch.tensor(discrete_betas("stable", n)).float()
  knots_t = torch.linspace(1.0 / n, 1.0, n)
  knots_la = 0.5 * torch.cumsum(torch.log(1 - betas), 0)

  def interp(x, xp, fp):  # piecewise linear on increasing xp (inside the range)
    k = torch.clamp(torch.searchsorted(xp, x), 1, len(xp) - 1)
    x0, x1, y0, y1 = xp[k - 1], xp[k], fp[k - 1], fp[k]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)

  log_alpha = lambda t: interp(t, knots_t, knots_la)
  sigma = lambda t: torch.sqrt(1 - torch.exp(2 * log_alpha(t)))
  lam = lambda t: log_alpha(t) - torch.log(sigma(t))
  def inv_lam(l):
    la = -0.5 * torch.logaddexp(torch.zeros_like(l), -2 * l)
    return interp(la, torch.flip(knots_la, [0]), torch.flip(knots_t, [0]))

  def network(x, label):  # an "official" network: label n in 1..N means alpha_bar[n - 1]
    t = label / n
    a, sg = torch.exp(log_alpha(t)), sigma(t)
    return (x - a * MU) * sg / (a ** 2 * S ** 2 + sg ** 2)

  def x0_of(x, t):
    return (x - sigma(t) * network(x, t * n)) / torch.exp(log_alpha(t))

  ts = torch.linspace(1.0, 1.0 / n, steps + 1)
  x0_init = x_init(3)
  x = torch.tensor(x0_init).float()
  i = 0
  for order in expected_orders(steps):
    s, t = ts[i], ts[i + order]
    h = lam(t) - lam(s)
    xs0 = x0_of(x, s)
    if order == 1:
      x = sigma(t) / sigma(s) * x - torch.exp(log_alpha(t)) * torch.expm1(-h) * xs0
    else:
      r1 = (lam(ts[i + 1]) - lam(s)) / h
      s1 = inv_lam(lam(s) + r1 * h)
      u1 = sigma(s1) / sigma(s) * x - torch.exp(log_alpha(s1)) * torch.expm1(-r1 * h) * xs0
      x01 = x0_of(u1, s1)
      if order == 2:
        at = torch.exp(log_alpha(t))
        x = sigma(t) / sigma(s) * x - at * torch.expm1(-h) * xs0 - (0.5 / r1) * at * torch.expm1(-h) * (x01 - xs0)
      else:
        r2 = (lam(ts[i + 2]) - lam(s)) / h
        s2 = inv_lam(lam(s) + r2 * h)
        a2, at = torch.exp(log_alpha(s2)), torch.exp(log_alpha(t))
        p22 = torch.expm1(-r2 * h) / (r2 * h) + 1
        u2 = sigma(s2) / sigma(s) * x - a2 * torch.expm1(-r2 * h) * xs0 + (r2 / r1) * a2 * p22 * (x01 - xs0)
        x02 = x0_of(u2, s2)
        p2 = torch.expm1(-h) / h + 1
        x = sigma(t) / sigma(s) * x - at * torch.expm1(-h) * xs0 + (1 / r2) * at * p2 * (x02 - xs0)
    i += order
  out, _ = run("stable", steps, x0_init)
  np.testing.assert_allclose(out, x.double().numpy(), rtol=0, atol=1e-4)
