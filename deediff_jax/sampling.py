"""Sampling from a network: the noise predictor, batching and ahead-of-time compilation.

`diffusion/samplers.py` integrates a plain `eps_fn(x, t_model, time_frac) -> (eps, stats)`; this
module builds that function from a network and its parameters (classifier-free guidance, the
early-exit forward with an exit policy, or the plain full-depth forward), runs a sampler over
batches with the same noise for every setting, compiles each program ahead of time
(`compile_only=True`) so a timed call compiles nothing, and summarises the exit statistics. It
also holds the one wall clock of every mode (`timed`, and `paired_speedup` for two interleaved runs).
"""
from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from deediff_jax import caching
from deediff_jax import policies
from deediff_jax.config import SAMPLERS, CacheSpec, ExitSpec, ModelConfig, SamplerSpec
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.diffusion.samplers import EpsFn, SamplerError, guide, run_sampler, x0_scale_fn
from deediff_jax.early_exit import check_policy, early_exit_forward, exit_params, make_policy_params
from deediff_jax.model.deediff import DeeDiffUViT


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


def make_eps_fn(params, cfg, policy: Optional[str] = None, policy_params=None, y=None, context=None,
                guidance_scale=0.0, null_y=None, null_context=None, *, aggregate: str = "all",
                plain: bool = False, x0_scale_of=None) -> EpsFn:
  """The noise predictor a sampler calls: early exit (default) or the plain full-depth forward.

  `plain=True` is the real baseline: `module.apply` (the scan forward, no while loop, no exit
  machinery); its stats report every sample at full depth. `guidance_scale` may be traced, but a
  Python 0 (the default) means no guidance and no doubled batch. `policy` None: full depth through
  the loop (`policies.full_depth()`). A policy that `needs_x0_scale` (the oracle) needs
  `x0_scale_of` (`x0_scale_fn(schedule)`).
  """
  cfg = ModelConfig.from_config(cfg)
  n = cfg.num_blocks
  module = DeeDiffUViT(cfg)
  doubled = not _is_zero(guidance_scale)
  y_in, ctx_in = _conditioning(cfg, y, context, null_y, null_context, doubled)
  if policy is None:
    policy = policies.full_depth().name
  if not plain:
    check_policy(policy, cfg, aggregate)
    if policy_params is None:
      policy_params = make_policy_params(n)

  def eps_fn(x, t_model, time_frac, cache=None, reuse=None):
    b = x.shape[0]
    xin = jnp.concatenate([x, x], axis=0) if doubled else x
    t = jnp.broadcast_to(jnp.asarray(t_model, jnp.float32), (xin.shape[0],))
    if plain and cache is not None:
      raise SamplerError("the plain forward has no cache; Learning-to-Cache runs through the loop")
    if plain:
      eps = module.apply({"params": params}, xin, t, y_in, ctx_in)
      stats = {"exit_layer": jnp.full((xin.shape[0],), n, jnp.int32), "layers_run": jnp.asarray(n, jnp.int32)}
    else:
      extra = {}
      if policies.get(policy).needs_x0_scale:
        if x0_scale_of is None:
          raise SamplerError(f"exit policy {policy!r} needs x0_scale_of (samplers.x0_scale_fn(schedule))")
        extra = dict(x0_scale=x0_scale_of(time_frac), guidance_scale=guidance_scale if doubled else None)
      if cache is not None:
        extra.update(cache=cache, reuse=reuse)
      eps, stats = early_exit_forward(params, cfg, xin, t, y_in, ctx_in, policy=policy,
                                      policy_params=policy_params, time_frac=time_frac,
                                      cfg_pairs=doubled, aggregate=aggregate, **extra)
    if doubled:
      eps = guide(eps, guidance_scale)
    out = {"exit_layer": stats["exit_layer"][:b], "layers_run": stats["layers_run"]}
    if cache is not None:  # Learning-to-Cache: the new state and the sublayers computed
      out.update({k: stats[k] for k in ("cache", "att_run", "mlp_run")})
    return eps, out
  return eps_fn


def make_plain_eps_fn(params, cfg, y=None, context=None, guidance_scale=0.0, null_y=None,
                      null_context=None) -> EpsFn:
  """The plain full-depth noise predictor (the scan forward), same interface as `make_eps_fn`."""
  return make_eps_fn(params, cfg, y=y, context=context, guidance_scale=guidance_scale, null_y=null_y,
                     null_context=null_context, plain=True)


# ----------------------------------------------------------------------------- top level

@functools.lru_cache(maxsize=64)
def _compiled(cfg: ModelConfig, schedule_name: str, timesteps: int, sampler: str, steps: int,
              policy: str, aggregate: str, doubled: bool, clip: bool, plain: bool, cached: bool = False):
  """One jitted sampler per static setting; thresholds, depths, eta, guidance and the cache's
  reuse schedule are traced."""
  schedule = sched_lib.make_schedule(schedule_name, timesteps)

  def fn(params, x_init, rng, y, context, null_context, policy_params, guidance_scale, eta, reuse=None):
    eps_fn = make_eps_fn(params, cfg, policy, policy_params, y, context,
                         guidance_scale if doubled else 0.0, None, null_context,
                         aggregate=aggregate, plain=plain, x0_scale_of=x0_scale_fn(schedule))
    cache = None
    if cached:
      rows = x_init.shape[0] * (2 if doubled else 1)   # CFG: the null rows keep their own cache
      cache = (caching.init_cache(cfg, rows), reuse)
    x, stats = run_sampler(sampler, eps_fn, schedule, steps, x_init, rng, eta=eta, clip=clip, cache=cache)
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


NOISE_STREAM = 0x1A6E   # fold_in id of the per-image initial noise


@functools.partial(jax.jit, static_argnums=(2,))
def _per_image_noise(rng, indices, image_shape):
  key = jax.random.fold_in(rng, NOISE_STREAM)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape, jnp.float32))(indices)


def initial_noise(rng, start: int, shape):
  """The starting noise of images start .. start + shape[0] - 1: image i's noise is a function of
  the seed and i only (not of the batch size or the batch it falls in)."""
  return _per_image_noise(rng, jnp.arange(start, start + shape[0], dtype=jnp.uint32), tuple(shape[1:]))


def sample(params, config, rng, num: int, *, policy: Optional[str] = None, policy_params=None,
           labels=None, context=None, null_context=None, plain: bool = False,
           aggregate: Optional[str] = None, progress: bool = False, compile_only: bool = False,
           x_init=None, reuse=None):
  """Samples `num` images in batches of `config.sample.batch_size` -> (images, stats).

  images: [num, H, W, C] float32 (clipped to [-1, 1] for pixel models; raw for latent models).
  stats (NumPy): `layers_run` [batches, steps], `exit_layer` [steps, num], `batch_sizes` [batches].
  The policy defaults to `config.exit`; `plain=True` uses the plain full-depth forward. Image
  i's initial noise depends only on `rng` and i (`initial_noise`), the sampler's noise on `rng`
  and the batch index, so early exit and full depth start from the same noise. `compile_only=True` compiles the program of every
  batch shape (ahead of time, nothing runs) and returns None: a timed call after it compiles
  nothing.

  `x_init` [num, H, W, C]: the initial noise to start from instead of drawing it (e.g. noise
  another implementation drew). `reuse`: Learning-to-Cache's reuse schedule (bool [solver_steps,
  N, 2], `caching.reuse_schedule`); None: from config.cache (on when cache.policy=l2c), False:
  off. With a cache, stats also hold `att_run` / `mlp_run` [batches, steps] (sublayers computed).
  """
  cfg = ModelConfig.from_config(config.model)
  n = cfg.num_blocks
  if policy is None or policy_params is None:
    policy, cfg_params = exit_params(ExitSpec.from_config(config, n, policy), n)
    policy_params = cfg_params if policy_params is None else policy_params
  aggregate = config.exit.aggregate if aggregate is None else aggregate
  if reuse is None:
    cache = CacheSpec.from_config(config)
    reuse = caching.reuse_for(cache, n) if cache.enabled and not plain else False
  return sample_with(params, cfg, SamplerSpec.from_config(config), rng, num, policy=policy,
                     policy_params=policy_params, aggregate=aggregate, labels=labels, context=context,
                     null_context=null_context, plain=plain, progress=progress,
                     compile_only=compile_only, x_init=x_init, reuse=reuse)


def sample_with(params, cfg: ModelConfig, spec: SamplerSpec, rng, num: int, *, policy: str, policy_params,
                aggregate: str = "all", labels=None, context=None, null_context=None, plain: bool = False,
                progress: bool = False, compile_only: bool = False, x_init=None, reuse=False):
  """The core of `sample` on typed specs (no config): `policy` and its traced `policy_params`
  given, `reuse` a reuse schedule or False. Same results and stats as `sample`."""
  n = cfg.num_blocks
  if not plain:
    check_policy(policy, cfg, aggregate)
  s = spec
  if s.sampler not in SAMPLERS:
    raise SamplerError(f"unknown sampler {s.sampler!r}; choose one of {', '.join(SAMPLERS)}")
  scale = float(s.guidance_scale)
  doubled = scale != 0.0
  clip = s.sampler in ("ddpm", "ddim") and not s.latent
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
  cached = reuse is not False and not plain
  if cached:
    rows = caching.solver_steps(s.sampler, int(s.steps))
    reuse = jnp.asarray(reuse, bool)
    if reuse.shape != (rows, n, 2):
      raise SamplerError(f"the reuse schedule must be [{rows}, {n}, 2] for {s.sampler} with "
                         f"{s.steps} steps, got {tuple(reuse.shape)}")
  if x_init is not None and np.shape(x_init) != (num, cfg.image_size, cfg.image_size, cfg.in_channels):
    raise SamplerError(f"x_init must be [{num}, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}] "
                       f"(NHWC), got {tuple(np.shape(x_init))}")
  fn = _compiled(cfg, s.schedule, int(s.timesteps), s.sampler,
                 int(s.steps), policies.full_depth().name if plain else policy, aggregate, doubled, clip, bool(plain),
                 *((True,) if cached else ()))   # the uncached program keeps its lru_cache key
  shape = (cfg.image_size, cfg.image_size, cfg.in_channels)
  bs = int(s.batch_size)
  starts = list(range(0, num, bs))
  images, layers_run, exit_layer, sizes, sub_run = [], [], [], [], []
  if compile_only:  # one batch of each distinct size: shapes are all that matter
    starts = list({min(st + bs, num) - st: st for st in reversed(starts)}.values())
  for bi, start in enumerate(tqdm(starts, desc="sampling", disable=not progress or compile_only, leave=False)):
    stop = min(start + bs, num)
    x0 = (initial_noise(rng, start, (stop - start,) + shape) if x_init is None
          else jnp.asarray(np.asarray(x_init, np.float32)[start:stop]))
    step_rng = jax.random.fold_in(jax.random.fold_in(rng, bi), 1)
    y = None if labels is None else jnp.asarray(np.asarray(labels)[start:stop], jnp.int32)
    ctx = None if context is None else jnp.asarray(np.asarray(context)[start:stop], jnp.float32)
    nctx = None if null_context is None else jnp.asarray(null_context, jnp.float32)
    args = (params, x0, step_rng, y, ctx, nctx, policy_params, jnp.float32(scale), jnp.float32(s.eta))
    if cached:
      args = args + (reuse,)
    program = _executable(fn, args)
    if compile_only:
      continue
    x, st = program(*args)
    images.append(x)
    layers_run.append(st["layers_run"])
    exit_layer.append(st["exit_layer"])
    if cached:
      sub_run.append((st["att_run"], st["mlp_run"]))
    sizes.append(stop - start)
  if compile_only:
    return None
  # Host-side assembly: eager jnp ops on new shapes would compile inside a timed call.
  images = np.concatenate([np.asarray(v, np.float32) for v in images], axis=0)
  if not s.latent:
    images = np.clip(images, -1.0, 1.0)
  stats = {"layers_run": np.stack([np.asarray(v) for v in layers_run]),
           "exit_layer": np.concatenate([np.asarray(v) for v in exit_layer], axis=1),
           "batch_sizes": np.asarray(sizes, np.int64)}
  if cached:
    stats["att_run"] = np.stack([np.asarray(a) for a, _ in sub_run])
    stats["mlp_run"] = np.stack([np.asarray(m) for _, m in sub_run])
  return images, stats


def compile_ahead(sample_fn, *variants) -> None:
  """Compiles ahead of time (running nothing) every batch shape of each variant's call of
  `sample_fn` (`sample` or `sample_with` with its positional arguments bound; a variant: a dict
  of its keyword arguments), so a timed call compiles nothing. The one warm-up of --mode sample,
  eval and the sweep; XLA compiles outside the GIL, so the variants compile side by side."""
  from concurrent.futures import ThreadPoolExecutor
  with ThreadPoolExecutor(max_workers=max(1, len(variants))) as pool:
    for f in [pool.submit(sample_fn, compile_only=True, **kw) for kw in variants]:
      f.result()


def timed(fn, *args, **kw) -> tuple:
  """(fn(*args, **kw), wall seconds) of one call. The clock stops only once every array of the
  result is ready (`jax.block_until_ready`): JAX dispatches asynchronously, so an earlier stop would
  time the dispatch, not the work. The caller compiles beforehand (`compile_ahead`, or a
  `compile_only=True` call), so the seconds are running time and never compilation."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kw))
  return out, time.perf_counter() - t0


def paired_speedup(full, other, repeats: int) -> dict:
  """Wall clock of `other` against `full` (thunks, compiled and run once beforehand): `repeats`
  pairs, the order alternating (full first in even pairs, other first in odd ones). On a shared
  machine the load drifts: within a pair it hits both alike, and neither side always runs second.
  Returns the median of the per-pair ratios full / other (`speedup`) and their min and max."""
  ratios = []
  for r in range(repeats):
    if r % 2 == 0:
      t_full, t_other = timed(full)[1], timed(other)[1]
    else:
      t_other, t_full = timed(other)[1], timed(full)[1]
    ratios.append(t_full / t_other)
  return {"speedup": float(np.median(ratios)), "speedup_min": float(np.min(ratios)),
          "speedup_max": float(np.max(ratios))}

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
