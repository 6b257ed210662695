"""One background thread that computes the next items while the caller works on this one.

Used wherever host work (reading, decoding, batching) should overlap device work: the training
loop, `data.pipeline.iterate` and `data.encode_latents`.
"""
from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREAD_NAME = "deediff-prefetch"


def prefetched(fn: Callable[[T], R], items: Iterable[T], depth: int = 1) -> Iterator[R]:
  """Yields fn(item) for each item, in order, with up to `depth` later items computed ahead on one
  background thread (depth 0: inline). An error in fn is raised where its result is taken.
  Closing the generator (or leaving the `for` loop) waits for the one running call and drops
  the rest, so no thread outlives the loop."""
  if depth < 0:
    raise ValueError(f"prefetch depth must be >= 0, got {depth}")
  if depth == 0:
    for item in items:
      yield fn(item)
    return
  it = iter(items)
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=THREAD_NAME)
  pending: collections.deque = collections.deque()
  try:
    for item in it:
      pending.append(pool.submit(fn, item))
      if len(pending) >= depth:
        break
    while pending:
      result = pending.popleft().result()
      for item in it:  # top the window up before handing out this result
        pending.append(pool.submit(fn, item))
        break
      yield result
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
