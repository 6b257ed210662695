"""Latent models: samples are autoencoder latents; this turns them (and the real data) into images.

`--mode sample` and `--mode sweep`/`eval` call `decoder_for(config)`: for a config with
`data.latent=True` and `data.autoencoder` set it returns `decode(latents) -> images`, the
autoencoder's decoder applied in fixed-size batches (it compiles once) and clipped to [-1, 1],
so samples.npz/samples.png, PSNR vs full depth, FID and the grids are all about images. For
every other config it returns None and the callers keep the network's output as it is.

The FID reference of a latent model is the images its latents were encoded from:
`real_pixels(config, ...)` reads the source, size and resize method recorded in the latents
directory's index.json (data/encode_latents.py) and preprocesses a seeded subset exactly as
the encoder saw it.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

DECODE_BATCH = 32   # images per decoder call (KL-f8 at 256 px: ~1 GB of activations per 8 images)


class DecodeError(ValueError):
  """A latent config whose samples cannot be decoded or whose real images cannot be read (one line)."""


def wants_decode(config) -> bool:
  return bool(config.data.get("latent", False)) and bool(str(config.data.get("autoencoder", "") or ""))


def decoder_for(config) -> Optional[Callable[[np.ndarray], np.ndarray]]:
  """latents [n, h, w, c] -> images [n, f*h, f*w, 3] float32 in [-1, 1]; None for pixel models or
  latent models without data.autoencoder."""
  if not wants_decode(config):
    return None
  from deediff_jax.model.autoencoder import load_autoencoder
  from deediff_jax.model import autoencoder as ae
  params = load_autoencoder(str(config.data.autoencoder), "data.autoencoder")
  cfg = ae.config_from_params(params)
  if cfg.embed_dim != int(config.model.in_channels):
    raise DecodeError(f"data.autoencoder {config.data.autoencoder} decodes {cfg.embed_dim}-channel latents but "
                      f"the model samples {config.model.in_channels} channels; use the autoencoder the latents "
                      "were encoded with")

  def decode(latents: np.ndarray) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    images = ae.decode_batched(params, latents, batch_size=max(1, min(DECODE_BATCH, len(latents))))
    return np.clip(images, -1.0, 1.0).astype(np.float32)

  return decode


def latents_index(config) -> dict:
  """The index.json of data.source=latents:DIR."""
  spec = str(config.data.source)
  if not spec.startswith("latents:"):
    raise DecodeError(f"FID of a latent model compares with the images its latents were encoded from, which "
                      f"only a latents:DIR source records (data.source={spec}); use --config.sweep.fid_kind=none")
  from deediff_jax.data.sources import LATENTS_INDEX
  path = os.path.join(os.path.abspath(os.path.expanduser(spec.partition(":")[2])), LATENTS_INDEX)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DecodeError(f"cannot read {path} ({type(e).__name__}: {e}); encode the latents with python -m "
                      "deediff_jax.data.encode_latents") from None


def real_pixels(config, split: str = "train", max_images: int = 10000):
  """(images float32 [-1, 1] [n, S, S, C], labels or None, num_classes) of the images a latents:DIR
  source was encoded from (a seeded subset of at most max_images, no mirrors), or None for a split
  other than train (the latents have only one)."""
  if split != "train":
    return None
  index = latents_index(config)
  from deediff_jax.data.encode_latents import open_images
  from deediff_jax.data.sources import DataError
  try:
    reader = open_images(index["source"], int(index["image_size"]), int(index.get("channels", 3)),
                         str(index.get("resize", "adm")))
  except DataError as e:
    raise DecodeError(f"FID compares with the real images the latents were encoded from ({index['source']}), "
                      f"which cannot be read here ({e}); make them available or use "
                      "--config.sweep.fid_kind=none") from None
  try:
    n = reader.num_examples
    idx = (np.arange(n) if n <= max_images
           else np.sort(np.random.default_rng(0).permutation(n)[:max_images]))
    images, labels = reader.read(idx)
  finally:
    reader.close()
  images = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images, labels, int(reader.num_classes)
