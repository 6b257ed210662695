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

Exit policies share one interface: a policy object from the registry in `deediff_jax/policies/`
(one module per family; each declares its rule, its score, its value and what it needs:
docs/policies.md) and `policy_params`, a pytree of *traced* arrays (threshold, depth, schedule,
min_layers, patience), so sweeping thresholds or depths reuses one compiled program. The
threshold may also be an array with one value per timestep bucket (bucketed like a depth
schedule), e.g. for a calibrated per-bucket threshold schedule. After each block the loop hands
the policy a `LayerView` (the block index, its threshold and lazily computed scores: the UEM's
u, the AdaDiff confidence, the hidden-state cosine); `exit_reference` hands it a
`ReferenceView` of every layer at once. A policy that `runs_every_block` (the oracle) decides
from every layer's output instead (`oracle_forward`).

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


import jax
import jax.numpy as jnp
from jax import lax

from deediff_jax import caching
from deediff_jax import policies
from deediff_jax.config import ExitSpec
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
  value = policies.get(policy).value
  kw = {}
  if value == "threshold":
    kw["threshold"] = 0.0 if threshold is None else threshold
  elif value == "depth":
    kw["depth"] = int(depth or 0)
  elif value == "schedule":
    kw["schedule"] = schedule
  return make_policy_params(num_blocks, min_layers=min_layers, patience=patience, **kw)


def exit_params(spec: ExitSpec, num_blocks: int) -> tuple:
  """An `ExitSpec` (config.exit, read at the edge) -> (policy name, policy_params). A threshold
  schedule (one threshold per timestep bucket) replaces the scalar threshold of a score policy."""
  threshold = list(spec.threshold_schedule) if spec.threshold_schedule is not None else spec.threshold
  return spec.policy, policy_params_for(spec.policy, num_blocks, threshold=threshold, depth=spec.depth,
                                        schedule=list(spec.schedule) if spec.schedule else None,
                                        min_layers=spec.min_layers, patience=spec.patience)


def check_policy(policy: str, cfg: ModelConfig, aggregate: str = "all") -> policies.ExitPolicy:
  """The registered policy, checked against the model and the aggregate (ValueError otherwise)."""
  pol = policies.get(policy)
  if aggregate not in AGGREGATES:
    raise ValueError(f"unknown exit aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
  problem = pol.model_problem(ModelConfig.from_config(cfg))
  if problem:
    raise ValueError(problem)
  return pol


def by_bucket(values, time_frac, batch: int, what: str):
  """values[bucket] per sample, with K = len(values) equal timestep buckets and bucket 0 the
  noisiest: bucket = floor((1 - time_frac) * K), clipped to [0, K-1]."""
  if time_frac is None:
    raise ValueError(f"{what} needs time_frac (1 = noisiest, 0 = clean) per step")
  k = values.shape[0]
  frac = jnp.broadcast_to(jnp.asarray(time_frac, jnp.float32), (batch,))
  bucket = jnp.clip(jnp.floor((1.0 - frac) * k).astype(jnp.int32), 0, k - 1)
  return values[bucket]


def _schedule_depth(policy_params, time_frac, batch: int):
  """Per-sample depth of a policy whose value is a depth schedule."""
  return by_bucket(policy_params["schedule"], time_frac, batch, "a depth schedule")


def _threshold(policy_params, time_frac, batch: int):
  """The threshold: a scalar, or one per timestep bucket (a [K] array, noisiest bucket first)."""
  thr = policy_params["threshold"]
  if thr.ndim == 0:
    return thr
  return by_bucket(thr, time_frac, batch, "a per-timestep-bucket threshold")


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


class LayerView:
  """What a policy's `confident` sees after one block of the loop (see ExitPolicy.confident)."""

  def __init__(self, *, i, n, k, b, aggregate, cfg_pairs, pp, thr, sched_depth, armed, scores):
    self.i, self.layer, self.n, self.k, self.b = i, i + 1, n, k, b
    self.aggregate, self.cfg_pairs, self.pp = aggregate, cfg_pairs, pp
    self.thr, self.sched_depth, self.armed = thr, sched_depth, armed
    self._scores = scores

  def score(self, kind: str):
    """The score `kind` ("uncertainty", "confidence" or "cosine") of this block, computed on demand."""
    if kind not in self._scores:
      raise ValueError(f"unknown exit score {kind!r}; choose one of {', '.join(self._scores)}")
    return self._scores[kind]()


class ReferenceView(LayerView):
  """What a policy's `reference_confident` sees: every layer at once (scores [N, B])."""

  def __init__(self, *, layers, **kw):
    super().__init__(i=layers - 1, **kw)
    self.layers = layers


def early_exit_forward(params, cfg, x, t_model, y=None, context=None, *, policy: str,
                       policy_params, time_frac=None, cfg_pairs: bool = False,
                       aggregate: str = "all", x0_scale=None, guidance_scale=None,
                       cache=None, reuse=None):
  """Noise prediction with early exit: (eps [B, H, W, C] float32, stats).

  stats: `exit_layer` int32 [B] (1-based block after which each sample exited) and
  `layers_run` int32 scalar (blocks actually executed). `t_model` is the network's time input
  (scalar or [B]); `time_frac` in [0, 1] (1 = noisiest, scalar or [B]) is only needed by
  depth schedules and by per-timestep-bucket thresholds. A policy that `needs_x0_scale` (the oracle) needs `x0_scale`
  (sigma/alpha of the step) and, with cfg_pairs, the `guidance_scale` its decision uses.

  Learning-to-Cache (`deediff_jax.caching`): `cache` is the previous evaluation's CacheState and
  `reuse` bool [N, 2] the sublayers that may reuse; a block runs `caching.block_with_cache`
  (a reused sublayer is a `lax.cond` branch that computes nothing; an entry the previous
  evaluation did not reach is computed), and stats gain `cache` (the new state: what this
  evaluation used, valid for the blocks it ran) and `att_run` / `mlp_run` (sublayers computed).
  """
  cfg = ModelConfig.from_config(cfg)
  pol = check_policy(policy, cfg, aggregate)
  _check_batch(x, cfg_pairs)
  if pol.runs_every_block:
    if cache is not None:
      raise ValueError("cache.policy=l2c does not run with the evaluation-only oracle (it runs every "
                       "block through the training path); pick another exit policy")
    return oracle_forward(params, cfg, x, t_model, y, context, policy_params=policy_params,
                          x0_scale=x0_scale, cfg_pairs=cfg_pairs, guidance_scale=guidance_scale,
                          policy=policy)
  module = DeeDiffUViT(cfg)
  n, k = cfg.num_blocks, cfg.num_segment_blocks
  b = x.shape[0]
  pp = policy_params
  h0, temb = module.apply({"params": params}, x, t_model, y, context, method=DeeDiffUViT.embed)

  in_block, out_block, head = Block(cfg), Block(cfg, use_skip=True), Head(cfg)
  in_params, out_params = params["in_blocks"], params["out_blocks"]
  mid_params, last_head = params["mid_block"], params["head"]
  shared_head = cfg.has_ltes  # every exit decodes with the backbone's head
  exit_heads = None if shared_head else params["exit_heads"]
  sched_depth = _schedule_depth(pp, time_frac, b) if pol.value == "schedule" else None
  thr = _threshold(pp, time_frac, b) if pol.is_score else None
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
    """(confident now [B], patience flags [B]): the policy's rule, then the rules of every policy."""
    layer = i + 1
    scores = {"uncertainty": lambda: uem_scores(cfg, slice_layer(params["uems"], i), h_new, temb),
              "confidence": lambda: confidence_scores(cfg, slice_layer(params["ltes"], i), h_new),
              "cosine": lambda: patch_cosine(cfg, h_new, h_old)}
    conf, armed = pol.confident(LayerView(i=i, n=n, k=k, b=b, aggregate=aggregate, cfg_pairs=cfg_pairs,
                                          pp=pp, thr=thr, sched_depth=sched_depth, armed=armed,
                                          scores=scores))
    conf = (conf & (layer >= pp["min_layers"])) | (layer >= n)
    return _pair_and(conf, cfg_pairs and pol.pairs_decide_together), armed

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

def oracle_forward(params, cfg, x, t_model, y=None, context=None, *, policy_params, x0_scale,
                   cfg_pairs: bool = False, guidance_scale=None, policy: str):
  """The oracle policy: every block runs; each sample takes its first layer within tolerance.

  `layers_run` is what an exit loop *would* run (the deepest exit), not what ran: the oracle
  saves nothing and only shows the ceiling of any exit policy on this model.
  """
  if x0_scale is None:
    raise ValueError(f"exit policy {policy!r} needs x0_scale (sigma/alpha of the step); sample through "
                     "deediff_jax.diffusion.samplers, which passes it")
  cfg = ModelConfig.from_config(cfg)
  module = DeeDiffUViT(cfg)
  b = x.shape[0]
  eps_all, _ = module.apply({"params": params}, x, t_model, y, context, method=DeeDiffUViT.all_exits)
  decide = eps_all
  if cfg_pairs:
    if guidance_scale is None:
      raise ValueError(f"exit policy {policy!r} with cfg_pairs needs guidance_scale")
    half = b // 2
    s = jnp.asarray(guidance_scale, jnp.float32)
    decide = (1.0 + s) * eps_all[:, :half] - s * eps_all[:, half:]
  scale = jnp.broadcast_to(jnp.asarray(x0_scale, jnp.float32), (b,))[:decide.shape[1]]
  first = policies.get(policy).first_exits(decide, scale, policy_params)
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
  pol = check_policy(policy, cfg, aggregate)
  _check_batch(x, cfg_pairs)
  module = DeeDiffUViT(cfg)
  variables = {"params": params}
  n, b = cfg.num_blocks, x.shape[0]
  pp = policy_params
  eps_all, u_all = module.apply(variables, x, t_model, y, context, method=DeeDiffUViT.all_exits)
  layers = jnp.arange(1, n + 1)[:, None]                                # [N, 1]
  thr = None
  if pol.is_score:
    thr = _threshold(pp, time_frac, b)
    thr = jnp.mean(thr) if aggregate == "mean" else thr
  sched_depth = _schedule_depth(pp, time_frac, b) if pol.value == "schedule" else None

  def cosines():
    h0, _ = module.apply(variables, x, t_model, y, context, method=DeeDiffUViT.embed)
    hs = module.apply(variables, h0, method=DeeDiffUViT.hidden_states)  # [N, B, T, D]
    prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    return jnp.stack([patch_cosine(cfg, hs[l], prev[l]) for l in range(n)])

  # all_exits returns each layer's u (deediff) or confidence map (adadiff) in the same slot.
  scores = {"uncertainty": lambda: u_all, "confidence": lambda: jnp.mean(u_all, axis=(2, 3, 4)), "cosine": cosines}
  conf = pol.reference_confident(ReferenceView(layers=layers, n=n, k=cfg.num_segment_blocks, b=b,
                                               aggregate=aggregate, cfg_pairs=cfg_pairs, pp=pp, thr=thr,
                                               sched_depth=sched_depth, armed=None, scores=scores))
  pair_and = cfg_pairs and pol.pairs_decide_together
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
