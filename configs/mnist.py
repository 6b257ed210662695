"""Class-conditional DeeDiff U-ViT on MNIST 28x28, read through TFDS.

With internet (TFDS prepares MNIST once: `tfds build mnist --file_format=array_record`):
  python -m deediff_jax.main --config configs/mnist.py --workdir /tmp/deediff_mnist
Offline, from an npz of 28x28 MNIST (`image`/`label`, optionally `test_image`/`test_label`, uint8):
  python -m deediff_jax.main --config configs/mnist.py --workdir /tmp/deediff_mnist \\
      --config.data.source=npz:PATH/TO/mnist.npz
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds:mnist"   # offline: --config.data.source=npz:PATH
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
