"""Analytic FLOPs of the DeeDiff U-ViT, per block, head, UEM and image, and an XLA cross-check.

Conventions (the same as XLA's `cost_analysis()`, so the two can be compared):

* A multiply-add is 2 FLOPs. A Dense layer on R rows is `2*R*in*out` plus `R*out` for the bias.
* Convolutions count only the taps that land inside the image (XLA does not count the zero
  padding): the 3x3 "same" conv of the head on an SxS image has `(3S-2)^2` valid taps per
  (input, output) channel pair, not `9*S^2`.
* Elementwise arithmetic is 1 FLOP per element and op; transcendentals (exp, cos, sin, rsqrt, the
  exp inside sigmoid) are not FLOPs, as in XLA, which reports them separately. Per element:
  - LayerNorm: 7 (mean and mean-of-squares reductions, the square, subtract the mean, multiply
    by rsqrt(var+eps), scale, shift) plus 5 per row (two divisions by D, mean^2, var, +eps).
  - softmax: 4 (max reduction, subtract, sum reduction, divide); the logit scale is 1 more.
  - exact (erf) GELU: 64. XLA expands f32 erf into a rational polynomial before any backend
    sees it, so this is real arithmetic; it is not negligible for small embedding widths
    (about a third of a D=32 block). `ELEMENTWISE` holds these constants.
  - sigmoid: 3, SiLU: 4, residual / position-embedding adds: 1, means: 1.
  Pass `matmul_only=True` to any function to get the usual paper convention instead (only
  dense, attention and convolution multiply-adds, no biases or elementwise work).
* Not counted: gathers (the class embedding), reshapes and transposes, concatenations, the
  early-exit loop's bookkeeping (counters, selects, the skip buffer), dtype casts, and the
  handful of scalar ops of the sinusoidal time embedding beyond `t * freqs`.

Everything is per image (batch row) and in plain Python numbers: the model is linear in the
batch, so a batch of B costs B times as much. The early-exit loop (`deediff_jax.early_exit`)
runs whole blocks on the whole batch, so its real cost per image comes from the *batch's*
layers run, not from each sample's own exit layer; see `early_exit_flops_per_image`.

`xla_flops` compiles a function and reads XLA's own count. XLA's cost analysis counts the body
of a `while` loop once, whatever its trip count, and `lax.scan` lowers to a while loop, so by
default `xla_flops` first rewrites every scan in the traced program to be fully unrolled
(`unroll_scans`: the same computation, no loop), so the count covers every scanned block.
Measured on jax 0.10.2 CPU, the analytic count is within 1% of XLA's for the forward, blocks
and heads of the test configs; the remaining gap is XLA's fusion duplicating cheap elementwise
work (e.g. the logit scale is recomputed in two fusions), which is not arithmetic the model needs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import numpy as np

from deediff_jax import policies
from deediff_jax.model.uvit import ModelConfig

# FLOPs per element of the elementwise pieces, matched to XLA's f32 lowering (see module doc).
ELEMENTWISE = {
    "layer_norm": 7, "layer_norm_row": 5, "softmax": 4, "gelu": 64, "sigmoid": 3, "silu": 4,
}


class FlopsError(ValueError):
  """Bad input to the FLOPs helpers (one line naming the problem and the fix)."""


class _Count:
  """Accumulates FLOPs, keeping matmul/conv work apart from elementwise work."""

  def __init__(self, matmul_only: bool):
    self.matmul_only = matmul_only
    self.total = 0

  def dense(self, rows: int, fan_in: int, fan_out: int, bias: bool = True):
    self.total += 2 * rows * fan_in * fan_out
    if bias:
      self.ew(rows * fan_out)

  def mm(self, flops: int):
    self.total += flops

  def ew(self, flops: int):
    if not self.matmul_only:
      self.total += flops

  def layer_norm(self, rows: int, width: int):
    self.ew(ELEMENTWISE["layer_norm"] * rows * width + ELEMENTWISE["layer_norm_row"] * rows)


def _cfg(cfg) -> ModelConfig:
  return ModelConfig.from_config(cfg)


def mlp_hidden(cfg: ModelConfig) -> int:
  return int(cfg.embed_dim * cfg.mlp_ratio)  # as uvit.Mlp


def block_flops(cfg, use_skip: bool = False, *, matmul_only: bool = False) -> int:
  """One U-ViT block on one image: [skip_linear], LN, attention, residual, LN, MLP, residual."""
  cfg = _cfg(cfg)
  t, d, h, m = cfg.num_tokens, cfg.embed_dim, cfg.num_heads, mlp_hidden(cfg)
  c = _Count(matmul_only)
  if use_skip:
    c.dense(t, 2 * d, d)                        # skip_linear(concat[x, skip])
  c.layer_norm(t, d)                            # norm1
  c.dense(t, d, 3 * d, bias=cfg.qkv_bias)       # qkv
  c.mm(2 * t * t * d)                           # q k^T over all heads: H * T*T*hd MACs
  c.ew(h * t * t)                               # * hd^-0.5
  c.ew(ELEMENTWISE["softmax"] * h * t * t)      # softmax over keys
  c.mm(2 * t * t * d)                           # weights @ v
  c.dense(t, d, d)                              # proj
  c.ew(t * d)                                   # residual
  c.layer_norm(t, d)                            # norm2
  c.dense(t, d, m)                              # fc1
  c.ew(ELEMENTWISE["gelu"] * t * m)             # exact GELU
  c.dense(t, m, d)                              # fc2
  c.ew(t * d)                                   # residual
  return c.total


def embed_flops(cfg, *, matmul_only: bool = False) -> int:
  """Tokens from the inputs: patch conv, time embedding (+ MLP), context projection, pos-embed."""
  cfg = _cfg(cfg)
  d = cfg.embed_dim
  c = _Count(matmul_only)
  c.dense(cfg.num_patches, cfg.patch_dim, d)    # Conv kernel=stride=p: a Dense per patch
  c.ew(d // 2)                                  # t * freqs (cos/sin are transcendentals)
  if cfg.mlp_time_embed:
    c.dense(1, d, 4 * d)
    c.ew(ELEMENTWISE["silu"] * 4 * d)
    c.dense(1, 4 * d, d)
  if cfg.context_dim > 0:
    c.dense(cfg.context_len, cfg.context_dim, d)
  c.ew(cfg.num_tokens * d)                      # + pos_embed (the class token is a gather)
  return c.total


def head_flops(cfg, *, matmul_only: bool = False) -> int:
  """One output head (uvit.Head): LN and decoder_pred over all tokens, then the 3x3 conv."""
  cfg = _cfg(cfg)
  t, d, s, ch = cfg.num_tokens, cfg.embed_dim, cfg.image_size, cfg.in_channels
  c = _Count(matmul_only)
  c.layer_norm(t, d)
  c.dense(t, d, cfg.patch_dim)                  # applied before the extra tokens are dropped
  conv_in = ch * (2 if cfg.input_skip else 1)   # input_skip: the conv also reads x_t
  c.mm(2 * conv_in * ch * (3 * s - 2) ** 2)     # 3x3 'same' conv, valid taps only
  c.ew(s * s * ch)                              # its bias
  return c.total


def uem_flops(cfg, kind: Optional[str] = None, *, matmul_only: bool = False) -> int:
  """One uncertainty module (exits.UEM) of `kind` (default: the model's `cfg.uem`)."""
  cfg = _cfg(cfg)
  kind = cfg.uem if kind is None else kind
  p, d = cfg.num_patches, cfg.embed_dim
  c = _Count(matmul_only)
  if kind in ("token_linear", "token_linear_no_time"):
    if kind == "token_linear":
      # W [h_token; temb] + b as W_h h_token (per token) + (W_t temb + b) once per sample.
      c.dense(p, d, 1, bias=False)
      c.dense(1, d, 1)
      c.ew(p)                                           # add the per-sample term to every token
    else:
      c.dense(p, d, 1)
    c.ew(ELEMENTWISE["sigmoid"] * p)
    c.ew(p + 1)                                         # mean over patch tokens
  elif kind == "attention_probe":
    c.layer_norm(p, d)
    c.dense(p, d, d, bias=False)                        # keys
    c.mm(2 * p * d)                                     # keys . query
    c.ew(p)                                             # / sqrt(d)
    c.ew(ELEMENTWISE["softmax"] * p)
    c.mm(2 * p * d)                                     # weighted pooling
    c.dense(1, 2 * d, d)                                # fc1 on [pooled, temb]
    c.ew(ELEMENTWISE["gelu"] * d)
    c.dense(1, d, 1)                                    # fc2
    c.ew(ELEMENTWISE["sigmoid"])
  else:
    raise FlopsError(f"unknown UEM kind {kind!r}; choose one of token_linear, "
                     "token_linear_no_time, attention_probe")
  return c.total


def cosine_flops(cfg, *, matmul_only: bool = False) -> int:
  """The state_cosine (CALM-style) test after a block: cos(h_i, h_{i-1}) over patch tokens."""
  cfg = _cfg(cfg)
  n = cfg.num_patches * cfg.embed_dim
  c = _Count(matmul_only)
  c.ew(6 * n + 4)   # three products and three sums over P*D, then the norm product and divide
  return c.total


def lte_flops(cfg, *, matmul_only: bool = False) -> int:
  """AdaDiff's confidence module after a block: Linear(D -> p*p*C) + sigmoid per patch token,
  then the mean over the map."""
  cfg = _cfg(cfg)
  p, d = cfg.num_patches, cfg.embed_dim
  c = _Count(matmul_only)
  c.dense(p, d, cfg.patch_dim)
  c.ew(ELEMENTWISE["sigmoid"] * p * cfg.patch_dim)
  c.ew(p * cfg.patch_dim + 1)
  return c.total


# An exit policy's per-block test (its `monitor`, deediff_jax/policies/) -> its FLOPs per image.
MONITORS = {"uncertainty": lambda cfg, matmul_only: uem_flops(cfg, matmul_only=matmul_only),
            "lte": lambda cfg, matmul_only: lte_flops(cfg, matmul_only=matmul_only),
            "cosine": lambda cfg, matmul_only: cosine_flops(cfg, matmul_only=matmul_only)}


def monitor_flops(cfg, policy: str, *, matmul_only: bool = False) -> int:
  """What an exit policy computes after each block it runs, per image: its declared monitor
  (none for the depth rules and for the oracle, which is costed at the depth it would stop at,
  a ceiling rather than a runnable saving)."""
  try:
    monitor = policies.get(policy).monitor
  except policies.UnknownPolicy as e:
    raise FlopsError(str(e)) from None
  return 0 if monitor is None else MONITORS[monitor](cfg, matmul_only)


def block_uses_skip(cfg, index: int) -> bool:
  """Block `index` (0-based, 0..N-1) is an out-block (with skip_linear) iff index > depth//2."""
  return index > _cfg(cfg).num_segment_blocks


def _cumulative_blocks(cfg: ModelConfig, matmul_only: bool) -> np.ndarray:
  """[N+1] FLOPs of the first k blocks, k = 0..N (out-blocks cost more: skip_linear)."""
  plain = block_flops(cfg, False, matmul_only=matmul_only)
  skip = block_flops(cfg, True, matmul_only=matmul_only)
  per = [skip if block_uses_skip(cfg, i) else plain for i in range(cfg.num_blocks)]
  return np.concatenate([[0.0], np.cumsum(per, dtype=np.float64)])


def _blocks(cfg: ModelConfig, k, matmul_only: bool, name: str = "number of blocks run"):
  k = np.asarray(k, np.float64)
  n = cfg.num_blocks
  if np.any(k < 0) or np.any(k > n):
    raise FlopsError(f"{name} must be in [0, {n}] (the model has {n} blocks), got {k.min()}..{k.max()}")
  return np.interp(k, np.arange(n + 1), _cumulative_blocks(cfg, matmul_only))


def blocks_flops(cfg, k: float, *, matmul_only: bool = False) -> float:
  """The first k blocks in execution order; fractional k interpolates (for mean depths)."""
  return float(_blocks(_cfg(cfg), k, matmul_only))


def forward_flops(cfg, depth: Optional[int] = None, *, matmul_only: bool = False) -> int:
  """A plain forward per image: embed + the first `depth` blocks (default all N) + one head."""
  cfg = _cfg(cfg)
  depth = cfg.num_blocks if depth is None else depth
  if not isinstance(depth, (int, np.integer)) or not 1 <= depth <= cfg.num_blocks:
    raise FlopsError(f"depth must be an integer in [1, {cfg.num_blocks}], got {depth!r}")
  return int(embed_flops(cfg, matmul_only=matmul_only)
             + round(blocks_flops(cfg, int(depth), matmul_only=matmul_only))
             + head_flops(cfg, matmul_only=matmul_only))


def breakdown(cfg, *, matmul_only: bool = False) -> dict:
  """Per-image FLOPs of every piece, for tables and READMEs."""
  cfg = _cfg(cfg)
  kw = dict(matmul_only=matmul_only)
  return {"embed": embed_flops(cfg, **kw), "in_block": block_flops(cfg, False, **kw),
          "out_block": block_flops(cfg, True, **kw), "head": head_flops(cfg, **kw),
          "uncertainty": uem_flops(cfg, **kw), "cosine": cosine_flops(cfg, **kw),
          "forward": forward_flops(cfg, **kw)}


# ----------------------------------------------------------------------------- exit profiles

def _per_step(name: str, value, steps: Optional[int]) -> np.ndarray:
  a = np.asarray(value, np.float64)
  if a.ndim == 0:
    if steps is None:
      raise FlopsError(f"{name} is a single number; pass steps=NUMBER_OF_NETWORK_EVALUATIONS "
                       "or give one value per step")
    return np.full((int(steps),), float(a))
  if a.ndim != 1:
    raise FlopsError(f"{name} must be a number or a 1-D sequence (one value per step), "
                     f"got shape {a.shape}")
  if steps is not None and a.shape[0] != steps:
    raise FlopsError(f"{name} has {a.shape[0]} entries but steps={steps}; give one per step")
  return a


def early_exit_flops_per_image(cfg, layers_run_per_step, *, policy: Optional[str] = None,
                               heads_per_step=None, monitors_per_step=None,
                               steps: Optional[int] = None, cfg_factor: int = 1,
                               matmul_only: bool = False) -> float:
  """FLOPs per generated image for a whole sampling run with the early-exit forward.

  Each network evaluation (step) costs, per batch row:
    embed + (first L blocks) + L_monitor * monitor + H * head
  where L = layers_run_per_step (the blocks the while_loop actually ran for the batch),
  the monitor is the policy's per-block test (UEM for uem/uem_no_time, the cosine for
  state_cosine, nothing for static/time_schedule/none) and runs after every block, so
  `monitors_per_step` defaults to L, and H = heads_per_step is the number of layers at which
  some row newly exited (the loop evaluates a head for the whole batch only then; default 1,
  the value for the depth policies and for aggregate="mean"). Use `exit_profile` to get L and H
  from the per-step exit layers (or `flops_from_exit_layers` to do it all). Fractional values
  (e.g. means over batches) interpolate linearly between whole depths.

  Scalars need `steps`; sequences give one value per step. `cfg_factor` is 2 under
  classifier-free guidance (each image costs a conditional and an unconditional row). `policy`
  None: the first registered learned exit (DeeDiff's UEM).
  """
  cfg = _cfg(cfg)
  policy = policies.first(learned=True).name if policy is None else policy
  if cfg_factor not in (1, 2):
    raise FlopsError(f"cfg_factor must be 1 (no guidance) or 2 (classifier-free guidance), "
                     f"got {cfg_factor!r}")
  layers = _per_step("layers_run_per_step", layers_run_per_step, steps)
  steps = layers.shape[0]
  heads = _per_step("heads_per_step", 1 if heads_per_step is None else heads_per_step, steps)
  monitors = (layers if monitors_per_step is None
              else _per_step("monitors_per_step", monitors_per_step, steps))
  if np.any(heads < 0) or np.any(heads > cfg.num_blocks):
    raise FlopsError(f"heads_per_step must be in [0, {cfg.num_blocks}]")
  kw = dict(matmul_only=matmul_only)
  total = np.sum(embed_flops(cfg, **kw) + _blocks(cfg, layers, matmul_only, "layers_run_per_step")
                 + monitors * monitor_flops(cfg, policy, **kw) + heads * head_flops(cfg, **kw))
  return float(cfg_factor * total)


def full_depth_flops_per_image(cfg, steps: int, *, cfg_factor: int = 1,
                               matmul_only: bool = False) -> float:
  """The plain full-depth sampler's cost per image: `steps` forwards (no monitors, one head)."""
  return float(cfg_factor * steps * forward_flops(cfg, matmul_only=matmul_only))


def _exit_layers_3d(exit_layers) -> np.ndarray:
  e = np.asarray(exit_layers)
  if e.ndim == 2:
    e = e[None]
  if e.ndim != 3 or e.shape[-1] == 0 or e.shape[-2] == 0:
    raise FlopsError(f"exit_layers must be [steps, B] or [batches, steps, B] ints, got shape {e.shape}")
  if np.any(e < 1):
    raise FlopsError("exit_layers are 1-based block numbers; got a value below 1")
  return e


def exit_profile(exit_layers) -> dict:
  """What the early-exit loop ran, from per-step exit layers [steps, B] (1-based ints).

  Returns `layers_run` (the deepest exit of the batch: the loop stops once every row exited)
  and `heads` (the number of distinct exit layers: the loop evaluates a head once for each),
  both [steps]. For [batches, steps, B] (one loop per batch) both are [batches, steps].
  """
  squeeze = np.ndim(exit_layers) == 2
  e = _exit_layers_3d(exit_layers)
  layers = e.max(axis=-1)
  srt = np.sort(e, axis=-1)
  heads = 1 + np.sum(srt[..., 1:] != srt[..., :-1], axis=-1)
  if squeeze:
    layers, heads = layers[0], heads[0]
  return {"layers_run": layers.astype(np.int64), "heads": heads.astype(np.int64)}


def flops_from_exit_layers(cfg, exit_layers, *, policy: str, cfg_factor: int = 1,
                           per_sample: bool = False, matmul_only: bool = False) -> float:
  """FLOPs per image of a sampling run from its per-step exit layers ([steps, B] or [batches, steps, B]).

  per_sample=False (default) is the real cost of the batched loop (see
  `early_exit_flops_per_image`). per_sample=True is the paper's accounting, as if each sample
  ran only its own blocks, monitors and one head.
  """
  cfg = _cfg(cfg)
  e = _exit_layers_3d(exit_layers)
  kw = dict(matmul_only=matmul_only)
  if per_sample:
    # Cost is piecewise linear in the depth, so average each sample's cost, not the depths.
    blocks = _blocks(cfg, e, matmul_only, "exit_layers").mean(axis=(0, 2))
    monitors = e.mean(axis=(0, 2)) * monitor_flops(cfg, policy, **kw)
    total = np.sum(embed_flops(cfg, **kw) + blocks + monitors + head_flops(cfg, **kw))
    return float(cfg_factor * total)
  prof = exit_profile(e)
  per_batch = [early_exit_flops_per_image(cfg, l, policy=policy, heads_per_step=h,
                                          cfg_factor=cfg_factor, **kw)
               for l, h in zip(prof["layers_run"], prof["heads"])]
  return float(np.mean(per_batch))


def gflops_per_image(cfg, exit_layers, *, policy: str, cfg_factor: int = 1,
                     per_sample: bool = False) -> float:
  """`flops_from_exit_layers` in GFLOPs (the sweep's `gflops_per_image`)."""
  return flops_from_exit_layers(cfg, exit_layers, policy=policy, cfg_factor=cfg_factor,
                                per_sample=per_sample) / 1e9


# ----------------------------------------------------------------------------- XLA cross-check

def _unroll_jaxpr(jaxpr):
  """The same jaxpr with every `scan` (at any nesting depth) fully unrolled."""
  from jax.extend import core as jcore

  def fix(v):
    if isinstance(v, jcore.ClosedJaxpr):
      return jcore.ClosedJaxpr(_unroll_jaxpr(v.jaxpr), v.consts)
    if isinstance(v, jcore.Jaxpr):
      return _unroll_jaxpr(v)
    if isinstance(v, (tuple, list)) and any(isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr)) for x in v):
      return type(v)(fix(x) for x in v)
    return v

  eqns = []
  for eqn in jaxpr.eqns:
    params = {k: fix(v) for k, v in eqn.params.items()}
    if eqn.primitive.name == "scan":
      params["unroll"] = params["length"]  # unroll == length lowers with no while loop
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def unroll_scans(fn: Callable) -> Callable:
  """`fn` with every `lax.scan` it traces fully unrolled: the same numbers, no while loops.

  Used for cost analysis (XLA counts a while body once); the unrolled program compiles slower.
  """
  from jax.extend import core as jcore

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(_unroll_jaxpr(closed.jaxpr), closed.consts))(
        *jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped


def xla_flops(fn: Callable, *args: Any, unroll: bool = True) -> float:
  """XLA's FLOP count of `jax.jit(fn)(*args)` compiled for the default backend.

  `args` may be arrays or `jax.ShapeDtypeStruct`s (e.g. params from `jax.eval_shape`), so
  nothing is allocated. With unroll=True every `lax.scan` is unrolled first (`unroll_scans`),
  because XLA counts a while loop's body once; a `lax.while_loop` with a data-dependent trip
  count (the early-exit loop) is still counted once.
  """
  compiled = jax.jit(unroll_scans(fn) if unroll else fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  # Older jax returns a list with one dict per device program; newer a dict.
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis reported no 'flops' for this backend")
  return float(cost["flops"])
