"""CelebA 64x64 U-ViT-S/4, the official AdaDiff setting (Tangshengku/AdaDiff eval_celeba.sh): threshold 0.95.

configs/celeba64_uvit_small.py (unconditional, continuous VPSDE with time input 999 t, Euler-Maruyama
1000 steps) with AdaDiff's exits: model.exit_style=adadiff (every block decodes with the backbone's
shared head; one confidence module per block) and exit.policy=adadiff, exit.aggregate=mean,
exit.threshold=0.95.

Sample from converted official AdaDiff weights (the nnet_ema.pth of an AdaDiff run: a U-ViT plus its
`lte_classifer.*` confidence modules):
  python -m deediff_jax.convert.uvit --torch nnet_ema.pth --config configs/celeba64_adadiff.py --out DIR
  python -m deediff_jax.main --config configs/celeba64_adadiff.py --workdir DIR --mode sample
  python -m deediff_jax.main --config configs/celeba64_adadiff.py --workdir DIR --mode sweep  # thresholds

The rule (exit.policy=adadiff): after each block the confidence map is averaged and the batch exits
when the mean exceeds the threshold; among the in-blocks the first confident block only arms a
patience flag and the next confident one exits. exit.aggregate=mean is the official rule for a batch
(one mean over the batch and all pixels). The official evaluation sampled one image per network call
(mini_batch_size=1), where that mean is each image's own; --config.exit.aggregate=all decides per
image as it did (the batch then runs to its deepest exit).
"""
import os

from deediff_jax.config import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celeba64_uvit_small.py"))
  c.model.exit_style = "adadiff"
  c.exit.update(policy="adadiff", aggregate="mean", threshold=0.95)
  return c
