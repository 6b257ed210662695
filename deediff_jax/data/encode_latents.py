"""Image -> autoencoder-moment extraction, run once before training a latent model.

U-ViT trains its ImageNet and MS-COCO models on the moments (mean and log-variance) that the
Stable Diffusion KL-f8 encoder gives for each centre-cropped 256x256 image, and draws a fresh
latent from them at every training step. This module writes those moments once:

  python -m deediff_jax.data.encode_latents --config configs/imagenet256_uvit_large.py \\
      --source folder:/data/imagenet/train --autoencoder autoencoder_kl.pth --flip --out /data/in256_latents

and training reads them with `--config.data.source=latents:/data/in256_latents` (see
`data/sources.py`: the shards are memory-mapped, nothing is loaded whole).

Input (`--source`, default `data.source` when it is not already `latents:`):
  folder:PATH  images directly in PATH (unlabeled) or one subdirectory per class (labels = index
               of the class in the sorted subdirectory names, as torchvision's ImageFolder and
               U-ViT's ImageNet loader); any sizes, read lazily, decoded in parallel threads
  tfds:NAME    a TFDS dataset in ArrayRecord format (the source's own resize applies)
  npz:PATH     `image` uint8 [N,H,W(,C)] (+ optional `label`), streamed from the zip member
  digits       scikit-learn's 8x8 digits (for tests and demos)
Every image is converted to the autoencoder's channels (RGB), centre-cropped and resized to
`--image-size` (default `data.image_size`) by `--resize`:
  adm       U-ViT's ImageNet preprocessing (ADM's center_crop_arr): halve with a BOX filter while
            the short side is >= 2x the size, BICUBIC resize so the short side is the size, then
            the centre crop (default)
  lanczos   U-ViT's MS-COCO preprocessing: centre crop to a square, then LANCZOS resize
  bilinear  what the folder:/tfds: training sources do: centre crop, then bilinear resize

Output directory (the contract with `latents:DIR`; keys stable):
  index.json           {"format": "deediff_jax.latents/1", "num_examples", "num_images", "flip",
                        "moments_shape" [h, w, 2*c], "latent_channels" c, "dtype", "scale_factor",
                        "labels" (bool), "num_classes", "shards": [{"moments", "labels",
                        "num_examples"}], "image_size", "channels", "resize", "source",
                        "autoencoder": {"path", "config"}, "seconds"}
  moments_00000.npy    float16 (or float32) [n, h, w, 2*c]: mean then log-variance, as
                       `model.autoencoder.encode_moments` gives them (unscaled)
  labels_00000.npy     int32 [n] (only for labelled sources)
  files.txt            folder sources: each image's path relative to the folder, one per line
  captions.txt         with --coco-captions: one caption per entry, for `encode_text --captions`
With --flip the mirrored image's moments are an entry of their own, right after the image's:
entry 2i is image i and entry 2i+1 its mirror (same label), so N images give 2N entries.
Shards hold --shard-size entries; each is written to a temporary name and renamed when
complete, so an interrupted run started again with the same arguments keeps the finished
shards and encodes only the rest.

The autoencoder comes from --autoencoder or `data.autoencoder`: U-ViT's
`assets/stable-diffusion/autoencoder_kl.pth` (read with torch, weights_only) or an .npz of the
same tensors (`--save-autoencoder FILE.npz` writes one, after which torch is not needed).

Bad input is one line on stderr and exit code 2 (`EncodeLatentsError`, `DataError`, ...).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import sys
import time
import zipfile
from typing import Any, Callable, Optional, Sequence

import numpy as np

from deediff_jax.data import coco, sources
from deediff_jax.data.prefetch import prefetched
from deediff_jax.model.autoencoder import load_autoencoder

RESIZE_METHODS = ("adm", "lanczos", "bilinear")
DEFAULT_BATCH = 64
DEFAULT_SHARD = 65536          # entries per shard: 1 GiB of float16 moments at 32x32x8
READ_THREADS = 16


class EncodeLatentsError(ValueError):
  """Bad input to the extraction step; one line (the CLI prints it and exits with code 2)."""

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------- autoencoder weights

def export_npz(params, path: str) -> str:
  """Writes params as an .npz of the reference tensors (names and OIHW layout of autoencoder_kl.pth),
  which `load_autoencoder` reads without torch."""
  from deediff_jax.model import autoencoder as ae
  cfg = ae.config_from_params(params)
  arrays = {}
  for name, (keys, _) in ae._spec(cfg).items():  # noqa: SLF001 - the converter's own name map
    leaf = params
    for k in keys:
      leaf = leaf[k]
    a = np.asarray(leaf, np.float32)
    arrays[name] = a.transpose(3, 2, 0, 1) if keys[-1] == "kernel" else a  # HWIO -> OIHW
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return path


# --------------------------------------------------------------------------- image readers


def resize_square(im, size: int, method: str = "adm"):
  """A PIL image -> uint8 [size, size, C]: centre crop and resize (module doc, `--resize`)."""
  from PIL import Image
  if method == "bilinear":
    return sources._as_hwc(sources._square_resize(im, size))  # noqa: SLF001 - the sources' own resize
  w, h = im.size
  if method == "adm":
    while min(im.size) >= 2 * size:
      im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    a = sources._as_hwc(im)  # noqa: SLF001
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]
  if method == "lanczos":
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return sources._as_hwc(im.resize((size, size), resample=Image.LANCZOS))  # noqa: SLF001
  raise EncodeLatentsError(f"unknown --resize {method!r}; choose one of {', '.join(RESIZE_METHODS)}")


def _to_mode(im, channels: int):
  mode = sources._PIL_MODES[channels]  # noqa: SLF001
  return im if im.mode == mode else im.convert(mode)


def _array_to_pil(a: np.ndarray):
  from PIL import Image
  a = np.asarray(a, np.uint8)
  return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)


@dataclasses.dataclass
class ImageReader:
  """Random access to a source's images, preprocessed: `read(indices)` -> (uint8 [n, S, S, C],
  int32 labels [n] or None). Nothing is decoded before it is read."""
  source: str                     # the source spec, file paths made absolute
  num_examples: int
  image_size: int
  channels: int
  num_classes: int                # 0: unlabeled
  has_labels: bool
  read: Callable[[np.ndarray], tuple]
  resize: str
  files: Optional[list] = None    # folder sources: paths relative to the folder
  close: Callable[[], None] = lambda: None


def _preprocess_arrays(images: np.ndarray, size: int, channels: int, resize: str) -> np.ndarray:
  images = np.asarray(images, np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[1:] == (size, size, channels):
    return images
  return np.stack([resize_square(_to_mode(_array_to_pil(a), channels), size, resize) for a in images])


class _NpzRows:
  """Rows of one uint8 array inside an .npz, read from the zip member on demand (never all of it)."""

  def __init__(self, full: str, key: str):
    self._zip = zipfile.ZipFile(full)
    self._f = self._zip.open(f"{key}.npy")
    version = np.lib.format.read_magic(self._f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    self.shape, fortran, self.dtype = read_header(self._f)
    if fortran or self.dtype.hasobject:
      raise sources.DataError(f"npz file {full}: '{key}' must be a C-ordered numeric array; save it with "
                              "np.savez(path, image=np.ascontiguousarray(images))")
    self._offset = self._f.tell()
    self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, indices) -> np.ndarray:
    idx = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((len(idx),) + tuple(self.shape[1:]), self.dtype)
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    # Contiguous runs of sorted indices are one seek and one read each (forward only when sorted).
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    for run in np.split(np.arange(len(idx)), breaks):
      if not len(run):
        continue
      first, count = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]]) - int(sorted_idx[run[0]]) + 1
      self._f.seek(self._offset + first * self._row_bytes)
      buf = self._f.read(count * self._row_bytes)
      rows = np.frombuffer(buf, self.dtype).reshape((count,) + tuple(self.shape[1:]))
      out[order[run]] = rows[sorted_idx[run] - first]
    return out

  def close(self):
    self._f.close()
    self._zip.close()


def _npz_reader(path: str, size: int, channels: int, resize: str) -> ImageReader:
  full = os.path.abspath(os.path.expanduser(path))
  _, z = sources._open_npz(path, "npz file")  # noqa: SLF001 - same checks and messages as training
  with z:
    if "image" not in z.files:
      raise sources.DataError(f"npz file {full} has no 'image' array (it has: {', '.join(z.files) or 'nothing'}); "
                              "save images as image=[N,H,W,C] uint8 (and label=[N] int)")
    labels = z["label"] if "label" in z.files else None
  try:
    rows = _NpzRows(full, "image")
  except (KeyError, ValueError, zipfile.BadZipFile) as e:
    raise sources.DataError(f"cannot stream 'image' from npz file {full} ({type(e).__name__}: {e})") from None
  if len(rows.shape) not in (3, 4) or rows.dtype != np.uint8 or not rows.shape[0]:
    rows.close()
    raise sources.DataError(f"npz file {full}: 'image' must be uint8 [N,H,W(,C)] images, got {rows.dtype} "
                            f"{tuple(rows.shape)}")
  if labels is not None:
    labels = sources._check_labels(labels, rows.shape[0], f"npz file {full}: 'label'")  # noqa: SLF001

  def read(indices):
    idx = np.asarray(indices, np.int64)
    return (_preprocess_arrays(rows[idx], size, channels, resize),
            None if labels is None else labels[idx])

  return ImageReader(source=f"npz:{full}", num_examples=int(rows.shape[0]), image_size=size, channels=channels,
                     num_classes=0 if labels is None else int(labels.max()) + 1, has_labels=labels is not None,
                     read=read, resize=resize, close=rows.close)


def _digits_reader(size: int, channels: int, resize: str) -> ImageReader:
  import ml_collections
  src = sources.load_source(ml_collections.ConfigDict(dict(source="digits", image_size=8, channels=1)))

  def read(indices):
    idx = np.asarray(indices, np.int64)
    return _preprocess_arrays(src.images[idx], size, channels, resize), src.labels[idx]

  return ImageReader(source="digits", num_examples=src.num_examples, image_size=size, channels=channels,
                     num_classes=src.num_classes, has_labels=True, read=read, resize=resize)


def list_folder(path: str) -> tuple[str, list, Optional[np.ndarray], int]:
  """(absolute folder, files, labels or None, num_classes) with the folder source's rules: images at
  the top level (unlabeled) or one subdirectory per class, searched recursively, sorted."""
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(full):
    what = "is not a directory" if os.path.exists(full) else "not found"
    raise sources.DataError(f"image folder {what}: {full} (relative paths resolve against {os.getcwd()}); "
                            "check --source folder:PATH")

  def is_image(name):
    return not name.startswith(".") and name.lower().endswith(sources.IMAGE_EXTENSIONS)

  entries = sorted(os.listdir(full))
  top = [e for e in entries if is_image(e) and os.path.isfile(os.path.join(full, e))]
  classes = []
  for e in entries:
    d = os.path.join(full, e)
    if e.startswith(".") or not os.path.isdir(d):
      continue
    files = sorted(os.path.relpath(os.path.join(r, f), full) for r, _, fs in os.walk(d) for f in fs if is_image(f))
    if files:
      classes.append(files)
  if top and classes:
    raise sources.DataError(f"image folder {full} mixes images at its top level ({top[0]}) with class "
                            "subdirectories; put every image in a class subdirectory, or none")
  if classes:
    files = [f for fs in classes for f in fs]
    labels = np.concatenate([np.full(len(fs), k, np.int32) for k, fs in enumerate(classes)])
    return full, files, labels, len(classes)
  if not top:
    raise sources.DataError(f"image folder {full} has no images ({', '.join(sources.IMAGE_EXTENSIONS)}), "
                            "neither at its top level nor in class subdirectories; check --source")
  return full, top, None, 0


def _folder_reader(path: str, size: int, channels: int, resize: str) -> ImageReader:
  from PIL import Image
  full, files, labels, num_classes = list_folder(path)
  pool = concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, (os.cpu_count() or 1) * 2))

  def load(rel):
    f = os.path.join(full, rel)
    try:
      with Image.open(f) as im:
        im.load()
        return resize_square(_to_mode(im, channels), size, resize)
    except (OSError, ValueError) as e:  # PIL's errors for a broken or unknown file
      raise sources.DataError(f"cannot read image file {f} ({type(e).__name__}: {e}); remove or replace "
                              "it") from None

  def read(indices):
    idx = np.asarray(indices, np.int64)
    images = list(pool.map(load, [files[i] for i in idx]))
    return (np.stack(images) if images else np.zeros((0, size, size, channels), np.uint8),
            None if labels is None else labels[idx])

  return ImageReader(source=f"folder:{full}", num_examples=len(files), image_size=size, channels=channels,
                     num_classes=num_classes, has_labels=labels is not None, read=read, resize=resize,
                     files=files, close=lambda: pool.shutdown(wait=False))


def _tfds_reader(name: str, size: int, channels: int, resize: str) -> ImageReader:
  import ml_collections
  src = sources.load_source(ml_collections.ConfigDict(dict(source=f"tfds:{name}", image_size=size,
                                                           channels=channels, split="train")))

  def read(indices):
    ex = src.get(np.asarray(indices, np.int64))
    return ex["image"], ex.get("label")

  return ImageReader(source=f"tfds:{name}", num_examples=src.num_examples, image_size=size, channels=channels,
                     num_classes=src.num_classes, has_labels=src.labels is not None, read=read,
                     resize="bilinear")


def open_images(spec: str, size: int, channels: int = 3, resize: str = "adm") -> ImageReader:
  """An ImageReader for an image source spec (module doc); one-line DataError for a bad one."""
  if resize not in RESIZE_METHODS:
    raise EncodeLatentsError(f"unknown --resize {resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
  if channels not in sources._PIL_MODES:  # noqa: SLF001
    raise EncodeLatentsError(f"the autoencoder takes {channels}-channel images; only 1, 3 or 4 can be read")
  scheme, sep, arg = str(spec).partition(":")
  if scheme == "digits" and not sep:
    return _digits_reader(size, channels, resize)
  if sep and arg and scheme == "npz":
    return _npz_reader(arg, size, channels, resize)
  if sep and arg and scheme == "folder":
    return _folder_reader(arg, size, channels, resize)
  if sep and arg and scheme == "tfds":
    return _tfds_reader(arg, size, channels, resize)
  if scheme == "latents":
    raise sources.DataError(f"--source {spec!r} holds latents already; give the images to encode, e.g. "
                            "--source folder:/data/imagenet/train")
  raise sources.DataError(f"unknown image source {spec!r}; use folder:PATH, tfds:NAME, npz:PATH or digits")


# --------------------------------------------------------------------------- COCO captions


def coco_captions(annotations: str, files: Sequence[str]) -> list[str]:
  """The first caption (lowest annotation id) of each image file, from a COCO captions_*.json."""
  try:
    return coco.captions_for_files(annotations, files)
  except coco.CocoCaptionsError as e:
    raise EncodeLatentsError(f"--coco-captions {e}") from None


# --------------------------------------------------------------------------- encoding


def _shard_name(kind: str, k: int) -> str:
  return f"{kind}_{k:05d}.npy"


def _complete_shard(out_dir: str, k: int, shape: tuple, dtype, labelled: bool) -> bool:
  try:
    m = np.load(os.path.join(out_dir, _shard_name("moments", k)), mmap_mode="r")
    ok = m.shape == shape and m.dtype == dtype
    if labelled:
      ok = ok and np.load(os.path.join(out_dir, _shard_name("labels", k))).shape == shape[:1]
    return ok
  except (OSError, ValueError):
    return False


def encode(reader: ImageReader, params, out_dir: str, *, flip: bool = False, batch_size: int = DEFAULT_BATCH,
           dtype: str = "float16", shard_size: int = DEFAULT_SHARD, progress: bool = True,
           autoencoder_path: str = "") -> dict:
  """Encodes every image of `reader` (and its mirror with `flip`) into moment shards in `out_dir`;
  returns the index (also written as index.json). Streams: one batch of images in memory at a time."""
  import jax
  from deediff_jax.model import autoencoder as ae
  cfg = ae.config_from_params(params)
  size, f = reader.image_size, cfg.downsample_factor
  if size % f:
    raise EncodeLatentsError(f"image size {size} is not a multiple of the autoencoder's downsampling factor {f}")
  if batch_size <= 0:
    raise EncodeLatentsError(f"--batch-size must be positive, got {batch_size}")
  per = 2 if flip else 1
  if shard_size < per or shard_size % per:
    raise EncodeLatentsError(f"--shard-size must be a positive{' even' if flip else ''} number of entries, "
                             f"got {shard_size}")
  if dtype not in ("float16", "float32"):
    raise EncodeLatentsError(f"--dtype must be float16 or float32, got {dtype!r}")
  h = size // f
  mshape = (h, h, 2 * cfg.embed_dim)
  n = reader.num_examples
  per_shard = shard_size // per
  num_shards = max(1, math.ceil(n / per_shard))
  settings = {"source": reader.source, "num_images": n, "image_size": size, "channels": reader.channels,
              "resize": reader.resize, "flip": bool(flip), "dtype": dtype, "shard_size": int(shard_size),
              "moments_shape": list(mshape), "autoencoder": {"path": autoencoder_path,
                                                             "config": dataclasses.asdict(cfg)}}
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(os.path.join(out_dir, sources.LATENTS_INDEX)):
    raise EncodeLatentsError(f"{out_dir} already holds encoded latents ({sources.LATENTS_INDEX}); choose a new "
                             "--out or delete it")
  settings_path = os.path.join(out_dir, "encode_settings.json")
  if os.path.exists(settings_path):
    with open(settings_path) as fh:
      before = json.load(fh)
    if before != json.loads(json.dumps(settings)):
      raise EncodeLatentsError(f"{out_dir} holds a partial encoding made with other arguments ({settings_path}); "
                               "rerun with the same arguments to resume, or choose a new --out")
  else:
    with open(settings_path, "w") as fh:
      json.dump(settings, fh, indent=2)

  np_dtype = np.dtype(dtype)
  bounds = [(k, k * per_shard, min(n, (k + 1) * per_shard)) for k in range(num_shards)]
  todo = [b for b in bounds if not _complete_shard(out_dir, b[0], ((b[2] - b[1]) * per,) + mshape, np_dtype,
                                                   reader.has_labels)]
  tasks = [(k, s, min(s + batch_size, e)) for k, a, e in todo for s in range(a, e, batch_size)]
  t0 = time.time()
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, initial=n - sum(e - a for _, a, e in todo), desc="encode_latents", unit="img",
               file=sys.stderr, dynamic_ncols=True)
  # The next batch is read while this one is encoded.
  reads = prefetched(lambda task: reader.read(np.arange(task[1], task[2])), tasks)
  open_shards: dict = {}
  try:
    for (k, start, stop), (images, labels) in zip(tasks, reads):
      b = stop - start
      if images.shape != (b, size, size, reader.channels):
        raise EncodeLatentsError(f"the source gave images of shape {images.shape[1:]} for {size}x{size}x"
                                 f"{reader.channels}")
      x = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
      if flip:
        x = np.concatenate([x, x[:, :, ::-1]])
      rows = per * batch_size
      if len(x) < rows:  # one compiled shape: pad the last batch
        x = np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], np.float32)])
      moments = np.asarray(jax.device_get(ae.encode_moments(params, x)))[:per * b]
      if flip:  # [b originals, b mirrors] -> image i at entry 2i, its mirror at 2i + 1
        moments = moments.reshape((2, b) + mshape).swapaxes(0, 1).reshape((2 * b,) + mshape)
      _, a, e = next(t for t in todo if t[0] == k)
      if k not in open_shards:
        tmp = os.path.join(out_dir, _shard_name("moments", k) + ".tmp")
        lab = np.zeros(((e - a) * per,), np.int32) if reader.has_labels else None
        open_shards[k] = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype,
                                                    shape=((e - a) * per,) + mshape), lab, tmp)
      mm, lab, tmp = open_shards[k]
      mm[(start - a) * per:(stop - a) * per] = moments.astype(np_dtype)
      if lab is not None:
        lab[(start - a) * per:(stop - a) * per] = np.repeat(np.asarray(labels, np.int32), per)
      if stop == e:  # shard complete: labels first, then the moments under their final name
        mm.flush()
        del mm
        open_shards.pop(k)
        if lab is not None:
          np.save(os.path.join(out_dir, _shard_name("labels", k)), lab)
        os.replace(tmp, os.path.join(out_dir, _shard_name("moments", k)))
      if bar is not None:
        bar.update(b)
  finally:
    if bar is not None:
      bar.close()
    reads.close()
    reader.close()

  shards = [{"moments": _shard_name("moments", k),
             "labels": _shard_name("labels", k) if reader.has_labels else None,
             "num_examples": (e - a) * per} for k, a, e in bounds]
  if reader.files is not None:
    with open(os.path.join(out_dir, "files.txt"), "w") as fh:
      fh.write("".join(f"{p}\n" for p in reader.files))
  index = {"format": sources.LATENTS_FORMAT, "num_examples": n * per, "num_images": n, "flip": bool(flip),
           "moments_shape": list(mshape), "latent_channels": cfg.embed_dim, "dtype": dtype,
           "scale_factor": ae.SCALE_FACTOR, "labels": reader.has_labels, "num_classes": reader.num_classes,
           "shards": shards, "image_size": size, "channels": reader.channels, "resize": reader.resize,
           "source": reader.source, "autoencoder": settings["autoencoder"], "seconds": time.time() - t0}
  with open(os.path.join(out_dir, sources.LATENTS_INDEX + ".tmp"), "w") as fh:
    json.dump(index, fh, indent=2)
  os.replace(os.path.join(out_dir, sources.LATENTS_INDEX + ".tmp"), os.path.join(out_dir, sources.LATENTS_INDEX))
  os.remove(settings_path)
  return index


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, like every other bad input
    self.exit(2, f"encode_latents: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m deediff_jax.data.encode_latents",
               description="Encode images once into autoencoder moments for latent diffusion training "
                           "(read back with data.source=latents:DIR).")
  ap.add_argument("--config", help="config file (configs/NAME.py): image size, autoencoder, model shape")
  ap.add_argument("--out", help="output directory (default: DIR of the config's data.source=latents:DIR)")
  ap.add_argument("--autoencoder", default="", help="autoencoder_kl.pth or .npz (default: data.autoencoder)")
  ap.add_argument("--source", default="", help="images: folder:PATH | tfds:NAME | npz:PATH | digits "
                  "(default: data.source unless it is latents:)")
  ap.add_argument("--flip", action="store_true", help="also store each mirrored image's moments (own entry)")
  ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per encoder call")
  ap.add_argument("--image-size", type=int, default=0, help="autoencoder input size (default: data.image_size)")
  ap.add_argument("--resize", default="adm", choices=RESIZE_METHODS, help="centre crop + resize method")
  ap.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored moments dtype")
  ap.add_argument("--shard-size", type=int, default=DEFAULT_SHARD, help="entries per .npy shard")
  ap.add_argument("--coco-captions", default="", help="COCO captions_*.json: write captions.txt, one per entry")
  ap.add_argument("--save-autoencoder", default="", help="also write the weights as .npz (no torch needed later)")
  ap.add_argument("--no-progress", action="store_true")
  return ap


def _coerce(key: str, old: Any, text: str):
  if isinstance(old, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise EncodeLatentsError(f"--config.{key} must be true or false, got {text!r}")
  try:
    return type(old)(text) if isinstance(old, (int, float)) else text
  except ValueError:
    raise EncodeLatentsError(f"--config.{key} must be a {type(old).__name__}, got {text!r}") from None


def _load_config(path: str, overrides: Sequence[str]):
  from deediff_jax.config import _flatten, base_config, load_config_file
  schema = _flatten(base_config())
  parsed = {}
  for arg in overrides:
    key, sep, value = arg[len("--config."):].partition("=")
    if not arg.startswith("--config.") or not sep:
      raise EncodeLatentsError(f"unrecognised argument {arg!r}; config overrides look like --config.KEY=VALUE")
    if key not in schema:
      raise EncodeLatentsError(f"unknown config key {key!r} in {arg.split('=')[0]}; see deediff_jax/config.py")
    parsed[key] = _coerce(key, schema[key], value)
  return load_config_file(path, parsed)


def run(args: argparse.Namespace, overrides: Sequence[str] = ()) -> str:
  """Does the work of the CLI; returns the summary line."""
  from deediff_jax.model import autoencoder as ae
  if not args.config:
    if args.save_autoencoder and args.autoencoder and not args.out:  # conversion only
      export_npz(load_autoencoder(args.autoencoder), args.save_autoencoder)
      return f"encode_latents: wrote {args.save_autoencoder}"
    raise EncodeLatentsError("missing --config; pass the latent model's config, e.g. "
                             "--config configs/imagenet256_uvit_large.py")
  config = _load_config(args.config, overrides)
  data = config.data
  if not bool(data.latent):
    raise EncodeLatentsError(f"{args.config} is not a latent model (data.latent=False); use a latent config "
                             "such as configs/imagenet256_uvit_large.py")
  spec = str(data.source)
  latents_dir = spec.partition(":")[2] if spec.startswith("latents:") else ""
  image_source = args.source or ("" if latents_dir else spec)
  if not image_source:
    raise EncodeLatentsError(f"pass the images with --source (folder:PATH, tfds:NAME, npz:PATH or digits); "
                             f"data.source={spec} is where training reads the latents")
  out = args.out or latents_dir
  if not out:
    raise EncodeLatentsError("missing --out DIR (where the moment shards go)")
  ae_path = args.autoencoder or str(data.get("autoencoder", "") or "")
  params = load_autoencoder(ae_path, "--autoencoder" if args.autoencoder else "data.autoencoder")
  if args.save_autoencoder:
    export_npz(params, args.save_autoencoder)
  cfg = ae.config_from_params(params)
  size = int(args.image_size or data.image_size)
  if size % cfg.downsample_factor:
    raise EncodeLatentsError(f"image size {size} is not a multiple of the autoencoder's downsampling "
                             f"factor {cfg.downsample_factor}; pass --image-size")
  h, mc = size // cfg.downsample_factor, config.model
  if (int(mc.image_size), int(mc.in_channels)) != (h, cfg.embed_dim):
    raise EncodeLatentsError(f"this autoencoder turns {size}x{size} images into {h}x{h}x{cfg.embed_dim} "
                             f"latents but the config's model takes {mc.image_size}x{mc.image_size}x"
                             f"{mc.in_channels}; set --image-size or model.image_size/in_channels to match")
  reader = open_images(image_source, size, cfg.in_channels, args.resize)
  captions = None
  if args.coco_captions:
    if reader.files is None:
      raise EncodeLatentsError("--coco-captions needs a folder:PATH source (the COCO train2014 images)")
    captions = coco_captions(args.coco_captions, reader.files)
  index = encode(reader, params, out, flip=args.flip, batch_size=args.batch_size, dtype=args.dtype,
                 shard_size=args.shard_size, progress=not args.no_progress,
                 autoencoder_path=os.path.abspath(ae_path))
  if captions is not None:
    per = 2 if args.flip else 1
    with open(os.path.join(out, "captions.txt"), "w") as fh:
      fh.write("".join(f"{c}\n" for c in captions for _ in range(per)))
  shape = "x".join(str(v) for v in index["moments_shape"])
  return (f"encode_latents: wrote {out}: {index['num_examples']} entries ({index['num_images']} images"
          f"{' and their mirrors' if args.flip else ''}) of {shape} moments ({index['dtype']}) in "
          f"{len(index['shards'])} shard(s), {index['num_classes']} classes, {index['seconds']:.1f} s; "
          f"train with --config.data.source=latents:{out}")


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  try:
    print(run(args, overrides))
  except ValueError as e:  # our one-line errors: EncodeLatentsError, DataError, ConfigError, ...
    ours = isinstance(e, EncodeLatentsError) or type(e).__module__.startswith("deediff_jax.")
    if type(e) is ValueError or not ours:  # (under python -m this module is __main__)
      raise
    print(f"encode_latents: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
