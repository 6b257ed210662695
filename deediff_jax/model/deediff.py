"""The DeeDiff U-ViT: a U-ViT backbone with an exit head and a UEM after every block.

Parameter tree (all plain pytrees, so sharding, conversion and slicing are tree ops):

  patch_embed, pos_embed, [label_emb], [time_mlp_1, time_mlp_2], [context_embed]
  in_blocks   [k, ...]   stacked Block params, k = depth // 2
  mid_block              one Block
  out_blocks  [k, ...]   stacked Block params (with skip_linear)
  head                   the backbone head (g_N)
  exit_heads  [N-1, ...] heads g_1..g_{N-1}
  uems        [N, ...]   uncertainty modules u_1..u_N

Two execution paths share these parameters: `all_exits` (training; `nn.scan` over layers,
differentiable, every prediction) and `deediff_jax.early_exit` (inference; a `while_loop`
that slices one layer per iteration). `__call__` is the plain full-depth forward.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from deediff_jax.model import exits
from deediff_jax.model.uvit import Block, Head, ModelConfig, stacked_heads, timestep_embedding

BACKBONE_KEYS = ("patch_embed", "pos_embed", "label_emb", "time_mlp_1", "time_mlp_2",
                 "context_embed", "in_blocks", "mid_block", "out_blocks", "head")
EXIT_KEYS = ("exit_heads", "uems", "ltes")
SCORE_KEYS = ("uems", "ltes")   # what train.mode=uem_only trains


def _scanned_blocks(cfg: ModelConfig, use_skip: bool, name: str):
  block = nn.remat(Block) if cfg.remat else Block
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=0, out_axes=0, length=cfg.num_segment_blocks)(cfg, use_skip=use_skip, name=name)


class DeeDiffUViT(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    d = cfg.embed_dim
    dt = cfg.compute_dtype
    self.patch_embed = nn.Conv(d, (cfg.patch_size,) * 2, strides=(cfg.patch_size,) * 2,
                               padding="VALID", dtype=dt)
    self.pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                                (1, cfg.num_tokens, d))
    if cfg.num_classes > 0:
      # One extra "null" row (id = num_classes) for classifier-free guidance.
      self.label_emb = nn.Embed(cfg.num_classes + 1, d)
    if cfg.mlp_time_embed:
      self.time_mlp_1 = nn.Dense(4 * d, dtype=dt)
      self.time_mlp_2 = nn.Dense(d, dtype=dt)
    if cfg.context_dim > 0:
      self.context_embed = nn.Dense(d, dtype=dt)
    self.in_blocks = _scanned_blocks(cfg, False, "in_blocks")
    self.mid_block = Block(cfg)
    self.out_blocks = _scanned_blocks(cfg, True, "out_blocks")
    self.head = Head(cfg)
    if cfg.has_ltes:
      self.ltes = exits.ltes(cfg)
    else:
      self.exit_heads = exits.exit_heads(cfg)
      self.uems = exits.uems(cfg)

  # ---- pieces (also called one by one by the early-exit path) ----

  def embed(self, x, t, y=None, context=None):
    """NHWC image + time input (+ class ids / context) -> tokens [B, T, D] and temb [B, D]."""
    cfg = self.cfg
    if x.ndim != 4 or x.shape[1:] != (cfg.image_size, cfg.image_size, cfg.in_channels):
      raise ValueError(f"x must be [B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}] (NHWC), "
                       f"got {tuple(x.shape)}")
    b = x.shape[0]
    patches = self.patch_embed(x.astype(cfg.compute_dtype)).reshape(b, cfg.num_patches, cfg.embed_dim)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    temb = timestep_embedding(t, cfg.embed_dim)
    if cfg.mlp_time_embed:
      temb = self.time_mlp_2(nn.silu(self.time_mlp_1(temb)))
    tokens = [temb[:, None, :].astype(patches.dtype)]
    if cfg.num_classes > 0:
      if y is None:  # No label given: the null class, i.e. the unconditional model.
        y = jnp.full((b,), cfg.num_classes, jnp.int32)
      tokens.insert(0, self.label_emb(y)[:, None, :].astype(patches.dtype))
    elif y is not None:
      raise ValueError("y was given but model.num_classes is 0; set model.num_classes or pass y=None")
    if cfg.context_dim > 0:
      if context is None:
        raise ValueError(f"this model needs context [B, {cfg.context_len}, {cfg.context_dim}] "
                         "(precomputed text-encoder tokens; use the null caption's for unconditional)")
      if context.shape[1:] != (cfg.context_len, cfg.context_dim):
        raise ValueError(f"context must be [B, {cfg.context_len}, {cfg.context_dim}], got {tuple(context.shape)}")
      tokens.append(self.context_embed(context.astype(cfg.compute_dtype)))
    elif context is not None:
      raise ValueError("context was given but model.context_dim is 0; set model.context_dim/context_len")
    tokens.append(patches)
    h = jnp.concatenate(tokens, axis=1) + self.pos_embed.astype(patches.dtype)
    return h, temb

  def hidden_states(self, h):
    """Runs every block; returns the N hidden states [N, B, T, D] (h_1..h_N)."""
    h, skips = self.in_blocks(h, None)
    h, mid = self.mid_block(h)
    # LIFO long skips: the last in-block's output feeds the first out-block.
    _, outs = self.out_blocks(h, skips[::-1])
    return jnp.concatenate([skips, mid[None], outs], axis=0)

  def all_predictions(self, hs, x=None):
    """Noise predictions of all N heads: [N, B, H, W, C]. `x`: the noisy input (for input_skip)."""
    x_in = self._head_input(x)
    if self.cfg.has_ltes:
      # One shared head decodes every block: fold the layers into the batch.
      n, b = hs.shape[:2]
      x_rep = None if x_in is None else jnp.broadcast_to(x_in[None], (n,) + x_in.shape).reshape((n * b,) + x_in.shape[1:])
      eps = self.head(hs.reshape((n * b,) + hs.shape[2:]), x_rep)
      return eps.reshape((n, b) + eps.shape[1:])
    if self.is_initializing():
      eps_exits = self.exit_heads(hs[:-1], x_in)  # creates the stacked [N-1, ...] parameters
      eps_last = self.head(hs[-1], x_in)
      return jnp.concatenate([eps_exits, eps_last[None]], axis=0)
    # All N heads (g_1..g_{N-1} and the backbone's g_N) as one batched computation.
    stacked = jax.tree_util.tree_map(lambda e, last: jnp.concatenate([e, last[None]], axis=0),
                                     self.exit_heads.variables["params"], self.head.variables["params"])
    return stacked_heads(self.cfg, stacked, hs, x_in)

  def _head_input(self, x):
    """What the heads' conv reads besides the prediction: x in the compute dtype, or None."""
    if not self.cfg.input_skip:
      return None
    if x is None:
      raise ValueError("model.input_skip=True: pass the noisy input x to all_predictions")
    return x.astype(self.cfg.compute_dtype)

  def all_uncertainties(self, hs, temb):
    """deediff: u [N, B] (uncertainty); adadiff: confidence maps [N, B, H, W, C]."""
    if self.cfg.has_ltes:
      return self.ltes(hs)
    return self.uems(hs, temb)

  # ---- the two public forwards ----

  def all_exits(self, x, t, y=None, context=None):
    """Training path: (eps_all [N, B, H, W, C], scores). eps_all[-1] is the full model.

    scores: u [N, B] for exit_style=deediff, confidence maps [N, B, H, W, C] for adadiff.
    """
    h, temb = self.embed(x, t, y, context)
    hs = self.hidden_states(h)
    return self.all_predictions(hs, x), self.all_uncertainties(hs, temb)

  def __call__(self, x, t, y=None, context=None):
    """The plain full-depth forward: eps [B, H, W, C]."""
    h, _ = self.embed(x, t, y, context)
    h, skips = self.in_blocks(h, None)
    h, _ = self.mid_block(h)
    h, _ = self.out_blocks(h, skips[::-1])
    return self.head(h, self._head_input(x))


def build(model_config) -> DeeDiffUViT:
  """`config.model` (ConfigDict, dict or ModelConfig) -> the Flax module."""
  return DeeDiffUViT(ModelConfig.from_config(model_config))


def dummy_inputs(cfg: ModelConfig, batch: int = 1):
  """Inputs with the right shapes for `init` and shape checks."""
  x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32) if cfg.num_classes > 0 else None
  ctx = (jnp.zeros((batch, cfg.context_len, cfg.context_dim), jnp.float32)
         if cfg.context_dim > 0 else None)
  return x, t, y, ctx


def init_params(module: DeeDiffUViT, rng: jax.Array):
  """Initialises every parameter (backbone, exit heads, UEMs)."""
  x, t, y, ctx = dummy_inputs(module.cfg)
  return module.init(rng, x, t, y, ctx, method=DeeDiffUViT.all_exits)["params"]


def split_params(params):
  """(backbone, exits) halves of a parameter dict."""
  backbone = {k: v for k, v in params.items() if k not in EXIT_KEYS}
  exit_params = {k: v for k, v in params.items() if k in EXIT_KEYS}
  return backbone, exit_params


def count_params(params) -> dict:
  backbone, exit_params = split_params(params)
  size = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
  return {"backbone": size(backbone), "exit_heads": size(exit_params.get("exit_heads", {})),
          "uems": size(exit_params.get("uems", {})), "ltes": size(exit_params.get("ltes", {})),
          "total": size(params)}


def slice_layer(stacked, i):
  """Layer i of a stacked parameter tree; `i` may be traced (used inside while_loop)."""
  return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), stacked)
