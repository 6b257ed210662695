"""Train state, optimizer, learning-rate schedule and EMA: pure functions over pytrees.

The state holds `step`, `params`, `ema_params` and `opt_state`. It holds no RNG key: the
step's key is `fold_in(PRNGKey(train.seed), step)`, so a resumed run draws exactly the same
noise as an uninterrupted one without saving anything but the step.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from deediff_jax.model.deediff import EXIT_KEYS, SCORE_KEYS

# Pre-peak steps of the EMA warmup: decay_t = min(ema_rate, (1 + t) / (EMA_WARMUP + t)).
# Without it a 0.999 EMA after 2,000 steps still carries 0.999**2000 = 13% of the random
# initialisation, which visibly spoils short runs; long runs reach `ema_rate` quickly.
EMA_WARMUP = 10.0


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: the number of optimizer updates applied so far
  params: dict
  ema_params: dict
  opt_state: optax.OptState


def lr_schedule(train_config):
  """step -> learning rate: linear warmup to `lr`, then cosine decay to 0 at `num_steps`.

  Warmup reaches `lr` at step `warmup_steps - 1` ((step + 1) / warmup_steps) so that step 0
  already learns. `lr_schedule=constant` keeps the warmup and then holds `lr`.
  """
  peak = float(train_config.lr)
  warmup = int(train_config.warmup_steps)
  total = int(train_config.num_steps)
  kind = train_config.get("lr_schedule", "cosine")
  if kind not in ("cosine", "constant"):
    from deediff_jax.config import ConfigError
    raise ConfigError(f"config key 'train.lr_schedule' is {kind!r}; choose one of cosine, constant")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1)) if warmup > 0 else 1.0
    if kind == "constant":
      return peak * warm
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return peak * jnp.where(step < warmup, warm, cosine)

  return schedule


def is_trainable(mode: str, top_key: str) -> bool:
  """frozen_backbone trains only the exit heads and score modules (UEMs / LTEs); uem_only only
  the score modules (backbone and heads fixed); the other modes train everything."""
  if mode == "frozen_backbone":
    return top_key in EXIT_KEYS
  if mode == "uem_only":
    return top_key in SCORE_KEYS
  return True


def param_labels(params, mode: str):
  """'train' / 'frozen' for every leaf (the labels of `optax.multi_transform`)."""
  return {k: jax.tree_util.tree_map(lambda _: "train" if is_trainable(mode, k) else "frozen", v)
          for k, v in params.items()}


def make_optimizer(train_config, params) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW on the schedule; frozen_backbone / uem_only zero frozen updates."""
  clip = float(train_config.grad_clip)
  # Clipping at +inf is a no-op but keeps the optimizer state's structure independent of
  # grad_clip, so a resumed run may change it.
  adamw = optax.chain(
      optax.clip_by_global_norm(clip if clip > 0 else float("inf")),
      optax.adamw(lr_schedule(train_config), b1=0.9, b2=0.999, eps=1e-8,
                  weight_decay=float(train_config.weight_decay)))
  mode = train_config.mode
  if mode not in ("frozen_backbone", "uem_only"):
    return adamw
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               param_labels(params, mode))


def ema_decay(step, ema_rate: float):
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + step) / (EMA_WARMUP + step))


def ema_update(ema_params, new_params, step, ema_rate: float, mode: str = "scratch"):
  """ema <- d ema + (1 - d) params with d = ema_decay(step); frozen subtrees are copied.

  Copying (rather than averaging equal values) keeps a frozen backbone's EMA bitwise equal to
  the backbone: d x + (1 - d) x can differ from x in the last bit.
  """
  d = ema_decay(step, ema_rate)
  out = {}
  for k, p in new_params.items():
    if is_trainable(mode, k):
      out[k] = jax.tree_util.tree_map(lambda e, q: (d * e + (1.0 - d) * q).astype(e.dtype),
                                      ema_params[k], p)
    else:
      out[k] = p
  return out


def create_state(params, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree_util.tree_map(jnp.copy, params),
                    opt_state=optimizer.init(params))
