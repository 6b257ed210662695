"""Early-exit inference: a `lax.while_loop` over blocks that really skips the layers it does not reach.

The training path (`DeeDiffUViT.all_exits`) scans over every block and returns every exit. At
inference that would waste the point of exiting, so here one loop iteration runs exactly one
block, sliced from the stacked parameters with a traced layer index:

  i < k        in-block i        (its output is pushed onto the skip buffer)
  i == k       the mid-block
  i > k        out-block j = i-k-1, whose long skip is buffer[k-1-j] (LIFO)

`lax.switch` picks the segment, so XLA executes one block's FLOPs per iteration; the skip buffer
has a fixed shape [k+1, B, T, D] (slot k is a write-only scratch slot so the write needs no
branch). After each block the exit policy scores the new hidden state; a sample that is
confident for the first time takes that layer's head output, and the head is only evaluated
(`lax.cond`) when at least one sample newly exits. The loop stops as soon as every sample has
exited, so unreached blocks cost nothing.

Exit policies share one interface: a static name and `policy_params`, a pytree of *traced*
arrays (threshold, depth, schedule, min_layers), so sweeping thresholds or depths reuses one
compiled program. The threshold may also be an array with one value per timestep bucket
(bucketed like time_schedule), e.g. for a calibrated per-bucket threshold schedule:

  uem / uem_no_time  exit when u_i < threshold (DeeDiff; the UEM kind is the model's own)
  static             exit after exactly `depth` blocks
  time_schedule      ASE-style: a depth per timestep bucket (first entry = noisiest bucket)
  state_cosine       CALM-style: exit when cos(h_i, h_{i-1}) > threshold (never at layer 1)
  adadiff            the official AdaDiff rule (model.exit_style=adadiff): exit when the mean of the
                     per-pixel confidence map exceeds threshold; among the in-blocks the first
                     confident block only arms a patience flag and the next confident one exits;
                     the mid- and out-blocks exit at once. aggregate="mean" is exactly the official
                     batch rule; aggregate="all" decides per image (the official evaluation
                     samples one image per batch, so "all" reproduces its decisions). With
                     classifier-free guidance the conditional and null rows decide separately
                     (each half on its own mean under "mean"), as the official code's two
                     separate network calls do
  oracle             evaluation only: runs every block and takes each sample's first layer whose x0
                     is within `threshold` (RMS, x0 units) of the final layer's x0 (needs x0_scale)
  none               full depth (through the same loop)

Batch semantics (docs/design.md, "Exit semantics for a batch"): each sample keeps the first layer at which it was confident;
aggregate="all" runs until every sample has exited, aggregate="mean" exits the whole batch at
the first layer whose batch-mean score passes the threshold (uem / state_cosine; the depth
policies are per-sample by definition and ignore it). aggregate="last" decides like "all" but
every sample takes the output of the last block the batch ran: the cost of a batch is its
deepest exit either way, and a sample that stops earlier only loses quality (our addition; the
13-block MNIST study in docs/results.md measures it). The last block always exits and
`min_layers` forbids exits before that many blocks ran. With `cfg_pairs=True` the batch is
[conditional rows; null rows] for classifier-free guidance and a row exits only when it and its
partner are both confident, so the guided prediction combines two outputs of the same layer.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from deediff_jax import caching
from deediff_jax.config import (POLICIES, SCORE_POLICIES, UEM_POLICIES, ConfigError, parse_depth_schedule,
                                parse_threshold_schedule)
from deediff_jax.model.deediff import DeeDiffUViT, slice_layer
from deediff_jax.model.exits import LTE, UEM
from deediff_jax.model.uvit import Block, Head, ModelConfig

AGGREGATES = ("all", "mean", "last")
_COS_EPS = 1e-12


# ----------------------------------------------------------------------------- policies

def make_policy_params(num_blocks: int, *, threshold: float = 0.0, depth: int = 0,
                       schedule=None, min_layers: int = 1, patience: bool = True) -> dict:
  """The traced parameters every policy reads (one pytree structure for all policies).

  depth 0 means all `num_blocks`; `schedule` is a sequence of depths per timestep bucket from the
  noisiest bucket (default: one bucket at full depth). `threshold` is a number, or a sequence of
  thresholds per timestep bucket (noisiest first, the same bucketing as `schedule`) for the
  score policies; a scalar and an array compile separately, values never recompile.
  """
  schedule = [num_blocks] if schedule is None or len(schedule) == 0 else list(schedule)
  return {
      "threshold": jnp.asarray(threshold, jnp.float32),
      "depth": jnp.asarray(depth if depth > 0 else num_blocks, jnp.int32),
      "schedule": jnp.asarray(schedule, jnp.int32),
      "min_layers": jnp.asarray(max(int(min_layers), 1), jnp.int32),
      "patience": jnp.asarray(bool(patience), jnp.bool_),  # adadiff: in-blocks need a second confident block
  }


def policy_params_for(policy: str, num_blocks: int, *, threshold=None, depth=None, schedule=None,
                      min_layers: int = 1, patience: bool = True) -> dict:
  """The one path from a policy's setting to its traced parameters (every mode uses it): each
  policy reads only its own value; exit.min_layers applies to every policy."""
  if policy not in POLICIES:
    raise ConfigError(f"unknown exit policy {policy!r}; choose one of {', '.join(POLICIES)}")
  kw = {}
  if policy in SCORE_POLICIES or policy == "oracle":
    kw["threshold"] = 0.0 if threshold is None else threshold
  elif policy == "static":
    kw["depth"] = int(depth or 0)
  elif policy == "time_schedule":
    kw["schedule"] = schedule
  return make_policy_params(num_blocks, min_layers=min_layers, patience=patience, **kw)


def policy_from_config(config, num_blocks: int, policy: Optional[str] = None):
  """`config.exit` -> (policy_name, policy_params); `policy` overrides exit.policy.

  A non-empty exit.threshold_schedule (one threshold per timestep bucket) replaces exit.threshold
  for the score policies. Raises ConfigError on an unknown policy or a bad exit.schedule.
  """
  e = config.exit
  policy = e.policy if policy is None else policy
  if policy not in POLICIES:
    raise ConfigError(f"config key 'exit.policy' is {policy!r}; choose one of {', '.join(POLICIES)}")
  schedule = None
  if policy == "time_schedule":
    schedule = parse_depth_schedule(e.schedule, num_blocks, key="exit.schedule")
  threshold = float(e.threshold)
  if policy in SCORE_POLICIES and str(e.get("threshold_schedule", "")).strip():
    threshold = parse_threshold_schedule(e.threshold_schedule, policy)
  return policy, policy_params_for(policy, num_blocks, threshold=threshold, depth=int(e.depth),
                                   schedule=schedule, min_layers=int(e.min_layers),
                                   patience=bool(e.get("patience", True)))


def check_policy(policy: str, cfg: ModelConfig, aggregate: str = "all"):
  if policy not in POLICIES:
    raise ValueError(f"unknown exit policy {policy!r}; choose one of {', '.join(POLICIES)}")
  if aggregate not in AGGREGATES:
    raise ValueError(f"unknown exit aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
  if policy == "uem_no_time" and cfg.uem != "token_linear_no_time":
    raise ValueError("exit policy 'uem_no_time' needs a model built with model.uem=token_linear_no_time")
  if policy in UEM_POLICIES and cfg.exit_style != "deediff":
    raise ValueError(f"exit policy {policy!r} needs model.exit_style=deediff (UEMs); use policy 'adadiff'")
  if policy == "adadiff" and cfg.exit_style != "adadiff":
    raise ValueError("exit policy 'adadiff' needs model.exit_style=adadiff (confidence modules)")


def _by_bucket(values, time_frac, batch: int, what: str):
  """values[bucket] per sample, with K = len(values) equal timestep buckets and bucket 0 the
  noisiest: bucket = floor((1 - time_frac) * K), clipped to [0, K-1]."""
  if time_frac is None:
    raise ValueError(f"{what} needs time_frac (1 = noisiest, 0 = clean) per step")
  k = values.shape[0]
  frac = jnp.broadcast_to(jnp.asarray(time_frac, jnp.float32), (batch,))
  bucket = jnp.clip(jnp.floor((1.0 - frac) * k).astype(jnp.int32), 0, k - 1)
  return values[bucket]


def _schedule_depth(policy_params, time_frac, batch: int):
  """Per-sample depth of the time_schedule policy."""
  return _by_bucket(policy_params["schedule"], time_frac, batch, "exit policy 'time_schedule'")


def _threshold(policy_params, time_frac, batch: int):
  """The threshold: a scalar, or one per timestep bucket (a [K] array, noisiest bucket first)."""
  thr = policy_params["threshold"]
  if thr.ndim == 0:
    return thr
  return _by_bucket(thr, time_frac, batch, "a per-timestep-bucket threshold")


def patch_cosine(cfg: ModelConfig, a, b):
  """Cosine similarity per sample between two hidden states, flattened over the patch tokens."""
  a = a[:, cfg.num_extra_tokens:].astype(jnp.float32).reshape(a.shape[0], -1)
  b = b[:, cfg.num_extra_tokens:].astype(jnp.float32).reshape(b.shape[0], -1)
  dot = jnp.sum(a * b, axis=-1)
  return dot / jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), _COS_EPS))


def uem_scores(cfg: ModelConfig, uem_params, h, temb):
  """u [B] of one layer's UEM, equal to `UEM(cfg).apply` but cheaper for the token-linear kinds.

  `UEM` concatenates [h_token, temb] per token ([B, L, 2D]) before its Dense; here the kernel is
  split instead, W [h, temb] = W_h h + W_t temb, so no [B, L, 2D] array is built in every loop
  iteration (that copy alone cost ~4% of a block on CPU).
  """
  if cfg.uem not in ("token_linear", "token_linear_no_time"):
    return UEM(cfg).apply({"params": uem_params}, h, temb)
  kernel = uem_params["linear"]["kernel"][:, 0]
  tokens = h[:, cfg.num_extra_tokens:].astype(jnp.float32)
  logits = tokens @ kernel[:cfg.embed_dim] + uem_params["linear"]["bias"][0]
  if cfg.uem == "token_linear":
    logits = logits + (temb.astype(jnp.float32) @ kernel[cfg.embed_dim:])[:, None]
  return jnp.mean(jax.nn.sigmoid(logits), axis=-1)


def _pair_and(conf, cfg_pairs: bool):
  """CFG: a row is confident only if it and its partner (other half of the batch) both are."""
  if not cfg_pairs:
    return conf
  half = conf.shape[0] // 2
  both = conf[:half] & conf[half:]
  return jnp.concatenate([both, both], axis=0)


# ----------------------------------------------------------------------------- the forward

def _check_batch(x, cfg_pairs):
  if cfg_pairs and x.shape[0] % 2:
    raise ValueError(f"cfg_pairs=True needs an even batch [cond rows; null rows], got {x.shape[0]} rows")


def confidence_scores(cfg: ModelConfig, lte_params, h):
  """Per-sample mean of one layer's AdaDiff confidence map: [B]."""
  conf = LTE(cfg).apply({"params": lte_params}, h)
  return jnp.mean(conf, axis=(1, 2, 3))


def _batch_mean(score, cfg_pairs: bool):
  """aggregate="mean": the batch mean, or with CFG pairs each half's own mean (per row)."""
  if not cfg_pairs:
    return jnp.broadcast_to(jnp.mean(score), score.shape)
  half = score.shape[0] // 2
  means = jnp.stack([jnp.mean(score[:half]), jnp.mean(score[half:])])
  return jnp.repeat(means, half)


def early_exit_forward(params, cfg, x, t_model, y=None, context=None, *, policy: str,
                       policy_params, time_frac=None, cfg_pairs: bool = False,
                       aggregate: str = "all", x0_scale=None, guidance_scale=None,
                       cache=None, reuse=None):
  """Noise prediction with early exit: (eps [B, H, W, C] float32, stats).

  stats: `exit_layer` int32 [B] (1-based block after which each sample exited) and
  `layers_run` int32 scalar (blocks actually executed). `t_model` is the network's time input
  (scalar or [B]); `time_frac` in [0, 1] (1 = noisiest, scalar or [B]) is only needed by
  time_schedule and by per-timestep-bucket thresholds. policy="oracle" needs `x0_scale`
  (sigma/alpha of the step) and, with cfg_pairs, the `guidance_scale` its decision uses.
  Learning-to-Cache (`deediff_jax.caching`): `cache` is the previous evaluation's CacheState and
  `reuse` bool [N, 2] the sublayers that may reuse; a block runs `caching.block_with_cache`
  (a reused sublayer is a `lax.cond` branch that computes nothing; an entry the previous
  evaluation did not reach is computed), and stats gain `cache` (the new state: what this
  evaluation used, valid for the blocks it ran) and `att_run` / `mlp_run` (sublayers computed).
  """
  cfg = ModelConfig.from_config(cfg)
  check_policy(policy, cfg, aggregate)
  _check_batch(x, cfg_pairs)
  if policy == "oracle":
    if cache is not None:
      raise ValueError("cache.policy=l2c does not run with the evaluation-only oracle (it runs every "
                       "block through the training path); pick another exit policy")
    return oracle_forward(params, cfg, x, t_model, y, context, policy_params=policy_params,
                          x0_scale=x0_scale, cfg_pairs=cfg_pairs, guidance_scale=guidance_scale)
  module = DeeDiffUViT(cfg)
  n, k = cfg.num_blocks, cfg.num_segment_blocks
  b = x.shape[0]
  pp = policy_params
  h0, temb = module.apply({"params": params}, x, t_model, y, context, method=DeeDiffUViT.embed)

  in_block, out_block, head = Block(cfg), Block(cfg, use_skip=True), Head(cfg)
  in_params, out_params = params["in_blocks"], params["out_blocks"]
  mid_params, last_head = params["mid_block"], params["head"]
  shared_head = cfg.exit_style == "adadiff"  # every exit decodes with the backbone's head
  exit_heads = None if shared_head else params["exit_heads"]
  uem_params = params["uems"] if policy in UEM_POLICIES else None
  lte_params = params["ltes"] if policy == "adadiff" else None
  sched_depth = _schedule_depth(pp, time_frac, b) if policy == "time_schedule" else None
  thr = _threshold(pp, time_frac, b) if policy in SCORE_POLICIES else None
  if aggregate == "mean" and thr is not None:
    thr = jnp.mean(thr)  # one decision for the batch (samplers pass one time for all rows)

  # Each branch runs one block; the skip buffer is only read (by the out-branch). With a cache a
  # branch returns (h, attention update, MLP update) and reads the previous updates of block i.
  def apply_block(block, p, i, h, skip, kv):
    if cache is None:
      return block.apply({"params": p}, h, skip)[0]
    ok = reuse[i] & cache["valid"][i]
    # Read the previous evaluation's updates from the input state (loop-invariant) and write this
    # evaluation's into fresh buffers in the carry: no buffer is read and written in one iteration.
    prev = [lambda c=c: lax.dynamic_index_in_dim(cache[c], i, 0, keepdims=False) for c in ("att", "mlp")]
    return caching.block_with_cache(cfg, p, h, skip, ok, prev[0], prev[1])

  def run_in(i, h, buf, kv):
    return apply_block(in_block, slice_layer(in_params, i), i, h, None, kv)

  def run_mid(i, h, buf, kv):
    return apply_block(in_block, mid_params, i, h, None, kv)

  def run_out(i, h, buf, kv):
    j = i - k - 1
    skip = lax.dynamic_index_in_dim(buf, k - 1 - j, 0, keepdims=False)
    return apply_block(out_block, slice_layer(out_params, j), i, h, skip, kv)


  x_in = x.astype(cfg.compute_dtype) if cfg.input_skip else None

  def head_at(i, h):
    if shared_head:
      return head.apply({"params": last_head}, h, x_in)
    def exit_head(h):
      return head.apply({"params": slice_layer(exit_heads, jnp.minimum(i, n - 2))}, h, x_in)
    def final_head(h):
      return head.apply({"params": last_head}, h, x_in)
    return lax.cond(i < n - 1, exit_head, final_head, h)

  def confident(i, h_new, h_old, armed):
    """(confident now [B], patience flags [B])."""
    layer = i + 1
    pair_and = cfg_pairs
    if policy in UEM_POLICIES:
      u = uem_scores(cfg, slice_layer(uem_params, i), h_new, temb)
      score = jnp.mean(u) if aggregate == "mean" else u
      conf = jnp.broadcast_to(score < thr, (b,))
    elif policy == "adadiff":
      c = confidence_scores(cfg, slice_layer(lte_params, i), h_new)
      if aggregate == "mean":
        c = _batch_mean(c, cfg_pairs)
      # Rows never wait for their CFG partner: the official code makes two separate network
      # calls (conditional, null), each exiting on its own confidence.
      pair_and = False
      over = c > thr
      # Patience among the in-blocks: the first confident in-block arms, the next one exits.
      in_block = (i < k) & pp["patience"]
      conf = jnp.where(in_block, over & armed, over)
      armed = armed | (over & in_block)
    elif policy == "state_cosine":
      cos = patch_cosine(cfg, h_new, h_old)
      score = jnp.mean(cos) if aggregate == "mean" else cos
      conf = jnp.broadcast_to(score > thr, (b,)) & (layer > 1)
    elif policy == "static":
      conf = jnp.broadcast_to(layer >= pp["depth"], (b,))
    elif policy == "time_schedule":
      conf = layer >= sched_depth
    else:  # none
      conf = jnp.zeros((b,), bool)
    conf = (conf & (layer >= pp["min_layers"])) | (layer >= n)
    return _pair_and(conf, pair_and), armed

  def cond_fn(carry):
    i, _, _, _, exited, _, _, _ = carry
    return (i < n) & ~jnp.all(exited)

  def body_fn(carry):
    i, h, buf, eps, exited, exit_layer, armed, kv = carry
    seg = (i >= k).astype(jnp.int32) + (i > k).astype(jnp.int32)
    h_new = lax.switch(seg, (run_in, run_mid, run_out), i, h, buf, kv)
    if cache is not None:  # store this evaluation's updates of block i (reused or computed)
      h_new, a, m = h_new
      kv = (lax.dynamic_update_index_in_dim(kv[0], a.astype(kv[0].dtype), i, 0),
            lax.dynamic_update_index_in_dim(kv[1], m.astype(kv[1].dtype), i, 0))
    # In-blocks fill slots 0..k-1; later blocks write the scratch slot k, so no branch is needed
    # and the update stays in place.
    buf = lax.dynamic_update_index_in_dim(buf, h_new, jnp.minimum(i, k), 0)
    # In-blocks fill slots 0..k-1; later blocks write the scratch slot k, so no branch is needed
    # and the update stays in place.
    buf = lax.dynamic_update_index_in_dim(buf, h_new, jnp.minimum(i, k), 0)
    conf, armed = confident(i, h_new, h, armed)
    newly = conf & ~exited
    if aggregate != "last":  # "last" decodes once, after the loop
      mask = newly[:, None, None, None]
      eps = lax.cond(jnp.any(newly), lambda e: jnp.where(mask, head_at(i, h_new), e), lambda e: e, eps)
    exit_layer = jnp.where(newly, i + 1, exit_layer)
    return i + 1, h_new, buf, eps, exited | newly, exit_layer, armed, kv

  kv0 = None if cache is None else (jnp.zeros_like(cache["att"]), jnp.zeros_like(cache["mlp"]))
  carry = (jnp.zeros((), jnp.int32), h0, jnp.zeros((k + 1,) + h0.shape, h0.dtype),
           jnp.zeros(x.shape[:3] + (cfg.in_channels,), jnp.float32), jnp.zeros((b,), bool),
           jnp.full((b,), n, jnp.int32), jnp.zeros((b,), bool), kv0)
  layers_run, h_last, _, eps, _, exit_layer, _, kv = lax.while_loop(cond_fn, body_fn, carry)
  if aggregate == "last":
    # The batch ran to the deepest exit anyway: every sample takes that block's output (same
    # cost as "all", and no sample leaves shallower than the compute already spent).
    eps = head_at(layers_run - 1, h_last).astype(jnp.float32)
    exit_layer = jnp.full((b,), layers_run, jnp.int32)
  stats = {"exit_layer": exit_layer, "layers_run": layers_run}
  if cache is not None:
    ran = jnp.arange(n) < layers_run
    reused = reuse & cache["valid"][:, None] & ran[:, None]          # [N, 2]
    stats["cache"] = {"att": kv[0], "mlp": kv[1], "valid": ran}
    stats["att_run"] = layers_run - jnp.sum(reused[:, 0]).astype(jnp.int32)
    stats["mlp_run"] = layers_run - jnp.sum(reused[:, 1]).astype(jnp.int32)
  return eps, stats



# ----------------------------------------------------------------------------- the oracle

def oracle_exits(eps_all, x0_scale, tolerance, min_layers=1):
  """First layer (0-based) per sample whose x0 is within `tolerance` RMS of the last layer's.

  eps_all [N, B, H, W, C]; x0 = (x - sigma eps) / alpha, so the x0 distance of two predictions
  from the same x is (sigma / alpha) |eps_i - eps_N|. x0_scale: sigma/alpha, scalar or [B].
  """
  n, b = eps_all.shape[:2]
  scale = jnp.broadcast_to(jnp.asarray(x0_scale, jnp.float32), (b,))
  rms = jnp.sqrt(jnp.mean(jnp.square(eps_all - eps_all[-1:]), axis=(2, 3, 4))) * scale[None]   # [N, B]
  layers = jnp.arange(1, n + 1)[:, None]
  conf = ((rms <= tolerance) & (layers >= min_layers)) | (layers == n)
  return jnp.argmax(conf, axis=0)


def oracle_forward(params, cfg, x, t_model, y=None, context=None, *, policy_params, x0_scale,
                   cfg_pairs: bool = False, guidance_scale=None):
  """policy="oracle": every block runs; each sample takes its first layer within tolerance.

  `layers_run` is what an exit loop *would* run (the deepest exit), not what ran: the oracle
  saves nothing and only shows the ceiling of any exit policy on this model.
  """
  if x0_scale is None:
    raise ValueError("exit policy 'oracle' needs x0_scale (sigma/alpha of the step); sample through "
                     "deediff_jax.diffusion.samplers, which passes it")
  cfg = ModelConfig.from_config(cfg)
  module = DeeDiffUViT(cfg)
  b = x.shape[0]
  eps_all, _ = module.apply({"params": params}, x, t_model, y, context, method=DeeDiffUViT.all_exits)
  decide = eps_all
  if cfg_pairs:
    if guidance_scale is None:
      raise ValueError("exit policy 'oracle' with cfg_pairs needs guidance_scale")
    half = b // 2
    s = jnp.asarray(guidance_scale, jnp.float32)
    decide = (1.0 + s) * eps_all[:, :half] - s * eps_all[:, half:]
  scale = jnp.broadcast_to(jnp.asarray(x0_scale, jnp.float32), (b,))[:decide.shape[1]]
  first = oracle_exits(decide, scale, policy_params["threshold"], policy_params["min_layers"])
  if cfg_pairs:
    first = jnp.concatenate([first, first])
  eps = eps_all[first, jnp.arange(b)]
  exit_layer = (first + 1).astype(jnp.int32)
  return eps.astype(jnp.float32), {"exit_layer": exit_layer, "layers_run": jnp.max(exit_layer)}


# ----------------------------------------------------------------------------- the reference

def exit_reference(params, cfg, x, t_model, y=None, context=None, *, policy: str, policy_params,
                   time_frac=None, cfg_pairs: bool = False, aggregate: str = "all"):
  """Runs ALL layers (`all_exits`) and picks each sample's first confident output with plain jnp.

  Same signature and semantics as `early_exit_forward` (not for the oracle, which is itself a
  reference), no savings: the ground truth for tests and for fidelity checks. `layers_run` is
  what the loop would have run (the deepest exit).
  """
  cfg = ModelConfig.from_config(cfg)
  check_policy(policy, cfg, aggregate)
  _check_batch(x, cfg_pairs)
  module = DeeDiffUViT(cfg)
  variables = {"params": params}
  n, b = cfg.num_blocks, x.shape[0]
  pp = policy_params
  eps_all, u_all = module.apply(variables, x, t_model, y, context, method=DeeDiffUViT.all_exits)
  layers = jnp.arange(1, n + 1)[:, None]                                # [N, 1]
  thr = None
  if policy in SCORE_POLICIES:
    thr = _threshold(pp, time_frac, b)
    thr = jnp.mean(thr) if aggregate == "mean" else thr
  pair_and = cfg_pairs
  if policy in UEM_POLICIES:
    score = jnp.mean(u_all, axis=1, keepdims=True) if aggregate == "mean" else u_all
    conf = score < thr
  elif policy == "adadiff":
    score = jnp.mean(u_all, axis=(2, 3, 4))                             # [N, B] per-sample confidence
    if aggregate == "mean":
      halves = jnp.split(score, 2, axis=1) if cfg_pairs else [score]
      score = jnp.concatenate([jnp.broadcast_to(jnp.mean(h, 1, keepdims=True), h.shape) for h in halves], 1)
    pair_and = False  # CFG rows decide alone (the official two network calls)
    over = score > thr
    k = cfg.num_segment_blocks
    # Patience: an in-block exits only if an earlier in-block was already confident.
    seen_before = jnp.cumsum(over[:k].astype(jnp.int32), axis=0) - over[:k].astype(jnp.int32)
    patient = jnp.concatenate([over[:k] & (seen_before > 0), over[k:]], axis=0)
    conf = jnp.where(pp["patience"], patient, over)
  elif policy == "state_cosine":
    h0, _ = module.apply(variables, x, t_model, y, context, method=DeeDiffUViT.embed)
    hs = module.apply(variables, h0, method=DeeDiffUViT.hidden_states)  # [N, B, T, D]
    prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    cos = jnp.stack([patch_cosine(cfg, hs[l], prev[l]) for l in range(n)])
    score = jnp.mean(cos, axis=1, keepdims=True) if aggregate == "mean" else cos
    conf = (score > thr) & (layers > 1)
  elif policy == "static":
    conf = layers >= pp["depth"]
  elif policy == "time_schedule":
    conf = layers >= _schedule_depth(pp, time_frac, b)[None]
  else:
    conf = jnp.zeros((n, b), bool)
  conf = jnp.broadcast_to(conf, (n, b))
  conf = (conf & (layers >= pp["min_layers"])) | (layers == n)
  if pair_and:
    half = b // 2
    both = conf[:, :half] & conf[:, half:]
    conf = jnp.concatenate([both, both], axis=1)
  first = jnp.argmax(conf, axis=0)                                      # first True per sample
  if aggregate == "last":
    first = jnp.full((b,), jnp.max(first))
  eps = eps_all[first, jnp.arange(b)]
  exit_layer = (first + 1).astype(jnp.int32)
  return eps, {"exit_layer": exit_layer, "layers_run": jnp.max(exit_layer)}
