"""Training metrics: DIR/metrics.jsonl (one JSON object per logging step) and TensorBoard
event files under DIR/tb (train/tb_events.py: no TensorFlow, no PyTorch). Only process 0 writes.

On resume the log is cut back to the restored step, so the steps a killed run logged after
its last checkpoint (and will now redo) do not appear twice.
"""
from __future__ import annotations

import json
import math

import jax
from etils import epath

from deediff_jax.train.tb_events import ScalarWriter


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


class MetricsWriter:
  """write(step, {name: float}); close(). A no-op on processes other than 0."""

  def __init__(self, workdir, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._lines: list[str] = []
    self._tb = None
    if not self.active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = []
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) <= resume_step:
            kept.append(line)
        except json.JSONDecodeError:
          continue  # A line cut short by a kill.
      self._lines = kept
      self.path.write_text("".join(l + "\n" for l in kept))
    self._tb = ScalarWriter(str(epath.Path(workdir) / "tb"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}
    line = json.dumps({"step": int(step), **clean}, sort_keys=True)
    if _is_local(self.path):
      with open(self.path, "a") as f:
        f.write(line + "\n")
    else:  # Object stores cannot append: rewrite the (small) file.
      self._lines.append(line)
      self.path.write_text("".join(l + "\n" for l in self._lines))
    self._tb.add_scalars(int(step), {f"train/{k}": v for k, v in scalars.items()})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
