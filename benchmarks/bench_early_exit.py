"""Does early exit save real time? Plain full-depth forward vs the early-exit while_loop.

  python benchmarks/bench_early_exit.py --json benchmarks/results/bench_early_exit.json [--quick]

One model with random weights (U-ViT, D=256, 13 blocks, 65 tokens, batch 64 by default). For
each setting the plain forward (`module.apply`, the scan path) and the early-exit forward are
timed in the same process, interleaved (plain, early exit, plain, early exit, ...) after a
warm-up, and the medians are compared:

  speedup        = seconds_full / seconds   (median of the paired ratios)
  ideal_speedup  = blocks / blocks actually run
  efficiency     = speedup / ideal_speedup     (docs/design.md "Budgets": >= 0.9)

Settings: forced exits (static policy at ~30/50/70/100% depth), UEM thresholds chosen from the
model's own u values so that the batch leaves at different depths, `threshold_zero_overhead`
(UEM threshold 0, i.e. the whole exit machinery but no exit; efficiency = seconds_full /
seconds, budget >= 0.95), the `none` policy through the loop, and one sampler-level row (a short
DDIM run at a static depth vs the plain sampler).

On a shared machine wall-clock time is noisy; every row also carries `efficiency_min` (fastest
runs) and `efficiency_cpu` (median process CPU time, which other jobs disturb far less) and the
spreads ((max - min) / median) so a reader can judge the noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deediff_jax import sampling
from deediff_jax.diffusion import samplers  # noqa: E402
from deediff_jax.diffusion.schedule import make_schedule  # noqa: E402
from deediff_jax.early_exit import early_exit_forward, make_policy_params  # noqa: E402
from deediff_jax.model import ModelConfig, build, init_params  # noqa: E402
from deediff_jax.model.deediff import DeeDiffUViT  # noqa: E402


def _time(fn, *args):
  """(wall seconds, process CPU seconds) of one call."""
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, time.process_time() - c0


def interleaved(full, ee, repeats, warmup=1):
  """Times two thunks in alternating order (A B, B A, A B, ...) after `warmup` runs of each.

  The machine is shared, so the load drifts: each early-exit run is paired with the plain run
  next to it and the speedup is the median of the per-pair ratios (drift cancels within a pair),
  besides the ratio of the fastest runs.
  """
  for _ in range(warmup):
    jax.block_until_ready(full())
    jax.block_until_ready(ee())
  tf, te = [], []
  for r in range(repeats):
    if r % 2:
      te.append(_time(ee))
      tf.append(_time(full))
    else:
      tf.append(_time(full))
      te.append(_time(ee))
  (tf, cf), (te, ce) = zip(*tf), zip(*te)
  med = statistics.median
  spread = lambda ts: (max(ts) - min(ts)) / med(ts)
  return {"seconds": med(te), "seconds_full": med(tf),
          "speedup": med([f / e for f, e in zip(tf, te)]),
          "seconds_min": min(te), "seconds_full_min": min(tf), "spread": max(spread(te), spread(tf)),
          "cpu_seconds": med(ce), "cpu_seconds_full": med(cf), "cpu_spread": max(spread(ce), spread(cf))}


def pick_thresholds(u_all, targets):
  """For each target depth, the UEM threshold whose 'all'-aggregate layers_run is closest to it."""
  n = u_all.shape[0]
  cands = np.unique(np.concatenate([u_all.ravel() + 1e-6, [0.0]]))
  def layers_run(thr):
    conf = u_all < thr
    conf[-1] = True
    return int(np.max(np.argmax(conf, axis=0) + 1))
  runs = np.array([layers_run(c) for c in cands])
  out = []
  for target in targets:
    best = cands[np.argmin(np.abs(runs - target) + 1e-9 * np.arange(len(cands)))]
    out.append(float(best))
  return sorted(set(out))


def row(name, layers_run, n, timing, zero_overhead=False):
  """One JSON row: speedup = median of paired wall-clock ratios; `efficiency_min` from the fastest
  runs; `efficiency_cpu` from median process CPU time."""
  frac = layers_run / n
  ideal = 1.0 if zero_overhead else 1.0 / frac
  speedup = timing["speedup"]
  return {"name": name, "layers_run_fraction": frac, "seconds": timing["seconds"],
          "seconds_full": timing["seconds_full"], "speedup": speedup, "ideal_speedup": ideal,
          "efficiency": speedup / ideal,
          "efficiency_min": timing["seconds_full_min"] / timing["seconds_min"] / ideal,
          "seconds_min": timing["seconds_min"], "seconds_full_min": timing["seconds_full_min"],
          "spread": timing["spread"],
          # Process CPU time: far less sensitive to other jobs on a shared machine.
          "cpu_seconds": timing["cpu_seconds"], "cpu_seconds_full": timing["cpu_seconds_full"],
          "efficiency_cpu": timing["cpu_seconds_full"] / timing["cpu_seconds"] / ideal,
          "cpu_spread": timing["cpu_spread"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", required=True, help="where to write the rows")
  ap.add_argument("--quick", action="store_true", help="batch 16, fewer repeats (a short run)")
  ap.add_argument("--tiny", action="store_true", help="D=32, 8x8 images, batch 4, 1 repeat: the smoke test")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--sampler-steps", type=int, default=None)
  args = ap.parse_args(argv)
  batch = args.batch or (4 if args.tiny else 16 if args.quick else 64)
  repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 9)
  steps = args.sampler_steps or (2 if args.tiny else 4 if args.quick else 8)
  size = 8 if args.tiny else 16
  # 13 blocks: depths 4, 7, 9 and 13 (~30/50/70/100%); --tiny: 5 blocks, depths 2, 3, 4 and 5.
  cfg = ModelConfig(image_size=size, in_channels=3, embed_dim=32 if args.tiny else 256,
                    depth=4 if args.tiny else 12, num_heads=2 if args.tiny else 4, patch_size=2)
  n = cfg.num_blocks
  module = build(cfg)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  t = jnp.full((batch,), 500.0)
  frac = jnp.float32(0.5)

  plain = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
  ee_fns = {pol: jax.jit(lambda p, x, t, pp, pol=pol: early_exit_forward(
      p, cfg, x, t, policy=pol, policy_params=pp, time_frac=frac)) for pol in ("static", "uem", "none")}

  # Random UEMs give u ~ 0.5 at every depth; a trained UEM grows more confident with depth. Biases
  # falling with depth imitate that (per-sample variation still comes from the random weights).
  params["uems"]["linear"]["bias"] = jnp.linspace(1.5, -1.5, n)[:, None]
  # UEM thresholds at which the batch runs ~30/50/70% of the blocks, from the model's own u.
  _, u_all = jax.jit(lambda p: module.apply({"params": p}, x, t, method=DeeDiffUViT.all_exits))(params)
  depths = (2, 3, 4, 5) if args.tiny else (4, 7, 9, 13)
  uem_thresholds = pick_thresholds(np.asarray(u_all), depths[:3])

  settings = [(f"static_depth_{d}", "static", make_policy_params(n, depth=d)) for d in depths]
  settings += [(f"uem_threshold_{thr:.4f}", "uem", make_policy_params(n, threshold=thr)) for thr in uem_thresholds]
  settings += [("threshold_zero_overhead", "uem", make_policy_params(n, threshold=0.0)),
               ("policy_none_overhead", "none", make_policy_params(n))]

  print(f"devices: {jax.devices()}  machine: {platform.machine()} {platform.processor()} "
        f"cpus: {os.cpu_count()}  batch: {batch}  tokens: {cfg.num_tokens}  D: {cfg.embed_dim}  blocks: {n}")
  rows = []
  for name, pol, pp in settings:
    fn = ee_fns[pol]
    _, st = jax.block_until_ready(fn(params, x, t, pp))
    layers_run = int(st["layers_run"])
    timing = interleaved(lambda: plain(params, x, t), lambda: fn(params, x, t, pp), repeats)
    rows.append(row(name, layers_run, n, timing, zero_overhead=name.endswith("_overhead")))
    _print_row(rows[-1])

  # Sampler level: a short DDIM run at a static depth vs the plain sampler, same noise.
  schedule = make_schedule("linear", 1000)
  depth = depths[1]
  pp = make_policy_params(n, depth=depth)
  x_init = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  @jax.jit
  def ddim_ee(p, x0, pp):
    eps_fn = sampling.make_eps_fn(p, cfg, "static", pp)
    return samplers.ddim(eps_fn, schedule, steps, x0, clip=True)

  @jax.jit
  def ddim_plain(p, x0):
    return samplers.ddim(sampling.make_plain_eps_fn(p, cfg), schedule, steps, x0, clip=True)

  timing = interleaved(lambda: ddim_plain(params, x_init), lambda: ddim_ee(params, x_init, pp),
                       max(3, repeats // 2))
  rows.append(row(f"ddim_{steps}_steps_static_depth_{depth}", depth, n, timing))
  _print_row(rows[-1])

  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(rows, f, indent=2)
  print(f"wrote {args.json}")
  return rows


def _print_row(r):
  print(f"{r['name']:34s} layers {r['layers_run_fraction']:5.2f}  ee {r['seconds']*1e3:8.1f} ms  "
        f"full {r['seconds_full']*1e3:8.1f} ms  speedup {r['speedup']:5.2f}  ideal {r['ideal_speedup']:5.2f}  "
        f"efficiency {r['efficiency']:5.2f} (min {r['efficiency_min']:4.2f}, cpu {r['efficiency_cpu']:4.2f})  "
        f"spread {r['spread']*100:3.0f}% (cpu {r['cpu_spread']*100:3.0f}%)", flush=True)


if __name__ == "__main__":
  main()
