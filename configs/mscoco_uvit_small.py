"""MS-COCO 256 text-to-image U-ViT-S/2 on 4x32x32 latents with 77 CLIP ViT-L/14 tokens (FID 5.95 published).

Encode the train2014 images once into autoencoder moments with deediff_jax.data.encode_latents
(data.source=latents:DIR) and their captions into CLIP token features with
deediff_jax.data.encode_text (docs/latent.md).
  python -m deediff_jax.main --config configs/mscoco_uvit_small.py --workdir gs://BUCKET/coco
"""
from deediff_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source="latents:mscoco256_latents", image_size=256, channels=3, flip=False, latent=True,
                context_file="mscoco_clip_features.npz")
  c.model.update(image_size=32, in_channels=4, embed_dim=512, depth=12, num_heads=8, patch_size=2,
                 num_classes=0, context_dim=768, context_len=77, mlp_time_embed=False, qkv_bias=False)
  c.diffusion.schedule = "stable"
  c.train.update(num_steps=1000000, batch_size=256, lr=2e-4, weight_decay=0.03, warmup_steps=5000,
                 ema_rate=0.9999, lr_schedule="constant", checkpoint_every=10000, log_every=100)
  c.sample.update(sampler="dpm_solver_fast", steps=50, num_images=64, batch_size=64, guidance_scale=1.0)
  c.sweep.fid_kind = "inception"
  return c
