"""U-ViT building blocks (Bao et al., CVPR 2023) in Flax Linen.

Everything here mirrors the official PyTorch U-ViT so that converted weights give the
same numbers: exact (erf) GELU, LayerNorm eps 1e-5, qkv split as (3, heads, head_dim),
`[cos, sin]` time embedding, LIFO long skips through `Linear(2D -> D)`.

Block parameters are stored *stacked* per segment (in-blocks [k, ...], out-blocks
[k, ...]) so that one parameter tree serves both the `scan` training path and the
`while_loop` early-exit path, which slices one layer at a time.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # torch.nn.LayerNorm default; flax's default (1e-6) would break parity.
# The typed view of config.model lives with the config (config.py imports no model); it is
# re-exported here, where the modules that take it are.
from deediff_jax.config import ModelConfig, UEM_KINDS  # noqa: E402,F401


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """U-ViT's sinusoidal embedding, `[cos, sin]` order, of the raw time input t: [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """[B, L, p*p*C] -> NHWC, with the `(p1 p2 C)` channel order of the official code."""
  b, l, _ = x.shape
  g = int(round(math.sqrt(l)))
  x = x.reshape(b, g, g, patch_size, patch_size, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch_size, g * patch_size, channels)


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=cfg.compute_dtype, name=name)


def _dense(cfg: ModelConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, name=name)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, l, d = x.shape
    h = cfg.num_heads
    hd = d // h
    qkv = _dense(cfg, 3 * d, "qkv", use_bias=cfg.qkv_bias)(x)
    # Official layout: 'B L (K H D) -> K B H L D'.
    qkv = qkv.reshape(b, l, 3, h, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * (hd ** -0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(b, l, d)
    return _dense(cfg, d, "proj")(out)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    x = _dense(cfg, hidden, "fc1")(x)
    x = nn.gelu(x, approximate=False)  # torch.nn.GELU() is the exact erf form.
    return _dense(cfg, cfg.embed_dim, "fc2")(x)


class Block(nn.Module):
  """Pre-LN transformer block; out-blocks first fuse the long skip.

  Returns `(h, h)` so that the same module is the body of `nn.scan` (carry, output).
  """
  cfg: ModelConfig
  use_skip: bool = False

  @nn.compact
  def __call__(self, h, skip=None):
    cfg = self.cfg
    if self.use_skip:
      h = _dense(cfg, cfg.embed_dim, "skip_linear")(jnp.concatenate([h, skip], axis=-1))
    h = h + Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(h))
    h = h + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm2")(h))
    return h, h


class Head(nn.Module):
  """U-ViT output head: LN -> Linear(D -> p*p*C) -> drop extra tokens -> unpatchify -> 3x3 conv.

  With `cfg.input_skip` the conv reads [unpatchified prediction, x_in] (2C channels), where
  x_in is the model's noisy input image.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h, x_in=None):
    cfg = self.cfg
    y = _layer_norm(cfg, "norm")(h)
    y = _dense(cfg, cfg.patch_dim, "decoder_pred")(y)
    y = y[:, cfg.num_extra_tokens:]
    img = unpatchify(y, cfg.patch_size, cfg.in_channels)
    if cfg.input_skip:
      if x_in is None:
        raise ValueError("model.input_skip=True: the head needs the noisy input image x_in")
      img = jnp.concatenate([img, x_in.astype(img.dtype)], axis=-1)
    img = nn.Conv(cfg.in_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=cfg.compute_dtype,
                  name="final_layer")(img)
    return img.astype(jnp.float32)


def stacked_heads(cfg: ModelConfig, params, hs: jax.Array, x_in=None) -> jax.Array:
  """`Head` for n stacked parameter sets at once: params leaves [n, ...], hs [n, B, T, D] -> [n, B, H, W, C].

  The same numbers as applying `Head` n times, written as batched matmuls: a vmapped `nn.Conv`
  becomes a grouped convolution whose backward pass is ~14x slower on CPU, and n separate heads
  are n small programs each. The 3x3 conv is an im2col (9 shifted views of the padded image)
  followed by one batched [9*C_in -> C] matmul per head.
  """
  dt = cfg.compute_dtype
  n, b = hs.shape[:2]
  norm, dec, conv = params["norm"], params["decoder_pred"], params["final_layer"]
  h = hs.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(h), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  y = (h - mean) * jax.lax.rsqrt(var + LN_EPS)
  y = (y * norm["scale"][:, None, None, :] + norm["bias"][:, None, None, :]).astype(dt)
  y = y[:, :, cfg.num_extra_tokens:]
  y = jnp.einsum("nbtd,ndk->nbtk", y, dec["kernel"].astype(dt)) + dec["bias"][:, None, None, :].astype(dt)
  img = unpatchify(y.reshape((n * b,) + y.shape[2:]), cfg.patch_size, cfg.in_channels)
  img = img.reshape((n, b) + img.shape[1:])
  if cfg.input_skip:
    if x_in is None:
      raise ValueError("model.input_skip=True: the head needs the noisy input image x_in")
    img = jnp.concatenate([img, jnp.broadcast_to(x_in.astype(img.dtype)[None], (n,) + x_in.shape)], axis=-1)
  hh, ww = img.shape[2:4]
  padded = jnp.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([padded[:, :, dy:dy + hh, dx:dx + ww] for dy in range(3) for dx in range(3)], axis=-1)
  kernel = conv["kernel"].astype(dt)  # [n, 3, 3, C_in, C_out], HWIO per head
  kernel = kernel.reshape(n, -1, kernel.shape[-1])
  out = jnp.einsum("nbhwk,nkc->nbhwc", cols, kernel) + conv["bias"][:, None, None, None, :].astype(dt)
  return out.astype(jnp.float32)
