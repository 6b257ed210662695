"""CIFAR-10 U-ViT-S/2 (44M), the published config: continuous VPSDE (beta 0.1 -> 20), time input t*999.

Not trainable on a CPU; on a TPU pod see launch/README.md (python launch/tpu_vm.py run ...). FID 3.11 published (Euler-Maruyama, 1000 steps).
  python -m deediff_jax.main --config configs/cifar10_uvit_small.py --workdir gs://BUCKET/cifar10
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source="tfds:cifar10", image_size=32, channels=3, flip=True)
  c.model.update(image_size=32, in_channels=3, embed_dim=512, depth=12, num_heads=8, patch_size=2,
                 num_classes=0, mlp_time_embed=False, qkv_bias=False)
  c.diffusion.schedule = "vpsde"
  c.train.update(num_steps=500000, batch_size=128, lr=2e-4, weight_decay=0.03, warmup_steps=2500,
                 ema_rate=0.9999, lr_schedule="constant", checkpoint_every=10000, log_every=100)
  c.sample.update(sampler="euler_maruyama", steps=1000, num_images=64, batch_size=64, guidance_scale=0.0)
  c.sweep.fid_kind = "inception"
  return c
