"""Orbax checkpoints: async saves, keep-N, exact resume, params-only export.

Layout of a workdir (a local path or gs://...):

  config.json                  the config of the latest run in this workdir
  checkpoints/<step>/params       the parameters            (orbax StandardSave)
                   /ema_params   their EMA
                   /opt_state    the optimizer state
                   /meta         JSON: step, seed, data position and the config that trained it

An `export_params` directory has the same layout with only `params` and `meta` at step 0,
so `train.init_from` and `load_params` read exports and training workdirs alike.

The state holds no RNG and the data pipeline is a pure function of (seed, step): the step
alone is the data position, and restoring it repeats an uninterrupted run exactly.
Orbax commits a step atomically (a temporary directory renamed on completion, or a commit
marker on object stores), so a run killed mid-save resumes from the previous complete step.

Faults (tests/test_faults.py):
- A step that cannot be restored (truncated or missing array files, a half-copied step folder,
  arrays of the wrong shape) is *damaged*. Readers (`load_params`: sample, eval, sweep, tune)
  fall back to the newest intact step with a one-line warning naming both steps, and only read.
  The trainer does the same, then moves the damaged step folders to `checkpoints/damaged/`
  before it saves again: they are never deleted, and keep-N never counts them (orbax lists only
  numeric step folders). With no intact step left, the error is one line.
- A save that fails (a full disk above all) is one line (`save_error`) that names the space one
  checkpoint needs; the earlier steps stay (orbax deletes old steps only after a new one
  committed) and the torn step stays a temporary directory that no reader trusts.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import uuid
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from deediff_jax.config import EXIT_MODEL_KEYS
from deediff_jax.tensor_files import CheckpointError  # one class, shared with model/ and convert/

ITEMS = ("params", "ema_params", "opt_state", "meta")
DAMAGED = "damaged"   # checkpoints/damaged/<step>: steps the trainer set aside (never deleted)
# Keys under `model` that do not change the parameter tree (compute-only settings).
NON_ARCH_MODEL_KEYS = ("remat", "dtype")


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def config_to_dict(config) -> dict:
  return json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))


def saved_model_key(workdir, key: str, default=None):
  """config.model[key] as saved in workdir/config.json (the default when there is none)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return default
  try:
    return json.loads(path.read_text()).get("model", {}).get(key, default)
  except ValueError:
    return default


def write_config(workdir, config) -> None:
  """workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))


class _DropReadOnlyNotice(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


class _DropPartialRestoreNotice(logging.Filter):
  """A reader restores only the items it needs (meta, then params or ema_params); orbax warns once
  per item left on disk, which tells the user nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "was found in the checkpoint, but could not be restored" not in str(record.getMessage())


@contextlib.contextmanager
def _partial_restore():
  quiet, logger = _DropPartialRestoreNotice(), logging.getLogger("absl")
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def make_manager(workdir, keep: int = 2, *, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      # A reader keeps nothing and saves nothing (orbax warns on stderr about anything else).
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only,
      enable_async_checkpointing=True,
      # A save killed midway leaves a temporary directory; it is never a complete step.
      cleanup_tmp_directories=not read_only)
  if not read_only:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
  quiet, logger = _DropReadOnlyNotice(), logging.getLogger("absl")
  logger.addFilter(quiet)  # a reader's stderr holds only what it has to say
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)
  finally:
    logger.removeFilter(quiet)


def save_state(manager: ocp.CheckpointManager, state, config) -> None:
  """Starts an async save of `state` at its step. Returns once device arrays are copied out,
  so the caller may donate `state` to the next train step."""
  step = int(jax.device_get(state.step))
  meta = {"step": step, "seed": int(config.train.seed),
          "data_position": {"step": step, "seed": int(config.train.seed)},
          "config": config_to_dict(config)}
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      ema_params=ocp.args.StandardSave(state.ema_params),
      opt_state=ocp.args.StandardSave(state.opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


@contextlib.contextmanager
def _quiet_tensorstore_teardown():
  """A failed tensorstore read can fire a late callback into orbax's closed event loop, which
  Python reports as an 'unraisable' RuntimeError traceback on stderr. The real error is raised
  (and reported) by the restore call itself, so drop only that echo."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  yield
  # Only on success: after a failure the echo can still arrive later, while the error is
  # being reported, so the filter stays for the rest of the process.
  sys.unraisablehook = previous


def _reason(e: Exception) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return text[:240] + ("..." if len(text) > 240 else "")


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out




def check_compatible(saved_config: dict, config, where: str, *, keys=("model",), extra=()) -> None:
  """Refuses a checkpoint whose saved config has another architecture (one-line error)."""
  saved = _flatten(saved_config)
  current = _flatten(config_to_dict(config))
  names = sorted(k for k in set(saved) | set(current)
                 if k.split(".")[0] in keys and k.split(".")[-1] not in NON_ARCH_MODEL_KEYS)
  for key in names + list(extra):
    if key in saved and key in current and saved[key] != current[key]:
      raise CheckpointError(
          f"{where} was trained with {key}={saved[key]!r} but the config says {current[key]!r}; "
          f"use --config.{key}={saved[key]!r} or a new --workdir")


def check_time_labels(saved_config: dict, where: str) -> None:
  """Refuses a discrete-schedule checkpoint saved before the network's time input became U-ViT's
  1-based label (its config has no diffusion.time_labels): sampled now, it would see every time
  one label late, silently."""
  diffusion = saved_config.get("diffusion", {}) if isinstance(saved_config, dict) else {}
  if not diffusion or diffusion.get("schedule") == "vpsde" or "time_labels" in diffusion:
    return
  raise CheckpointError(
      f"{where} was trained with 0-based time labels (before diffusion.time_labels existed), but the "
      "network now sees U-ViT's 1-based labels n = 1..N; retrain it (or re-convert official weights)")


def latest_step(workdir) -> Optional[int]:
  if not checkpoint_dir(workdir).exists():
    return None
  manager = make_manager(workdir, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


class _Damaged(Exception):
  """This step cannot be restored (internal: the callers fall back to an earlier step)."""


def warn(message: str) -> None:
  """A one-line warning on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _all_hosts(ok: bool) -> bool:
  """True when `ok` holds on every process (JAX's allgather; every process must call it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(int(ok), np.int32))))


def _check_shapes(restored, abstract, path) -> None:
  got = jax.tree_util.tree_leaves_with_path(restored)
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  if len(got) != len(want):
    raise _Damaged(f"{path} holds {len(got)} arrays but the model has {len(want)}")
  for k, v in got:
    name = jax.tree_util.keystr(k)
    if want.get(name) != tuple(v.shape):
      raise _Damaged(f"array {name} has shape {tuple(v.shape)}, the model needs {want.get(name)}")


def _no_intact(workdir, damaged) -> CheckpointError:
  step, reason = damaged[0]
  steps = ", ".join(str(s) for s, _ in damaged)
  return CheckpointError(
      f"cannot restore checkpoint step {step} at {checkpoint_dir(workdir) / str(step)}: {reason}; no "
      f"intact checkpoint is left in {checkpoint_dir(workdir)} (damaged: {steps}); move the damaged "
      "step directories away to train from scratch, or use a new --workdir")


def restore_state(manager: ocp.CheckpointManager, workdir, config, abstract_state):
  """The newest intact checkpoint restored into `abstract_state` (ShapeDtypeStructs with
  shardings): (state, meta, damaged), or None when the workdir has no checkpoint.

  `damaged` lists (step, reason) of the newer steps that could not be restored (newest first);
  the caller moves them aside (`set_aside`) before it saves. With no intact step left, a
  CheckpointError naming the newest step: an existing run is never silently restarted from step
  0. A checkpoint of another architecture is a CheckpointError, never "damaged". With several
  processes, every process restores and they agree on the step (a step damaged on one host is
  damaged on all).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  damaged = []
  for step in steps:
    path = checkpoint_dir(workdir) / str(step)
    try:
      state, meta = _restore_step(manager, step, path, config, abstract_state)
      ok = True
    except _Damaged as e:
      ok, reason = False, str(e)
    if not _all_hosts(ok):
      damaged.append((step, reason if not ok else "it cannot be restored on another host"))
      continue
    return state, meta, damaged
  raise _no_intact(workdir, damaged)


def _restore_step(manager, step, path, config, abstract_state):
  try:
    with _quiet_tensorstore_teardown():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or "step" not in meta:
      raise ValueError("its meta item has no step")
  except Exception as e:  # noqa: BLE001 -- any failure means this step is unusable
    raise _Damaged(_reason(e)) from None
  check_time_labels(meta.get("config", {}), f"checkpoint {path}")
  check_compatible(meta.get("config", {}), config, f"checkpoint {path}", extra=("train.mode",))
  try:
    with _quiet_tensorstore_teardown():
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.params),
          ema_params=ocp.args.StandardRestore(abstract_state.ema_params),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
  except Exception as e:  # noqa: BLE001
    raise _Damaged(_reason(e)) from None
  # orbax restores the saved shape whatever the target says: a folder copied from another model
  # of the same config keys would otherwise pass.
  for item in ("params", "ema_params", "opt_state"):
    _check_shapes(getattr(restored, item), getattr(abstract_state, item), f"{path}/{item}")
  state = abstract_state.replace(
      step=jax.device_put(np.asarray(meta["step"], np.int32), abstract_state.step.sharding),
      params=restored.params, ema_params=restored.ema_params, opt_state=restored.opt_state)
  return state, meta


def set_aside(workdir, steps) -> list:
  """Moves the step folders `steps` to checkpoints/damaged/<step> (process 0; a later copy of
  the same step gets a suffix) and returns the new paths. Nothing is deleted."""
  root = checkpoint_dir(workdir)
  moved = []
  for step in steps:
    target = root / DAMAGED / str(step)
    n = 1
    while target.exists():
      target = root / DAMAGED / f"{step}-{n}"
      n += 1
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (root / str(step)).rename(target)
    moved.append(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("deediff_jax checkpoints set aside")
  return moved


def _default_sharding():
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # Fully replicated over every device: each process can read the whole value.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _item_tree(manager, step: int, item: str):
  md = manager.item_metadata(step)[item]
  return md.tree if hasattr(md, "tree") else md


def load_params(workdir, config, use_ema: bool = True, *, step: Optional[int] = None,
                sharding=None, backbone_only: bool = False, with_step: bool = False):
  """Parameters from a training workdir or an `export_params` directory (with `with_step`:
  (params, the step they come from), which differs from `latest_step` after a fallback).

  The EMA weights by default (what sampling wants), the raw ones where there is no EMA
  (exports). The saved config must have the same model architecture as `config`. Returns
  the tree as saved (an export of a bare backbone has no exit_heads/uems); every leaf
  present must have the shape `config.model` gives it. `backbone_only` (train.init_from into
  another exit style, e.g. an adadiff model finetuned from a deediff one): the exits are
  dropped and model.exit_style / model.uem may differ.

  Without `step`, the newest intact step: a damaged newer one is skipped with a one-line
  warning naming both steps (nothing is moved or written: readers only read). A step deleted
  while it was read (keep-N of a training run in progress) is skipped silently.
  """
  workdir = epath.Path(workdir)
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)}); train "
                          "first with --mode train or point to an export_params directory")
  damaged = []
  for _ in range(3):  # a training run in progress may delete the steps while they are read
    try:
      manager = make_manager(workdir, read_only=True)
    except FileNotFoundError:
      # keep-N deleted a step between orbax listing the directory and reading its metadata.
      continue
    try:
      steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
      if not steps:
        raise CheckpointError(f"no complete checkpoint in {checkpoint_dir(workdir)}; train first with "
                              "--mode train or point to an export_params directory")
      damaged, vanished = [], False
      for candidate in steps:
        path = checkpoint_dir(workdir) / str(candidate)
        try:
          params = _load_step(manager, candidate, path, config, use_ema, sharding, backbone_only)
        except _Damaged as e:
          if not path.exists():
            vanished = True
            continue
          if step is not None:
            raise CheckpointError(f"cannot restore checkpoint step {candidate} at {path}: {e}") from None
          damaged.append((candidate, str(e)))
          continue
        if damaged:
          newest, reason = damaged[0]
          others = "".join(f", step {s}" for s, _ in damaged[1:])
          warn(f"checkpoint step {newest} at {checkpoint_dir(workdir) / str(newest)} cannot be restored "
               f"({reason[:160]}){' (nor' + others[1:] + ')' if others else ''}; using step {candidate} instead")
        return (params, candidate) if with_step else params
      if damaged and not vanished:
        raise _no_intact(workdir, damaged)
    finally:
      manager.close()
  if damaged:
    raise _no_intact(workdir, damaged)
  raise CheckpointError(f"no complete checkpoint in {checkpoint_dir(workdir)}; train first with "
                        "--mode train or point to an export_params directory")


def _load_step(manager, step, path, config, use_ema, sharding, backbone_only) -> dict:
  sharding = _default_sharding() if sharding is None else sharding
  try:
    with _quiet_tensorstore_teardown(), _partial_restore():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # noqa: BLE001 -- any failure means this step is unusable
    raise _Damaged(_reason(e)) from None
  saved_config = meta.get("config", {}) if isinstance(meta, dict) else {}
  if backbone_only:  # the exits are not loaded, so their kind may differ
    saved_config = {**saved_config, "model": {k: v for k, v in saved_config.get("model", {}).items()
                                              if k not in EXIT_MODEL_KEYS}}
  check_time_labels(saved_config, f"checkpoint {path}")
  check_compatible(saved_config, config, f"checkpoint {path}")
  # An export holds only `params`; a training step without its EMA is damaged (never silently
  # the raw weights in its place).
  item = "ema_params" if use_ema and not (isinstance(meta, dict) and meta.get("export")) else "params"
  try:
    with _quiet_tensorstore_teardown(), _partial_restore():
      tree = _item_tree(manager, step, item)
      target = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
      params = manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(target)}))[item]
  except Exception as e:  # noqa: BLE001
    raise _Damaged(_reason(e)) from None
  if backbone_only:
    from deediff_jax.model.deediff import EXIT_KEYS
    params = {k: v for k, v in params.items() if k not in EXIT_KEYS}
  try:
    check_param_shapes(params, config, f"checkpoint {path}")
  except CheckpointError as e:  # the same architecture (checked above) with other shapes: damaged
    raise _Damaged(str(e)) from None
  return params


def check_param_shapes(params: dict, config, where: str) -> None:
  """Every leaf present must match the shape of the model built from `config.model`."""
  from deediff_jax.model import build, init_params
  module = build(config.model)
  expected = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
  flat_expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  for k, v in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(k)
    if name not in flat_expected:
      raise CheckpointError(f"{where} has parameter {name} that model config does not have; check "
                            "model.* against the config that produced it")
    if tuple(v.shape) != tuple(flat_expected[name].shape):
      raise CheckpointError(f"{where}: parameter {name} has shape {tuple(v.shape)} but model.* "
                            f"gives {tuple(flat_expected[name].shape)}; check model.* against the "
                            "config that produced it")


def export_params(directory, params: dict, config) -> epath.Path:
  """A params-only checkpoint (+ config.json) at `directory`, readable by `load_params` and by
  train.init_from (finetune / frozen_backbone). `params` may be NumPy or jax arrays."""
  directory = epath.Path(directory)
  if checkpoint_dir(directory).exists() and latest_step(directory) is not None:
    raise CheckpointError(f"{directory} already holds checkpoints; export to a new directory")
  check_param_shapes(params, config, "the exported params")
  write_config(directory, config)
  manager = make_manager(directory, keep=1)
  try:
    meta = {"step": 0, "seed": int(config.train.seed), "export": True, "config": config_to_dict(config)}
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(jax.tree_util.tree_map(np.asarray, params)),
        meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return directory


def abstract_with_shardings(abstract_tree: Any, shardings: Any):
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_tree, shardings)


# ----------------------------------------------------------------------------- failed saves

def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def tree_nbytes(tree) -> int:
  """Bytes of the arrays in `tree` (global shapes): about what one checkpoint of it takes."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))


def free_bytes(path) -> Optional[int]:
  """Free bytes of the local file system holding `path` (None for object stores)."""
  path = str(path)
  if "://" in path:
    return None
  while path and not os.path.exists(path):
    path = os.path.dirname(path.rstrip("/")) or "/"
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def is_no_space(e: BaseException) -> bool:
  """ENOSPC (or a quota) anywhere in the exception chain or its text."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e).lower()
    if "no space left" in text or "disk quota exceeded" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def save_error(e: BaseException, workdir, step: int, nbytes: int) -> CheckpointError:
  """The one-line error for a failed save of `step`; names the last committed step to resume
  from and, for a full disk, the space one checkpoint needs."""
  where = checkpoint_dir(workdir)
  try:
    last = latest_step(workdir)
  except Exception:  # noqa: BLE001 -- the error being reported matters more
    last = None
  resume = (f"rerun the same command to resume from step {last}" if last is not None
            else "rerun the same command to start again")
  if is_no_space(e):
    free = free_bytes(where)
    have = f"{_size(free)} free there; " if free is not None else ""
    return CheckpointError(
        f"cannot save checkpoint step {step} in {where}: no space left on device ({have}one checkpoint "
        f"needs about {_size(nbytes)}); free at least {_size(nbytes)} there (or lower "
        f"train.keep_checkpoints, or use another --workdir), then {resume}")
  return CheckpointError(f"cannot save checkpoint step {step} in {where}: {_reason(e)}; {resume}")


class _QuietOrbaxErrors(logging.Filter):
  """orbax logs a failed background save as ERROR records with tracebacks (several per failure,
  some after the manager closed). The failure itself reaches the trainer as an exception and
  becomes one line (`save_error`), so those records are dropped; the last message is kept."""
  last = None

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and "orbax" in (record.pathname or "") and record.exc_info:
      _QuietOrbaxErrors.last = record.getMessage()
      return False
    return True


def quiet_orbax_save_errors() -> None:
  """Installs the filter on absl's logger (idempotent; stays for the process, since orbax's
  background threads may log after the manager closed)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
    logger.addFilter(_QuietOrbaxErrors())


# ----------------------------------------------------------------------------- inputs at the edge

def check_workdir_writable(workdir) -> None:
  """A one-line CheckpointError unless files can be created in `workdir` (or, when it does not
  exist yet, in its nearest existing parent, where it would be created). Writes one empty probe
  file and removes it; creates nothing else. Object stores (gs://...) are not probed."""
  path = str(workdir)
  if "://" in path:
    return
  probe_dir = os.path.abspath(path)
  while not os.path.exists(probe_dir):
    parent = os.path.dirname(probe_dir)
    if parent == probe_dir:
      break
    probe_dir = parent
  fix = "pass a --workdir you can write to"
  if os.path.exists(probe_dir) and not os.path.isdir(probe_dir):
    raise CheckpointError(f"--workdir {path} cannot be created: {probe_dir} is a file, not a directory; {fix}")
  probe = os.path.join(probe_dir, f".deediff-write-test-{uuid.uuid4().hex[:12]}")
  try:
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except OSError as e:
    what = "written" if probe_dir == os.path.abspath(path) else "created"
    raise CheckpointError(f"--workdir {path} cannot be {what}: {e.strerror or e} in {probe_dir}; {fix}") from None
  os.close(fd)
  with contextlib.suppress(OSError):
    os.unlink(probe)


def check_params_tree(params: dict, config, where: str) -> None:
  """For a params file given by the user (sample.params_file, a router file, ...): every array
  finite and every leaf of the shape `config.model` gives it. One-line CheckpointError naming
  the file, the parameter and the fix."""
  for k, v in jax.tree_util.tree_leaves_with_path(params):
    a = np.asarray(v)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
      bad = "NaN" if np.isnan(a).any() else "infinity"
      raise CheckpointError(f"{where}: parameter {jax.tree_util.keystr(k)} contains {bad}; the file is "
                            "damaged or comes from a diverged run, use another one")
  check_param_shapes(params, config, where)
