"""Do reused sublayers save real time? Learning-to-Cache's cached forward vs the plain forward.

  python benchmarks/bench_cache.py --json benchmarks/results/bench_cache_cpu.json [--quick]

One model with random weights, the headline MNIST model's shape (configs/mnist13.py: 13 blocks,
D=128, 14x14x1 with patch 2, class-conditional), batch 100. Each row times, in one process, the
plain forward (`module.apply`, the scan path) and one cached evaluation
(`early_exit.early_exit_forward(..., cache=..., reuse=...)`, policy none) with the previous
evaluation's updates valid for every block; both are compiled before timing and interleaved
after a warm-up (bench_early_exit.interleaved: median of paired ratios). The reuse patterns:
every attention, every MLP, both sublayers of half the blocks, everything, nothing (the cost of
the cache machinery itself). One sampler-level row compares DDIM with the DiT alternation and
every sublayer reused at the cached steps against the plain DDIM sampler.

  ideal_speedup  = FLOPs of the plain forward / (that - FLOPs of the sublayers actually skipped),
                   each skipped sublayer at its own FLOPs (eval/cache_rows.sublayer_flops: an MLP
                   is about 62% of a block here), eval/flops.py's conventions
  efficiency     = measured speedup / ideal_speedup      (issue 23: >= 0.9)

`efficiency_cpu` uses median process CPU time, which other jobs on a shared machine disturb less.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deediff_jax import caching  # noqa: E402
from deediff_jax.diffusion import samplers  # noqa: E402
from deediff_jax.diffusion.schedule import make_schedule  # noqa: E402
from deediff_jax.early_exit import early_exit_forward, make_policy_params  # noqa: E402
from deediff_jax.eval import flops as flops_lib  # noqa: E402
from deediff_jax.eval.cache_rows import sublayer_flops  # noqa: E402
from deediff_jax.model import ModelConfig, build, init_params  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_early_exit", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_early_exit.py"))
bee = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bee)


def ideal(cfg, reuse, evals_full, evals_cached_skips=None):
  """FLOPs ratio: plain forward / cached forward, for one evaluation with `reuse` [N, 2]."""
  full = flops_lib.forward_flops(cfg)
  sub = sublayer_flops(cfg)
  skipped = int(np.sum(reuse[:, 0])) * sub["attn"] + int(np.sum(reuse[:, 1])) * sub["mlp"]
  return full / (full - skipped)


def row(name, timing, ideal_speedup, skipped_fraction):
  speedup = timing["speedup"]
  return {"name": name, "flops_skipped_fraction": skipped_fraction, "seconds": timing["seconds"],
          "seconds_full": timing["seconds_full"], "speedup": speedup, "ideal_speedup": ideal_speedup,
          "efficiency": speedup / ideal_speedup,
          "efficiency_min": timing["seconds_full_min"] / timing["seconds_min"] / ideal_speedup,
          "spread": timing["spread"], "cpu_seconds": timing["cpu_seconds"],
          "cpu_seconds_full": timing["cpu_seconds_full"],
          "efficiency_cpu": timing["cpu_seconds_full"] / timing["cpu_seconds"] / ideal_speedup,
          "cpu_spread": timing["cpu_spread"]}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--json", default="")
  ap.add_argument("--batch", type=int, default=100)
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--quick", action="store_true", help="fewer repeats and no sampler row (the test)")
  args = ap.parse_args(argv)
  repeats = 3 if args.quick else args.repeats
  cfg = ModelConfig(image_size=14, in_channels=1, embed_dim=128, depth=12, num_heads=4, patch_size=2,
                    num_classes=10, input_skip=True)
  n, b = cfg.num_blocks, args.batch
  module = build(cfg)
  params = jax.jit(lambda k: init_params(module, k))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v) + 0.05 * rng.standard_normal(v.shape),
                                                        jnp.float32), params)
  x = jax.random.normal(jax.random.PRNGKey(1), (b, 14, 14, 1))
  t = jnp.full((b,), 500.0)
  y = jnp.arange(b) % 10
  pp = make_policy_params(n)
  plain = jax.jit(lambda p, x: module.apply({"params": p}, x, t, y))
  # A previous evaluation: every block ran, so every cache entry is valid.
  st0 = caching.init_cache(cfg, b)
  _, s_prev = jax.jit(lambda p, x: early_exit_forward(p, cfg, x, t, y, policy="none", policy_params=pp,
                                                      cache=st0, reuse=jnp.zeros((n, 2), bool)))(params, x * 0.9)
  state = s_prev["cache"]
  cached = jax.jit(lambda p, x, reuse: early_exit_forward(p, cfg, x, t, y, policy="none", policy_params=pp,
                                                          cache=state, reuse=reuse)[0])
  half = np.zeros((n, 2), bool)
  half[::2] = True
  patterns = {"nothing_reused (cache machinery only)": np.zeros((n, 2), bool),
              "every_attention_reused": np.stack([np.ones(n, bool), np.zeros(n, bool)], 1),
              "every_mlp_reused": np.stack([np.zeros(n, bool), np.ones(n, bool)], 1),
              "both_sublayers_of_alternate_blocks": half,
              "everything_reused": np.ones((n, 2), bool)}
  rows = []
  full_flops = flops_lib.forward_flops(cfg)
  for name, reuse in patterns.items():
    r = jnp.asarray(reuse)
    jax.block_until_ready(cached(params, x, r))       # compiled (one program serves every pattern)
    timing = bee.interleaved(lambda: plain(params, x), lambda: cached(params, x, r), repeats, warmup=2)
    ideal_speedup = ideal(cfg, reuse, 1)
    rows.append(row(name, timing, ideal_speedup, 1 - 1 / ideal_speedup))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
  if not args.quick:
    # Sampler level: DDIM 10 steps, DiT alternation (steps 2, 4, 6, 8 cached), every sublayer reused there.
    steps = 10
    sched = make_schedule("cosine", 1000)
    reuse = jnp.asarray(caching.reuse_schedule(np.zeros((steps, 2 * n), np.float32), 0.5, steps, "ddim"))
    from deediff_jax.sampling import make_eps_fn
    eps_plain = make_eps_fn(params, cfg, y=y, plain=True)
    eps_loop = make_eps_fn(params, cfg, "none", pp, y=y)
    run_plain = jax.jit(lambda x: samplers.ddim(eps_plain, sched, steps, x)[0])
    run_cached = jax.jit(lambda x: samplers.ddim(eps_loop, sched, steps, x,
                                                 cache=(caching.init_cache(cfg, b), reuse))[0])
    jax.block_until_ready(run_plain(x))
    jax.block_until_ready(run_cached(x))
    timing = bee.interleaved(lambda: run_plain(x), lambda: run_cached(x), max(5, repeats // 3), warmup=1)
    cached_steps = int(np.sum(np.asarray(reuse).any(axis=(1, 2))))
    sub = sublayer_flops(cfg)
    skipped = cached_steps * n * (sub["attn"] + sub["mlp"])
    ideal_speedup = steps * full_flops / (steps * full_flops - skipped)
    rows.append(row(f"sampler_ddim_{steps}_steps_alternating_cache", timing, ideal_speedup, 1 - 1 / ideal_speedup))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
  out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                     "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                     "load_average_at_end": os.getloadavg()},
         "model": "13 blocks, D=128, 14x14x1, patch 2, 51 tokens, class-conditional (configs/mnist13.py's shape), random weights",
         "batch": b, "repeats": repeats,
         "sublayer_flops": sublayer_flops(cfg), "block_flops": flops_lib.block_flops(cfg),
         "forward_flops": full_flops,
         "command": "python benchmarks/bench_cache.py --json benchmarks/results/bench_cache_cpu.json",
         "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
