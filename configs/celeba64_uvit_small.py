"""CelebA 64x64 U-ViT-S/4, the published config: continuous VPSDE, time input t*999 (FID 2.87 published).

  python -m deediff_jax.main --config configs/celeba64_uvit_small.py --workdir gs://BUCKET/celeba
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source="tfds:celeb_a", image_size=64, channels=3, flip=True)
  c.model.update(image_size=64, in_channels=3, embed_dim=512, depth=12, num_heads=8, patch_size=4,
                 num_classes=0, mlp_time_embed=False, qkv_bias=False)
  c.diffusion.schedule = "vpsde"
  c.train.update(num_steps=500000, batch_size=128, lr=2e-4, weight_decay=0.03, warmup_steps=4000,
                 ema_rate=0.9999, lr_schedule="constant", checkpoint_every=10000, log_every=100)
  c.sample.update(sampler="euler_maruyama", steps=1000, num_images=64, batch_size=64, guidance_scale=0.0)
  c.sweep.fid_kind = "inception"
  return c
