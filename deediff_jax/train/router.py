"""`train.mode=router`: a Learning-to-Cache router on a frozen backbone (`deediff_jax.caching`).

Only the router logits learn, `prob` [R, 2N] (R = sample.steps rows, one per network evaluation
for dpm_solver_2s as in the official files, one per step for ddim); the backbone from
train.init_from (or sample.params_file) is frozen. One training step, as the official `train_router_discrete.py`
(`LRouter`), conditional calls only (no null rows):

  dpm_solver_2s  a training image is noised to grid step k (k uniform in 0 .. K-2, K = steps/2
                 solver steps; the discrete time round(t_k N), as the official code), one
                 DPM-Solver-2 step with the full model (no gradient) fills the caches at its
                 intermediate evaluation and gives x at t_{k+1}; router row k+1 is trained.
  ddim           (the DiT alternation) a training image is noised to a full step j whose next
                 step j+1 is a cached one; the full evaluation at j fills the caches and one DDIM
                 step gives x_{j+1}; router row S-1-(j+1) is trained.

At that next evaluation the loss is

  loss = mean_b sum_{h,w,c} (eps_full - eps_student)^2 + lambda * sum_l sigmoid(prob_row)_l

where the student blends each sublayer's fresh and cached update, `s * fresh + (1 - s) * cached`
(s = the sublayer's score), and lambda = cache.l1_weight * H*W*C / 4096: the official 0.1 is sized
for a sum over a 4x32x32 latent (4096 values); the data term is a sum over the output, so lambda is
scaled by the output size to keep the two terms in the same ratio on other data (MNIST 14x14x1:
0.1 * 196 / 4096 = 0.0048).

AdamW without weight decay (official), train.lr with train.warmup_steps linear warm-up, then
constant; the logits start from a standard normal (official `torch.randn`), seeded by train.seed.
Writes DIR/router.npz (`caching.save_router`: logits, sampler, steps) every
train.checkpoint_every steps and at the end, and DIR/router_metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deediff_jax import caching
from deediff_jax.config import ConfigError, ModelConfig
from deediff_jax.diffusion import samplers as samplers_lib
from deediff_jax.diffusion import schedule as sched_lib

REFERENCE_SIZE = 4 * 32 * 32   # the output size the official lambda is given for


def l1_lambda(config) -> float:
  """cache.l1_weight scaled from a 4x32x32 output to this model's H*W*C (module doc)."""
  mc = ModelConfig.from_config(config.model)
  return float(config.cache.l1_weight) * mc.image_size ** 2 * mc.in_channels / REFERENCE_SIZE


def router_loss(prob_row, params, cfg, x, t_model, y, prev_att, prev_mlp, l1_weight):
  """(loss, (data_loss, l1)) of one router row at one evaluation (module doc)."""
  cfg = ModelConfig.from_config(cfg)
  scores = jax.nn.sigmoid(jnp.asarray(prob_row))
  teacher, _, _ = caching.sublayer_forward(params, cfg, x, t_model, y)
  teacher = jax.lax.stop_gradient(teacher)
  student, _, _ = caching.sublayer_forward(params, cfg, x, t_model, y,
                                           blend=(prev_att, prev_mlp, scores.reshape(cfg.num_blocks, 2)))
  data = jnp.mean(jnp.sum(jnp.square(teacher - student), axis=(1, 2, 3)))
  l1 = jnp.sum(scores)
  return data + l1_weight * l1, (data, l1)


def _plan(config, schedule):
  """The host-side arrays a training step reads: for each trainable case c, the start's alpha,
  sigma and discrete index, and the row trained."""
  sampler, steps = str(config.sample.sampler), int(config.sample.steps)
  if sampler == "dpm_solver_2s":
    g = samplers_lib.dpm_solver_2s_grid(schedule, steps)
    k = steps // 2
    cases = np.arange(0, k - 1)
    # The official code noises to the discrete label round(t_k N) (our 0-based index: minus 1).
    noise_t = (g["t"][cases] if schedule.continuous else
               np.round(g["t"][cases] * schedule.num_timesteps) - 1)
    return {"cases": cases, "rows": cases + 1, "noise_t": noise_t, "grid": g}
  g = samplers_lib.grid_arrays(schedule, steps)
  cases = np.array([j for j in range(steps - 1) if (steps - 1 - (j + 1)) % 2 == 0], np.int64)
  return {"cases": cases, "rows": steps - 1 - (cases + 1), "noise_t": np.asarray(g["grid"])[cases],
          "grid": g}


def make_step(config, params, schedule, optimizer):
  """The jitted training step (prob, opt_state, image, label, key) -> (prob, opt_state, metrics)."""
  cfg = ModelConfig.from_config(config.model)
  sampler, steps = str(config.sample.sampler), int(config.sample.steps)
  plan = _plan(config, schedule)
  if len(plan["cases"]) == 0:
    raise ConfigError(f"{sampler} with sample.steps={steps} has no cached evaluation to train a router "
                      "for; use more steps")
  lam = l1_lambda(config)
  cases = jnp.asarray(plan["cases"], jnp.int32)
  rows = jnp.asarray(plan["rows"], jnp.int32)
  noise_t = jnp.asarray(plan["noise_t"], jnp.float32)   # alpha_sigma casts it for discrete schedules
  g = {k: jnp.asarray(v, jnp.float32) for k, v in plan["grid"].items()
       if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 1}

  def fwd(x, t_model, y):
    eps, att, mlp = caching.sublayer_forward(params, cfg, x, t_model, y)
    return eps, att, mlp

  def prepare(x0, y, c, key):
    """(x at the cached evaluation, its network time, cached att, cached mlp), no gradient."""
    b = x0.shape[0]
    alpha, sigma = sched_lib.alpha_sigma(schedule, noise_t[c])
    x = alpha * x0 + sigma * jax.random.normal(key, x0.shape, x0.dtype)
    tb = lambda v: jnp.full((b,), v, jnp.float32)
    if sampler == "dpm_solver_2s":
      eps, _, _ = fwd(x, tb(g["t_model_s"][c]), y)
      x0s = (x - g["sigma_s"][c] * eps) / g["alpha_s"][c]
      u = g["u_x"][c] * x + g["u_0"][c] * x0s
      eps1, att, mlp = fwd(u, tb(g["t_model_s1"][c]), y)
      x01 = (u - g["sigma_s1"][c] * eps1) / g["alpha_s1"][c]
      x_next = g["x_x"][c] * x + g["x_0"][c] * x0s + g["x_1"][c] * x01
      return x_next, tb(g["t_model_s"][c + 1]), att, mlp
    eps, att, mlp = fwd(x, tb(g["t_model"][c]), y)
    x0p = (x - g["sigma"][c] * eps) / g["alpha"][c]
    x_next = g["alpha"][c + 1] * x0p + g["sigma"][c + 1] * eps     # DDIM, eta = 0
    return x_next, tb(g["t_model"][c + 1]), att, mlp

  def step(prob, opt_state, x0, y, key):
    k_case, k_noise = jax.random.split(key)
    c = jax.random.randint(k_case, (), 0, cases.shape[0])
    x, t_model, att, mlp = jax.lax.stop_gradient(prepare(x0, y, cases[c], k_noise))
    row = rows[c]

    def loss_fn(p):
      return router_loss(p[row], params, cfg, x, t_model, y, att, mlp, lam)
    (loss, (data, l1)), grad = jax.value_and_grad(loss_fn, has_aux=True)(prob)
    updates, opt_state = optimizer.update(grad, opt_state, prob)
    prob = optax.apply_updates(prob, updates)
    return prob, opt_state, {"loss": loss, "data_loss": data, "l1": l1, "row": row}
  return jax.jit(step)


def train_router(config, workdir: str, *, params=None, batch_fn=None, progress: bool = True) -> np.ndarray:
  """`--mode train` with train.mode=router: returns the trained logits [R, 2N] (module doc)."""
  cfg = ModelConfig.from_config(config.model)
  sampler, steps = str(config.sample.sampler), int(config.sample.steps)
  if sampler not in caching.CACHE_SAMPLERS:
    raise ConfigError(f"train.mode=router trains for sample.sampler dpm_solver_2s or ddim, got {sampler}")
  if sampler == "dpm_solver_2s" and steps % 2:
    raise ConfigError(f"sample.sampler=dpm_solver_2s needs an even sample.steps, got {steps}")
  if cfg.context_dim > 0:
    raise ConfigError("train.mode=router supports unconditional and class-conditional models; this "
                      "one is text-conditional (model.context_dim > 0)")
  if params is None and str(config.sample.params_file).strip():   # a committed params file
    from deediff_jax.train import params_file
    params = params_file.load_for(config)
  if params is None:
    from deediff_jax.train.checkpoint import load_params
    params = load_params(config.train.init_from, config, use_ema=True)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  if batch_fn is None:
    from deediff_jax.train.trainer import default_batch_fn
    batch_fn, _ = default_batch_fn(config)
  schedule = sched_lib.from_config(config.diffusion)
  t = config.train
  lr = optax.join_schedules([optax.linear_schedule(0.0, float(t.lr), max(int(t.warmup_steps), 1)),
                             optax.constant_schedule(float(t.lr))], [max(int(t.warmup_steps), 1)])
  optimizer = optax.adamw(lr, weight_decay=0.0)
  rng = jax.random.PRNGKey(int(t.seed))
  prob = jax.random.normal(jax.random.fold_in(rng, 0), (steps, 2 * cfg.num_blocks), jnp.float32)
  opt_state = optimizer.init(prob)
  step_fn = make_step(config, params, schedule, optimizer)
  os.makedirs(workdir, exist_ok=True)
  out = os.path.join(workdir, "router.npz")
  metrics_path = os.path.join(workdir, "router_metrics.jsonl")
  window, t0 = [], time.perf_counter()
  for i in range(int(t.num_steps)):
    batch = batch_fn(i)
    x0 = jnp.asarray(batch["image"], jnp.float32)
    y = jnp.asarray(batch["label"], jnp.int32) if cfg.num_classes > 0 else None
    prob, opt_state, m = step_fn(prob, opt_state, x0, y, jax.random.fold_in(rng, i + 1))
    window.append(m)
    last = i + 1 == int(t.num_steps)
    if (i + 1) % int(t.log_every) == 0 or last:
      row = {k: float(np.mean([float(w[k]) for w in window])) for k in ("loss", "data_loss", "l1")}
      trained = np.unique(np.asarray(_plan(config, schedule)["rows"]))
      scores = np.asarray(jax.nn.sigmoid(prob))[trained]
      row.update(step=i + 1, mean_score=float(scores.mean()),
                 reused_at_threshold=float(np.mean(scores <= float(config.cache.threshold))),
                 seconds=time.perf_counter() - t0)
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      if progress:
        print(f"router step {i + 1}: loss {row['loss']:.4g} (data {row['data_loss']:.4g}, L1 {row['l1']:.3g}) "
              f"mean score {row['mean_score']:.3f}, reused at {float(config.cache.threshold):g}: "
              f"{row['reused_at_threshold']:.0%}", flush=True)
      window = []
    if (i + 1) % int(t.checkpoint_every) == 0 or last:
      caching.save_router(out, np.asarray(prob), sampler=sampler, steps=steps, num_blocks=cfg.num_blocks)
  print(f"router written to {out}: sample with --config.cache.policy=l2c --config.cache.router={out} "
        f"--config.sample.sampler={sampler} --config.sample.steps={steps}")
  return np.asarray(prob)
