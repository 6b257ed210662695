"""Are the samples whole digits? Ink components per image, against real data.

A handwritten digit is one or two strokes; a sample whose strokes break into pieces is legible to a
classifier long before it looks like a digit to a person. This counts the 4-connected components
of the ink (pixels above `--threshold` of the way from black to white) per image and compares the
samples with real test images at the same size:

  python benchmarks/stroke_components.py runs/mnist13_look/samples.npz \
      --real npz:../shared/data/mnist10k.npz --size 14

Prints one line per file (and for the real images): mean components per image, the share of
images with more than 2, and the mean ink per image. `samples.npz` is what `--mode sample`
writes (`images` in [-1, 1], NHWC). Real images come from the npz's `test_image` (uint8), shrunk
by the same k x k mean the data pipeline uses.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def components_per_image(images01: np.ndarray, threshold: float = 0.35) -> np.ndarray:
  """[N] number of 4-connected ink components of each [N, H, W] image in [0, 1]."""
  from scipy import ndimage
  cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
  return np.array([ndimage.label(im > threshold, structure=cross)[1] for im in images01])


def summary(images01: np.ndarray, threshold: float = 0.35) -> dict:
  comps = components_per_image(images01, threshold)
  return {"images": int(len(comps)), "components_mean": float(comps.mean()),
          "share_over_2": float(np.mean(comps > 2)),
          "ink_mean": float(np.mean((images01 > threshold).sum(axis=(1, 2))))}


def load_samples(path: str) -> np.ndarray:
  with np.load(path) as f:
    x = np.asarray(f["images"], np.float32)
  if x.ndim == 4:
    x = x[..., 0] if x.shape[-1] == 1 else x.mean(axis=-1)
  return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def load_real(source: str, size: int, limit: int) -> np.ndarray:
  from deediff_jax.data.sources import mean_pool, pool_factor
  path = source[len("npz:"):] if source.startswith("npz:") else source
  with np.load(path) as f:
    x = np.asarray(f["test_image"][:limit])
  if x.ndim == 4:
    x = x[..., 0]
  k = pool_factor(x.shape[1], x.shape[2], size)
  if k > 1:
    x = np.asarray(mean_pool(x[..., None], k))[..., 0]
  return x.astype(np.float32) / 255.0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("samples", nargs="*", help="samples.npz files written by --mode sample")
  p.add_argument("--real", default="", help="npz:PATH of uint8 test_image to compare with")
  p.add_argument("--size", type=int, default=14, help="the real images are shrunk to this size")
  p.add_argument("--real-images", type=int, default=1000)
  p.add_argument("--threshold", type=float, default=0.35)
  args = p.parse_args(argv)
  rows = []
  if args.real:
    rows.append(("real " + args.real, load_real(args.real, args.size, args.real_images)))
  rows += [(path, load_samples(path)) for path in args.samples]
  if not rows:
    p.error("give samples.npz files and/or --real npz:PATH")
  for name, images in rows:
    s = summary(images, args.threshold)
    print(f"{name}: {s['components_mean']:.2f} ink components per image, {s['share_over_2']:.0%} with more "
          f"than 2, {s['ink_mean']:.1f} ink pixels ({s['images']} images)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
