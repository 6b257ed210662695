"""Stable Diffusion KL-f8 first-stage autoencoder in Flax Linen, as U-ViT's latent models use it.

U-ViT (`libs/autoencoder.py`) wraps the LDM `AutoencoderKL` with ch 128, ch_mult (1, 2, 4, 4),
two ResNet blocks per level, no attention outside the mid-blocks (attn_resolutions=[]),
z_channels 4 with double_z (the encoder emits mean and log-variance), embed_dim 4 and latents
scaled by 0.18215. Its weights are `assets/stable-diffusion/autoencoder_kl.pth`.

API (NHWC throughout, images in [-1, 1]):
  convert(state_dict)                     -> params     (sizes inferred from the tensor shapes)
  load_checkpoint(path)                   -> {name: np.ndarray}  (.pth/.pt/.ckpt safely, .npz, .safetensors)
  config_from_params(params)              -> AutoencoderConfig   (from shapes only)
  init_params(config, seed)               -> random params of that config
  encode_moments(params, images)          -> [B, H/f, W/f, 2*embed_dim]  (mean, logvar; f = 2**(levels-1))
  sample_latent(moments, rng)             -> 0.18215 * (mean + std * noise)
  decode(params, z)                       -> images, z being the *scaled* latent
  encode_moments_batched / decode_batched -> the same over a large array, batch by batch (NumPy out)

Numerics follow the reference exactly: GroupNorm(32 groups, eps 1e-6), swish, downsampling by
zero-padding right and bottom then a stride-2 3x3 conv, nearest x2 upsampling then a 3x3 conv,
single-head attention over all positions with 1x1-conv q/k/v/proj_out and scale C**-0.5, a 1x1
`nin_shortcut` where a ResNet block changes width, logvar clamped to [-30, 20]. The decoder
output is not clipped or squashed (the reference has no tanh and no clamp): it is nominally in
[-1, 1]; clip when turning it into pixels.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Re-exported: the shared error classes (one class each across the package) and the safe loader.
from deediff_jax.tensor_files import (CheckpointError, ConversionError, MissingTensorError,  # noqa: F401
                                      ShapeMismatchError, UnusedTensorError, load_state_dict, to_numpy)

SCALE_FACTOR = 0.18215  # U-ViT / SD v1: makes latents roughly unit variance.
GN_GROUPS = 32
GN_EPS = 1e-6           # the reference's Normalize(); flax's GroupNorm default happens to agree.
LOGVAR_RANGE = (-30.0, 20.0)
# Tensors of LDM's training-time loss (LPIPS net, PatchGAN discriminator, the learned `loss.logvar`)
# that an AutoencoderKL Lightning checkpoint carries next to the model; U-ViT's pruned .pth has none.
# They play no part in encoding or decoding, so they are skipped by name, never silently otherwise.
IGNORED_PREFIXES = ("loss.",)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Sizes of a KL autoencoder; hashable, so it serves as a static jit argument."""
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  embed_dim: int = 4
  in_channels: int = 3
  out_channels: int = 3

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    for f in ("ch", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "out_channels"):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"autoencoder.{f}: must be a positive integer, got {v!r}")
    if not self.ch_mult or min(self.ch_mult) <= 0:
      raise ValueError(f"autoencoder.ch_mult: must be non-empty positive integers, got {self.ch_mult!r}")
    bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % GN_GROUPS]
    if bad:
      raise ValueError(f"autoencoder.ch: every width ch*mult must be a multiple of {GN_GROUPS} "
                       f"(GroupNorm groups), got {bad[0]} from ch={self.ch}, ch_mult={self.ch_mult}")

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (self.num_levels - 1)

  def describe(self) -> str:
    return f"ch={self.ch}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}"


KL_F8 = AutoencoderConfig()  # the SD v1 / U-ViT first stage


# ----------------------------------------------------------------------------- modules


def _group_norm(name: str) -> nn.GroupNorm:
  # Two-pass variance: E[x^2] - E[x]^2 loses digits on activations with a large mean.
  return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False, name=name)


def _conv(features: int, name: str | None, kernel: int = 3, stride: int = 1, padding: Any = None) -> nn.Conv:
  pad = (kernel // 2) if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, name=name)


class ResnetBlock(nn.Module):
  """norm-swish-conv twice, plus the input (through a 1x1 `nin_shortcut` when the width changes).

  The reference has no time embedding here (temb_channels=0) and dropout 0.
  """
  out_channels: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, "conv1")(nn.swish(_group_norm("norm1")(x)))
    h = _conv(self.out_channels, "conv2")(nn.swish(_group_norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "nin_shortcut", kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, residual."""

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = _group_norm("norm")(x)
    q, k, v = (_conv(c, n, kernel=1)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hh, ww, c)
    return x + _conv(c, "proj_out", kernel=1)(out)


def _mid(x, width: int):
  """block_1 -> attn_1 -> block_2, the only attention in KL-f8 (attn_resolutions=[])."""
  x = ResnetBlock(width, name="mid_block_1")(x)
  x = AttnBlock(name="mid_attn_1")(x)
  return ResnetBlock(width, name="mid_block_2")(x)


class Encoder(nn.Module):
  """NHWC image -> [B, H/f, W/f, 2*z_channels] (double_z: mean and log-variance)."""
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _conv(cfg.ch, "conv_in")(x)
    for i, mult in enumerate(cfg.ch_mult):
      for j in range(cfg.num_res_blocks):
        h = ResnetBlock(cfg.ch * mult, name=f"down_{i}_block_{j}")(h)
      if i != cfg.num_levels - 1:
        # torch pads (0, 1, 0, 1) then convolves with padding 0: all the padding goes right and
        # bottom, which an explicit asymmetric conv padding reproduces without a copy.
        h = _conv(h.shape[-1], f"down_{i}_downsample", stride=2, padding=((0, 1), (0, 1)))(h)
    h = _mid(h, h.shape[-1])
    h = nn.swish(_group_norm("norm_out")(h))
    return _conv(2 * cfg.z_channels, "conv_out")(h)


def _upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Decoder(nn.Module):
  """[B, h, w, z_channels] -> NHWC image; levels run from the coarsest (last) to level 0."""
  cfg: AutoencoderConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    width = cfg.ch * cfg.ch_mult[-1]
    h = _mid(_conv(width, "conv_in")(z), width)
    for i in reversed(range(cfg.num_levels)):
      for j in range(cfg.num_res_blocks + 1):  # one more block per level than the encoder
        h = ResnetBlock(cfg.ch * cfg.ch_mult[i], name=f"up_{i}_block_{j}")(h)
      if i != 0:
        h = _conv(h.shape[-1], f"up_{i}_upsample")(_upsample_nearest(h))
    h = nn.swish(_group_norm("norm_out")(h))
    return _conv(cfg.out_channels, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """Encoder + quant_conv, post_quant_conv + Decoder. `__call__` reconstructs from the mean
  (used to create every parameter at init); the public functions below call the methods."""
  cfg: AutoencoderConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = _conv(2 * cfg.embed_dim, None, kernel=1)  # setup names it by the attribute
    self.post_quant_conv = _conv(cfg.z_channels, None, kernel=1)

  def encode_moments(self, x):
    return self.quant_conv(self.encoder(x))

  def decode_unscaled(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    mean = self.encode_moments(x)[..., :self.cfg.embed_dim]
    return self.decode_unscaled(mean)


def _abstract_params(cfg: AutoencoderConfig) -> dict:
  """Parameter shapes of `cfg` (traced, never run); they do not depend on the image size."""
  side = cfg.downsample_factor  # the smallest image that survives every downsampling
  x = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0), x)["params"]


def init_params(cfg: AutoencoderConfig = KL_F8, seed: int = 0) -> dict:
  """Random parameters for tests and benchmarks: LeCun-normal kernels, small random biases and
  GroupNorm affines (so that parity checks exercise them). Drawn with NumPy from the abstract
  shapes: a jitted Flax `init` of the full model, or one jax.random call per leaf, compiles for
  tens of seconds on a CPU."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))
  out = []
  for path, leaf in leaves:
    noise = rng.standard_normal(leaf.shape, dtype=np.float32)
    kind = path[-1].key
    if kind == "kernel":
      out.append(noise / np.sqrt(np.prod(leaf.shape[:-1])))  # fan_in = kh * kw * in
    elif kind == "scale":
      out.append(1.0 + 0.1 * noise)
    else:
      out.append(0.1 * noise)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in out])


def config_from_params(params: Mapping[str, Any]) -> AutoencoderConfig:
  """Reads the sizes off the parameter shapes (works on arrays, tracers or ShapeDtypeStructs)."""
  enc, dec = params["encoder"], params["decoder"]
  conv_in = enc["conv_in"]["kernel"].shape  # HWIO
  ch = conv_in[-1]
  levels = sorted(int(m.group(1)) for m in (re.fullmatch(r"down_(\d+)_block_0", k) for k in enc) if m)
  ch_mult = tuple(enc[f"down_{i}_block_0"]["conv1"]["kernel"].shape[-1] // ch for i in levels)
  num_res_blocks = sum(1 for k in enc if re.fullmatch(r"down_0_block_\d+", k))
  return AutoencoderConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           z_channels=enc["conv_out"]["kernel"].shape[-1] // 2,
                           embed_dim=params["quant_conv"]["kernel"].shape[-1] // 2,
                           in_channels=conv_in[-2], out_channels=dec["conv_out"]["kernel"].shape[-1])


# ----------------------------------------------------------------------------- encode / decode


@functools.partial(jax.jit, static_argnames="cfg")
def _encode_moments(params, images, cfg):
  return AutoencoderKL(cfg).apply({"params": params}, images, method=AutoencoderKL.encode_moments)


@functools.partial(jax.jit, static_argnames="cfg")
def _decode(params, z, scale_factor, cfg):
  return AutoencoderKL(cfg).apply({"params": params}, z * (1.0 / scale_factor),  # as the reference
                                  method=AutoencoderKL.decode_unscaled)


def encode_moments(params, images) -> jax.Array:
  """NHWC images in [-1, 1] -> [B, H/f, W/f, 2*embed_dim]: mean then log-variance (after quant_conv)."""
  return _encode_moments(params, jnp.asarray(images, jnp.float32), cfg=config_from_params(params))


def split_moments(moments) -> tuple[jax.Array, jax.Array]:
  """(mean, logvar), logvar clamped to [-30, 20] as the reference's diagonal Gaussian does."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


@jax.jit  # one small program instead of several eager dispatches (random.normal alone compiles)
def sample_latent(moments, rng, scale_factor: float = SCALE_FACTOR) -> jax.Array:
  """A draw from the diagonal Gaussian, scaled: scale_factor * (mean + exp(logvar / 2) * noise)."""
  mean, logvar = split_moments(moments)
  noise = jax.random.normal(rng, mean.shape, mean.dtype)
  return scale_factor * (mean + jnp.exp(0.5 * logvar) * noise)


def decode(params, z, scale_factor: float = SCALE_FACTOR) -> jax.Array:
  """Scaled latents [B, h, w, embed_dim] -> NHWC images, nominally in [-1, 1] (not clipped)."""
  return _decode(params, jnp.asarray(z, jnp.float32), jnp.float32(scale_factor),
                 cfg=config_from_params(params))


def _batched(fn, x, batch_size: int) -> np.ndarray:
  """Applies fn to x in fixed-size batches; the last one is zero-padded so that fn compiles once."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  x = np.asarray(x, np.float32)
  outs = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    outs.append(np.asarray(fn(chunk))[:n])
  if not outs:
    raise ValueError("no inputs: got an empty array")
  return np.concatenate(outs)


def encode_moments_batched(params, images, batch_size: int = 32) -> np.ndarray:
  return _batched(lambda x: encode_moments(params, x), images, batch_size)


def decode_batched(params, z, batch_size: int = 32, scale_factor: float = SCALE_FACTOR) -> np.ndarray:
  return _batched(lambda x: decode(params, x, scale_factor), z, batch_size)


# ----------------------------------------------------------------------------- checkpoints


_ENTRY_HINT = "pass the autoencoder state_dict (U-ViT's autoencoder_kl.pth)"
# Either failure of torch.load (a rejected pickle or an unreadable file), in this module's words.
_NOT_LOADABLE = "{path}: not loadable as a plain tensor state_dict with weights_only=True ({kind}: {reason})"


def load_checkpoint(path) -> dict[str, np.ndarray]:
  """Reads `autoencoder_kl.pth` (or a .npz / .safetensors export) as {name: np.ndarray}, never
  running code from it.

  torch files go through `torch.load(map_location='cpu', weights_only=True)`; torch is imported
  only then. A Lightning checkpoint's {'state_dict': {...}} wrapper is unwrapped.
  `tensor_files.load_state_dict` with the autoencoder's wording.
  """
  return load_state_dict(
      path, what="autoencoder checkpoint",
      missing_hint="pass U-ViT's assets/stable-diffusion/autoencoder_kl.pth (or an .npz export of it)",
      entry_hint=_ENTRY_HINT, refused=_NOT_LOADABLE, unreadable=_NOT_LOADABLE)


def _torch_module_name(flax_name: str) -> str:
  """Flax module name -> the reference's dotted module path (flat Flax names, nested torch ones)."""
  for pattern, repl in ((r"(down|up)_(\d+)_block_(\d+)", r"\1.\2.block.\3"),
                        (r"down_(\d+)_downsample", r"down.\1.downsample.conv"),
                        (r"up_(\d+)_upsample", r"up.\1.upsample.conv"),
                        (r"mid_(block_1|block_2|attn_1)", r"mid.\1")):
    if re.fullmatch(pattern, flax_name):
      return re.sub(pattern, repl, flax_name)
  return flax_name


def _torch_layout(leaf: str, flax_shape: tuple) -> tuple:
  return tuple(flax_shape[i] for i in (3, 2, 0, 1)) if leaf == "kernel" else tuple(flax_shape)


def _spec(cfg: AutoencoderConfig) -> dict[str, tuple[tuple, tuple]]:
  """{torch name: (flax path, torch shape)} for every parameter of `cfg`, from an abstract init."""
  spec = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(cfg))[0]:
    keys = tuple(p.key for p in path)
    torch_leaf = "bias" if keys[-1] == "bias" else "weight"  # kernel and GroupNorm scale are `weight`
    name = ".".join([_torch_module_name(k) for k in keys[:-1]] + [torch_leaf])
    spec[name] = (keys, _torch_layout(keys[-1], leaf.shape))
  return spec


def _need(sd: Mapping[str, Any], name: str, ndim: int) -> tuple:
  if name not in sd:
    raise MissingTensorError(f"autoencoder checkpoint lacks tensor {name!r}, needed to infer its sizes")
  shape = tuple(np.shape(sd[name]))
  if len(shape) != ndim:
    raise ShapeMismatchError(f"tensor {name!r} has shape {shape}, expected a {ndim}-d tensor")
  return shape


def config_from_state_dict(sd: Mapping[str, Any]) -> AutoencoderConfig:
  """Infers ch, ch_mult, num_res_blocks and channel counts from the reference tensor shapes."""
  ch, in_channels = _need(sd, "encoder.conv_in.weight", 4)[:2]
  levels = sorted({int(m.group(1)) for m in (re.match(r"encoder\.down\.(\d+)\.", k) for k in sd) if m})
  if not levels:
    raise MissingTensorError("autoencoder checkpoint lacks tensor 'encoder.down.0.block.0.conv1.weight' "
                             "(no encoder.down.* tensors at all)")
  num_res_blocks = len({m.group(1) for m in (re.match(r"encoder\.down\.0\.block\.(\d+)\.", k) for k in sd) if m})
  ch_mult = []
  for i in range(max(levels) + 1):
    name = f"encoder.down.{i}.block.0.conv1.weight"
    width = _need(sd, name, 4)[0]
    if width % ch:
      raise ShapeMismatchError(f"tensor {name!r} has {width} output channels, not a multiple of ch={ch} "
                               "(from encoder.conv_in.weight)")
    ch_mult.append(width // ch)
  try:
    return AutoencoderConfig(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=max(num_res_blocks, 1),
        z_channels=_need(sd, "encoder.conv_out.weight", 4)[0] // 2,
        embed_dim=_need(sd, "quant_conv.weight", 4)[0] // 2,
        in_channels=in_channels, out_channels=_need(sd, "decoder.conv_out.weight", 4)[0])
  except ConversionError:
    raise
  except ValueError as e:  # sizes that no KL autoencoder has (e.g. widths not divisible by 32)
    raise ConversionError(f"autoencoder checkpoint has impossible sizes: {e}") from None


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def convert(state_dict: Mapping[str, Any]) -> dict:
  """U-ViT's `autoencoder_kl.pth` layout ({name: np.ndarray or torch.Tensor}) -> params.

  Sizes come from the tensors themselves. Every tensor is used exactly once; `loss.*` (LDM's
  LPIPS / discriminator) is skipped by name. Anything else missing, extra or mis-shaped raises a
  ConversionError (a ValueError) whose one-line message names the tensor.
  """
  sd = {str(k): v for k, v in state_dict.items() if not str(k).startswith(IGNORED_PREFIXES)}
  cfg = config_from_state_dict(sd)
  spec = _spec(cfg)
  missing = [n for n in spec if n not in sd]
  if missing:
    path, want = spec[missing[0]]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise MissingTensorError(f"autoencoder checkpoint lacks tensor {missing[0]!r} (expected shape {want}, "
                             f"sizes inferred: {cfg.describe()}){more}")
  unused = [n for n in sd if n not in spec]
  if unused:
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise UnusedTensorError(f"autoencoder checkpoint tensor {unused[0]!r} (shape {tuple(np.shape(sd[unused[0]]))}) "
                            f"has no place in a KL autoencoder with {cfg.describe()}{more}")
  params: dict = {}
  for name, (path, want) in spec.items():
    arr = to_numpy(name, sd[name], _ENTRY_HINT)
    if tuple(arr.shape) != want:
      raise ShapeMismatchError(f"tensor {name!r} has shape {tuple(arr.shape)} but a KL autoencoder with "
                               f"{cfg.describe()} expects {want}")
    arr = arr.astype(np.float32)
    if path[-1] == "kernel":
      arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    _set(params, path, jnp.asarray(arr))
  return params


# --------------------------------------------------------------------------- weights from a file

class AutoencoderError(ValueError):
  """Autoencoder weights that cannot be read (one line, with the fix)."""


_AUTOENCODERS: dict = {}


def load_autoencoder(path: str, what: str = "--autoencoder"):
  """Autoencoder params from U-ViT's autoencoder_kl.pth or an .npz of its tensors (cached per file)."""
  if not path:
    raise AutoencoderError(f"no autoencoder weights: pass {what}=PATH to U-ViT's "
                             "assets/stable-diffusion/autoencoder_kl.pth (or its .npz export)")
  full = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isfile(full):
    raise AutoencoderError(f"autoencoder weights {full} not found ({what}); download U-ViT's "
                             "assets/stable-diffusion/autoencoder_kl.pth (see docs/latent.md)")
  stat = os.stat(full)
  key = (full, stat.st_mtime_ns, stat.st_size)
  if key not in _AUTOENCODERS:
    try:
      params = convert(load_checkpoint(full))
    except ImportError as e:
      raise AutoencoderError(f"reading {full} needs torch ({e}); pip install torch (CPU is enough) or "
                               "convert it once elsewhere with --save-autoencoder FILE.npz") from None
    _AUTOENCODERS.clear()  # one autoencoder at a time: KL-f8 is 320 MB of float32
    _AUTOENCODERS[key] = params
  return _AUTOENCODERS[key]
