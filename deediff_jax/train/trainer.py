"""The training loop: sharded jit step, EMA, checkpoints, metrics, NaN guard, final sampling.

One step, inside `jax.jit` on the ("data", "fsdp") mesh:
  key = fold_in(PRNGKey(seed), step) -> t, noise, classifier-free-guidance dropout for the
  whole global batch; x_t = q_sample(x_0, t, noise); all N exits' predictions and
  uncertainties (`all_exits`); the DeeDiff loss; gradients (summed over `grad_accum`
  microbatches with `lax.scan`); clipping + AdamW; EMA.
Random draws cover the global batch before it is split into microbatches, so
grad_accum = k computes the same update as one batch of the same size.

The host loop syncs with the device only on logging and checkpoint steps.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from deediff_jax.config import ConfigError, LossSpec, validate
from deediff_jax.data.prefetch import prefetched
from deediff_jax.diffusion import schedule as schedule_lib
from deediff_jax.diffusion.losses import configured_loss, time_weights
from deediff_jax.model import build, init_params
from deediff_jax.model.deediff import SCORE_KEYS, DeeDiffUViT
from deediff_jax.train import checkpoint as ckpt
from deediff_jax.train import preemption
from deediff_jax.train import sharding as shd
from deediff_jax.train.metrics import MetricsWriter
from deediff_jax.train.state import (TrainState, create_state, ema_update, is_trainable, lr_schedule,
                                     make_optimizer)


class TrainingDivergedError(RuntimeError):
  """NaN/Inf in the loss or the parameters; `main` prints it as one line and exits with code 1."""


@dataclasses.dataclass
class Setup:
  """Everything a step needs, built once from the config."""
  config: object
  module: DeeDiffUViT
  schedule: schedule_lib.Schedule
  optimizer: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: TrainState          # ShapeDtypeStructs with their shardings
  state_shardings: TrainState
  batch_sharding: NamedSharding
  train_step: Callable                # (state, global batch) -> (state, metrics); donates state
  init_params: Callable               # () -> fresh params on the mesh (jitted)
  init_opt_state: Callable            # params -> optimizer state on the mesh (jitted)


def _init_key(seed: int):
  # Distinct from every step key fold_in(PRNGKey(seed), step), step >= 0.
  return jax.random.fold_in(jax.random.PRNGKey(seed), 2 ** 31 - 1)


def _microbatches(tree, accum: int, mesh):
  """[B, ...] -> [accum, B / accum, ...] taking rows j, j + accum, ... for microbatch j: each
  device keeps its own rows, so the split needs no communication."""
  spec = NamedSharding(mesh, P(None, shd.AXES))

  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree_util.tree_map(split, tree)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What one training step reads from the config, read once by `_make_setup` (the jitted step
  closes over typed values, not the ConfigDict)."""
  seed: int
  mode: str
  grad_accum: int
  ema_rate: float
  loss: LossSpec

  @classmethod
  def from_config(cls, config) -> "StepSpec":
    tc = config.train
    return cls(seed=int(tc.seed), mode=str(tc.mode), grad_accum=int(tc.grad_accum),
               ema_rate=float(tc.ema_rate), loss=LossSpec.from_config(config))


def train_step(state: TrainState, batch: dict, *, spec: StepSpec, module, sched, optimizer, lr_fn,
               mesh, null_context=None):
  """One optimizer update. Pure: the same (state, batch) gives the same result on any mesh.
  `lr_fn`: step -> learning rate (`state.lr_schedule`), logged with the metrics."""
  mc, loss = module.cfg, spec.loss
  mode = spec.mode
  rng = jax.random.fold_in(jax.random.PRNGKey(spec.seed), state.step)
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  x0 = batch["image"].astype(jnp.float32)
  b = x0.shape[0]
  inputs = {"x0": x0, "t": schedule_lib.sample_train_times(sched, k_t, b),
            "noise": jax.random.normal(k_noise, x0.shape, jnp.float32)}
  drop = jax.random.uniform(k_drop, (b,)) < loss.cfg_dropout
  if mc.num_classes > 0:
    inputs["y"] = jnp.where(drop, mc.num_classes, batch["label"].astype(jnp.int32))
  if mc.context_dim > 0:
    ctx = batch["context"].astype(jnp.float32)
    null = (jnp.zeros_like(ctx) if null_context is None
            else jnp.broadcast_to(jnp.asarray(null_context, jnp.float32), ctx.shape))
    inputs["context"] = jnp.where(drop[:, None, None], null, ctx)

  def loss_fn(params, mb):
    if mode in ("frozen_backbone", "uem_only"):
      # No gradient into the frozen parts at all: XLA drops their backward pass.
      params = {k: (v if is_trainable(mode, k) else jax.lax.stop_gradient(v)) for k, v in params.items()}
    xt = schedule_lib.q_sample(sched, mb["x0"], mb["t"], mb["noise"])
    eps_all, scores = module.apply({"params": params}, xt, schedule_lib.model_time(sched, mb["t"]),
                                   mb.get("y"), mb.get("context"), method=DeeDiffUViT.all_exits)
    alpha, sigma = schedule_lib.alpha_sigma(sched, mb["t"])
    weight = time_weights(loss.time_weighting, alpha, sigma, loss.min_snr_gamma)
    return configured_loss(eps_all, scores, mb["noise"], loss, ltes=mc.has_ltes,
                           x0_scale=sigma / alpha, sample_weight=weight)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = spec.grad_accum
  if accum == 1:
    (_, metrics), grads = grad_fn(state.params, inputs)
  else:
    def body(carry, mb):
      (_, m), g = grad_fn(state.params, mb)
      return jax.tree_util.tree_map(jnp.add, carry, (g, m)), None
    zeros = jax.tree_util.tree_map(
        jnp.zeros_like, (state.params, jax.eval_shape(lambda: grad_fn(state.params, inputs)[0][1])))
    (grads, metrics), _ = jax.lax.scan(body, zeros, _microbatches(inputs, accum, mesh))
    grads, metrics = jax.tree_util.tree_map(lambda x: x / accum, (grads, metrics))

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Frozen subtrees keep their exact bits (x + 0.0 would turn a -0.0 into +0.0).
  params = {k: (v if is_trainable(mode, k) else state.params[k]) for k, v in params.items()}
  ema = ema_update(state.ema_params, params, state.step, spec.ema_rate, mode)
  metrics = dict(metrics, lr=lr_fn(state.step), grad_norm=optax.tree.norm(grads))
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


_SETUP_CACHE: dict = {}


def make_setup(config, mesh=None, *, null_context=None) -> Setup:
  """Model, optimizer, mesh, shardings and the jitted step for `config` (validated).

  Cached per (config, mesh, null context), so calling `train` again in one process (a
  notebook, a resumed run, tests) reuses the compiled step instead of compiling it anew.
  """
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  key = (config.to_json(sort_keys=True), mesh.shape_tuple, tuple(d.id for d in mesh.devices.flat),
         None if null_context is None else np.asarray(null_context, np.float32).tobytes())
  if key not in _SETUP_CACHE:
    if len(_SETUP_CACHE) >= 8:
      _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
    _SETUP_CACHE[key] = _make_setup(config, mesh, null_context)
  return _SETUP_CACHE[key]


def _make_setup(config, mesh, null_context) -> Setup:
  shd.check_batch_size(config.train, mesh)
  module = build(config.model)
  sched = schedule_lib.from_config(config.diffusion)
  abstract_params = jax.eval_shape(lambda: init_params(module, _init_key(config.train.seed)))
  optimizer = make_optimizer(config.train, abstract_params)
  abstract = jax.eval_shape(lambda p: create_state(p, optimizer), abstract_params)
  state_shardings = shd.tree_shardings(mesh, abstract)
  abstract_state = ckpt.abstract_with_shardings(abstract, state_shardings)
  batch_sharding = shd.batch_sharding(mesh)
  metric_sharding = shd.replicated(mesh)
  step_fn = functools.partial(train_step, spec=StepSpec.from_config(config), module=module, sched=sched,
                              optimizer=optimizer, lr_fn=lr_schedule(config.train), mesh=mesh,
                              null_context=null_context)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
  init_fn = jax.jit(lambda: init_params(module, _init_key(config.train.seed)),
                    out_shardings=state_shardings.params)
  opt_init = jax.jit(optimizer.init, out_shardings=state_shardings.opt_state)
  return Setup(config=config, module=module, schedule=sched, optimizer=optimizer, mesh=mesh,
               abstract_state=abstract_state, state_shardings=state_shardings,
               batch_sharding=batch_sharding, train_step=jitted, init_params=init_fn,
               init_opt_state=opt_init)


def _load_init_from(setup: Setup, fresh: dict) -> dict:
  """finetune / frozen_backbone: the backbone (and exits, if saved) from train.init_from."""
  config = setup.config
  if str(config.train.init_from).lower().endswith(".npz"):
    # A params file (python -m deediff_jax.export) of this very model: it checks the
    # architecture itself, and continuing a committed model needs no checkpoint.
    from deediff_jax.train import params_file
    loaded = params_file.load(config.train.init_from, config, key="train.init_from")
  else:
    # Into another exit style (e.g. adadiff from a deediff model) only the backbone carries over.
    saved_style = ckpt.saved_model_key(config.train.init_from, "exit_style", "deediff")
    other_style = saved_style != config.model.get("exit_style", "deediff")
    loaded = shd.gather_to_host(ckpt.load_params(config.train.init_from, config, use_ema=True,
                                                 backbone_only=other_style))
  params = {}
  for key, value in fresh.items():
    if config.train.mode == "uem_only" and key in SCORE_KEYS:
      params[key] = value  # uem_only trains the score modules anew on a fixed model.
    elif key in loaded:
      params[key] = loaded[key]
    elif key in ("uems", "ltes") or (key == "exit_heads" and config.train.mode != "uem_only"):
      params[key] = value  # A bare U-ViT backbone: the exits start fresh.
    else:
      raise ckpt.CheckpointError(f"train.init_from {config.train.init_from} has no '{key}' parameters; "
                                 "point it at a checkpoint or export of this model's backbone")
  return params


def init_state(setup: Setup) -> TrainState:
  """Step-0 state on the mesh: fresh (scratch) or loaded from train.init_from."""
  config = setup.config
  param_shardings = setup.state_shardings.params
  init_fn = setup.init_params
  if config.train.mode == "scratch":
    # Two calls of the same deterministic init: params and EMA get their own buffers (one
    # buffer in both would be donated twice).
    params, ema = init_fn(), init_fn()
  else:
    host = _load_init_from(setup, shd.gather_to_host(init_fn()))
    params = shd.put_tree(host, param_shardings)
    ema = shd.put_tree(host, param_shardings)
  opt_state = setup.init_opt_state(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), setup.state_shardings.step)
  return TrainState(step=step, params=params, ema_params=ema, opt_state=opt_state)


def default_batch_fn(config):
  """(step -> this process's batch as numpy arrays, source) from deediff_jax.data."""
  from deediff_jax.data import pipeline, sources
  source = sources.load_source(config.data)
  mc = config.model
  num_classes = getattr(source, "num_classes", 0) or 0
  if mc.num_classes > 0 and num_classes == 0:
    raise ConfigError(f"model.num_classes is {mc.num_classes} but data.source {config.data.source!r} "
                      "has no labels; set model.num_classes=0 or use a labelled source")
  if num_classes > mc.num_classes > 0:
    raise ConfigError(f"data.source {config.data.source!r} has {num_classes} classes but "
                      f"model.num_classes is {mc.num_classes}; set model.num_classes={num_classes}")

  def batch_fn(step):
    return pipeline.make_batch(source, step, batch_size=config.train.batch_size, seed=config.train.seed,
                               flip=config.data.flip, process_index=jax.process_index(),
                               process_count=jax.process_count())
  return batch_fn, source


def _check_batch(batch: dict, config, local_batch_size: int) -> None:
  mc = config.model
  img = batch.get("image")
  want = (local_batch_size, mc.image_size, mc.image_size, mc.in_channels)
  if img is None or tuple(np.shape(img)) != want:
    raise ConfigError(f"the data gives image batches of shape {None if img is None else tuple(np.shape(img))} "
                      f"but the model needs {want}; make data.image_size/channels match model.image_size/"
                      "in_channels")
  if mc.num_classes > 0 and "label" not in batch:
    raise ConfigError("model.num_classes > 0 but the data has no labels; set model.num_classes=0")
  if mc.context_dim > 0 and "context" not in batch:
    raise ConfigError("model.context_dim > 0 but the data has no context; set data.context_file")


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


_all_finite_jit = jax.jit(_all_finite)


def _mean_metrics(window: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


def train(config, workdir, *, batch_fn: Optional[Callable[[int], dict]] = None,
          stop_after: Optional[int] = None, mesh=None, null_context=None,
          progress: bool = True) -> TrainState:
  """Trains (or resumes) in `workdir` up to train.num_steps; returns the final state.

  batch_fn(step) -> this process's rows of the global batch (numpy); default: deediff_jax.data.
  stop_after: run at most this many steps in this call, checkpoint and return (a planned
  interruption; the next call resumes).
  """
  config = validate(config)
  shd.maybe_initialize_distributed(config.train)
  tc = config.train
  source = None
  if batch_fn is None:  # Data errors come before anything is written to the workdir.
    batch_fn, source = default_batch_fn(config)
  if null_context is None and getattr(source, "context", None) is not None:
    null_context = source.context.null_features  # The empty caption's features, when encoded.
  setup = make_setup(config, mesh, null_context=null_context)
  workdir = epath.Path(workdir)
  local_b = tc.batch_size // jax.process_count()
  _check_batch(batch_fn(0), config, local_b)  # Shapes and keys, before the workdir is touched.

  ckpt.quiet_orbax_save_errors()  # a failed save is one line (ckpt.save_error), not orbax's tracebacks
  manager = ckpt.make_manager(workdir, tc.keep_checkpoints)
  saver = _Saver(manager, workdir, setup.abstract_state)
  try:
    restored = ckpt.restore_state(manager, workdir, config, setup.abstract_state)
    if restored is None:
      state, start = init_state(setup), 0
    else:
      state, meta, damaged = restored
      start = int(meta["step"])
      if int(meta.get("seed", tc.seed)) != tc.seed:
        raise ckpt.CheckpointError(f"checkpoint {ckpt.checkpoint_dir(workdir) / str(start)} was trained "
                                   f"with train.seed={meta['seed']}; resume with --config.train.seed="
                                   f"{meta['seed']} or use a new --workdir")
      if damaged:
        # Aside before anything is saved: a save must not meet (or keep-N count) a damaged step.
        moved = ckpt.set_aside(workdir, [s for s, _ in damaged])
        manager.reload()
        (newest, reason), others = damaged[0], "".join(f", step {s}" for s, _ in damaged[1:])
        ckpt.warn(f"checkpoint step {newest} at {ckpt.checkpoint_dir(workdir) / str(newest)} cannot be "
                  f"restored ({reason[:160]}){' (nor' + others[1:] + ')' if others else ''}; resuming from "
                  f"step {start}; the damaged step is kept in {moved[0].parent}")
    ckpt.write_config(workdir, config)
    with preemption.Watch(manager) as watch:
      state = _loop(setup, state, start, batch_fn, saver, workdir, stop_after, progress, watch)
      saver.wait()
    if watch.received:  # after the last step: the run is complete and committed, but stopped
      _preempted(watch, int(jax.device_get(state.step)), workdir)
  finally:
    saver.close()

  return state


class _Saver:
  """Starts async saves and waits for them; a save that fails (a full disk) becomes one line
  (`ckpt.save_error`) naming the step and the space one checkpoint needs."""

  def __init__(self, manager, workdir, abstract_state):
    self.manager, self.workdir = manager, workdir
    self.nbytes = ckpt.tree_nbytes((abstract_state.params, abstract_state.ema_params,
                                    abstract_state.opt_state))
    self.started: list = []   # steps whose save may not be committed yet

  def _failed(self, e: BaseException, step: int):
    last = ckpt.latest_step(self.workdir)
    pending = [s for s in self.started if last is None or s > last]
    raise ckpt.save_error(e, self.workdir, min(pending) if pending else step, self.nbytes) from None

  def save(self, state, config) -> None:
    step = int(jax.device_get(state.step))
    try:
      ckpt.save_state(self.manager, state, config)
    except Exception as e:  # noqa: BLE001 -- an earlier async save or this one failed
      self._failed(e, step)
    self.started.append(step)

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed(e, self.started[-1] if self.started else -1)
    self.started = []

  def close(self) -> None:
    """Closes the manager; a save failing now is reported unless another error is on its way."""
    failed = None
    try:
      self.manager.close()
    except Exception as e:  # noqa: BLE001
      failed = e
    if failed is not None and sys.exc_info()[0] is None:
      self._failed(failed, self.started[-1] if self.started else -1)


def _preempted(watch, step: int, workdir):
  raise preemption.Preempted(
      f"training stopped by {preemption.signal_name(watch.signum)} after step {step}; checkpoint step "
      f"{step} is saved in {ckpt.checkpoint_dir(workdir)}; rerun the same command to resume from it",
      watch.signum or signal.SIGTERM)


def finished(config, state) -> bool:
  """True when `state` reached train.num_steps (the CLI then samples, if train.sample_at_end)."""
  return int(jax.device_get(state.step)) >= int(config.train.num_steps)


def _loop(setup: Setup, state, start, batch_fn, saver, workdir, stop_after, progress, watch):
  config = setup.config
  tc = config.train
  end = tc.num_steps if stop_after is None else min(tc.num_steps, start + stop_after)
  if int(tc.get("stop_at", 0)) > 0:  # a planned stop on the full schedule; the next run resumes
    end = min(end, int(tc.stop_at))
  if start >= end:
    return state
  writer = MetricsWriter(workdir, resume_step=start)
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm
    bar = tqdm(total=tc.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  batches = prefetched(batch_fn, range(start, end))  # host data work overlaps the device step
  window: list = []           # device metrics since the last log
  unchecked: list = []        # (step, device loss) since the last finiteness check
  last_good = start if start > 0 else None
  t_log, step_log = time.perf_counter(), start
  try:
    for step, local in zip(range(start, end), batches):
      batch = shd.global_batch(local, setup.batch_sharding, tc.batch_size)
      state, metrics = setup.train_step(state, batch)
      done = step + 1
      window.append(metrics)
      unchecked.append((done, metrics["loss"]))
      # Once per step, on every host (multi-host: JAX's preemption sync point).
      stop = watch.should_stop(done)
      log_now = done % tc.log_every == 0 or done == end or stop
      save_now = done % tc.checkpoint_every == 0 or done == end or stop
      if log_now or save_now:
        # The only host-device syncs: a bad state is caught before it can be saved.
        losses = jax.device_get([l for _, l in unchecked])
        for (s, _), l in zip(unchecked, losses):
          if not math.isfinite(float(l)):
            _diverged(saver, f"the loss is {float(l)} at step {s}", last_good, workdir)
        if not bool(_all_finite_jit(state.params)):
          _diverged(saver, f"the parameters contain NaN/Inf after step {done}", last_good, workdir)
        unchecked = []
      if log_now:
        values = _mean_metrics(jax.device_get(window))
        now = time.perf_counter()
        values["images_per_sec"] = (done - step_log) * tc.batch_size / max(now - t_log, 1e-9)
        t_log, step_log = now, done
        writer.write(done, values)
        if bar is not None:
          bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.0f}")
        window = []
      if save_now:
        saver.save(state, config)
        last_good = done
      if bar is not None:
        bar.update(1)
      if stop:
        saver.wait()  # committed before the process exits; a second signal is ignored meanwhile
        _preempted(watch, done, workdir)
  finally:
    batches.close()
    writer.close()
    if bar is not None:
      bar.close()
  return state


def _diverged(saver, what: str, last_good, workdir):
  saver.wait()  # The last good checkpoint must be complete on disk.
  where = (f"the last good checkpoint is step {last_good} in {ckpt.checkpoint_dir(workdir)}"
           if last_good is not None else "no checkpoint was saved")
  raise TrainingDivergedError(f"training stopped: {what}; {where}; lower train.lr or raise "
                              "train.warmup_steps / train.grad_clip")
