"""Data: sources (digits, npz, image folder, TFDS) and the deterministic, per-host-sharded pipeline."""
from deediff_jax.data.pipeline import (epoch_permutation, flip_mask, global_batch_indices, host_rows, iterate,
                                       make_batch, scale_images)
from deediff_jax.data.sources import Captions, DataError, Source, load_captions, load_source

__all__ = ["Captions", "DataError", "Source", "epoch_permutation", "flip_mask", "global_batch_indices",
           "host_rows", "iterate", "load_captions", "load_source", "make_batch", "scale_images"]
