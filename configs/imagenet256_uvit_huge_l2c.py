"""U-ViT-H/2 (configs/imagenet256_uvit_huge.py) with Learning-to-Cache's official router.

horseee/learning-to-cache ships U-ViT/ckpt/dpm20_router.pth and dpm50_router.pth: one router row
of 2 x 29 scores per network evaluation, for DPM-Solver-2S at 20 and 50 NFE, used at threshold
0.9 (FID 2.58 at 20 NFE and 2.36 at 50 NFE with caching, 2.57 and 2.37 without). The router file
must match sample.steps (a one-line error otherwise):

  python -m deediff_jax.main --config configs/imagenet256_uvit_huge_l2c.py --workdir /tmp/uvit_h \\
      --mode sample --config.cache.router=ckpt/dpm20_router.pth
  # 50 NFE: --config.sample.steps=50 --config.cache.router=ckpt/dpm50_router.pth

Reading an official .pth needs PyTorch (torch.load(weights_only=True): tensors only);
`python -m deediff_jax.convert.l2c ROUTER.pth OUT.npz --sampler dpm_solver_2s --steps 20` writes our
flat npz, which samples without PyTorch. docs/caching.md.
"""
import os

from deediff_jax.config import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_uvit_huge.py"))
  c.sample.steps = 20
  c.cache.update(policy="l2c", router="ckpt/dpm20_router.pth", threshold=0.9)
  return c
