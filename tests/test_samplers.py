"""Samplers against straightforward Python-loop references, CFG convention, determinism."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import sampling
from deediff_jax import early_exit as ee
from deediff_jax.config import base_config
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import discrete_betas, make_schedule, sampling_grid
from deediff_jax.model import build, init_params

B = 4
STEPS = 3


def _config(**sample):
  c = base_config()
  c.model.update(embed_dim=32, depth=4, num_heads=2)
  c.sample.update(**{"steps": STEPS, "num_images": B, "batch_size": B, "guidance_scale": 0.0, **sample})
  return c


@pytest.fixture(scope="module")
def model():
  c = _config()
  module = build(c.model)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  y = jnp.arange(B) % 10
  x_init = jax.random.normal(jax.random.PRNGKey(7), (B, 8, 8, 1))
  apply = jax.jit(lambda p, x, t, y: module.apply({"params": p}, x, jnp.broadcast_to(t, (x.shape[0],)), y))
  eps = lambda x, t, yy=y: np.asarray(apply(params, jnp.asarray(x, jnp.float32), jnp.float32(t), yy), np.float64)
  return dict(config=c, module=module, cfg=module.cfg, params=params, y=y, x_init=x_init, eps=eps)


@functools.lru_cache(maxsize=None)
def _jit_sampler(name, schedule_name, timesteps, steps, clip, policy, cfg):
  """The library sampler (policy none = the early-exit loop at full depth), jitted once."""
  schedule = make_schedule(schedule_name, timesteps)
  def run(params, x_init, rng, y, pp, eta):
    eps_fn = sampling.make_eps_fn(params, cfg, policy, pp, y)
    return samplers.run_sampler(name, eps_fn, schedule, steps, x_init, rng, eta=eta, clip=clip)
  return jax.jit(run)


def _run(m, name, schedule_name="linear", timesteps=1000, steps=STEPS, clip=False, eta=0.0, rng=None,
         policy="none", pp=None):
  n = m["cfg"].num_blocks
  rng = jax.random.PRNGKey(11) if rng is None else rng
  fn = _jit_sampler(name, schedule_name, timesteps, steps, clip, policy, m["cfg"])
  x, st = fn(m["params"], m["x_init"], rng, m["y"], ee.make_policy_params(n) if pp is None else pp,
             jnp.float32(eta))
  return np.asarray(x, np.float64), {k: np.asarray(v) for k, v in st.items()}


def _noises(rng, steps, shape):
  keys = jax.random.split(rng, steps)  # the samplers' documented per-step keys
  return [np.asarray(jax.random.normal(k, shape), np.float64) for k in keys]


def _abar(schedule_name, timesteps):
  return np.cumprod(1.0 - discrete_betas(schedule_name, timesteps))


# ----------------------------------------------------------------------------- references

def ref_ddim(m, steps, eta, clip, rng, schedule_name="linear", timesteps=1000):
  abar = _abar(schedule_name, timesteps)
  grid = sampling_grid(make_schedule(schedule_name, timesteps), steps)
  z = _noises(rng, steps, m["x_init"].shape)
  x = np.asarray(m["x_init"], np.float64)
  for i in range(steps):
    t, prev = grid[i], grid[i + 1]
    a_t, a_p = abar[t], (abar[prev] if prev >= 0 else 1.0)
    e = m["eps"](x, t + 1)  # U-ViT's 1-based time label of step index t
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    if clip:
      x0 = np.clip(x0, -1, 1)
      e = (x - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    sig = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    x = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sig ** 2) * e + sig * z[i]
  return x


def ref_ddpm_ho(m, timesteps, rng, schedule_name="cosine"):
  """Ho et al. Algorithm 2 with the schedule's own betas (steps == timesteps, no clipping)."""
  betas = discrete_betas(schedule_name, timesteps)
  alphas, abar = 1 - betas, np.cumprod(1 - betas)
  z = _noises(rng, timesteps, m["x_init"].shape)
  x = np.asarray(m["x_init"], np.float64)
  for i, t in enumerate(range(timesteps - 1, -1, -1)):
    e = m["eps"](x, t + 1)  # U-ViT's 1-based time label of step index t
    mean = (x - betas[t] / np.sqrt(1 - abar[t]) * e) / np.sqrt(alphas[t])
    var = betas[t] * (1 - abar[t - 1]) / (1 - abar[t]) if t > 0 else 0.0
    x = mean + np.sqrt(var) * z[i]
  return x


def ref_ddpm_strided(m, steps, clip, rng, schedule_name="linear", timesteps=1000):
  """Posterior q(x_s | x_t, x0) of the respaced chain (improved-diffusion's respacing)."""
  abar = _abar(schedule_name, timesteps)
  grid = sampling_grid(make_schedule(schedule_name, timesteps), steps)
  z = _noises(rng, steps, m["x_init"].shape)
  x = np.asarray(m["x_init"], np.float64)
  for i in range(steps):
    t, prev = grid[i], grid[i + 1]
    a_t, a_p = abar[t], (abar[prev] if prev >= 0 else 1.0)
    beta = 1 - a_t / a_p
    e = m["eps"](x, t + 1)  # U-ViT's 1-based time label of step index t
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    if clip:
      x0 = np.clip(x0, -1, 1)
    mean = beta * np.sqrt(a_p) / (1 - a_t) * x0 + (1 - a_p) * np.sqrt(1 - beta) / (1 - a_t) * x
    x = mean + np.sqrt(beta * (1 - a_p) / (1 - a_t)) * z[i]
  return x


def _alpha_sigma_np(schedule_name, timesteps, t):
  if schedule_name == "vpsde":
    log_a = -0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1
    return np.exp(log_a), np.sqrt(1 - np.exp(2 * log_a))
  abar = _abar(schedule_name, timesteps)
  return (np.sqrt(abar[t]), np.sqrt(1 - abar[t])) if t >= 0 else (1.0, 0.0)


def ref_dpm_solver_pp_2m(m, steps, schedule_name, timesteps=1000):
  """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2; first-order first step and step into sigma = 0."""
  grid = sampling_grid(make_schedule(schedule_name, timesteps), steps)
  x = np.asarray(m["x_init"], np.float64)
  x0_prev = h_prev = None
  for i in range(steps):
    t, s = grid[i], grid[i + 1]
    a_t, s_t = _alpha_sigma_np(schedule_name, timesteps, t)
    a_s, s_s = _alpha_sigma_np(schedule_name, timesteps, s)
    t_model = t * 999.0 if schedule_name == "vpsde" else t + 1  # U-ViT's 1-based label
    x0 = (x - s_t * m["eps"](x, t_model)) / a_t
    if s_s == 0.0:   # into the clean image: lambda = inf, x = x0
      x = x0
    else:
      h = np.log(a_s / s_s) - np.log(a_t / s_t)
      if x0_prev is None:
        d = x0
      else:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
      x = (s_s / s_t) * x - a_s * (np.exp(-h) - 1) * d
      h_prev = h
    x0_prev = x0
  return x


def ref_euler_maruyama(m, steps, rng):
  """U-ViT's / AdaDiff's sde.euler_maruyama: the times [0] + linspace(1e-3, 1, steps), taken from 1
  downwards; mean = x + drift dt (dt < 0), no noise on the final step into t = 0."""
  ts = np.append(0.0, np.linspace(1e-3, 1.0, steps))[::-1]
  z = _noises(rng, steps, m["x_init"].shape)
  x = np.asarray(m["x_init"], np.float64)
  for i in range(steps):
    t, s = ts[i], ts[i + 1]
    beta = 0.1 + t * (20.0 - 0.1)
    _, std = _alpha_sigma_np("vpsde", 0, t)
    score = -m["eps"](x, t * 999.0) / std
    drift = -0.5 * beta * x - beta * score
    dt = s - t
    x = x + drift * dt
    if i < steps - 1:
      x = x + np.sqrt(beta) * np.sqrt(-dt) * z[i]
  return x


# ----------------------------------------------------------------------------- tests

ATOL = 2e-4


@pytest.mark.parametrize("eta,clip", [(0.0, False), (1.0, True), (0.5, False)])
def test_ddim_matches_reference(model, eta, clip):
  rng = jax.random.PRNGKey(3)
  x, st = _run(model, "ddim", eta=eta, clip=clip, rng=rng)
  np.testing.assert_allclose(x, ref_ddim(model, STEPS, eta, clip, rng), atol=ATOL, rtol=1e-4)
  n = model["cfg"].num_blocks
  np.testing.assert_array_equal(st["layers_run"], np.full(STEPS, n))
  assert st["exit_layer"].shape == (STEPS, B)


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_strided_matches_posterior_reference(model, clip):
  rng = jax.random.PRNGKey(4)
  x, _ = _run(model, "ddpm", clip=clip, rng=rng)
  np.testing.assert_allclose(x, ref_ddpm_strided(model, STEPS, clip, rng), atol=ATOL, rtol=1e-4)


def test_ddpm_full_chain_is_ho_algorithm_2(model):
  rng = jax.random.PRNGKey(5)
  x, _ = _run(model, "ddpm", schedule_name="cosine", timesteps=STEPS, steps=STEPS, rng=rng)
  np.testing.assert_allclose(x, ref_ddpm_ho(model, STEPS, rng), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("schedule_name", ["linear", "vpsde"])
def test_dpm_solver_matches_reference(model, schedule_name):
  x, _ = _run(model, "dpm_solver", schedule_name=schedule_name)
  ref = ref_dpm_solver_pp_2m(model, STEPS, schedule_name)
  np.testing.assert_allclose(x, ref, atol=ATOL, rtol=1e-4)
  assert np.all(np.isfinite(x))


def test_euler_maruyama_matches_reference(model):
  rng = jax.random.PRNGKey(6)
  x, _ = _run(model, "euler_maruyama", schedule_name="vpsde", rng=rng)
  np.testing.assert_allclose(x, ref_euler_maruyama(model, STEPS, rng), atol=ATOL, rtol=1e-4)


def test_euler_maruyama_needs_vpsde(model):
  with pytest.raises(ValueError, match="needs diffusion.schedule=vpsde"):
    samplers.euler_maruyama(lambda x, t, f: (x, {}), make_schedule("linear", 10), 2, model["x_init"],
                            jax.random.PRNGKey(0))


def test_ddim_eta0_deterministic(model):
  a, _ = _run(model, "ddim", rng=jax.random.PRNGKey(1))
  b, _ = _run(model, "ddim", rng=jax.random.PRNGKey(2))  # eta 0: the step noise is unused
  np.testing.assert_array_equal(a, b)
  c = _config()
  one, _ = sampling.sample(model["params"], c, jax.random.PRNGKey(9), B, plain=True)
  two, _ = sampling.sample(model["params"], c, jax.random.PRNGKey(9), B, plain=True)
  other, _ = sampling.sample(model["params"], c, jax.random.PRNGKey(10), B, plain=True)
  np.testing.assert_array_equal(one, two)
  assert np.abs(one - other).max() > 1e-3


def test_guide_convention():
  cond, null = jnp.full((2, 3), 2.0), jnp.full((2, 3), 0.5)
  pair = jnp.concatenate([cond, null])
  np.testing.assert_allclose(samplers.guide(pair, 0.0), cond)
  np.testing.assert_allclose(samplers.guide(pair, 1.5), 2.5 * 2.0 - 1.5 * 0.5)


def test_guidance_in_eps_fn(model):
  m = model
  p, cfg, y = m["params"], m["cfg"], m["y"]
  x, t = m["x_init"], jnp.float32(500.0)
  cond = m["eps"](x, 500.0)
  null = m["eps"](x, 500.0, jnp.full((B,), 10))
  for plain in (True, False):
    f0 = sampling.make_eps_fn(p, cfg, "none", None, y, guidance_scale=0.0, plain=plain)
    e0, st = jax.jit(f0)(x, t, jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(e0), cond, atol=1e-5)
    assert st["exit_layer"].shape == (B,)
    # s = 0 must not double the batch: no 2B-row image enters the network.
    assert f"f32[{2 * B},8,8,1]" not in str(jax.make_jaxpr(f0)(x, t, jnp.float32(0.5)))
    f1 = sampling.make_eps_fn(p, cfg, "none", None, y, guidance_scale=1.5, plain=plain)
    assert f"f32[{2 * B},8,8,1]" in str(jax.make_jaxpr(f1)(x, t, jnp.float32(0.5)))
    e1, st = jax.jit(f1)(x, t, jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(e1), 2.5 * cond - 1.5 * null, atol=1e-4)
    assert st["exit_layer"].shape == (B,)


def test_guidance_needs_condition():
  c = base_config().model
  c.update(embed_dim=32, depth=2, num_heads=2, num_classes=0)
  module = build(c)
  with pytest.raises(ValueError, match="needs a conditional model"):
    sampling.make_eps_fn({}, module.cfg, guidance_scale=1.0)


def test_early_exit_threshold_zero_equals_plain_sampler(model):
  # Two batches of 3, guidance on (CFG pairs through the loop), eta 1 (step noise matters too):
  # equal images prove the same initial and step noise for both paths.
  c = _config(guidance_scale=1.0, num_images=6, batch_size=3, eta=1.0)
  c.exit.update(policy="uem", threshold=0.0)
  ee_img, st = sampling.sample(model["params"], c, jax.random.PRNGKey(2), 6)
  plain_img, pst = sampling.sample(model["params"], c, jax.random.PRNGKey(2), 6, plain=True)
  np.testing.assert_allclose(ee_img, plain_img, atol=5e-5)  # float32 reassociation between the two paths (1.4e-5 seen)
  n = model["cfg"].num_blocks
  np.testing.assert_array_equal(st["layers_run"], np.full((2, STEPS), n))
  np.testing.assert_array_equal(st["exit_layer"], np.full((STEPS, 6), n))
  np.testing.assert_array_equal(st["batch_sizes"], [3, 3])
  assert ee_img.shape == (6, 8, 8, 1) and ee_img.min() >= -1 and ee_img.max() <= 1
  assert np.abs(ee_img[:3] - ee_img[3:]).max() > 1e-3  # batches get their own noise


def test_time_schedule_follows_sampler_steps(model):
  c = _config(steps=4, sampler="ddim")
  c.exit.update(policy="time_schedule", schedule="2,5", threshold=0.0)
  _, st = sampling.sample(model["params"], c, jax.random.PRNGKey(0), B)
  # Grid 999, 666, 333, 0 -> time_frac 1, .67, .33, 0 -> buckets 0, 0, 1, 1 -> depths 2, 2, 5, 5.
  np.testing.assert_array_equal(st["layers_run"][0], [2, 2, 5, 5])
  np.testing.assert_array_equal(st["exit_layer"], np.repeat([[2], [2], [5], [5]], B, axis=1))


def test_thresholds_do_not_recompile_sampler(model):
  c = _config(steps=2, sampler="ddim")
  c.exit.update(policy="uem", threshold=0.0)
  layers = set()
  for thr in (0.0, 0.45, 0.5, 0.55, 1.0):
    c.exit.threshold = thr
    _, st = sampling.sample(model["params"], c, jax.random.PRNGKey(0), B)
    layers.add(tuple(st["layers_run"].ravel()))
  fn = sampling._compiled(model["cfg"], "linear", 1000, "ddim", 2, "uem", "all", False, True, False)
  # One ahead-of-time compiled program serves every threshold value.
  assert sum(1 for f, _ in sampling._EXECUTABLES if f is fn) == 1
  assert len(layers) >= 2


def test_summarize():
  stats = {"layers_run": np.array([[4, 2], [2, 2]]), "exit_layer": np.array([[4, 1, 2], [2, 2, 2]]),
           "batch_sizes": np.array([2, 1])}
  s = sampling.summarize(stats, 4)
  # run: batch 0 (2 rows) ran 4+2, batch 1 (1 row) ran 2+2 -> (2*6 + 1*4) / (3 rows * 2 steps * 4 blocks)
  assert s["layer_ratio_run"] == pytest.approx(16 / 24)
  assert s["layer_ratio_per_sample"] == pytest.approx(13 / 6 / 4)
  assert s["layers_run_per_step"] == pytest.approx([(2 * 4 + 2) / 3, 2.0])
  assert s["mean_exit_layer_per_step"] == pytest.approx([7 / 3, 2.0])
  assert s["exit_histogram"] == [[1, 1, 0, 1], [0, 3, 0, 0]]
