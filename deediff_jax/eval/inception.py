"""Inception v3 for FID in Flax: the standard FID network, pool3 features (2048-d).

This is the network of the TensorFlow graph `inception-2015-12-05` that defines FID (TTUR),
as ported to PyTorch by pytorch-fid. It differs from torchvision's ImageNet Inception v3 in
ways that change the numbers, so it is reproduced exactly:

- the average-pool branches of Mixed_5b..5d (A), Mixed_6b..6e (C) and Mixed_7b (E_1)
  exclude the zero padding from the mean (`count_include_pad=False`, TensorFlow's
  behaviour);
- the pool branch of Mixed_7c (E_2) is a 3x3 *max* pool (a quirk of that graph);
- every conv has no bias and is followed by BatchNorm with eps 1e-3 and a ReLU;
- inputs are resized bilinearly to 299x299 (PyTorch `F.interpolate(..., mode='bilinear',
  align_corners=False)`, no antialiasing, also when downsampling) and the output is the
  global average of Mixed_7c (`pool3`).

Weights. Get `pt_inception-2015-12-05-6726825d.pth` from the pytorch-fid GitHub release:
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Reading a `.pth` needs torch (it is opened with `torch.load(weights_only=True)`, which
refuses pickled code). To need torch only once, convert it to an npz of the same keys:
  python -m deediff_jax.eval.inception --torch pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz
and pass the npz (e.g. `--config.sweep.inception_weights=inception_fid.npz`).

Parameters are a plain pytree named as in the PyTorch file: `params['Mixed_5b']['branch1x1']
['conv']['kernel']` (HWIO) and `[...]['bn']['scale'|'bias'|'mean'|'var']`. BatchNorm
statistics live in `params` (not `batch_stats`) because this network is never trained: one
pytree is all `features` needs.

API: `convert(state_dict) -> params`, `load_weights(path) -> params`,
`features(params, images) -> [B, 2048]`, `init_params(seed)` (random weights, for tests).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3  # TensorFlow's value in the 2015 graph; torch's default (1e-5) would shift features.
NUM_LOGITS = 1008  # the graph's classifier (1000 ImageNet classes + 8 unused); not used for FID.


class InceptionWeightsError(ValueError):
  """The weights file or state dict does not have the standard FID Inception layout."""


# ----------------------------------------------------------------------------- network


class FrozenBatchNorm(nn.Module):
  """Inference-only BatchNorm; running statistics are ordinary params (see module doc)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU, torch's `BasicConv2d`."""
  features: int
  kernel: Sequence[int] = (1, 1)
  stride: int = 1
  padding: Sequence[int] = (0, 0)
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel), strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride, pad):
  # flax pads max pools with -inf, as torch does.
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d
  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a (grid reduction 35 -> 17)
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e (factorised 7x7)
  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, **row, name="branch7x7_2")(b7)
    b7 = conv(192, **col, name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = conv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = conv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = conv(192, **row, name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a (grid reduction 17 -> 8)
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (pool="avg", FID E_1), Mixed_7c (pool="max", FID E_2)
  pool: str
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, **row, name="branch3x3_2a")(b3),
                          conv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, **row, name="branch3x3dbl_3a")(bd),
                          conv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool(x, 1, 1) if self.pool == "max" else _avg_pool_same(x)
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """[B, 299, 299, 3] in [-1, 1] -> pool3 [B, 2048]."""
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    p = self.precision
    x = BasicConv(32, (3, 3), stride=2, precision=p, name="Conv2d_1a_3x3")(x)     # 149
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)               # 147
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2, 0)                                                         # 73
    x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)              # 71
    x = _max_pool(x, 2, 0)                                                         # 35
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)                            # 256
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)                            # 288
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)                            # 288
    x = InceptionB(precision=p, name="Mixed_6a")(x)                                # 17, 768
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)                                # 8, 1280
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)                         # 2048
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------- weights

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def init_params(seed: int = 0):
  """Random parameters of the right structure (for tests and shape checks; not for FID).

  He-normal kernels and identity BatchNorm, drawn with NumPy from the module's own shapes:
  running `InceptionV3FID().init` would compile or execute ~100 random initialisers.
  """
  rng = np.random.default_rng(seed)
  params: dict = {}
  for path, shape in _flax_shapes().items():
    if path[-1] == "kernel":
      fan_in = shape[0] * shape[1] * shape[2]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    else:
      value = np.ones(shape) if path[-1] in ("scale", "var") else np.zeros(shape)
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = jnp.asarray(value, jnp.float32)
  return params


@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[tuple, tuple]:
  """Flax param path -> shape, from the module itself (no compute: eval_shape)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(lambda x: InceptionV3FID().init(jax.random.PRNGKey(0), x), x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_key(path: tuple) -> str:
  *module, layer, leaf = path  # e.g. ('Mixed_5b', 'branch1x1', 'conv', 'kernel')
  name = "weight" if layer == "conv" else _BN_NAMES[leaf]
  return ".".join([*module, layer, name])


def torch_layout() -> dict[str, tuple]:
  """The tensors of the standard file: name -> PyTorch shape (fc excluded; it is optional)."""
  out = {}
  for path, shape in _flax_shapes().items():
    out[_torch_key(path)] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
  return out


def _short_list(names, limit=6):
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert(state_dict: Mapping[str, Any]):
  """Standard PyTorch FID Inception state dict (NumPy arrays) -> Flax params.

  Every conv/BatchNorm tensor of the file is used exactly once; conv kernels go OIHW ->
  HWIO. Accepted and ignored on purpose: `fc.weight`/`fc.bias` (the 1008-way classifier,
  not part of pool3 features; shape-checked when present) and BatchNorm
  `num_batches_tracked` counters (training bookkeeping that newer torch versions add).
  Missing, unexpected or mis-shaped tensors raise InceptionWeightsError naming them.
  """
  shapes = _flax_shapes()
  expected = {_torch_key(path): path for path in shapes}
  bn_prefixes = {k.rsplit(".", 1)[0] for k in expected if ".bn." in k}
  optional = {"fc.weight": (NUM_LOGITS, FEATURE_DIM), "fc.bias": (NUM_LOGITS,)}

  missing = sorted(set(expected) - set(state_dict))
  unused, misshaped = [], []
  params: dict = {}
  for key, value in state_dict.items():
    arr = np.asarray(value)
    if key in expected:
      path = expected[key]
      if arr.ndim == 4:
        arr = arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      if arr.shape != shapes[path]:
        want = torch_layout()[key]
        misshaped.append(f"{key} {tuple(np.asarray(value).shape)} (expected {want})")
        continue
      node = params
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = jnp.asarray(arr, jnp.float32)
    elif key in optional:
      if arr.shape != optional[key]:
        misshaped.append(f"{key} {arr.shape} (expected {optional[key]})")
    elif key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] in bn_prefixes:
      continue
    else:
      unused.append(key)

  problems = []
  if missing:
    problems.append(f"missing {len(missing)}: {_short_list(missing)}")
  if unused:
    problems.append(f"unexpected {len(unused)}: {_short_list(unused)}")
  if misshaped:
    problems.append(f"wrong shape {len(misshaped)}: {_short_list(misshaped)}")
  if problems:
    raise InceptionWeightsError(
        "not the standard FID Inception weights (pt_inception-2015-12-05-6726825d.pth): "
        + "; ".join(problems) + f"; get the file from {FID_WEIGHTS_URL}")
  return params


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Tensors of a `.pth` (via `torch.load(weights_only=True)`) or of an `.npz` of the same keys."""
  if not os.path.isfile(path):
    raise InceptionWeightsError(f"Inception weights file {path!r} does not exist; download "
                                f"{FID_WEIGHTS_URL} (see deediff_jax/eval/inception.py)")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch  # only needed for .pth; convert to .npz once to drop the dependency
  except ImportError:
    raise InceptionWeightsError(
        f"reading {path} needs torch (pip install torch), or convert it once elsewhere with "
        "`python -m deediff_jax.eval.inception --torch FILE.pth --out FILE.npz`") from None
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for corrupt or pickled-code files
    raise InceptionWeightsError(f"cannot read {path} as a PyTorch weights file "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(sd, Mapping):
    raise InceptionWeightsError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
  return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def load_weights(path: str):
  """Flax params from `pt_inception-2015-12-05-6726825d.pth` or its npz conversion."""
  return convert(read_state_dict(path))


# ----------------------------------------------------------------------------- features


@jax.jit
def resize_to_input(images):
  """NHWC -> [B, 299, 299, C], bilinear like torch `align_corners=False` without antialias."""
  b, h, w, c = images.shape
  if (h, w) == (INPUT_SIZE, INPUT_SIZE):
    return images
  # With antialias=False the triangle kernel is not widened when downsampling, so exactly
  # the two nearest source pixels are blended, as in F.interpolate; at the borders jax
  # renormalises the weights of in-range pixels, which equals torch's coordinate clamp.
  return jax.image.resize(images, (b, INPUT_SIZE, INPUT_SIZE, c), method="bilinear",
                          antialias=False)


@functools.partial(jax.jit, static_argnames=("precision",))
def _pool3(params, x, precision):
  return InceptionV3FID(precision=precision).apply({"params": params}, x)


def features(params, images, *, batch_size: int = 50, precision: str = "highest") -> np.ndarray:
  """pool3 features [B, 2048] (float32 NumPy) of NHWC images in [-1, 1], any size.

  Grayscale images (C=1) are repeated to 3 channels. Images are fed in chunks of
  `batch_size` (the last chunk padded) so that one compiled network serves any B.
  `precision="highest"` keeps convolutions in full float32 on accelerators (FID is
  sensitive to the reduced-precision matmuls that GPUs/TPUs use by default); pass
  "default" to trade that for speed.
  """
  shape = tuple(getattr(images, "shape", ()))
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floats in [-1, 1], got dtype {images.dtype}; "
                     "scale uint8 images with x / 127.5 - 1")
  if shape[0] == 0:
    return np.zeros((0, FEATURE_DIM), np.float32)
  chunk = max(1, min(int(batch_size), shape[0]))
  out = []
  for start in range(0, shape[0], chunk):
    x = jnp.asarray(images[start:start + chunk], jnp.float32)
    n = x.shape[0]
    peak = float(jnp.max(jnp.abs(x)))
    if not np.isfinite(peak) or peak > 2.0:
      raise ValueError(f"images must be in [-1, 1], got max |x| = {peak:.4g}; scale [0, 255] "
                       "images with x / 127.5 - 1 and [0, 1] images with 2x - 1")
    if n < chunk:
      x = jnp.concatenate([x, jnp.zeros((chunk - n,) + x.shape[1:], x.dtype)], axis=0)
    x = resize_to_input(x)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    out.append(np.asarray(_pool3(params, x, precision))[:n])
  return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m deediff_jax.eval.inception",
      description="Convert the PyTorch FID Inception weights to an npz (torch needed only here).")
  ap.add_argument("--torch", required=True, help="pt_inception-2015-12-05-6726825d.pth")
  ap.add_argument("--out", required=True, help="output .npz (same tensor names)")
  args = ap.parse_args(argv)
  if not args.out.endswith(".npz"):
    print(f"error: --out must end with .npz, got {args.out!r}", file=sys.stderr)
    return 2
  try:
    sd = read_state_dict(args.torch)
    convert(sd)  # validate before writing: a wrong file must not become a wrong npz
  except InceptionWeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **sd)
  print(f"wrote {args.out}: {len(sd)} tensors; use it wherever a .pth is accepted")
  return 0


if __name__ == "__main__":
  sys.exit(main())
