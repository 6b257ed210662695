"""The headline model: a 13-block class-conditional DeeDiff U-ViT on MNIST pooled to 14x14.

13 blocks (model.depth=12, the U-ViT-S depth the paper uses), width 128, patch 2 (49 patch tokens),
cosine schedule. MNIST's 28x28 digits are shrunk by a 2x2 mean (rounded half up) in both data paths,
so both give the same input:

  # with internet (TFDS prepares MNIST once: `tfds build mnist --file_format=array_record`)
  python -m deediff_jax.main --config configs/mnist13.py --workdir /tmp/mnist13
  # offline, from an npz of 28x28 MNIST (image/label, test_image/test_label uint8 arrays)
  python -m deediff_jax.main --config configs/mnist13.py --workdir /tmp/mnist13 \\
      --config.data.source=npz:PATH/TO/mnist.npz

Training is joint (backbone, heads and UEMs together, the paper's recipe); the study then retrains
the UEMs alone on the fidelity target (benchmarks/mnist13_study.sh). About 1.15 s per step on an idle
2-core CPU at batch 64 (about 2 s with a test suite beside it): 3,000 steps in about an hour.

The committed model, benchmarks/models/mnist13/params.npz (float16), is this config's 3,000 steps
in one run (`bash benchmarks/mnist13_study.sh joint`) with its UEMs then retrained for 250 steps on
the fidelity target (`... uem`); every number in benchmarks/results/mnist13/ is measured from it.
The sample settings below are the study's.
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.source = "tfds:mnist"
  c.data.image_size = 14
  c.data.channels = 1
  c.model.update(image_size=14, in_channels=1, embed_dim=128, depth=12, num_heads=4, patch_size=2,
                 num_classes=10, input_skip=True)
  c.diffusion.schedule = "cosine"
  c.train.update(num_steps=3000, batch_size=64, lr=2e-3, warmup_steps=200, ema_rate=0.999,
                 checkpoint_every=250, keep_checkpoints=3, log_every=50, sample_at_end=False)
  c.sample.update(sampler="ddim", steps=25, num_images=100, batch_size=100, guidance_scale=2.0)
  c.sweep.num_images = 1000
  return c
