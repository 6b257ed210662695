"""Text-conditional DeeDiff U-ViT on MNIST: captions -> all-MiniLM-L6-v2 token features -> context tokens.

Captions are written from the labels of an npz of MNIST (`image`/`label`, optionally
`test_image`/`test_label`, uint8), one per training example in the npz's order, so the images
that training reads must be those arrays in that order. With internet the data source is TFDS
`mnist`; write its arrays to an npz once (docs/text.md has the four lines), then:

  python -m deediff_jax.data.encode_text --captions-for-npz mnist.npz --out /tmp/mnist_captions.npz
  python -m deediff_jax.main --config configs/mnist_text.py --workdir /tmp/deediff_mnist_text \\
      --config.data.context_file=/tmp/mnist_captions.npz

Offline, with an npz of MNIST: the same two commands, the second with
`--config.data.source=npz:PATH/TO/mnist.npz` (the npz the captions were written from).
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds:mnist"   # offline: --config.data.source=npz:PATH
  c.data.image_size = 28
  c.data.channels = 1
  c.model.update(image_size=28, in_channels=1, embed_dim=192, depth=8, num_heads=6, patch_size=4,
                 num_classes=0, context_dim=384, context_len=16)
  c.diffusion.schedule = "linear"
  c.train.update(num_steps=20000, batch_size=128, lr=5e-4, warmup_steps=500, ema_rate=0.9995,
                 checkpoint_every=1000, log_every=100)
  c.sample.update(sampler="ddim", steps=50, num_images=100, batch_size=100, guidance_scale=1.0)
  return c
