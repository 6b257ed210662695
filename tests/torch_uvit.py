"""A small, faithful PyTorch U-ViT with the official parameter names (test helper, not a product module).

Written from the architecture (docs/design.md, "The method") and the structure of baofff/U-ViT's libs/uvit.py
(unconditional / class-conditional) and libs/uvit_t2i.py (text): same module names, so its
`state_dict()` has exactly the keys of the official `nnet.pth`. Reshapes that the official code
does with einops are spelled out with reshape/permute, pattern by pattern.

  model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=4)
  randomize_(model, seed=0)      # every tensor random, biases and LayerNorms included
  eps = model(x_nchw, timesteps, y=labels)      # or context=... for the text variant
  sd = numpy_state_dict(model)

  ada = AdaDiffUViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4)
  eps, exit_layer, inner, conf = ada(x_nchw, timesteps, thres=0.9)   # the official exit loop
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def timestep_embedding(timesteps, dim, max_period=10000):
  """Sinusoidal embedding of (possibly fractional) timesteps, `[cos, sin]` order."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
  args = timesteps[:, None].float() * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
  return emb


def unpatchify(x, channels):
  """'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'."""
  b, l, pd = x.shape
  p = int(round(math.sqrt(pd // channels)))
  h = w = int(round(math.sqrt(l)))
  assert h * w == l and p * p * channels == pd
  x = x.reshape(b, h, w, p, p, channels)        # B h w p1 p2 C
  x = x.permute(0, 5, 1, 3, 2, 4)               # B C h p1 w p2
  return x.reshape(b, channels, h * p, w * p)


class Attention(nn.Module):
  def __init__(self, dim, num_heads=8, qkv_bias=False):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, l, c = x.shape
    h = self.num_heads
    qkv = self.qkv(x)
    # 'B L (K H D) -> K B H L D', K=3, H=num_heads (the official "math" attention path).
    qkv = qkv.reshape(b, l, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, l, c)
    return self.proj(x)


class Mlp(nn.Module):
  """timm's Mlp: fc1 -> GELU (exact) -> fc2 (dropout 0)."""

  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim)
    self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

  def forward(self, x, skip=None):
    if self.skip_linear is not None:
      x = self.skip_linear(torch.cat([x, skip], dim=-1))
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return x


class PatchEmbed(nn.Module):
  def __init__(self, patch_size, in_chans, embed_dim):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # B C h w -> B (h w) C


class UViT(nn.Module):
  """U-ViT. `num_classes > 0` (official count, null row included): class-conditional,
  tokens [class][time][patches]. `clip_dim > 0`: the uvit_t2i text model, tokens
  [time][context][patches]. Neither: unconditional, [time][patches]. `conv=False`: no
  final 3x3 conv (U-ViT-H)."""

  def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio=4.0,
               qkv_bias=False, mlp_time_embed=False, num_classes=-1, clip_dim=0, num_clip_token=0,
               conv=True):
    super().__init__()
    if num_classes > 0 and clip_dim > 0:
      raise ValueError("the official U-ViT is either class-conditional or text-conditional")
    self.embed_dim = embed_dim
    self.in_chans = in_chans
    self.num_classes = num_classes
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    num_patches = (img_size // patch_size) ** 2
    self.time_embed = nn.Sequential(
        nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim),
    ) if mlp_time_embed else nn.Identity()
    if num_classes > 0:
      self.label_emb = nn.Embedding(num_classes, embed_dim)
      self.extras = 2
    elif clip_dim > 0:
      self.context_embed = nn.Linear(clip_dim, embed_dim)
      self.extras = 1 + num_clip_token
    else:
      self.extras = 1
    self.text = clip_dim > 0
    self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
    kw = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
    self.in_blocks = nn.ModuleList([Block(**kw) for _ in range(depth // 2)])
    self.mid_block = Block(**kw)
    self.out_blocks = nn.ModuleList([Block(**kw, skip=True) for _ in range(depth // 2)])
    self.norm = nn.LayerNorm(embed_dim)
    self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans, bias=True)
    self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

  def embed(self, x, timesteps, y=None, context=None):
    """NCHW image -> (tokens [B, extras + L, D], L)."""
    x = self.patch_embed(x)
    _, l, _ = x.shape
    time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(1)
    if self.text:
      x = torch.cat((time_token, self.context_embed(context), x), dim=1)
    else:
      x = torch.cat((time_token, x), dim=1)
      if y is not None:
        x = torch.cat((self.label_emb(y).unsqueeze(1), x), dim=1)
    return x + self.pos_embed, l

  def output_forward(self, x, l):
    """The head: norm -> decoder_pred -> drop the extra tokens -> unpatchify -> final conv."""
    x = self.decoder_pred(self.norm(x))
    assert x.size(1) == self.extras + l
    x = unpatchify(x[:, self.extras:, :], self.in_chans)
    return self.final_layer(x)

  def forward(self, x, timesteps, y=None, context=None):
    x, l = self.embed(x, timesteps, y, context)
    skips = []
    for blk in self.in_blocks:
      x = blk(x)
      skips.append(x)
    x = self.mid_block(x)
    for blk in self.out_blocks:
      x = blk(x, skips.pop())          # LIFO
    return self.output_forward(x, l)


class LTE(nn.Module):
  """AdaDiff's confidence module: sigmoid(Linear(D -> p*p*C)) of each patch token, in float32."""

  def __init__(self, embed_dim, patch_dim):
    super().__init__()
    self.lte = nn.Linear(embed_dim, patch_dim)

  def forward(self, x):
    return torch.sigmoid(self.lte(x).float())


class AdaDiffUViT(UViT):
  """The official AdaDiff model (Tangshengku/AdaDiff, libs/uvit.py and libs/uvit_t2i.py), written
  from its description: a U-ViT plus one confidence module per block, `lte_classifer.{i}`
  (i = 0..depth in running order, registered after the head, so `state_dict()` has the official
  keys), and every block decodes with the shared head (`output_forward`).

  forward(x, t, y=None, context=None, thres=None) -> (eps, exit_layer, inner_states, confidences)

  thres=None is the training forward: every block runs, nothing exits. Otherwise the official exit
  loop: after each block the hidden state is decoded (`inner_states`, as the official code does at
  every block) and its confidence map [B, C, H, W] computed from the detached patch tokens; the
  whole batch exits when the mean of that map over the batch and all pixels exceeds `thres`. Among
  the in-blocks the first confident block only arms a patience flag, which stays armed, and the
  next confident in-block exits (`patience=False`: the text model's rule, where patience is
  commented out); the mid- and out-blocks exit at once. The exit output is the head applied to
  the exit block's hidden state (again). `exit_layer` is the 1-based block count.
  `decode_every_block=False` skips the per-block decoding (it changes no output, only the cost).
  """

  def __init__(self, *args, patience=True, **kwargs):
    super().__init__(*args, **kwargs)
    depth = len(self.in_blocks) + len(self.out_blocks)
    patch_dim = self.decoder_pred.out_features
    self.lte_classifer = nn.ModuleList([LTE(self.embed_dim, patch_dim) for _ in range(depth + 1)])
    self.patience = patience

  def confidence(self, x, l, layer):
    tokens = x[:, self.extras:, :].float().detach()
    assert tokens.size(1) == l
    return unpatchify(self.lte_classifer[layer](tokens), self.in_chans)

  def forward(self, x, timesteps, y=None, context=None, thres=None, decode_every_block=True):
    x, l = self.embed(x, timesteps, y, context)
    k = len(self.in_blocks)
    inner, conf = [], []
    armed = False

    def step(x, layer):
      """Decodes and scores block `layer`'s output; True when the batch exits here."""
      nonlocal armed
      if decode_every_block or thres is None:
        inner.append(self.output_forward(x, l))
      c = self.confidence(x, l, layer)
      conf.append(c)
      if thres is None or not torch.mean(c.reshape(-1)) > thres:
        return False
      if layer < k and self.patience and not armed:
        armed = True
        return False
      return True

    skips = []
    for i, blk in enumerate(self.in_blocks):
      x = blk(x)
      skips.append(x)
      if step(x, i):
        return self.output_forward(x, l), i + 1, inner, conf
    x = self.mid_block(x)
    if step(x, k):
      return self.output_forward(x, l), k + 1, inner, conf
    for j, blk in enumerate(self.out_blocks):
      x = blk(x, skips.pop())          # LIFO
      if step(x, k + 1 + j):
        return self.output_forward(x, l), k + 2 + j, inner, conf
    return self.output_forward(x, l), 2 * k + 1, inner, conf


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random values in *every* tensor, so that no mapping error hides behind a zero bias or a
  unit LayerNorm (the official init has both). Scales keep activations of order one."""
  g = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
      p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    elif p.ndim == 1:
      p.copy_(0.1 * torch.randn(p.shape, generator=g))
    elif name == "pos_embed" or name.startswith("label_emb"):
      p.copy_(0.5 * torch.randn(p.shape, generator=g))
    else:
      fan_in = int(np.prod(p.shape[1:]))
      p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
  return model


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
