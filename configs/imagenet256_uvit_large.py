"""ImageNet 256 U-ViT-L/2 on 4x32x32 autoencoder latents, discrete "stable" schedule, CFG (FID 3.40 published).

The data are autoencoder moments encoded once (docs/latent.md):
  python -m deediff_jax.data.encode_latents --config configs/imagenet256_uvit_large.py \
      --source folder:imagenet/train --autoencoder assets/stable-diffusion/autoencoder_kl.pth --flip \
      --out imagenet256_latents
  python -m deediff_jax.main --config configs/imagenet256_uvit_large.py --workdir gs://BUCKET/in256 \
      --config.data.autoencoder=assets/stable-diffusion/autoencoder_kl.pth
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source="latents:imagenet256_latents", image_size=256, channels=3, flip=False, latent=True)
  c.model.update(image_size=32, in_channels=4, embed_dim=1024, depth=20, num_heads=16, patch_size=2,
                 num_classes=1000, mlp_time_embed=False, qkv_bias=False)
  c.diffusion.schedule = "stable"
  c.train.update(num_steps=300000, batch_size=1024, lr=2e-4, weight_decay=0.03, warmup_steps=5000,
                 ema_rate=0.9999, lr_schedule="constant", checkpoint_every=10000, log_every=100)
  c.mesh.fsdp = 8
  c.sample.update(sampler="dpm_solver_fast", steps=50, num_images=64, batch_size=64, guidance_scale=0.4)
  c.sweep.fid_kind = "inception"
  return c
