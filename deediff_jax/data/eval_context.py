"""The held-out conditioning of text models: caption features (and their text) that sampling,
calibration and evaluation draw from `data.context_file` (made by `data/encode_text.py`)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from deediff_jax.config import ModelConfig


class EvalContextError(ValueError):
  """A context file that cannot give evaluation features (one line; the CLI exits 2)."""


NULL_CONTEXT_KEYS = ("null_features", "null_feature", "null_context")


def conditioning(config, num: int):
  """(labels, context, null_context) for `num` evaluation images: the one conditioning builder of
  --mode sample, the sweep, eval and calibration (labels cycle through the classes; text models
  take the held-out captions of data.context_file)."""
  cfg = ModelConfig.from_config(config.model)
  labels = context = null_context = None
  if cfg.num_classes > 0:
    labels = np.arange(num) % cfg.num_classes
  if cfg.context_dim > 0:
    context, labels, null_context = load_eval_context(config, num)
  return labels, context, null_context


def load_eval_context(config, num: int):
  """(context [num, L, Dc], labels [num] or None, null_context or None) from data.context_file.

  The file's `eval_features` [M, L, Dc] rows are used in order, cycling; `eval_labels` [M]
  (optional) labels them; the null caption's features (optional, needed for guidance) are read
  from the first of NULL_CONTEXT_KEYS present.
  """
  cfg = ModelConfig.from_config(config.model)
  path = config.data.context_file
  if not path:
    raise EvalContextError("this text model samples from caption features: set data.context_file=FILE.npz "
                     "(made by python -m deediff_jax.data.encode_text) with an 'eval_features' array")
  if not os.path.exists(path):
    raise EvalContextError(f"data.context_file {path!r} does not exist; build it with python -m "
                     "deediff_jax.data.encode_text")
  with np.load(path) as f:
    if "eval_features" not in f:
      raise EvalContextError(f"data.context_file {path!r} has no 'eval_features' array [M, {cfg.context_len}, "
                       f"{cfg.context_dim}]; rebuild it with python -m deediff_jax.data.encode_text")
    feats = np.asarray(f["eval_features"], np.float32)
    labels = np.asarray(f["eval_labels"], np.int64) if "eval_labels" in f else None
    null = next((np.asarray(f[k], np.float32) for k in NULL_CONTEXT_KEYS if k in f), None)
  if feats.ndim != 3 or feats.shape[1:] != (cfg.context_len, cfg.context_dim):
    raise EvalContextError(f"'eval_features' in {path!r} is {feats.shape}, the model needs "
                     f"[M, {cfg.context_len}, {cfg.context_dim}]; check model.context_len/context_dim")
  if feats.shape[0] == 0:
    raise EvalContextError(f"data.context_file {path!r} holds no held-out captions to sample from; encode "
                           "some with python -m deediff_jax.data.encode_text ... --eval-captions FILE")
  idx = np.arange(num) % feats.shape[0]
  return feats[idx], (None if labels is None else labels[idx]), null


def load_eval_captions(config, num: int) -> Optional[list[str]]:
  """The caption text behind each of `num` images, cycled as `load_eval_context` cycles the
  features; None when data.context_file has no `eval_captions` (features made elsewhere)."""
  path = config.data.context_file
  if not path or not os.path.exists(path):
    return None
  with np.load(path) as f:
    if "eval_captions" not in f:
      return None
    caps = [str(c) for c in np.asarray(f["eval_captions"])]
  if not caps:
    return None
  return [caps[i % len(caps)] for i in range(num)]
