"""ImageNet 256 U-ViT-H/2 on 4x32x32 autoencoder latents (FID 2.29 published with DPM-Solver, 50 steps).

The official U-ViT-H/2 (baofff/U-ViT configs/imagenet256_uvit_huge.py): D 1152, depth 28 (29
blocks), 16 heads, patch 2, no time MLP, no qkv bias, 1001 class rows (ours: 1000 + the null
row), trained with conv=False (no final 3x3 conv). Learning-to-Cache samples it with DPM-Solver++
singlestep order 2 and guidance 0.4. Convert the official weights (the missing final conv becomes
an exact identity conv):

  python -m deediff_jax.convert.uvit --torch imagenet256_uvit_huge.pth \\
      --config configs/imagenet256_uvit_huge.py --out /tmp/uvit_h --no_final_conv
  python -m deediff_jax.main --config configs/imagenet256_uvit_huge.py --workdir /tmp/uvit_h --mode sample \\
      --config.data.autoencoder=assets/stable-diffusion/autoencoder_kl_ema.pth

configs/imagenet256_uvit_huge_l2c.py adds the official routers (docs/caching.md).
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source="latents:imagenet256_latents", image_size=256, channels=3, flip=False, latent=True)
  c.model.update(image_size=32, in_channels=4, embed_dim=1152, depth=28, num_heads=16, patch_size=2,
                 num_classes=1000, mlp_time_embed=False, qkv_bias=False)
  c.diffusion.schedule = "stable"
  c.train.update(num_steps=500000, batch_size=1024, lr=2e-4, weight_decay=0.03, warmup_steps=5000,
                 ema_rate=0.9999, lr_schedule="constant", checkpoint_every=10000, log_every=100)
  c.mesh.fsdp = 8
  c.exit.policy = "none"      # the official weights have no exit heads or UEMs
  c.sample.update(sampler="dpm_solver_2s", steps=50, num_images=64, batch_size=50, guidance_scale=0.4)
  c.sweep.fid_kind = "inception"
  return c
