"""What a `--mode tune` run has finished, on disk, so that an interrupted run resumes.

A tune search on a real model takes hours of CPU (about 80 minutes per budget on the committed
13-block model here), and a preempted or timed-out session used to lose all of it. Each search task
(one family fitted to one budget) and each held-out validation is deterministic given the
parameters, the config and the budget, so its result can be written down once and replayed:

  DIR/tune_journal.json
    {"fingerprint": sha256 of the parameters and of the config without the tune keys that only
                    choose what to report (budget, budgets, min_psnr, out) and without
                    sweep.cache_thresholds (the caching task's name holds those),
     "tasks":   {"<budget>|<task name>": [candidate, ...]}      calibration measurements
     "heldout": {"<Candidate.key>": {"heldout": {...}, "per_image_psnr": [...]}}}

A rerun of the same command with the same parameters and config replays what the journal holds
and runs only the rest; a journal with another fingerprint (other parameters, other sample
settings) is ignored and replaced, so stale results are never mixed in. Floats survive the JSON
round trip exactly, so a resumed run writes the same files a whole run writes (timing aside:
speedups are measured once, by whichever run validated the candidate).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import jax
import numpy as np

JOURNAL_FILE = "tune_journal.json"
# Keys that choose what a run reports, not what any task measures: a run with other budgets reuses
# the tasks of the budgets it shares.
_REPORT_ONLY = ("budget", "budgets", "min_psnr", "out")


def fingerprint(params, config) -> str:
  """sha256 over every parameter (path, dtype, shape, bytes) and the config minus tune's report-only keys."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  c = json.loads(config.to_json_best_effort())
  for k in _REPORT_ONLY:
    c.get("tune", {}).pop(k, None)
  # Only the caching task reads it, and that task's name carries the list (tune.search_tasks):
  # another list re-measures the caching family alone.
  c.get("sweep", {}).pop("cache_thresholds", None)
  h.update(json.dumps(c, sort_keys=True).encode())
  return h.hexdigest()


def task_key(budget: float, name: str) -> str:
  return f"{float(budget)!r}|{name}"


class Journal:
  """The finished tasks and validations of one tune workdir; every record is written at once."""

  def __init__(self, workdir: str, fp: str):
    self.path = os.path.join(str(workdir), JOURNAL_FILE)
    self.fingerprint = fp
    self.tasks: dict = {}
    self.heldout: dict = {}
    self.replaced = False       # a journal of other parameters or settings was found and set aside
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          saved = json.load(f)
      except (OSError, ValueError):
        saved = {}              # unreadable (a crash mid-write of an older version): start over
      if saved.get("fingerprint") == fp:
        self.tasks = dict(saved.get("tasks", {}))
        self.heldout = dict(saved.get("heldout", {}))
      else:
        self.replaced = True

  @property
  def resumed(self) -> int:
    """How many finished items were found."""
    return len(self.tasks) + len(self.heldout)

  def task(self, budget: float, name: str) -> Optional[list]:
    return self.tasks.get(task_key(budget, name))

  def record_task(self, budget: float, name: str, candidates: list) -> None:
    self.tasks[task_key(budget, name)] = candidates
    self._write()

  def validation(self, key: str) -> Optional[tuple]:
    got = self.heldout.get(key)
    if got is None:
      return None
    return dict(got["heldout"]), np.asarray(got["per_image_psnr"], np.float64)

  def record_validation(self, key: str, heldout: dict, per_image) -> None:
    self.heldout[key] = {"heldout": heldout, "per_image_psnr": np.asarray(per_image, np.float64).tolist()}
    self._write()

  def _write(self) -> None:
    from deediff_jax.eval.report import write_json
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = self.path + ".tmp"
    # Written beside and renamed: a kill mid-write leaves the previous journal whole.
    write_json(tmp, {"fingerprint": self.fingerprint, "tasks": self.tasks, "heldout": self.heldout})
    os.replace(tmp, self.path)
