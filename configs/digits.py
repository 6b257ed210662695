"""Tiny class-conditional DeeDiff U-ViT on scikit-learn's bundled 8x8 digits (the embedded default).

A few minutes on a 2-core CPU (README, "Quickstart"): 5 blocks of width 96, 2,000 steps,
sampled with guidance scale 2. 2,000 steps, not 1,000: at 1,000 the full-depth samples were the
requested digit 84.6% of the time by the dataset classifier (500 images; 91.4% at guidance 4),
at 2,000 99.2% (benchmarks/results/digits/).
  python -m deediff_jax.main --config configs/digits.py --workdir /tmp/deediff_digits
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "digits"
  c.data.image_size = 8
  c.data.channels = 1
  c.model.update(image_size=8, in_channels=1, embed_dim=96, depth=4, num_heads=4, patch_size=2,
                 num_classes=10)
  c.diffusion.schedule = "linear"
  c.train.update(num_steps=2000, batch_size=64, lr=3e-3, warmup_steps=100, ema_rate=0.999,
                 checkpoint_every=500, log_every=50)
  c.sample.update(sampler="ddim", steps=50, num_images=100, batch_size=100, guidance_scale=2.0)
  c.sweep.num_images = 200
  return c
