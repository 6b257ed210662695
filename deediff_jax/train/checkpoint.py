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
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from deediff_jax.tensor_files import CheckpointError  # one class, shared with model/ and convert/

ITEMS = ("params", "ema_params", "opt_state", "meta")
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


def make_manager(workdir, keep: int = 2, *, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=True,
      # A save killed midway leaves a temporary directory; it is never a complete step.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


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


EXIT_MODEL_KEYS = ("exit_style", "uem")   # model keys of the exits alone, not of the backbone


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


def restore_state(manager: ocp.CheckpointManager, workdir, config, abstract_state):
  """The latest complete checkpoint restored into `abstract_state` (ShapeDtypeStructs with
  shardings), or None when the workdir has none. Any failure is a CheckpointError naming the
  step and path: an existing run is never silently restarted from step 0."""
  step = manager.latest_step()
  if step is None:
    return None
  path = checkpoint_dir(workdir) / str(step)
  try:
    with _quiet_tensorstore_teardown():
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # noqa: BLE001 -- any failure means this step is unusable
    raise CheckpointError(f"cannot restore checkpoint step {step} at {path}: {_reason(e)}; move "
                          "that step directory away to resume from an earlier one, or use a new "
                          "--workdir") from None
  check_time_labels(meta.get("config", {}), f"checkpoint {path}")
  check_compatible(meta.get("config", {}), config, f"checkpoint {path}", extra=("train.mode",))
  try:
    with _quiet_tensorstore_teardown():
      restored = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state.params),
          ema_params=ocp.args.StandardRestore(abstract_state.ema_params),
          opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot restore checkpoint step {step} at {path}: {_reason(e)}; move "
                          "that step directory away to resume from an earlier one, or use a new "
                          "--workdir") from None
  state = abstract_state.replace(
      step=jax.device_put(np.asarray(meta["step"], np.int32), abstract_state.step.sharding),
      params=restored.params, ema_params=restored.ema_params, opt_state=restored.opt_state)
  return state, meta


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
                sharding=None, backbone_only: bool = False) -> dict:
  """Parameters from a training workdir or an `export_params` directory.

  The EMA weights by default (what sampling wants), the raw ones where there is no EMA
  (exports). The saved config must have the same model architecture as `config`. Returns
  the tree as saved (an export of a bare backbone has no exit_heads/uems); every leaf
  present must have the shape `config.model` gives it. `backbone_only` (train.init_from into
  another exit style, e.g. an adadiff model finetuned from a deediff one): the exits are
  dropped and model.exit_style / model.uem may differ.
  """
  workdir = epath.Path(workdir)
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f"no checkpoints in {workdir} (expected {checkpoint_dir(workdir)}); train "
                          "first with --mode train or point to an export_params directory")
  manager = make_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no complete checkpoint in {checkpoint_dir(workdir)}; train first with "
                            "--mode train or point to an export_params directory")
    path = checkpoint_dir(workdir) / str(step)
    item = "ema_params" if use_ema and (path / "ema_params").exists() else "params"
    sharding = _default_sharding() if sharding is None else sharding
    try:
      with _quiet_tensorstore_teardown():
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        saved_config = meta.get("config", {})
        if backbone_only:  # the exits are not loaded, so their kind may differ
          saved_config = {**saved_config, "model": {k: v for k, v in saved_config.get("model", {}).items()
                                                    if k not in EXIT_MODEL_KEYS}}
        check_time_labels(saved_config, f"checkpoint {path}")
        check_compatible(saved_config, config, f"checkpoint {path}")
        tree = _item_tree(manager, step, item)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
        params = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(target)}))[item]
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"cannot restore checkpoint step {step} at {path}: {_reason(e)}") from None
  finally:
    manager.close()
  if backbone_only:
    from deediff_jax.model.deediff import EXIT_KEYS
    params = {k: v for k, v in params.items() if k not in EXIT_KEYS}
  check_param_shapes(params, config, f"checkpoint {path}")
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
