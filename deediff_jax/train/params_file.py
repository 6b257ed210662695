"""Params files: a model's parameters as one flat {name: array} .npz (no pickle, no orbax).

`sample.params_file=PATH` makes `--mode sample|eval|sweep|tune` read the parameters from such a
file instead of the workdir's checkpoint, so a study reproduces without training. The writer is
`python -m deediff_jax.export` (a checkpoint's EMA params, optionally with the UEMs of another
workdir, e.g. a train.mode=uem_only run).

Format: one entry per parameter leaf, named by its path in the tree joined with '/'
("blocks/attn/qkv/kernel"), float32 or float16 (float16 is cast to float32 on load), plus
`__config__`: the UTF-8 JSON {"model": config.model, "diffusion": config.diffusion} as a uint8
array, so that a file for another model is refused with the key that differs. Loading checks, in
order: the recorded model config against `config.model` (architecture keys), every name and
shape against the model built from `config.model` (the first bad name is named), and that every
value is finite. Each failure is a CheckpointError: one line, exit code 2.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from deediff_jax.tensor_files import CheckpointError, load_state_dict

CONFIG_KEY = "__config__"
NON_ARCH_MODEL_KEYS = ("remat", "dtype")     # compute settings: they do not change the tree
SEPARATOR = "/"


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(params) -> dict:
  """{'a/b/c': np.ndarray} of a nested params tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {SEPARATOR.join(_key_name(k) for k in path): np.asarray(v) for path, v in leaves}


def unflatten(flat: dict) -> dict:
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = name.split(SEPARATOR)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _config_dict(config) -> dict:
  def as_dict(section):
    return json.loads(section.to_json()) if hasattr(section, "to_json") else dict(section)
  out = {"model": as_dict(config.model)}
  if "diffusion" in config:
    out["diffusion"] = as_dict(config.diffusion)
  return out


def save(path: str, params, config, *, float16: bool = False) -> str:
  """Writes `params` (a nested tree) and config.model/diffusion to `path` (.npz, compressed)."""
  flat = flatten(params)
  bad = next((k for k, v in flat.items() if not np.all(np.isfinite(v))), None)
  if bad is not None:
    raise CheckpointError(f"parameter {bad} holds NaN or Inf; refusing to write {path}")
  if float16:
    flat = {k: v.astype(np.float16) if np.issubdtype(v.dtype, np.floating) else v for k, v in flat.items()}
    bad = next((k for k, v in flat.items() if not np.all(np.isfinite(v))), None)
    if bad is not None:
      raise CheckpointError(f"parameter {bad} overflows float16; write float32 (drop --float16)")
  meta = json.dumps(_config_dict(config), sort_keys=True).encode("utf-8")
  flat[CONFIG_KEY] = np.frombuffer(meta, np.uint8)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "wb") as f:   # np.savez would append .npz to a name without it
    np.savez_compressed(f, **flat)
  return path


def recorded_config(flat: dict, path: str) -> Optional[dict]:
  raw = flat.get(CONFIG_KEY)
  if raw is None:
    return None
  try:
    return json.loads(np.asarray(raw, np.uint8).tobytes().decode("utf-8"))
  except ValueError:
    raise CheckpointError(f"params file {path}: its {CONFIG_KEY} entry is not JSON; rewrite it with "
                          "python -m deediff_jax.export") from None


def _check_config(recorded: dict, config, path: str) -> None:
  mine = _config_dict(config)
  for section in ("model", "diffusion"):
    saved, current = recorded.get(section, {}), mine.get(section, {})
    for key in sorted(set(saved) | set(current)):
      if section == "model" and key in NON_ARCH_MODEL_KEYS:
        continue
      if key in saved and key in current and saved[key] != current[key]:
        raise CheckpointError(f"params file {path} is for another model: it has {section}.{key}="
                              f"{saved[key]!r} but the config says {current[key]!r}; use "
                              f"--config.{section}.{key}={saved[key]!r} or the config it was exported with")


def expected_shapes(config) -> dict:
  """{'a/b/c': shape} of the model built from config.model."""
  from deediff_jax.model import build, init_params
  module = build(config.model)
  tree = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
  return {k: tuple(v.shape) for k, v in flatten_shapes(tree).items()}


def flatten_shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {SEPARATOR.join(_key_name(k) for k in path): v for path, v in leaves}


def load(path: str, config, *, key: str = "sample.params_file") -> dict:
  """The params tree (float32 NumPy arrays) of a params file, checked against `config.model`.
  `key`: the config key that named the file, for the errors."""
  path = os.fspath(path)
  if os.path.splitext(path)[1].lower() != ".npz":
    raise CheckpointError(f"{key} {path!r} must be an .npz written by python -m deediff_jax.export")
  flat = load_state_dict(path, what=key, missing_hint="write one with python -m "
                         "deediff_jax.export --workdir RUN --out FILE.npz",
                         entry_hint="a params file holds arrays only")
  recorded = recorded_config(flat, path)
  if recorded is not None:
    _check_config(recorded, config, path)
  flat.pop(CONFIG_KEY, None)
  want = expected_shapes(config)
  for name in sorted(flat):
    if name not in want:
      raise CheckpointError(f"params file {path} is for another model: it has {name}, which model.* "
                            "does not; check the config against the one it was exported with")
    if tuple(flat[name].shape) != want[name]:
      raise CheckpointError(f"params file {path} is for another model: {name} has shape "
                            f"{tuple(flat[name].shape)} but model.* gives {want[name]}")
  missing = [k for k in want if k not in flat]
  if missing:
    raise CheckpointError(f"params file {path} lacks {missing[0]} (and {len(missing) - 1} more) that "
                          "model.* needs; check the config against the one it was exported with"
                          if len(missing) > 1 else
                          f"params file {path} lacks {missing[0]}, which model.* needs; check the config")
  out = {}
  for name, value in flat.items():
    if not np.issubdtype(value.dtype, np.floating):
      raise CheckpointError(f"params file {path}: {name} is {value.dtype}, not a float array")
    value = value.astype(np.float32)
    if not np.all(np.isfinite(value)):
      raise CheckpointError(f"params file {path}: {name} holds NaN or Inf")
    out[name] = value
  return unflatten(out)


def wanted(config) -> bool:
  return bool(str(config.sample.get("params_file", "") or "").strip())


def load_for(config) -> dict:
  """`load(config.sample.params_file, config)`."""
  return load(str(config.sample.params_file), config)


__all__ = ["CONFIG_KEY", "flatten", "unflatten", "save", "load", "load_for", "wanted", "expected_shapes",
           "recorded_config"]
