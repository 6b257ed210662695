"""Learning-to-Cache routers: the official files and ours (the logic lives in deediff_jax/caching.py).

  load_router(path)                               -> float32 [num_routers, 2 * num_blocks] scores
  reuse_schedule(scores, threshold, solver_steps) -> bool [solver_steps, num_blocks, 2]

`load_router` reads the official `ModuleList` state dict (`{k}.prob`, e.g. U-ViT/ckpt/dpm20_router.pth:
20 rows of 58 logits for U-ViT-H/2) through `torch.load(weights_only=True)` (tensors only, never
code), or our flat npz (`caching.save_router`, what train.mode=router writes), which needs no
torch. `reuse_schedule` is the official `load_ranking`: row k >= 1 of a DPM-Solver-2S router
reuses a sublayer where its score <= threshold (row 0 never reuses).

  python -m deediff_jax.convert.l2c dpm20_router.pth dpm20_router.npz --sampler dpm_solver_2s --steps 20

writes our npz (recording the sampler and step count, which the official file does not), so that
sampling with the router needs no PyTorch.
"""
from __future__ import annotations

import argparse

from deediff_jax.caching import (CacheError, RouterFile, load_router, read_router, reuse_schedule,  # noqa: F401
                                 save_router)

__all__ = ["CacheError", "RouterFile", "load_router", "read_router", "reuse_schedule", "save_router", "main"]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description="official Learning-to-Cache router .pth -> our flat npz")
  ap.add_argument("src")
  ap.add_argument("out")
  ap.add_argument("--sampler", default="dpm_solver_2s", choices=["dpm_solver_2s", "ddim"])
  ap.add_argument("--steps", type=int, default=0, help="sampler steps (NFE); default: the router's row count")
  args = ap.parse_args(argv)
  r = read_router(args.src)
  steps = args.steps or r.scores.shape[0]
  save_router(args.out, r.prob, sampler=args.sampler, steps=steps, num_blocks=r.scores.shape[1] // 2)
  print(f"{args.out}: {r.scores.shape[0]} routers x {r.scores.shape[1]} scores, {args.sampler}, {steps} steps")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
