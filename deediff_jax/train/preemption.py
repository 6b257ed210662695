"""Preemption: SIGTERM (what Cloud TPU / GPU schedulers send before they kill) or SIGINT stops
training cleanly.

The trainer asks `Watch.should_stop(step)` once per step, after the step ran. When it says yes,
the trainer saves a checkpoint at that step (even between periodic saves), waits until the save
is committed and raises `Preempted`, which `main` prints as one line (exit code 128 + signal
number: 143 for SIGTERM, 130 for SIGINT).

- One process: a signal handler only sets a flag (no exception is raised inside the step or
  the save). A second signal while the checkpoint is being written is counted and ignored, so
  it cannot tear the save; SIGKILL cannot be caught, and then orbax's atomic commit (a
  temporary directory renamed on completion) keeps the previous checkpoint the newest one.
- Several processes (after `jax.distributed.initialize`): every host must save the same step.
  JAX's preemption sync service does that: its notifier catches SIGTERM on any host, the hosts
  agree on a step, and `multihost_utils.reached_preemption_sync_point(step)` (through orbax's
  `CheckpointManager.reached_preemption`) is True on every host at that step. No Python
  SIGTERM handler is installed then (it would replace JAX's notifier); SIGINT keeps its default
  (KeyboardInterrupt), since one host cannot stop the others on its own.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
  """Training stopped on a signal after saving a checkpoint; `main` prints it as one line and
  exits with `exit_code`."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + int(signum)


def signal_name(signum: Optional[int]) -> str:
  try:
    return signal.Signals(signum).name
  except (ValueError, TypeError):
    return "a preemption notice"


class Watch:
  """Context manager: installs the handlers on entry, restores the previous ones on exit.

  `manager` is the orbax CheckpointManager; with several processes it answers through JAX's
  preemption sync point (every host must call `should_stop` at every step).
  """

  def __init__(self, manager=None):
    self.manager = manager
    self.multihost = jax.process_count() > 1
    self.signum: Optional[int] = None   # the first signal received
    self.count = 0                       # signals received (a second one during the save is ignored)
    self._previous: dict = {}

  def _handler(self, signum, frame):  # noqa: ARG002 -- the signal module's signature
    self.count += 1
    if self.signum is None:
      self.signum = signum

  def __enter__(self) -> "Watch":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only; nothing to install here
    for s in SIGNALS:
      if self.multihost:
        continue  # SIGTERM belongs to JAX's preemption notifier; SIGINT keeps its default
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  @property
  def received(self) -> bool:
    return self.signum is not None

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested: at this step, on every host."""
    if self.multihost:
      if self.manager is not None and self.manager.reached_preemption(step):
        if self.signum is None:
          self.signum = signal.SIGTERM
        return True
      return False
    return self.signum is not None
