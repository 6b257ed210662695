"""U-ViT building blocks (Bao et al., CVPR 2023) in Flax Linen.

Everything here mirrors the official PyTorch U-ViT so that converted weights give the
same numbers: exact (erf) GELU, LayerNorm eps 1e-5, qkv split as (3, heads, head_dim),
`[cos, sin]` time embedding, LIFO long skips through `Linear(2D -> D)`.

Block parameters are stored *stacked* per segment (in-blocks [k, ...], out-blocks
[k, ...]) so that one parameter tree serves both the `scan` training path and the
`while_loop` early-exit path, which slices one layer at a time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # torch.nn.LayerNorm default; flax's default (1e-6) would break parity.
UEM_KINDS = ("token_linear", "token_linear_no_time", "attention_probe")
# deediff: the paper's text (a head per block, a per-sample timestep-aware UEM); adadiff: the
# official AdaDiff code (every exit decodes with the backbone's shared head, a per-pixel
# confidence module "LTE" on stop-gradient patch tokens).
EXIT_STYLES = ("deediff", "adadiff")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable, validated view of `config.model` (Flax module attributes must hash)."""
  image_size: int
  in_channels: int
  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  num_classes: int = 0        # 0: unconditional. Else the table has num_classes+1 rows (null id = num_classes).
  context_dim: int = 0        # 0: no text context. Else width of the precomputed text-encoder tokens.
  context_len: int = 0        # number of context tokens (e.g. 77 for CLIP).
  mlp_time_embed: bool = False
  # Every head's final 3x3 conv also reads the noisy input x_t (concatenated channels). Off in
  # U-ViT. At low SNR an eps-prediction must reproduce x_t almost pixel for pixel (sigma/alpha
  # magnifies any copy error in the x0 a sampler derives), which a patchified transformer learns
  # slowly; this path makes the copy a single conv weight. See README "MNIST".
  input_skip: bool = False
  uem: str = "token_linear"
  exit_style: str = "deediff"
  remat: bool = False
  dtype: str = "float32"      # compute dtype; parameters stay float32.

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f"model.{field}: {msg}")
    for f in ("image_size", "in_channels", "embed_dim", "depth", "num_heads", "patch_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or v <= 0:
        bad(f, f"must be a positive integer, got {v!r}")
    if self.depth % 2:
      bad("depth", f"must be even (depth//2 in-blocks + mid + depth//2 out-blocks), got {self.depth}; use {self.depth + 1}")
    if self.image_size % self.patch_size:
      bad("patch_size", f"{self.patch_size} does not divide image_size {self.image_size}; pick a divisor of {self.image_size}")
    if self.embed_dim % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide embed_dim {self.embed_dim}; pick a divisor of {self.embed_dim}")
    if self.embed_dim % 2:
      bad("embed_dim", f"must be even for the [cos, sin] time embedding, got {self.embed_dim}")
    if self.mlp_ratio <= 0:
      bad("mlp_ratio", f"must be positive, got {self.mlp_ratio}")
    if self.num_classes < 0:
      bad("num_classes", f"must be >= 0 (0 = unconditional), got {self.num_classes}")
    if self.context_dim < 0 or self.context_len < 0:
      bad("context_dim", "context_dim and context_len must be >= 0")
    if (self.context_dim > 0) != (self.context_len > 0):
      bad("context_len", f"set both context_dim and context_len (got {self.context_dim}, {self.context_len}) or neither")
    if self.uem not in UEM_KINDS:
      bad("uem", f"unknown kind {self.uem!r}; choose one of {', '.join(UEM_KINDS)}")
    if self.exit_style not in EXIT_STYLES:
      bad("exit_style", f"unknown style {self.exit_style!r}; choose one of {', '.join(EXIT_STYLES)}")
    if self.dtype not in ("float32", "bfloat16"):
      bad("dtype", f"must be float32 or bfloat16, got {self.dtype!r}")

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds from an ml_collections ConfigDict, a dict or a ModelConfig."""
    if isinstance(cfg, ModelConfig):
      return cfg
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "mlp_ratio" in kw:
      kw["mlp_ratio"] = float(kw["mlp_ratio"])
    return cls(**kw)

  @property
  def num_blocks(self) -> int:
    return self.depth + 1

  @property
  def num_segment_blocks(self) -> int:
    return self.depth // 2

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_extra_tokens(self) -> int:
    return int(self.num_classes > 0) + 1 + self.context_len

  @property
  def num_tokens(self) -> int:
    return self.num_extra_tokens + self.num_patches

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.in_channels

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


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
