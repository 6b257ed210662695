"""The input pipeline: infinite shuffled epochs, flips and per-host shards as pure functions of (seed, step).

Nothing here keeps state between batches. The batch of training step `s` depends only on
(source, seed, s, batch_size, flip): a run resumed at step s sees exactly the data an
uninterrupted one would, and any number of hosts together see exactly the one-host batch.

Order. The data stream is the concatenation of epochs 0, 1, 2, ...; epoch e is
`np.random.default_rng([seed, 0, e]).permutation(N)`, so every example appears exactly once
per epoch. Global batch `s` is positions [s*B, (s+1)*B) of that stream; it may straddle two
epochs (or several, if B > N).

Flip. Row r of global batch s is mirrored left-right iff
`np.random.default_rng([seed, 1, s]).random(B)[r] < 0.5`: a function of the global row, not
of the host that loads it.

Shards. With P processes, process p gets rows [p*B/P, (p+1)*B/P) of the global batch (B must be
divisible by P): exactly what `jax.make_array_from_process_local_data` expects for a batch
sharded along its first axis in process order.

Batch dict (NumPy, this host's rows only):
  image    float32 [B/P, H, W, C], uint8 pixels mapped by x / 127.5 - 1 to [-1, 1] exactly
           (0 -> -1, 255 -> 1); latents (source.latent) pass through unscaled, and sources
           that store moments (latents:DIR) give a latent drawn for this step (`source.draw`)
  label    int32 [B/P]             when the source has labels
  context  float32 [B/P, L, Dc]    when the source has caption features
"""
from __future__ import annotations

import functools
import itertools
from typing import Iterator, Optional

import numpy as np

from deediff_jax.data.prefetch import prefetched
from deediff_jax.data.sources import DataError, Source

_ORDER, _FLIP = 0, 1  # stream tags, so the order and the flips never share random numbers


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  # Cached: consecutive steps reuse one epoch's permutation (O(N) to draw, e.g. ~20 ms for 1.3M).
  perm = np.random.default_rng([seed, _ORDER, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of range(num_examples) (read-only)."""
  _check_nonneg(num_examples=num_examples, seed=seed, epoch=epoch)
  return _epoch_permutation(int(num_examples), int(seed), int(epoch))


def global_batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Dataset indices (int64 [batch_size]) of global batch `step` of the infinite shuffled stream."""
  _check_nonneg(seed=seed, step=step)
  if num_examples <= 0:
    raise DataError(f"the data source has no examples (num_examples={num_examples}); check data.source")
  if batch_size <= 0:
    raise DataError(f"batch_size must be positive, got {batch_size}")
  pos = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(pos, num_examples)
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = epoch_permutation(num_examples, seed, int(e))[offsets[sel]]
  return out


def flip_mask(batch_size: int, seed: int, step: int) -> np.ndarray:
  """bool [batch_size]: which rows of global batch `step` are mirrored (when flips are on)."""
  _check_nonneg(seed=seed, step=step)
  return np.random.default_rng([seed, _FLIP, step]).random(batch_size) < 0.5


def host_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
  """The rows of the global batch that process `process_index` of `process_count` loads."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f"process_index must be in [0, {process_count}), got {process_index}")
  if batch_size % process_count:
    raise DataError(f"batch size {batch_size} is not divisible by the {process_count} processes; "
                    f"set --config.train.batch_size to a multiple of {process_count}")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def scale_images(images: np.ndarray, latent: bool = False) -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1] (x / 127.5 - 1, exact at 0 and 255); latents: float32 as they are."""
  if latent:
    return np.asarray(images, np.float32)
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def make_batch(source: Source, step: int, *, batch_size: int, seed: int, flip: bool,
               process_index: int = 0, process_count: int = 1) -> dict:
  """This host's part of global batch `step` (format in the module docstring)."""
  rows = host_rows(batch_size, process_index, process_count)
  idx = global_batch_indices(source.num_examples, batch_size, seed, step)[rows]
  ex = source.get(idx)
  if getattr(source, "draw", None) is not None:  # latents:DIR: a fresh latent per (seed, step, row)
    ex["image"] = source.draw(ex["image"], seed, step, np.arange(batch_size)[rows])
  image = scale_images(ex["image"], source.latent)
  if flip:
    mirror = flip_mask(batch_size, seed, step)[rows]
    image[mirror] = image[mirror, :, ::-1]
  batch = {"image": image}
  if "label" in ex:
    batch["label"] = ex["label"]
  if "context" in ex:
    batch["context"] = ex["context"]
  return batch


def iterate(source: Source, start_step: int = 0, *, batch_size: int, seed: int, flip: bool,
            process_index: int = 0, process_count: int = 1, num_steps: Optional[int] = None,
            prefetch: int = 2) -> Iterator[tuple[int, dict]]:
  """Yields (step, make_batch(source, step, ...)) for step = start_step, start_step + 1, ...

  Stops before `num_steps` (the absolute end step) if given, else runs forever. With
  prefetch > 0 a background thread prepares up to `prefetch` batches ahead; since each batch
  is a pure function of its step, the output is identical with or without it. Closing the
  generator (or leaving a `for` loop) stops the thread; an error in the thread is re-raised.
  """
  host_rows(batch_size, process_index, process_count)  # fail here, not inside the thread
  _check_nonneg(start_step=start_step, prefetch=prefetch)
  kw = dict(batch_size=batch_size, seed=seed, flip=flip, process_index=process_index,
            process_count=process_count)
  steps = range(start_step, num_steps) if num_steps is not None else itertools.count(start_step)
  return prefetched(lambda s: (s, make_batch(source, s, **kw)), steps, depth=prefetch)


def _check_nonneg(**values):
  for k, v in values.items():
    if int(v) != v or v < 0:
      raise DataError(f"{k} must be a non-negative integer, got {v!r}")
