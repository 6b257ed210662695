"""Where does a trained denoiser fail? Per-timestep errors on real data, and restarts from real data.

When full-depth samples are noise, the sampler is rarely at fault: the network is. This script
shows at which noise level it stops being good enough, on held-out real images:

  1. For each time t: eps-MSE, and the MSE of the x0 estimate a sampler derives from it,
     x0 = (x_t - sigma eps_hat) / alpha (clipped to [-1, 1]), with sigma/alpha (how much an eps
     error is magnified in x0) beside it.
  2. "Restarts": noise real images to time t, run deterministic DDIM (clipped x0) from t to 0,
     and compare with the originals. A model that restores digits from t = 500 but not from
     t = 700 decides shape poorly at t >= 700, which is where sampling from pure noise starts.

  python benchmarks/diagnose_denoiser.py --workdir /root/runs/mnist_scratch --out /tmp/diag
  python benchmarks/diagnose_denoiser.py --params-file benchmarks/models/mnist13/params.npz \
      --config configs/mnist13.py --data-source npz:../shared/data/mnist10k.npz --out /tmp/diag

Writes OUT/denoise.json, OUT/denoise.md, OUT/x0_grid.png (first row: the real images; then the
x0 estimate at each t) and OUT/restart_grid.png (first row: real; then the restart from each t).
Class-conditional models get the images' own labels; text models the split's caption features.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

EpsFn = Callable  # (x [B, H, W, C], t int [B]) -> eps_hat [B, H, W, C]


def x0_estimate(sched, x_t, eps_hat, t):
  """(clipped x0, the eps consistent with it) exactly as the DDIM/DDPM samplers derive them."""
  from deediff_jax.diffusion import samplers
  from deediff_jax.diffusion import schedule as S
  a, s = S.alpha_sigma(sched, t)
  return samplers._x0_from_eps(x_t, eps_hat, a[:, None, None, None], s[:, None, None, None], clip=True)


def per_time_errors(eps_fn: EpsFn, sched, x0, times: Sequence[int], rng) -> tuple[list, list]:
  """For each t: ({t, eps_mse, x0_mse, sigma_over_alpha}, the x0 estimates [B, H, W, C])."""
  import jax
  import jax.numpy as jnp
  from deediff_jax.diffusion import schedule as S
  rows, images = [], []
  b = x0.shape[0]
  for i, t in enumerate(times):
    tt = jnp.full((b,), int(t), jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x0.shape, jnp.float32)
    x_t = S.q_sample(sched, x0, tt, noise)
    eps = eps_fn(x_t, tt)
    x0_hat, _ = x0_estimate(sched, x_t, eps, tt)
    a, s = S.alpha_sigma(sched, int(t))
    rows.append({"t": int(t), "eps_mse": float(jnp.mean((eps - noise) ** 2)),
                 "x0_mse": float(jnp.mean((x0_hat - x0) ** 2)), "sigma_over_alpha": float(s / a)})
    images.append(np.asarray(x0_hat))
  return rows, images


def restart(eps_fn: EpsFn, sched, x0, t_start: int, steps: int, rng):
  """Noise x0 to t_start, then deterministic DDIM (clipped x0) on `steps` times down to 0."""
  import jax
  import jax.numpy as jnp
  from deediff_jax.diffusion import schedule as S
  b = x0.shape[0]
  times = np.unique(np.round(np.linspace(t_start, 0, steps)).astype(np.int32))[::-1]
  x = S.q_sample(sched, x0, jnp.full((b,), int(t_start), jnp.int32),
                 jax.random.normal(rng, x0.shape, jnp.float32))
  for t, t_next in zip(times, list(times[1:]) + [None]):
    tt = jnp.full((b,), int(t), jnp.int32)
    x0_hat, eps = x0_estimate(sched, x, eps_fn(x, tt), tt)
    if t_next is None:
      return x0_hat
    a_next, s_next = S.alpha_sigma(sched, int(t_next))
    x = a_next * x0_hat + s_next * eps


def markdown(rows: list, restarts: list, meta: dict) -> str:
  where = f"step {meta['step']}, " if meta['step'] is not None else ""
  lines = [f"# Denoiser diagnosis: {meta['workdir']} ({where}{meta['weights']} weights)", "",
           f"{meta['num']} held-out images from `{meta['source']}` ({meta['split']} split), schedule "
           f"`{meta['schedule']}`. x0 = clip((x_t - sigma eps_hat) / alpha); sigma/alpha is how much "
           "an eps error is magnified in x0.", "",
           "| t | sigma/alpha | eps-MSE | x0-MSE |", "|---:|---:|---:|---:|"]
  lines += [f"| {r['t']} | {r['sigma_over_alpha']:.2f} | {r['eps_mse']:.4f} | {r['x0_mse']:.4f} |" for r in rows]
  lines += ["", f"Restarts: noise the real images to t, then DDIM ({meta['restart_steps']} steps, clipped x0) "
            "back to 0; MSE against the originals (pixels in [-1, 1]).", "",
            "| from t | MSE vs original |", "|---:|---:|"]
  lines += [f"| {r['t_start']} | {r['mse']:.4f} |" for r in restarts]
  return "\n".join(lines) + "\n"


def _parse_ints(text: str, name: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise SystemExit(f"error: --{name} must be comma-separated integers, got {text!r}")
  if not values:
    raise SystemExit(f"error: --{name} is empty; give e.g. 100,500,900")
  return values


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="", help="a training workdir (config.json + checkpoints)")
  ap.add_argument("--params-file", default="", help="instead of --workdir: a params .npz (python -m "
                  "deediff_jax.export) with --config, the config file it was trained with")
  ap.add_argument("--config", default="", help="with --params-file: the model's config file")
  ap.add_argument("--data-source", default="", help="override data.source (e.g. npz:PATH offline)")
  ap.add_argument("--out", required=True, help="directory for denoise.{json,md} and the two grids")
  ap.add_argument("--num", type=int, default=10, help="held-out images (default 10)")
  ap.add_argument("--split", default="test", help="data split to take them from (default test)")
  ap.add_argument("--times", default="20,100,300,500,700,900", help="times t for the error table")
  ap.add_argument("--restarts", default="300,500,700,850,999", help="start times for the restarts")
  ap.add_argument("--restart-steps", type=int, default=20, help="DDIM steps of each restart")
  ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  args = ap.parse_args(argv)
  times, starts = _parse_ints(args.times, "times"), _parse_ints(args.restarts, "restarts")
  if bool(args.workdir) == bool(args.params_file):
    raise SystemExit("error: pass --workdir DIR (a training run) or --params-file FILE.npz --config CONFIG.py")
  if args.params_file and not args.config:
    raise SystemExit("error: --params-file needs --config, the config file the model was trained with")
  if args.workdir and not os.path.exists(os.path.join(args.workdir, "config.json")):
    raise SystemExit(f"error: {args.workdir} has no config.json; pass a training workdir")

  import jax
  import jax.numpy as jnp
  import ml_collections
  from deediff_jax.data import pipeline, sources
  from deediff_jax.diffusion import schedule as S
  from deediff_jax.eval import plots
  from deediff_jax.model.deediff import build
  from deediff_jax.train import checkpoint as ckpt

  from deediff_jax.config import ConfigError, load_config_file
  from deediff_jax.train import params_file
  if args.workdir:
    with open(os.path.join(args.workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
  else:
    try:
      config = load_config_file(args.config)
    except (ConfigError, OSError) as e:
      raise SystemExit(f"error: {e}")
  if args.data_source:
    config.data.source = args.data_source
  sched = S.from_config(config.diffusion)
  if sched.continuous:
    raise SystemExit("error: this diagnosis uses discrete timesteps; the VPSDE model is not supported")
  bad = [t for t in times + starts if not 0 <= t < sched.num_timesteps]
  if bad:
    raise SystemExit(f"error: times {bad} are outside [0, {sched.num_timesteps - 1}]")
  try:
    params = (params_file.load(args.params_file, config) if args.params_file else
              ckpt.load_params(args.workdir, config, use_ema=not args.raw, step=args.step))
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.split = args.split
    src = sources.load_source(data)
  except (ckpt.CheckpointError, sources.DataError) as e:
    raise SystemExit(f"error: {e}")
  step = None if args.params_file else ckpt.latest_step(args.workdir) if args.step is None else args.step
  num = min(args.num, src.num_examples)
  ex = src.get(np.arange(num))
  x0 = jnp.asarray(pipeline.scale_images(ex["image"]))
  module = build(config.model)
  y = jnp.asarray(ex["label"], jnp.int32) if module.cfg.num_classes > 0 and "label" in ex else None
  ctx = jnp.asarray(ex["context"], jnp.float32) if module.cfg.context_dim > 0 else None
  apply = jax.jit(lambda x, t: module.apply({"params": params}, x, S.model_time(sched, t), y, ctx))

  rng = jax.random.PRNGKey(0)
  rows, x0_images = per_time_errors(apply, sched, x0, times, rng)
  restarts, restart_images = [], []
  for i, t in enumerate(starts):
    out = restart(apply, sched, x0, t, args.restart_steps, jax.random.fold_in(rng, 1000 + i))
    restarts.append({"t_start": int(t), "mse": float(jnp.mean((out - x0) ** 2))})
    restart_images.append(np.asarray(out))
  meta = {"workdir": args.workdir or args.params_file, "step": step,
          "weights": "params file" if args.params_file else "raw" if args.raw else "EMA", "num": num,
          "source": str(config.data.source), "split": args.split, "schedule": sched.name,
          "restart_steps": args.restart_steps}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "denoise.json"), "w") as f:
    json.dump({"meta": meta, "per_time": rows, "restarts": restarts}, f, indent=2)
  with open(os.path.join(args.out, "denoise.md"), "w") as f:
    f.write(markdown(rows, restarts, meta))
  real = np.asarray(x0)
  plots.image_grid(np.concatenate([real] + x0_images), os.path.join(args.out, "x0_grid.png"), nrow=num,
                   row_labels=["real"] + [f"x0 @ t={t}" for t in times])
  plots.image_grid(np.concatenate([real] + restart_images), os.path.join(args.out, "restart_grid.png"),
                   nrow=num, row_labels=["real"] + [f"from t={t}" for t in starts])
  print(markdown(rows, restarts, meta))
  return 0


if __name__ == "__main__":
  sys.exit(main())
