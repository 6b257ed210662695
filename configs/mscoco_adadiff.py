"""MS-COCO 256 text-to-image U-ViT-S/2 (77 CLIP tokens), the official AdaDiff setting
(Tangshengku/AdaDiff eval_coco.sh): threshold 0.87.

configs/mscoco_uvit_small.py (discrete "stable" schedule, CFG scale 1.0, DPM-Solver 50 steps) with
AdaDiff's exits: model.exit_style=adadiff (every block decodes with the backbone's shared head; one
confidence module per block) and exit.policy=adadiff, exit.aggregate=mean, exit.threshold=0.87.

Sample from converted official AdaDiff weights (the nnet_ema.pth of an AdaDiff run: a U-ViT plus its
`lte_classifer.*` confidence modules; latents and caption features as for the base config):
  python -m deediff_jax.convert.uvit --torch nnet_ema.pth --config configs/mscoco_adadiff.py --out DIR
  python -m deediff_jax.main --config configs/mscoco_adadiff.py --workdir DIR --mode sample
  python -m deediff_jax.main --config configs/mscoco_adadiff.py --workdir DIR --mode sweep  # thresholds

The rule (exit.policy=adadiff): after each block the confidence map is averaged and the batch exits
when the mean exceeds the threshold; the mid- and out-blocks exit at once. exit.aggregate=mean is the
official rule for a batch (one mean over the batch and all pixels); with guidance the official code
makes two network calls (conditional, null) that exit independently, and here each half of the
[cond; null] batch decides on its own mean. The official evaluation sampled one image per network
call (mini_batch_size=1), where that mean is each image's own.

The official text model (libs/uvit_t2i.py) has the in-block patience rule commented out, so its
in-blocks exit at the first confident one: this config sets exit.patience=False to match.
"""
import os

from deediff_jax.config import config_from_file


def get_config():
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mscoco_uvit_small.py"))
  c.model.exit_style = "adadiff"
  c.exit.update(policy="adadiff", aggregate="mean", threshold=0.87, patience=False)
  return c
