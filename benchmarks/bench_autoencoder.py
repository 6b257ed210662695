"""How fast is the KL-f8 first stage on this machine? Encode and decode throughput at 256x256.

  python benchmarks/bench_autoencoder.py --json benchmarks/results/bench_autoencoder_cpu.json
  python benchmarks/bench_autoencoder.py --small          # seconds; what the smoke test runs

The real-size autoencoder (ch 128, ch_mult 1,2,4,4, two ResNet blocks per level: SD's KL-f8 as
U-ViT uses it) with random weights, so the numbers say nothing about reconstruction quality,
only about time. The input is real-looking: sklearn digits upsampled to 256x256, 3 channels, in
[-1, 1]. Each function is compiled (and run once) before timing; the reported time is the
median of `--repeats` calls, images/s = batch / median seconds. On a shared CPU the wall clock
is noisy, so the minimum and the process CPU time are recorded too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deediff_jax.model import autoencoder as ae  # noqa: E402

SMALL = ae.AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def digit_images(n: int, size: int) -> np.ndarray:
  """n sklearn digits (8x8, 0..16), nearest-upsampled to size x size, grey in 3 channels, [-1, 1]."""
  from sklearn.datasets import load_digits
  digits = load_digits().images[:n].astype(np.float32) / 16.0
  reps = -(-size // 8)  # ceil: 256 is 32x; other sizes are cropped back down
  img = np.repeat(np.repeat(digits, reps, axis=1), reps, axis=2)[:, :size, :size]
  return np.repeat(img[..., None] * 2.0 - 1.0, 3, axis=-1)


def time_calls(fn, arg, repeats: int) -> dict:
  """First call (compile + run), then `repeats` timed calls."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(arg))
  first = time.perf_counter() - t0
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(arg))
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return dict(out=out, first_call_seconds=first, seconds=wall, seconds_median=statistics.median(wall),
              seconds_min=min(wall), cpu_seconds_median=statistics.median(cpu))


def run(cfg: ae.AutoencoderConfig, image_size: int, batch: int, repeats: int, seed: int = 0) -> dict:
  params = ae.init_params(cfg, seed)
  images = digit_images(batch, image_size)
  enc = time_calls(lambda x: ae.encode_moments(params, x), images, repeats)
  z = ae.sample_latent(enc.pop("out"), jax.random.PRNGKey(seed))
  dec = time_calls(lambda z: ae.decode(params, z), z, repeats)
  out = np.asarray(dec.pop("out"))
  for r in (enc, dec):
    r["images_per_second"] = batch / r["seconds_median"]
  return dict(
      config=dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                  z_channels=cfg.z_channels, embed_dim=cfg.embed_dim),
      num_params=int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(params))),
      image_size=image_size, batch=batch, repeats=repeats,
      latent_shape=list(z.shape), output_shape=list(out.shape), output_finite=bool(np.isfinite(out).all()),
      encode=enc, decode=dec,
      device=str(jax.devices()[0]), backend=jax.default_backend(), cpu_count=os.cpu_count(),
      machine=platform.machine(), jax_version=jax.__version__,
      note="random weights: timing only; wall clock on a shared machine")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--small", action="store_true", help="ch 32, ch_mult (1, 2), 1 block, 16x16, batch 2, 1 repeat")
  p.add_argument("--json", help="write the result here")
  args = p.parse_args(argv)
  if args.small:
    cfg, size, batch, repeats = SMALL, 16, 2, 1
  else:
    cfg, size, batch, repeats = ae.KL_F8, args.image_size, args.batch, args.repeats
  result = run(cfg, size, batch, repeats)
  for name in ("encode", "decode"):
    r = result[name]
    print(f"{name}: {r['images_per_second']:.3f} images/s at {size}x{size} (batch {batch}, median "
          f"{r['seconds_median']:.2f} s, min {r['seconds_min']:.2f} s, first call {r['first_call_seconds']:.1f} s)")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
