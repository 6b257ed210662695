"""The real images that FID and the classifier compare with: a split of `config.data` as images in
[-1, 1] (for latent models, the images the latents were encoded from). It reads the ConfigDict's
data section, so the modes bind it at their edge (`eval/specs.quality_spec`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

MAX_REAL_IMAGES = 10000     # real images for the classifier and the FID statistics (seeded subset)


@dataclasses.dataclass
class RealData:
  images: np.ndarray               # float32 [-1, 1]
  labels: Optional[np.ndarray]
  num_classes: int
  source: str
  split: str


def real_images(config, split: str = "train", max_images: int = MAX_REAL_IMAGES) -> Optional[RealData]:
  """Real images of config.data's `split` scaled to [-1, 1] (at most `max_images`, a seeded
  subset), or None when that split does not exist (only for split != 'train')."""
  if bool(config.data.latent):  # the images the latents were encoded from (eval/decode.py)
    from deediff_jax.eval.decode import real_pixels
    got = real_pixels(config, split, max_images)
    return None if got is None else RealData(*got, source=str(config.data.source), split=split)
  from deediff_jax.data.sources import DataError, load_source
  dc = config.data.copy_and_resolve_references()
  dc.split = split
  dc.context_file = ""        # captions are not needed for images
  try:
    src = load_source(dc)
  except DataError:
    if split == "train":
      raise
    return None
  n = src.num_examples
  idx = (np.arange(n) if n <= max_images
         else np.sort(np.random.default_rng(0).permutation(n)[:max_images]))
  batch = src.get(idx)
  images = batch["image"].astype(np.float32) / 127.5 - 1.0
  return RealData(images=images, labels=batch.get("label"), num_classes=int(src.num_classes),
                  source=str(config.data.source), split=split)


__all__ = ["MAX_REAL_IMAGES", "RealData", "real_images"]
