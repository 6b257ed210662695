"""ImageNet 256 U-ViT-L/2 on 4x32x32 latents, the official AdaDiff setting (Tangshengku/AdaDiff
eval_imagenet.sh): threshold 0.92.

configs/imagenet256_uvit_large.py (class-conditional, CFG scale 0.4, DPM-Solver 50 steps) with
AdaDiff's exits: model.exit_style=adadiff (every block decodes with the backbone's shared head; one
confidence module per block) and exit.policy=adadiff, exit.aggregate=mean, exit.threshold=0.92.

Time: the official AdaDiff ImageNet model is sampled by eval_ldm.py, a continuous-time VPSDE (beta
0.1 -> 20, network time input 999 t; U-ViT trained its L/2 model with train_ldm.py), so this config
sets diffusion.schedule=vpsde where configs/imagenet256_uvit_large.py has the discrete "stable" one.

Sample from converted official AdaDiff weights (the nnet_ema.pth of an AdaDiff run: a U-ViT plus its
`lte_classifer.*` confidence modules; the data source must yield latents, see the base config):
  python -m deediff_jax.convert.uvit --torch nnet_ema.pth --config configs/imagenet256_adadiff.py --out DIR
  python -m deediff_jax.main --config configs/imagenet256_adadiff.py --workdir DIR --mode sample
  python -m deediff_jax.main --config configs/imagenet256_adadiff.py --workdir DIR --mode sweep  # thresholds

The rule (exit.policy=adadiff): after each block the confidence map is averaged and the batch exits
when the mean exceeds the threshold; among the in-blocks the first confident block only arms a
patience flag and the next confident one exits. exit.aggregate=mean is the official rule for a batch
(one mean over the batch and all pixels); with guidance the official code makes two network calls
(conditional, null) that exit independently, and here each half of the [cond; null] batch decides on
its own mean. The official evaluation sampled one image per network call (mini_batch_size=1), where
that mean is each image's own.
"""
import os

from deediff_jax.config import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet256_uvit_large.py"))
  c.model.exit_style = "adadiff"
  c.diffusion.schedule = "vpsde"
  c.exit.update(policy="adadiff", aggregate="mean", threshold=0.92)
  return c
