"""Flat {name: tensor} files read safely, and the errors every checkpoint reader shares.

The bottom of the import graph: NumPy and the standard library only (torch and safetensors are
imported inside the functions that read their files), nothing of deediff_jax. `train.checkpoint`,
`model.autoencoder` and `convert.uvit` import these names and re-export them, so each error is
one class wherever it is caught.

API:
  load_state_dict(path, *, what, missing_hint, entry_hint, ...) -> {name: np.ndarray}
  to_numpy(name, value, hint)                                   -> np.ndarray (bfloat16 -> float32)

A file can never run code: .pth/.pt/.ckpt/.bin (and any other extension) go through
`torch.load(map_location='cpu', weights_only=True)`, .npz through NumPy without pickle,
.safetensors is data only. Every failure is a CheckpointError with a one-line message.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: a missing or unsafe file, not a flat tensor dict, or one
  that does not match the config it is restored into. `main` prints it as one line, exit code 2."""


class ConversionError(ValueError):
  """A readable checkpoint that does not fit the model it is converted into; the one-line message
  names the tensor and, where there is one, the config key to fix."""


class MissingTensorError(ConversionError):
  """The model needs a tensor the checkpoint lacks."""


class UnusedTensorError(ConversionError):
  """The checkpoint holds a tensor that has no place in the model (every tensor is used once)."""


class ShapeMismatchError(ConversionError):
  """A tensor is present but its shape is not the one the model needs."""


# The two wordings of a failed torch.load; fields: path, kind (the exception's type), reason.
REFUSED = ("{path}: refusing to load: it is not a plain tensor state_dict and weights_only=True "
           "rejected it ({reason})")
UNREADABLE = "{path}: not a readable torch checkpoint ({kind}: {reason})"


def to_numpy(name: str, value: Any, hint: str) -> np.ndarray:
  """One state_dict entry as a NumPy array (torch tensors without importing torch; bfloat16 ->
  float32, which holds it exactly). Anything else raises CheckpointError ending in `hint`."""
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach") and hasattr(value, "dtype"):  # a torch.Tensor, without importing torch
    t = value.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
      t = t.float()
    return t.numpy()
  if isinstance(value, (int, float, np.generic)) or hasattr(value, "__array__"):  # scalars, jax arrays
    return np.asarray(value)
  raise CheckpointError(f"entry {name!r} is a {type(value).__name__}, not a tensor; {hint}")


def first_reason(message: str) -> str:
  """One line out of torch's multi-line, ANSI-coloured load errors: the unpickler's own reason."""
  lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in message.splitlines()]
  lines = [ln for ln in lines if ln]
  for ln in lines:
    if ln.startswith("WeightsUnpickler error:"):
      return ln.split(" Please use")[0]  # drop torch's advice on how to allow-list arbitrary code
  return lines[0] if lines else ""


def load_state_dict(path, *, missing_hint: str, entry_hint: str, what: str = "checkpoint file",
                    not_mapping_hint: str = "", refused: str = REFUSED,
                    unreadable: str = UNREADABLE) -> dict[str, np.ndarray]:
  """Reads a flat {name: tensor} file as NumPy arrays, never executing code from it.

  .safetensors: safetensors.numpy. .npz: NumPy with allow_pickle=False. Anything else
  (.pth/.pt/.ckpt/.bin): `torch.load(map_location='cpu', weights_only=True)`, torch imported
  here only; a Lightning {'state_dict': {...}} wrapper is unwrapped. bfloat16 becomes float32.

  The caller's wording: `what` and `missing_hint` for a missing file ("{what} {path!r} does not
  exist; {missing_hint}"), `entry_hint` for an entry that is not a tensor, `not_mapping_hint`
  after "{path}: holds a list, not a state_dict", and the templates `refused` (weights_only
  rejected a pickled object) and `unreadable` (any other torch.load failure), both formatted with
  path, kind and reason (the failure's one-line reason).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"{what} {path!r} does not exist; {missing_hint}")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises its own error types; name the file in one line.
      raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                            f"{first_reason(str(e))})") from None
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except ValueError as e:
      raise CheckpointError(f"{path}: refusing an npz that needs pickle ({first_reason(str(e))}); "
                            "save plain arrays") from None
  import pickle

  import torch
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(refused.format(path=path, kind=type(e).__name__, reason=first_reason(str(e)))) from None
  except (RuntimeError, EOFError, OSError) as e:
    raise CheckpointError(unreadable.format(path=path, kind=type(e).__name__,
                                            reason=first_reason(str(e)))) from None
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict{not_mapping_hint}")
  return {str(k): to_numpy(str(k), v, entry_hint) for k, v in obj.items()}
