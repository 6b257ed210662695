"""deediff_jax.tensor_files: the shared checkpoint errors and the safe flat {name: tensor} loader."""
import ast
import os

import numpy as np
import pytest
import torch

from deediff_jax import tensor_files as tf

HINTS = dict(missing_hint="pass a real file", entry_hint="pass a state_dict")


def test_one_class_per_error_across_modules():
  from deediff_jax.convert import uvit as cu
  from deediff_jax.model import autoencoder as ae
  from deediff_jax.train import checkpoint as ckpt
  assert ckpt.CheckpointError is cu.CheckpointError is ae.CheckpointError is tf.CheckpointError
  for name in ("ConversionError", "MissingTensorError", "UnusedTensorError", "ShapeMismatchError"):
    assert getattr(cu, name) is getattr(ae, name) is getattr(tf, name)
  assert issubclass(tf.MissingTensorError, tf.ConversionError) and issubclass(tf.ConversionError, ValueError)
  assert issubclass(tf.CheckpointError, ValueError)


def test_imports_nothing_of_ours_and_no_torch_at_top_level():
  path = os.path.join(os.path.dirname(__file__), "..", "deediff_jax", "tensor_files.py")
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      assert not node.level
      names.add(node.module)
  assert not {n for n in names if n.split(".")[0] == "deediff_jax"}
  top = {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
  top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
  assert not {n for n in top if n.split(".")[0] in ("torch", "safetensors")}


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_refuses_pickled_object_in_pth(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"w": torch.zeros(1), "evil": _Evil(str(marker))}, tmp_path / "evil.pth")
  with pytest.raises(tf.CheckpointError) as e:
    tf.load_state_dict(tmp_path / "evil.pth", **HINTS)
  msg = str(e.value)
  assert msg.startswith(f"{tmp_path / 'evil.pth'}: refusing to load: it is not a plain tensor state_dict "
                        "and weights_only=True rejected it (")
  assert "\n" not in msg and "\x1b" not in msg
  assert not marker.exists()


def test_refuses_npz_that_needs_pickle(tmp_path):
  np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(tf.CheckpointError) as e:
    tf.load_state_dict(tmp_path / "obj.npz", **HINTS)
  msg = str(e.value)
  assert msg.startswith(f"{tmp_path / 'obj.npz'}: refusing an npz that needs pickle (")
  assert msg.endswith("); save plain arrays") and "\n" not in msg


def test_unwraps_state_dict_and_widens_bfloat16(tmp_path):
  w = torch.randn(3, 4, dtype=torch.bfloat16)
  torch.save({"state_dict": {"w": w, "b": torch.ones(2)}, "epoch": 7}, tmp_path / "lightning.ckpt")
  got = tf.load_state_dict(tmp_path / "lightning.ckpt", **HINTS)
  assert set(got) == {"w", "b"}
  assert got["w"].dtype == np.float32
  np.testing.assert_array_equal(got["w"], w.float().numpy())
  assert tf.to_numpy("w", w, "hint").dtype == np.float32


def test_caller_wording(tmp_path):
  with pytest.raises(tf.CheckpointError) as e:
    tf.load_state_dict(tmp_path / "nope.pth", what="weights", **HINTS)
  assert str(e.value) == f"weights {str(tmp_path / 'nope.pth')!r} does not exist; pass a real file"
  torch.save({"nested": {"w": torch.zeros(1)}}, tmp_path / "nested.pth")
  with pytest.raises(tf.CheckpointError) as e:
    tf.load_state_dict(tmp_path / "nested.pth", **HINTS)
  assert str(e.value) == "entry 'nested' is a dict, not a tensor; pass a state_dict"
  torch.save({"w": torch.zeros(8)}, tmp_path / "whole.pth")
  (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100])  # a truncated zip
  with pytest.raises(tf.CheckpointError) as e:
    tf.load_state_dict(tmp_path / "cut.pth", unreadable="{path} unreadable ({kind})", **HINTS)
  assert str(e.value) == f"{tmp_path / 'cut.pth'} unreadable (RuntimeError)"
