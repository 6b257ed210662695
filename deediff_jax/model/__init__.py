"""Model: U-ViT backbone, DeeDiff exits, and `build(config.model)`."""
from deediff_jax.model.deediff import (DeeDiffUViT, build, count_params, dummy_inputs, init_params,
                                       slice_layer, split_params)
from deediff_jax.model.uvit import ModelConfig

__all__ = ["DeeDiffUViT", "ModelConfig", "build", "count_params", "dummy_inputs", "init_params",
           "slice_layer", "split_params"]
