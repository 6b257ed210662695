"""Exits: what turns block i's hidden state into a prediction and a score.

`model.exit_style=deediff` (the paper's text): an output head g_i and an uncertainty estimation
module (UEM) u_i per block. Heads have the U-ViT head's form (`uvit.Head`); the last block's head
is the backbone's own head, so exit heads are stacked only for blocks 1..N-1. UEMs are stacked
for all N blocks (u_N is trained too, the last block always exits at inference).

`model.exit_style=adadiff` (the official AdaDiff code): no exit heads, every block decodes with
the backbone's shared head, and a confidence module (`LTE`) per block maps the patch tokens, with
their gradient stopped, to a per-pixel confidence map in (0, 1).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deediff_jax.model.uvit import LN_EPS, Head, ModelConfig, unpatchify


class UEM(nn.Module):
  """Uncertainty estimation module: hidden state (+ time embedding) -> u in (0, 1) per sample.

  `token_linear` (DeeDiff): sigmoid(W [h_tok, temb] + b) per patch token, averaged.
  `token_linear_no_time` (BERxiT-style baseline): the same without temb.
  `attention_probe`: one learned query attends over patch tokens; an MLP on [pooled, temb].
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, temb):
    cfg = self.cfg
    tokens = h[:, cfg.num_extra_tokens:].astype(jnp.float32)
    temb = temb.astype(jnp.float32)
    if cfg.uem == "token_linear":
      logits = _TokenTimeLinear(name="linear")(tokens, temb)
      return jnp.mean(jax.nn.sigmoid(logits), axis=-1)
    if cfg.uem == "token_linear_no_time":
      logits = nn.Dense(1, name="linear")(tokens)[..., 0]
      return jnp.mean(jax.nn.sigmoid(logits), axis=-1)
    # attention_probe
    d = cfg.embed_dim
    x = nn.LayerNorm(epsilon=LN_EPS, name="norm")(tokens)
    query = self.param("query", nn.initializers.normal(0.02), (d,))
    keys = nn.Dense(d, use_bias=False, name="key")(x)
    weights = jax.nn.softmax(jnp.einsum("bld,d->bl", keys, query) / math.sqrt(d), axis=-1)
    pooled = jnp.einsum("bl,bld->bd", weights, x)
    z = nn.gelu(nn.Dense(d, name="fc1")(jnp.concatenate([pooled, temb], axis=-1)), approximate=False)
    return jax.nn.sigmoid(nn.Dense(1, name="fc2")(z)[..., 0])


class _TokenTimeLinear(nn.Module):
  """`nn.Dense(1)` on [token, temb] for every token, with the same parameters (kernel [2D, 1], bias [1]).

  Splitting the kernel, W [h; t] = W_h h + W_t t, computes the time term once per sample instead
  of broadcasting temb to every token and concatenating: that [N, B, L, 2D] copy and its
  gradient were a visible share of a small model's training step.
  """

  @nn.compact
  def __call__(self, tokens, temb):
    d = tokens.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (d + temb.shape[-1], 1))
    bias = self.param("bias", nn.initializers.zeros_init(), (1,))
    per_sample = temb @ kernel[d:, 0] + bias[0]                       # [B]
    return tokens @ kernel[:d, 0] + per_sample[:, None]               # [B, L]


class LTE(nn.Module):
  """AdaDiff's confidence module: sigmoid(Linear(D -> p*p*C)) per patch token -> [B, H, W, C].

  The tokens are detached (the official `.detach()`), so the confidence loss never reaches the
  backbone; time enters only through the time token that attention mixed into the tokens.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h):
    cfg = self.cfg
    tokens = jax.lax.stop_gradient(h[:, cfg.num_extra_tokens:].astype(jnp.float32))
    logits = nn.Dense(cfg.patch_dim, name="lte")(tokens)
    return unpatchify(jax.nn.sigmoid(logits), cfg.patch_size, cfg.in_channels)


def stacked(module_cls, cfg: ModelConfig, count: int, in_axes, name: str):
  """`count` independent copies of a module with parameters stacked on axis 0."""
  return nn.vmap(module_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, out_axes=0, axis_size=count)(cfg, name=name)


def exit_heads(cfg: ModelConfig, name: str = "exit_heads"):
  return stacked(Head, cfg, cfg.num_blocks - 1, (0, None), name)  # (hidden states, shared x_in)


def uems(cfg: ModelConfig, name: str = "uems"):
  return stacked(UEM, cfg, cfg.num_blocks, (0, None), name)


def ltes(cfg: ModelConfig, name: str = "ltes"):
  return stacked(LTE, cfg, cfg.num_blocks, 0, name)
