"""Which UEM recipe wins on held-out noise: the calibrated row of several one-policy sweeps.

  python benchmarks/compare_recipes.py benchmarks/results/digits/recipes_*.json

Each argument is a sweep.json whose per-image PSNRs sit beside it (NAME.json -> NAME.npz, as
digits_study.sh copies them; or sweep.json -> per_image_psnr.npz). Every sweep must be made from
the same held-out noise (same sample.seed, num_images, batch size), so that rows pair image by
image. For each file the calibrated row (calibrated to the same layer ratio on calibration noise)
and every fixed threshold are listed; the calibrated rows are compared with the first file's by a
paired bootstrap 95% interval (deediff_jax.eval.bootstrap). Markdown to stdout.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from deediff_jax.eval.bootstrap import paired_diff_ci
from deediff_jax.eval.heldout import read_per_image_psnr


def _per_image(path: str) -> dict:
  stem = os.path.splitext(path)[0]
  candidates = [stem + ".npz", os.path.join(os.path.dirname(path), "per_image_psnr.npz")]
  for c in candidates:
    if os.path.exists(c):
      with np.load(c, allow_pickle=False) as z:
        settings = [str(s) for s in z["setting"]]
      return {settings[i]: v for i, v in read_per_image_psnr(c).items()}
  raise SystemExit(f"error: no per-image PSNRs beside {path} (looked for {', '.join(candidates)})")


def _calibrated(rows: list) -> dict:
  rows = [r for r in rows if r.get("calibrated") and not r.get("threshold_schedule")]
  if not rows:
    raise SystemExit("error: a sweep has no calibrated row; run it with exit.target_layer_ratio > 0")
  return rows[0]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("sweeps", nargs="+")
  args = ap.parse_args(argv)
  runs = []
  for path in args.sweeps:
    rows = json.load(open(path))
    runs.append((os.path.splitext(os.path.basename(path))[0], rows, _per_image(path)))
  base_name, base_rows, base_psnr = runs[0]
  base = _calibrated(base_rows)
  print(f"# UEM recipes on held-out noise ({base['num_images']} images, {base['sampler']} "
        f"{base['steps']} steps, guidance {base['guidance_scale']:g})\n")
  print("Calibrated rows: each threshold calibrated on calibration noise to the same layer ratio; "
        f"difference = paired bootstrap 95% interval against `{base_name}`.\n")
  print("| recipe | aggregate | threshold | layers run | GFLOPs ratio | PSNR vs full (dB) | diff (dB) [95% CI] | FID | class acc. |")
  print("|---|---|---:|---:|---:|---:|---|---:|---:|")
  for name, rows, psnr in runs:
    r = _calibrated(rows)
    if name == base_name:
      diff = "—"
    else:
      d, lo, hi = paired_diff_ci(psnr[r["setting"]], base_psnr[base["setting"]])
      diff = f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    fid = "—" if r.get("fid") is None else f"{r['fid']:.2f}"
    acc = "—" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}"
    print(f"| {name} | {r['aggregate']} | {r['threshold']:.4g} | {r['layer_ratio_run']:.3f} | "
          f"{r['gflops_ratio']:.3f} | {r['psnr_vs_full']:.2f} | {diff} | {fid} | {acc} |")
  print("\nEvery row (fixed thresholds too):\n")
  print("| recipe | setting | layers run | GFLOPs ratio | PSNR vs full (dB) |")
  print("|---|---|---:|---:|---:|")
  for name, rows, _ in runs:
    for r in rows:
      print(f"| {name} | {r['setting']} | {r['layer_ratio_run']:.3f} | {r['gflops_ratio']:.3f} | "
            f"{r['psnr_vs_full']:.2f} |")


if __name__ == "__main__":
  main()
