"""Class-conditional DeeDiff U-ViT on MNIST 28x28.

Here (no internet) it reads the 10k-image MNIST subset shipped in ../shared:
  python -m deediff_jax.main --config configs/mnist.py --workdir /tmp/deediff_mnist
Users with TFDS: add --config.data.source=tfds:mnist
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "npz:../shared/data/mnist10k.npz"
  c.data.image_size = 28
  c.data.channels = 1
  c.model.update(image_size=28, in_channels=1, embed_dim=192, depth=8, num_heads=6, patch_size=4,
                 num_classes=10)
  c.diffusion.schedule = "linear"
  c.train.update(num_steps=20000, batch_size=128, lr=5e-4, warmup_steps=500, ema_rate=0.9995,
                 checkpoint_every=1000, log_every=100)
  c.sample.update(sampler="ddim", steps=50, num_images=100, batch_size=100, guidance_scale=1.0)
  c.sweep.num_images = 500
  return c
