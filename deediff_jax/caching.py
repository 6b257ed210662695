"""Learning-to-Cache (L2C; Ma et al., NeurIPS 2024): attention and MLP sublayers that reuse the
update they produced at the previous network evaluation, carried through the sampler's step loop.

A U-ViT block adds two residual updates, the attention output `a = attn(norm1(x))` and the MLP
output `m = mlp(norm2(x + a))`. A *reused* sublayer adds the update it produced at the previous
evaluation instead of computing it (the official `U-ViT/libs/uvit_dynamic.py` semantics); an
out-block's long-skip Linear always runs. Here the previous updates ride through the sampler's
`lax.scan` as a fixed-shape carry, `CacheState` = {att [N, B, T, D], mlp [N, B, T, D], valid [N]},
and a reused sublayer is skipped with `lax.cond` inside the early-exit `while_loop`
(`early_exit.early_exit_forward(..., cache=...)`), so it costs nothing.

When a sublayer reuses (`reuse_schedule`, a bool [solver_steps, N, 2], 0 = attention, 1 = MLP):
  dpm_solver_2s  (the official sampler: DPM-Solver++ singlestep order 2, NFE = 2 x solver steps)
                 every sublayer runs at each step's intermediate evaluation and fills the cache;
                 at the first evaluation of step k >= 1 a sublayer reuses what it produced at step
                 k-1's intermediate evaluation where router row k's score <= threshold. Step 0
                 computes everything. Router rows 1 .. NFE/2 - 1 are read.
  ddim           the DiT version's alternation (`DiT/models/dynamic_models.py`): with S steps, step j
                 (0 = noisiest) is a cached step iff j >= 1 and S-1-j is even; it reuses the
                 previous (full) step's updates where router row S-1-j's score <= threshold. Only
                 the even-indexed rows are read and reuse is never chained.
Classifier-free guidance: the conditional and null rows are rows of one batch, so each keeps its
own cache (the official code keeps `cond_cache_features` and `uncond_cache_features`). Without
guidance the official code's reset rule (written for two calls per evaluation) does not apply;
here the rule is the same with or without guidance: each step's first evaluation reuses the
previous step's last evaluation.

With an exit policy the loop still stops at the exit: blocks past it are not run, and the cache
entries of a block that the previous evaluation did not reach are marked invalid (`valid`), so
that block computes both sublayers instead of reusing.

Router files (`load_router`, `read_router`): the official `ModuleList` state dict of `Router`s
(`{k}.prob`, one row of 2N logits per NFE, scores = sigmoid(prob), block by block in running
order, attention at even and MLP at odd indices), read with `torch.load(weights_only=True)`, or
our own flat npz (`save_router`: `prob`, `sampler`, `steps`, `num_blocks`), which needs no torch.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deediff_jax.config import CacheSpec, ConfigError, ModelConfig
from deediff_jax.model.deediff import DeeDiffUViT
from deediff_jax.model.uvit import LN_EPS, Attention, Head, Mlp
from deediff_jax.tensor_files import CheckpointError, load_state_dict

CACHE_POLICIES = ("none", "l2c")
CACHE_SAMPLERS = ("dpm_solver_2s", "ddim")
ROUTER_FORMAT = "deediff_jax.l2c_router/1"


class CacheError(ConfigError):
  """A router or cache request that does not fit the run (one line; the CLI exits 2)."""


# ----------------------------------------------------------------------------- router files

class RouterFile(NamedTuple):
  scores: np.ndarray          # float32 [num_routers, 2 * num_blocks], sigmoid(prob)
  sampler: Optional[str]      # our format records it; official files do not (None)
  steps: Optional[int]        # sampler steps (NFE for dpm_solver_2s) it was trained for
  prob: Optional[np.ndarray] = None   # the logits as stored


def sigmoid32(prob) -> np.ndarray:
  """float32 sigmoid, as torch.sigmoid of a float32 tensor."""
  p = np.asarray(prob, np.float32)
  with np.errstate(over="ignore"):
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-p))).astype(np.float32)


def read_router(path) -> RouterFile:
  """A router file -> RouterFile. Official `.pth` (torch.load(weights_only=True): tensors only,
  never code) or our `.npz` (NumPy, no pickle). One-line CacheError for anything else."""
  path = os.fspath(path)
  sd = load_state_dict(path, what="router file", missing_hint="set cache.router to a router .pth/.npz",
                       entry_hint="a router file holds only tensors")
  if "prob" in sd and "num_blocks" in sd:       # ours
    prob = np.asarray(sd["prob"], np.float32)
    if prob.ndim != 2:
      raise CacheError(f"{path}: 'prob' must be [num_routers, 2*num_blocks], got shape {prob.shape}")
    sampler = str(sd["sampler"]) if "sampler" in sd else None
    steps = int(sd["steps"]) if "steps" in sd else None
    return RouterFile(sigmoid32(prob), sampler, steps, prob)
  rows = {}
  for name, value in sd.items():
    head, _, tail = name.partition(".")
    if tail != "prob" or not head.isdigit():
      raise CacheError(f"{path}: unexpected entry {name!r}; an official router file holds only "
                       "'{k}.prob' entries (a ModuleList of Routers)")
    rows[int(head)] = np.asarray(value, np.float32)
  if not rows or sorted(rows) != list(range(len(rows))):
    raise CacheError(f"{path}: router entries must be '0.prob' .. '{{R-1}}.prob' without gaps, got "
                     f"{sorted(rows)[:5]}...")
  sizes = {v.shape for v in rows.values()}
  if len(sizes) != 1 or len(next(iter(sizes))) != 1:
    raise CacheError(f"{path}: every '{{k}}.prob' must be one vector of the same length, got {sorted(sizes)}")
  prob = np.stack([rows[k] for k in range(len(rows))])
  return RouterFile(sigmoid32(prob), None, None, prob)


def load_router(path) -> np.ndarray:
  """Router scores float32 [num_routers, 2 * num_blocks] (sigmoid of the logits)."""
  return read_router(path).scores


def save_router(path, prob, *, sampler: str, steps: int, num_blocks: int) -> None:
  """Our flat format: router logits [R, 2N] with the sampler and step count they were trained for."""
  prob = np.asarray(prob, np.float32)
  if prob.shape[1:] != (2 * num_blocks,):
    raise CacheError(f"router logits must be [R, {2 * num_blocks}], got {prob.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, prob=prob, sampler=np.asarray(sampler), steps=np.asarray(int(steps), np.int64),
             num_blocks=np.asarray(int(num_blocks), np.int64), format=np.asarray(ROUTER_FORMAT))


def solver_steps(sampler: str, steps: int) -> int:
  """Sampler steps -> solver steps (the rows of a reuse schedule)."""
  if sampler == "dpm_solver_2s":
    return steps // 2
  if sampler == "ddim":
    return steps
  raise CacheError(f"cache.policy=l2c works with sample.sampler dpm_solver_2s or ddim, got {sampler!r}")


def num_routers(sampler: str, steps: int) -> int:
  """Rows a router file has for this run: one per network evaluation (NFE) for dpm_solver_2s (the
  official files), one per step for ddim."""
  return int(steps)


def reuse_schedule(scores, threshold: float, solver_steps: int, sampler: str = "dpm_solver_2s") -> np.ndarray:
  """bool [solver_steps, num_blocks, 2]: True where that sublayer (0 attention, 1 MLP) reuses at
  that step's first (dpm_solver_2s) or only (ddim) evaluation; row 0 is all False.

  dpm_solver_2s: exactly the official `load_ranking` with num_steps = NFE = 2 * solver_steps
  routers: row k >= 1 reuses where `score <= threshold` (a sublayer is recomputed where its
  score > threshold, compared in float32). ddim: the DiT alternation (module doc).
  """
  scores = np.asarray(scores, np.float32)
  if scores.ndim != 2 or scores.shape[1] % 2:
    raise CacheError(f"router scores must be [num_routers, 2*num_blocks], got shape {scores.shape}")
  n = scores.shape[1] // 2
  recompute = scores > np.float32(threshold)
  reuse = np.zeros((solver_steps, n, 2), bool)
  if sampler == "dpm_solver_2s":
    need = 2 * solver_steps
    if scores.shape[0] != need:
      raise CacheError(f"the router has {scores.shape[0]} rows but dpm_solver_2s with {need} steps (NFE) "
                       f"needs {need}; train or pick a router for sample.steps={scores.shape[0]}")
    for k in range(1, solver_steps):
      reuse[k] = ~recompute[k].reshape(n, 2)
  elif sampler == "ddim":
    if scores.shape[0] != solver_steps:
      raise CacheError(f"the router has {scores.shape[0]} rows but ddim with {solver_steps} steps needs "
                       f"{solver_steps}; train or pick a router for sample.steps={scores.shape[0]}")
    for j in range(1, solver_steps):
      r = solver_steps - 1 - j
      if r % 2 == 0:
        reuse[j] = ~recompute[r].reshape(n, 2)
  else:
    raise CacheError(f"cache.policy=l2c works with sample.sampler dpm_solver_2s or ddim, got {sampler!r}")
  return reuse


def check_router(router: RouterFile, *, num_blocks: int, sampler: str, steps: int, path: str = "") -> None:
  """One-line errors for a router that does not fit the model, the sampler or the step count."""
  where = f"{path}: " if path else ""
  if router.scores.shape[1] != 2 * num_blocks:
    raise CacheError(f"{where}the router has {router.scores.shape[1]} scores per row but this model has "
                     f"{num_blocks} blocks ({2 * num_blocks} sublayers); use a router trained for it")
  if router.sampler is not None and router.sampler != sampler:
    raise CacheError(f"{where}the router was trained for sample.sampler={router.sampler}, the run uses "
                     f"{sampler}; set --config.sample.sampler={router.sampler} or train another")
  if router.steps is not None and router.steps != steps:
    raise CacheError(f"{where}the router was trained for sample.steps={router.steps}, the run uses "
                     f"{steps}; set --config.sample.steps={router.steps} or train another")
  if router.scores.shape[0] != num_routers(sampler, steps):
    raise CacheError(f"{where}the router has {router.scores.shape[0]} rows but {sampler} with "
                     f"sample.steps={steps} needs {num_routers(sampler, steps)}; use sample.steps="
                     f"{router.scores.shape[0]} or another router")


def check_spec(spec: CacheSpec) -> None:
  """The run-level rules of a cached run (one line each): a sampler that caches and a router."""
  if spec.sampler not in CACHE_SAMPLERS:
    raise CacheError(f"cache.policy=l2c works with sample.sampler dpm_solver_2s or ddim, got {spec.sampler}")
  if spec.sampler == "dpm_solver_2s" and spec.steps % 2:
    raise CacheError(f"sample.sampler=dpm_solver_2s needs an even sample.steps (NFE), got {spec.steps}")
  if not spec.router:
    raise CacheError("cache.policy=l2c needs cache.router=PATH (an official .pth or one trained with "
                     "--config.train.mode=router)")


def reuse_for(spec: CacheSpec, num_blocks: int, threshold: Optional[float] = None) -> np.ndarray:
  """The reuse schedule of `spec`'s router at `threshold` (default: spec.threshold) for its sampler
  and step count, whatever spec.policy says (the sweep's and tune's cache rows set only the
  threshold)."""
  check_spec(spec)
  router = read_router(spec.router)
  check_router(router, num_blocks=num_blocks, sampler=spec.sampler, steps=spec.steps, path=spec.router)
  thr = spec.threshold if threshold is None else float(threshold)
  return reuse_schedule(router.scores, thr, solver_steps(spec.sampler, spec.steps), spec.sampler)


# ----------------------------------------------------------------------------- the carry

def init_cache(cfg: ModelConfig, batch: int) -> dict:
  """An empty cache for `batch` rows (CFG: conditional + null rows): nothing valid yet."""
  cfg = ModelConfig.from_config(cfg)
  shape = (cfg.num_blocks, batch, cfg.num_tokens, cfg.embed_dim)
  return {"att": jnp.zeros(shape, cfg.compute_dtype), "mlp": jnp.zeros(shape, cfg.compute_dtype),
          "valid": jnp.zeros((cfg.num_blocks,), bool)}


def no_reuse(cfg: ModelConfig) -> jax.Array:
  return jnp.zeros((ModelConfig.from_config(cfg).num_blocks, 2), bool)


# ----------------------------------------------------------------------------- one block

def _norm(cfg: ModelConfig, p, h):
  return nn.LayerNorm(epsilon=LN_EPS, dtype=cfg.compute_dtype).apply({"params": p}, h)


def attn_update(cfg: ModelConfig, p, h):
  """a = attn(norm1(h)), exactly as inside `uvit.Block`."""
  return Attention(cfg).apply({"params": p["attn"]}, _norm(cfg, p["norm1"], h))


def mlp_update(cfg: ModelConfig, p, h):
  """m = mlp(norm2(h)), exactly as inside `uvit.Block`."""
  return Mlp(cfg).apply({"params": p["mlp"]}, _norm(cfg, p["norm2"], h))


def skip_in(cfg: ModelConfig, p, h, skip):
  """An out-block's long-skip Linear (always runs)."""
  if skip is None:
    return h
  return nn.Dense(cfg.embed_dim, dtype=cfg.compute_dtype).apply({"params": p["skip_linear"]},
                                                                  jnp.concatenate([h, skip], axis=-1))


def block_with_cache(cfg: ModelConfig, p, h, skip, reuse, prev_att, prev_mlp):
  """One block whose sublayers may reuse: (h_out, a, m). `reuse` bool [2] (traced scalars): a
  reused sublayer's branch of `lax.cond` adds `prev_att` / `prev_mlp` and computes nothing.
  `prev_att` / `prev_mlp` may be thunks, so that reading the cache happens only in that branch."""
  get = lambda v: v() if callable(v) else v
  h = skip_in(cfg, p, h, skip)
  a = lax.cond(reuse[0], lambda h: get(prev_att).astype(h.dtype), lambda h: attn_update(cfg, p, h), h)
  h = h + a
  m = lax.cond(reuse[1], lambda h: get(prev_mlp).astype(h.dtype), lambda h: mlp_update(cfg, p, h), h)
  return h + m, a, m


# ----------------------------------------------------------------------------- training forward

def _block_params(params, cfg: ModelConfig, i: int):
  k = cfg.num_segment_blocks
  take = lambda tree, j: jax.tree_util.tree_map(lambda a: a[j], tree)
  if i < k:
    return take(params["in_blocks"], i)
  if i == k:
    return params["mid_block"]
  return take(params["out_blocks"], i - k - 1)


def sublayer_forward(params, cfg, x, t_model, y=None, context=None, *, blend=None):
  """The plain forward, block by block, that also returns every sublayer update: (eps, att, mlp)
  with att/mlp [N, B, T, D]. `blend=(prev_att, prev_mlp, scores [N, 2])` is the router-training
  student: each update is `score * fresh + (1 - score) * prev` (train_router_discrete's LRouter
  with reuse weight 1 - score), and everything is computed (differentiable in the scores)."""
  cfg = ModelConfig.from_config(cfg)
  n, k = cfg.num_blocks, cfg.num_segment_blocks
  h, _ = DeeDiffUViT(cfg).apply({"params": params}, x, t_model, y, context, method=DeeDiffUViT.embed)
  skips, atts, mlps = [], [], []
  for i in range(n):
    p = _block_params(params, cfg, i)
    skip = skips[2 * k - i] if i > k else None   # LIFO: out-block j reads in-block k-1-j
    h = skip_in(cfg, p, h, skip)
    a = attn_update(cfg, p, h)
    if blend is not None:
      w = blend[2][i, 0].astype(a.dtype)
      a = w * a + (1 - w) * blend[0][i].astype(a.dtype)
    h = h + a
    m = mlp_update(cfg, p, h)
    if blend is not None:
      w = blend[2][i, 1].astype(m.dtype)
      m = w * m + (1 - w) * blend[1][i].astype(m.dtype)
    h = h + m
    if i < k:
      skips.append(h)
    atts.append(a)
    mlps.append(m)
  x_in = x.astype(cfg.compute_dtype) if cfg.input_skip else None
  eps = Head(cfg).apply({"params": params["head"]}, h, x_in)
  return eps, jnp.stack(atts), jnp.stack(mlps)
