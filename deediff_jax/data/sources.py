"""Data sources: `load_source(config.data)` turns `data.source` into random-access examples.

Every source gives the same thing, a `Source` whose `get(indices)` returns a dict of NumPy
arrays for those dataset indices:

  image    uint8 [n, H, W, C] in 0..255 (float32 [n, H, W, C] for latents, values as stored)
  label    int32 [n]               only when the source has labels (`source.labels is not None`)
  context  float32 [n, L, Dc]      only when `data.context_file` is set (text models)

Scaling to [-1, 1], flips, shuffling and per-host sharding happen in `pipeline.py`, not here.

Sources (`data.source`):

- `digits`: scikit-learn's bundled 8x8 digits (1,797 images, labels 0..9). The values 0..16
  are scaled to 0..255 by `round(v * 255 / 16)`. Only split `train`; needs image_size=8,
  channels=1.
- `npz:PATH`: a NumPy .npz file (PATH relative to the current directory) with
    `image`       uint8 [N, H, W, C] or [N, H, W] (C = 1 is added); float16/32 for latents
    `label`       optional, integer [N], class ids >= 0
    `test_image`, `test_label`   the same for `data.split=test`
  The arrays are used as they are: H, W, C must equal data.image_size/channels (an error
  says which key to set), except that images exactly k times data.image_size on a side are
  shrunk by a k x k mean (`mean_pool`; MNIST 28 -> 14), as the tfds source does. With `data.latent=True` the file holds autoencoder latents:
  `image` is float [N, h, w, c] of any size, returned as float32 without any scaling.
- `folder:PATH`: a directory of .png/.jpg/.jpeg/.bmp/.webp files, either all directly in PATH
  (unlabeled) or one subdirectory per class (labels = index of the subdirectory name in the
  sorted list of subdirectories holding images; files are searched recursively inside each
  class). Images are converted to L / RGB / RGBA for channels 1 / 3 / 4. All images must have
  one size; if it is not image_size x image_size they are center-cropped to a square and
  resized with PIL bilinear (antialiased) filtering. Only split `train`. Decoded once, at load.
- `tfds:NAME`: a TFDS dataset prepared in ArrayRecord format, read with `tfds.data_source`
  (random access, no TensorFlow) from $TFDS_DATA_DIR (default ~/tensorflow_datasets); NAME
  may carry a config/version (`tfds:celeb_a:2.1.0`), data.split is the TFDS split string.
  Images are decoded on access. Preprocessing:
    cifar10, mnist and any image already image_size x image_size: as stored;
    square uint8 images exactly k times image_size: the k x k mean (`mean_pool`, as npz);
    celeb_a: the U-ViT / DDIM CelebA-64 crop, rows 57..185 and columns 25..153 (a 128x128
      box centred on row 121, column 89), then PIL bilinear resize to image_size;
    anything else: center crop to a square, PIL bilinear resize to image_size.
  The `label` feature (a ClassLabel) gives labels and num_classes; datasets without one
  (celeb_a) are unlabeled. Prepare with `tfds build NAME --file_format=array_record`.
- `latents:DIR`: autoencoder moments written by `python -m deediff_jax.data.encode_latents`
  (format in that module: index.json plus numbered `moments_*.npy` / `labels_*.npy` shards).
  Needs `data.latent=True`; only split `train`; `data.flip` must be False (encode with --flip
  instead: the mirror's moments are entries of their own). The shards are memory-mapped, so
  nothing is loaded whole; `get` returns the stored moments [n, h, w, 2c] (mean, log-variance)
  and the pipeline turns them into a latent drawn afresh at every step (`draw`, below):
  `scale_factor * (mean + exp(logvar / 2) * noise)`, the noise of global batch row r at step s
  from `np.random.default_rng([seed, 2, s, r])`, as U-ViT samples one per training step.

Arrays sources (digits, npz) are strict about sizes; file sources (folder, tfds) resize.

Text context (`data.context_file`, issue 7): an .npz written by `deediff_jax.data.encode_text`
  features         float16/float32 [M, L, Dc]   token features of M captions
  caption_index    integer [N]   for each example of the train split, its row of `features`
  test_caption_index  integer [N_test], optional: the same for data.split=test
  null_features    float [L, Dc], optional: the empty caption's features (classifier-free guidance)
  captions         str [M], optional: the caption strings, for plots and reports
Other keys that encode_text writes (mask, eval_*, encoder, max_length) are not read here.
One caption per example; an encoder that draws among several templates writes the chosen
one's row into `caption_index`. `features` stay in their stored dtype in memory (store
float16 for large sets) and `get` returns float32.

Bad input raises `DataError`, a ValueError whose message is one line naming the problem and
the fix; the CLI prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SCHEMES = ("digits", "npz:PATH", "folder:PATH", "tfds:NAME")  # in error messages; latents:DIR is one more
LATENTS_INDEX = "index.json"             # latents:DIR (data/encode_latents.py writes it)
LATENTS_FORMAT = "deediff_jax.latents/1"
_LATENT_NOISE = 2                        # the pipeline's stream tags: 0 order, 1 flips, 2 latent noise
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# U-ViT's CelebA 64 crop (datasets.py, after DDIM): the 128x128 box centred on (row 121, col 89)
# of the 218x178 aligned images, as a PIL (left, upper, right, lower) box.
CELEBA_CROP_BOX = (89 - 64, 121 - 64, 89 + 64, 121 + 64)


class DataError(ValueError):
  """Bad data input; the message is one line that names the problem and the fix."""

  def __init__(self, message: str):
    # Messages quote paths and library errors; keep them on one line whatever they contain.
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass
class Captions:
  """Precomputed caption features for one split (format in the module docstring)."""
  features: np.ndarray                # [M, L, Dc], stored dtype
  caption_index: np.ndarray           # int64 [N]: row of `features` for each example
  null_features: Optional[np.ndarray]  # float32 [L, Dc] or None
  captions: Optional[np.ndarray]      # str [M] or None

  @property
  def context_len(self) -> int:
    return int(self.features.shape[1])

  @property
  def context_dim(self) -> int:
    return int(self.features.shape[2])

  def get(self, indices: np.ndarray) -> np.ndarray:
    return np.asarray(self.features[self.caption_index[indices]], np.float32)


@dataclasses.dataclass
class Source:
  """Random-access examples of one split. `get(indices)` returns the batch dict (see module doc)."""
  name: str                     # the data.source string it was loaded from
  images: Any                   # np.ndarray [N,H,W,C] (uint8, or float for latents) or, for TFDS, a lazy column
  labels: Any                   # int32 [N] np.ndarray, a lazy column (TFDS), or None
  num_examples: int
  image_size: int               # H (= W) of what `get` returns
  channels: int
  num_classes: int = 0          # 0: unlabeled
  latent: bool = False          # True: `image` holds float latents, not 0..255 pixels
  context: Optional[Captions] = None
  # TFDS reads an image and its label from one record; `_read(indices) -> (images, labels|None)`.
  _read: Optional[Callable[[np.ndarray], tuple]] = dataclasses.field(default=None, repr=False)
  # latents:DIR: `image` holds moments; `draw(moments, seed, step, rows)` -> that step's latents.
  draw: Optional[Callable[..., np.ndarray]] = dataclasses.field(default=None, repr=False)

  def get(self, indices) -> dict:
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"indices must be in [0, {self.num_examples}), got [{indices.min()}, {indices.max()}]")
    if self._read is not None:
      image, label = self._read(indices)
    else:
      image = self.images[indices]
      label = None if self.labels is None else self.labels[indices]
    out = {"image": np.asarray(image, np.float32) if self.latent else np.asarray(image, np.uint8)}
    if label is not None:
      out["label"] = np.asarray(label, np.int32)
    if self.context is not None:
      out["context"] = self.context.get(indices)
    return out


def load_source(data_config) -> Source:
  """`config.data` (keys source, image_size, channels, split, context_file, latent) -> Source."""
  spec = str(data_config.source)
  latent = bool(data_config.get("latent", False))
  split = str(data_config.get("split", "train"))
  scheme, sep, arg = spec.partition(":")
  if latent and scheme in ("digits", "folder", "tfds"):
    raise DataError(f"data.latent=True needs precomputed latents from an npz:PATH source, not {spec!r}; "
                    "set --config.data.latent=False for images")
  if scheme == "latents" and not latent:
    raise DataError(f"data.source {spec!r} holds autoencoder moments; set --config.data.latent=True "
                    "(and model.image_size/in_channels to the latent size)")
  if scheme == "digits" and not sep:
    src = _load_digits(data_config, split)
  elif scheme in ("npz", "folder", "tfds", "latents") and sep:
    if not arg:
      example = {"npz": "npz:data/train.npz", "folder": "folder:data/images", "tfds": "tfds:cifar10",
                 "latents": "latents:data/imagenet256_latents"}[scheme]
      raise DataError(f"data.source {spec!r} needs a {'name' if scheme == 'tfds' else 'path'} after "
                      f"'{scheme}:', e.g. {example}")
    if scheme == "npz":
      src = _load_npz(arg, data_config, split, latent)
    elif scheme == "folder":
      src = _load_folder(arg, data_config, split)
    elif scheme == "latents":
      src = _load_latents(arg, data_config, split)
    else:
      src = _load_tfds(arg, data_config, split)
  else:
    raise DataError(f"unknown data.source {spec!r}; use one of: {', '.join(SCHEMES)}")
  src.name = spec
  context_file = str(data_config.get("context_file", "") or "")
  if context_file:
    src.context = load_captions(context_file, split, src.num_examples)
  return src


# ----------------------------------------------------------------------------------------------
# digits


def _load_digits(data_config, split: str) -> Source:
  _only_train("digits", split)
  _check_size("digits", 8, 8, 1, data_config)
  from sklearn.datasets import load_digits
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  return Source(name="digits", images=images, labels=labels, num_examples=len(images), image_size=8,
                channels=1, num_classes=10)


def _only_train(what: str, split: str):
  if split != "train":
    raise DataError(f"source {what} has only the 'train' split, got data.split={split!r}; "
                    "set --config.data.split=train")


def _check_size(what: str, h: int, w: int, c: int, data_config):
  want = (int(data_config.image_size), int(data_config.image_size), int(data_config.channels))
  if (h, w, c) != want:
    fix = f"set --config.data.image_size={h} --config.data.channels={c}" if h == w else \
        "store square images"
    raise DataError(f"{what} images are {h}x{w}x{c} (HxWxC) but the config expects "
                    f"{want[0]}x{want[1]}x{want[2]}; {fix} (and model.image_size/in_channels to match)")


# ----------------------------------------------------------------------------------------------
# npz


def _open_npz(path: str, what: str):
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(full):
    raise DataError(f"{what} not found: {full} (relative paths resolve against the current "
                    f"directory {os.getcwd()}); check the path")
  if os.path.isdir(full):
    raise DataError(f"{what} {full} is a directory, not an .npz file; for a directory of images "
                    f"use folder:{path}")
  try:
    return full, np.load(full, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - numpy raises several kinds for a bad file
    raise DataError(f"cannot read {what} {full} as .npz ({type(e).__name__}: {e}); write it with "
                    "np.savez(path, image=...)") from None


def pool_factor(h: int, w: int, size: int) -> int:
  """k when an h x w image is exactly k times data.image_size on both sides (k > 1), else 1."""
  return h // size if h == w and size > 0 and h % size == 0 and h > size else 1


def mean_pool(images: np.ndarray, k: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> [N, H/k, W/k, C] uint8: the k x k mean, rounded half up. Every source
  shrinks by an integer factor this way (MNIST 28 -> 14 for the 13-block study), so the npz and
  TFDS paths give bit-identical inputs."""
  n, h, w, c = images.shape
  x = images.astype(np.uint32).reshape(n, h // k, k, w // k, k, c).sum(axis=(2, 4))
  return ((x + (k * k) // 2) // (k * k)).astype(np.uint8)


def _load_npz(path: str, data_config, split: str, latent: bool) -> Source:
  if split not in ("train", "test"):
    raise DataError(f"npz sources have splits 'train' and 'test', got data.split={split!r}")
  full, z = _open_npz(path, "npz file")
  with z:
    keys = list(z.files)
    ikey, lkey = ("image", "label") if split == "train" else ("test_image", "test_label")
    if ikey not in keys:
      if split == "test":
        raise DataError(f"npz file {full} has no 'test_image' array for data.split=test (it has: "
                        f"{', '.join(keys) or 'nothing'}); add test_image/test_label or use data.split=train")
      raise DataError(f"npz file {full} has no 'image' array (it has: {', '.join(keys) or 'nothing'}); "
                      "save images as image=[N,H,W,C] uint8 (and label=[N] int)")
    try:
      images = z[ikey]
      labels = z[lkey] if lkey in keys else None
      train_labels = z["label"] if split == "test" and "label" in keys else None
    except ValueError as e:  # object arrays need pickle, which we refuse
      raise DataError(f"npz file {full}: cannot load '{ikey}'/'{lkey}' ({e}); store plain numeric arrays") from None

  if images.ndim == 3 and not latent:
    images = images[..., None]
  if images.ndim != 4:
    raise DataError(f"npz file {full}: '{ikey}' must be [N,H,W,C] (or [N,H,W] for one channel), got "
                    f"shape {tuple(images.shape)}")
  n, h, w, c = images.shape
  if n == 0:
    raise DataError(f"npz file {full}: '{ikey}' holds no images (shape {tuple(images.shape)})")
  if latent:
    if not np.issubdtype(images.dtype, np.floating):
      raise DataError(f"npz file {full}: data.latent=True expects float latents in '{ikey}', got dtype "
                      f"{images.dtype}; set --config.data.latent=False for uint8 images")
    image_size = h
  else:
    if images.dtype != np.uint8:
      raise DataError(f"npz file {full}: '{ikey}' must be uint8 in 0..255, got dtype {images.dtype}; "
                      "convert with np.clip(x, 0, 255).astype(np.uint8), or set --config.data.latent=True "
                      "for float autoencoder latents")
    factor = pool_factor(h, w, int(data_config.image_size))
    if factor > 1 and c == int(data_config.channels):
      images = mean_pool(images, factor)
      n, h, w, c = images.shape
    _check_size(f"npz file {full}: '{ikey}'", h, w, c, data_config)
    image_size = h

  num_classes = 0
  if labels is not None:
    labels = _check_labels(labels, n, f"npz file {full}: '{lkey}'")
    num_classes = int(labels.max()) + 1
    if train_labels is not None and train_labels.size and np.issubdtype(train_labels.dtype, np.integer):
      # The test split keeps the train split's class count (a class may be missing from test).
      num_classes = max(num_classes, int(train_labels.max()) + 1)
  return Source(name=f"npz:{path}", images=images, labels=labels, num_examples=n, image_size=image_size,
                channels=c, num_classes=num_classes, latent=latent)


def _check_labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{what} must be integer class ids of shape [{n}], got {labels.dtype} "
                    f"{tuple(labels.shape)}; store labels as an int array")
  if len(labels) != n:
    raise DataError(f"{what} has {len(labels)} labels for {n} images; store one label per image")
  if labels.min() < 0:
    raise DataError(f"{what} has a negative class id {int(labels.min())}; class ids must be 0..K-1")
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# latents


class _ShardedRows:
  """Rows of several memory-mapped .npy shards as one array: `rows[indices]` reads only those rows."""

  def __init__(self, shards: list):
    self.shards = shards
    self.starts = np.cumsum([0] + [len(a) for a in shards])
    self.shape = (int(self.starts[-1]),) + tuple(shards[0].shape[1:])
    self.dtype = shards[0].dtype

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, indices):
    idx = np.asarray(indices, np.int64)
    flat = idx.reshape(-1)
    out = np.empty((len(flat),) + self.shape[1:], self.dtype)
    which = np.searchsorted(self.starts, flat, side="right") - 1
    for k in np.unique(which):
      sel = np.flatnonzero(which == k)
      local = flat[sel] - self.starts[k]
      order = np.argsort(local, kind="stable")  # ascending reads from the file
      out[sel[order]] = self.shards[k][local[order]]
    return out.reshape(idx.shape + self.shape[1:])


def sample_latents(moments: np.ndarray, seed: int, step: int, rows, scale_factor: float) -> np.ndarray:
  """Latents [n, h, w, c] drawn from moments [n, h, w, 2c] for global batch rows `rows` of `step`:
  scale_factor * (mean + exp(logvar / 2) * noise), logvar clamped to [-30, 20] as the autoencoder
  does; row r's noise is np.random.default_rng([seed, 2, step, r]), whichever host loads it."""
  moments = np.asarray(moments, np.float32)
  mean, logvar = np.split(moments, 2, axis=-1)
  noise = np.stack([np.random.default_rng([int(seed), _LATENT_NOISE, int(step), int(r)])
                    .standard_normal(mean.shape[1:], np.float32) for r in rows]) if len(rows) else mean
  std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
  return (np.float32(scale_factor) * (mean + std * noise)).astype(np.float32)


def _load_latents(path: str, data_config, split: str) -> Source:
  _only_train(f"latents:{path}", split)
  full = os.path.abspath(os.path.expanduser(path))
  hint = f"write it with python -m deediff_jax.data.encode_latents --config CONFIG --source IMAGES --out {path}"
  if not os.path.isdir(full):
    raise DataError(f"latents directory not found: {full} (relative paths resolve against {os.getcwd()}); {hint}")
  index_path = os.path.join(full, LATENTS_INDEX)
  if not os.path.isfile(index_path):
    partial = os.path.exists(os.path.join(full, "encode_settings.json"))
    raise DataError(f"{full} has no {LATENTS_INDEX}"
                    + ("; its encoding did not finish: rerun encode_latents with the same arguments to resume"
                       if partial else f"; {hint}"))
  try:
    with open(index_path) as f:
      index = json.load(f)
    if index.get("format") != LATENTS_FORMAT:
      raise ValueError(f"format {index.get('format')!r}, expected {LATENTS_FORMAT!r}")
    mshape = tuple(int(v) for v in index["moments_shape"])
    shard_info = list(index["shards"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"cannot read {index_path} ({type(e).__name__}: {e}); {hint}") from None
  if bool(data_config.get("flip", False)):
    raise DataError(f"data.flip=True would mirror latents, which is not the latent of the mirrored image; "
                    f"set --config.data.flip=False (encode_latents --flip stores the mirrors' moments)")
  shards, labels = [], []
  for info in shard_info:
    f = os.path.join(full, info["moments"])
    try:
      m = np.load(f, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise DataError(f"cannot memory-map latent shard {f} ({type(e).__name__}: {e}); {hint}") from None
    if m.shape != (int(info["num_examples"]),) + mshape or not np.issubdtype(m.dtype, np.floating):
      raise DataError(f"latent shard {f} is {m.dtype} {m.shape}, but {index_path} says "
                      f"[{info['num_examples']}, {', '.join(map(str, mshape))}] floats; re-encode {path}")
    shards.append(m)
    if info.get("labels"):
      lab = np.load(os.path.join(full, info["labels"]))
      labels.append(_check_labels(lab, len(m), f"latent labels {os.path.join(full, info['labels'])}"))
  if not shards or not sum(len(m) for m in shards):
    raise DataError(f"{full} holds no latents; {hint}")
  labels = np.concatenate(labels) if labels and len(labels) == len(shards) else None
  scale = float(index.get("scale_factor", 0.18215))
  return Source(name=f"latents:{path}", images=_ShardedRows(shards), labels=labels,
                num_examples=int(sum(len(m) for m in shards)), image_size=mshape[0], channels=mshape[2] // 2,
                num_classes=int(index.get("num_classes", 0)) if labels is not None else 0, latent=True,
                draw=functools.partial(sample_latents, scale_factor=scale))


# ----------------------------------------------------------------------------------------------
# folder


def _load_folder(path: str, data_config, split: str) -> Source:
  _only_train(f"folder:{path}", split)
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(full):
    raise DataError(f"image folder not found: {full} (relative paths resolve against the current "
                    f"directory {os.getcwd()}); check the path")
  if not os.path.isdir(full):
    raise DataError(f"folder:{path} is not a directory: {full}; for an .npz file use npz:{path}")
  channels = int(data_config.channels)
  if channels not in _PIL_MODES:
    raise DataError(f"folder sources need data.channels 1, 3 or 4 (L, RGB, RGBA), got {channels}")

  def is_image(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)

  entries = sorted(os.listdir(full))
  top = [os.path.join(full, e) for e in entries if is_image(e) and os.path.isfile(os.path.join(full, e))]
  classes = []
  for e in entries:
    d = os.path.join(full, e)
    if e.startswith(".") or not os.path.isdir(d):
      continue
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if is_image(f))
    if files:
      classes.append((e, files))
  if top and classes:
    raise DataError(f"image folder {full} mixes images at its top level ({os.path.basename(top[0])}) with "
                    f"class subdirectories ({classes[0][0]}/); put every image in a class subdirectory, or none")
  if classes:
    files = [f for _, fs in classes for f in fs]
    labels = np.concatenate([np.full(len(fs), k, np.int32) for k, (_, fs) in enumerate(classes)])
  else:
    files, labels = top, None
  if not files:
    raise DataError(f"image folder {full} has no images ({', '.join(IMAGE_EXTENSIONS)}), neither at its "
                    "top level nor in class subdirectories; add images or fix the path")

  from PIL import Image
  size = int(data_config.image_size)
  first_size, first_file = None, None
  images = np.empty((len(files), size, size, channels), np.uint8)
  for i, f in enumerate(files):
    try:
      with Image.open(f) as im:
        im.load()
        im = im.convert(_PIL_MODES[channels])
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a broken file
      raise DataError(f"cannot read image file {f} ({type(e).__name__}: {e}); remove or replace it") from None
    if first_size is None:
      first_size, first_file = im.size, f
    elif im.size != first_size:
      raise DataError(f"image folder {full} has images of mixed sizes: {os.path.relpath(first_file, full)} is "
                      f"{first_size[0]}x{first_size[1]} but {os.path.relpath(f, full)} is {im.size[0]}x{im.size[1]} "
                      "(WxH); resize them to one size first")
    images[i] = _as_hwc(_square_resize(im, size))
  return Source(name=f"folder:{path}", images=images, labels=labels, num_examples=len(files),
                image_size=size, channels=channels, num_classes=len(classes))


def _square_resize(im, size: int):
  """Center-crop a PIL image to a square and resize it to size x size (bilinear, antialiased)."""
  from PIL import Image
  w, h = im.size
  if (w, h) == (size, size):
    return im
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  if (w, h) != (s, s):
    im = im.crop((left, top, left + s, top + s))
  return im.resize((size, size), resample=Image.BILINEAR)


def _as_hwc(im) -> np.ndarray:
  a = np.asarray(im, np.uint8)
  return a[..., None] if a.ndim == 2 else a


# ----------------------------------------------------------------------------------------------
# tfds


def _tfds_prepare_hint(name: str) -> str:
  base = name.split(":")[0].split("/")[0]
  return (f"on a machine with internet run `tfds build {base} --file_format=array_record` (or python -c "
          f"\"import tensorflow_datasets as tfds; tfds.builder('{base}', file_format='array_record')"
          f".download_and_prepare()\") and copy the dataset directory into $TFDS_DATA_DIR "
          "(default ~/tensorflow_datasets)")


def _load_tfds(name: str, data_config, split: str) -> Source:
  import tensorflow_datasets as tfds
  data_dir = os.environ.get("TFDS_DATA_DIR") or None  # read now: tfds reads it once, at import
  where = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f"TFDS has no dataset named {name!r}; see https://www.tensorflow.org/datasets/catalog "
                    "for names (e.g. tfds:cifar10, tfds:mnist, tfds:celeb_a)") from None
  except Exception as e:  # noqa: BLE001 - classify below by asking the builder
    raise _tfds_open_error(tfds, name, split, data_dir, where, e) from None

  features = ds.dataset_info.features
  if "image" not in features:
    raise DataError(f"TFDS dataset {name!r} has no 'image' feature (it has: {', '.join(features.keys())}); "
                    "use an image dataset")
  label_feature = features["label"] if "label" in features else None
  has_labels = isinstance(label_feature, tfds.features.ClassLabel)
  num_classes = int(label_feature.num_classes) if has_labels else 0
  channels = int(data_config.channels)
  if channels not in _PIL_MODES:
    raise DataError(f"tfds sources need data.channels 1, 3 or 4, got {channels}")
  size = int(data_config.image_size)
  base = name.split(":")[0].split("/")[0]
  preprocess = _tfds_preprocess(base, size, channels)

  def read(indices: np.ndarray):
    records = [ds[int(i)] for i in indices]
    images = np.stack([preprocess(r["image"]) for r in records]) if records else \
        np.zeros((0, size, size, channels), np.uint8)
    labels = np.asarray([r["label"] for r in records], np.int32) if has_labels else None
    return images, labels

  n = len(ds)
  if n == 0:
    raise DataError(f"TFDS dataset {name!r} split {split!r} is empty; pick another data.split")
  return Source(name=f"tfds:{name}", images=_LazyColumn(read, 0, (n, size, size, channels)),
                labels=_LazyColumn(read, 1, (n,)) if has_labels else None, num_examples=n,
                image_size=size, channels=channels, num_classes=num_classes, _read=read)


def _tfds_open_error(tfds, name: str, split: str, data_dir, where: str, err: Exception) -> DataError:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001
    return DataError(f"cannot open TFDS dataset {name!r} ({type(e).__name__}: {e})")
  if not builder.is_prepared():
    return DataError(f"TFDS dataset {name!r} is not prepared in {where}; {_tfds_prepare_hint(name)}")
  fmt = getattr(builder.info, "file_format", None)
  fmt = getattr(fmt, "value", fmt)
  if fmt is not None and str(fmt) != "array_record":
    return DataError(f"TFDS dataset {name!r} in {where} is stored as {fmt}, which has no random access; "
                     f"rebuild it with `tfds build {name.split(':')[0]} --file_format=array_record` (or "
                     "`tfds convert_format --out_file_format=array_record`)")
  splits = ", ".join(sorted(builder.info.splits.keys()))
  msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return DataError(f"cannot open split {split!r} of TFDS dataset {name!r} ({msg}); its splits are: {splits}")


def _tfds_preprocess(base: str, size: int, channels: int) -> Callable[[np.ndarray], np.ndarray]:
  from PIL import Image
  mode = _PIL_MODES[channels]

  def to_pil(a: np.ndarray):
    a = np.asarray(a)
    im = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
    return im if im.mode == mode else im.convert(mode)

  def celeba(a):
    im = to_pil(a).crop(CELEBA_CROP_BOX)
    return _as_hwc(im.resize((size, size), resample=Image.BILINEAR))

  def generic(a):
    a = np.asarray(a)
    if a.shape == (size, size, channels) and a.dtype == np.uint8:
      return a  # cifar10 at 32, mnist at 28: as stored, bit for bit
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == channels and pool_factor(a.shape[0], a.shape[1], size) > 1:
      return mean_pool(a[None], pool_factor(a.shape[0], a.shape[1], size))[0]  # as the npz source does
    return _as_hwc(_square_resize(to_pil(a), size))

  return celeba if base == "celeb_a" else generic


class _LazyColumn:
  """A random-access column of a TFDS source: `col[indices]` decodes only those records."""

  def __init__(self, read, which: int, shape: tuple):
    self._read, self._which, self.shape = read, which, shape

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, indices):
    idx = np.asarray(indices, np.int64)
    out = self._read(idx.reshape(-1))[self._which]
    return out.reshape(idx.shape + out.shape[1:])


# ----------------------------------------------------------------------------------------------
# text context


def load_captions(path: str, split: str, num_examples: int) -> Captions:
  """Reads a caption-feature .npz (format in the module docstring) for `split`; one-line errors."""
  full, z = _open_npz(path, "caption feature file (data.context_file)")
  with z:
    keys = list(z.files)
    for k in ("features", "caption_index"):
      if k not in keys:
        raise DataError(f"caption feature file {full} has no '{k}' array (it has: {', '.join(keys) or 'nothing'}); "
                        "write it with python -m deediff_jax.data.encode_text")
    ikey = "caption_index" if split == "train" else "test_caption_index"
    if ikey not in keys:
      raise DataError(f"caption feature file {full} has no '{ikey}' array for data.split={split}; encode "
                      f"captions for that split or use data.split=train")
    try:
      features = z["features"]
      index = z[ikey]
      null = z["null_features"] if "null_features" in keys else None
      captions = z["captions"] if "captions" in keys else None
    except ValueError as e:  # object arrays need pickle, which we refuse
      raise DataError(f"caption feature file {full}: cannot load arrays ({e}); store numeric arrays and "
                      "captions as a fixed-width str array (np.array(list_of_str))") from None
  if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
    raise DataError(f"caption feature file {full}: 'features' must be float [M, L, D], got {features.dtype} "
                    f"{tuple(features.shape)}")
  m, length, dim = features.shape
  if m == 0:
    raise DataError(f"caption feature file {full}: 'features' holds no captions")
  if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
    raise DataError(f"caption feature file {full}: '{ikey}' must be integer [N], got {index.dtype} "
                    f"{tuple(index.shape)}")
  if len(index) != num_examples:
    raise DataError(f"caption feature file {full}: '{ikey}' has {len(index)} entries but the {split} split "
                    f"has {num_examples} examples; encode captions for this dataset and split")
  if index.size and (index.min() < 0 or index.max() >= m):
    raise DataError(f"caption feature file {full}: '{ikey}' has values in [{index.min()}, {index.max()}] but "
                    f"'features' has {m} rows")
  if null is not None:
    if tuple(null.shape) != (length, dim) or not np.issubdtype(null.dtype, np.floating):
      raise DataError(f"caption feature file {full}: 'null_features' must be float [{length}, {dim}] like one "
                      f"row of 'features', got {null.dtype} {tuple(null.shape)}")
    null = null.astype(np.float32)
  if captions is not None and (captions.ndim != 1 or len(captions) != m):
    raise DataError(f"caption feature file {full}: 'captions' must be [M={m}] strings, got shape "
                    f"{tuple(captions.shape)}")
  return Captions(features=features, caption_index=index.astype(np.int64), null_features=null,
                  captions=captions)
