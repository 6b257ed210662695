"""deediff_jax: DeeDiff early-exit diffusion transformers (U-ViT) in JAX/Flax."""
__version__ = "0.1.0"
