"""Imports of weights trained elsewhere.

`deediff_jax.convert.uvit`: official U-ViT PyTorch checkpoints (baofff/U-ViT nnet.pth /
nnet_ema.pth) -> deediff_jax params; also the CLI `python -m deediff_jax.convert.uvit`.
Submodules are not imported here, so that `python -m` runs the module once and torch is
never imported by training or sampling.
"""
