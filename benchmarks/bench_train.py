"""Training-step throughput against the machine's f32 matmul rate (docs/design.md, "Budgets").

  python benchmarks/bench_train.py [--json PATH] [--steps 20] [--batch 128]
  python benchmarks/bench_train.py --tiny --json /tmp/t.json    # seconds; what the smoke test runs

Model: the reference of docs/design.md "Budgets", a D=256, 13-block (depth 12) DeeDiff U-ViT with 65 tokens
(32x32x3 images, patch 4: 64 patches + the time token, unconditional), all exits and UEMs.
It times the real jitted train step (loss over every exit, backward, AdamW, EMA) on one
device. FLOPs are counted analytically (the matmuls of every block, skip linear and
attention, forward + backward = 3x forward; exit heads, UEMs and elementwise work are not
counted, so the rate is a lower bound); XLA's cost analysis is printed beside it but counts a
`scan` body once, not once per layer. The matmul rate is the best of a few 2048^3 f32 GEMMs.

Both are reported two ways: per wall-clock second, and per CPU second of this process times
the number of cores (`os.cpu_count()`), which stays meaningful on a machine shared with
other jobs. Prints a table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import resource
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def timed(fn, reps: int):
  """(median wall seconds, median CPU seconds x cores) of `fn()` (which must block)."""
  walls, cpus = [], []
  for _ in range(reps):
    w, c = time.perf_counter(), cpu_seconds()
    fn()
    walls.append(time.perf_counter() - w)
    cpus.append((cpu_seconds() - c) / (os.cpu_count() or 1))
  return float(np.median(walls)), float(np.median(cpus))


def matmul_rate(n: int = 2048, reps: int = 10):
  """f32 GEMM rate in GFLOP/s (an n x n by n x n product, 2 n^3 FLOPs): (wall, cpu-normalised)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  wall, cpu = timed(lambda: f(a, b).block_until_ready(), reps)
  return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def bench_config(batch: int, tiny: bool = False):
  from deediff_jax.config import base_config
  c = base_config()
  size = 8 if tiny else 32
  c.data.update(image_size=size, channels=3)
  c.model.update(image_size=size, in_channels=3, embed_dim=32 if tiny else 256, depth=2 if tiny else 12,
                 num_heads=2 if tiny else 4, patch_size=4, num_classes=0)
  c.train.update(batch_size=batch, num_steps=1000, sample_at_end=False)
  c.mesh.update(data=1, fsdp=1)
  return c


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--json", default="")
  ap.add_argument("--tiny", action="store_true", help="D=32, 3 blocks, 8x8, batch 4, 2 steps: a smoke run")
  args = ap.parse_args(argv)
  if args.tiny:
    args.steps, args.batch = 2, 4

  from deediff_jax.config import validate
  from deediff_jax.model.uvit import ModelConfig
  from deediff_jax.train import sharding as shd
  from deediff_jax.train import trainer
  c = validate(bench_config(args.batch, args.tiny))
  mc = ModelConfig.from_config(c.model)
  setup = trainer.make_setup(c)
  state = trainer.init_state(setup)
  rng = np.random.default_rng(0)
  size = mc.image_size
  local = {"image": rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)}
  batch = shd.global_batch(local, setup.batch_sharding, args.batch)

  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  # Analytic matmul FLOPs of forward + backward (3x forward).
  d, tokens, n_blocks, b = mc.embed_dim, mc.num_tokens, mc.num_blocks, args.batch
  hidden = int(d * mc.mlp_ratio)
  per_block = 2 * b * tokens * (4 * d * d + 2 * d * hidden) + 2 * 2 * b * tokens * tokens * d
  skips = 2 * b * tokens * 2 * d * d * (mc.depth // 2)
  analytic = 3 * (n_blocks * per_block + skips)

  step = compiled  # the AOT-compiled step (calling setup.train_step would compile it a second time)
  for _ in range(3):  # warm up (the step donates its state: keep the returned one)
    state, m = step(state, batch)
  jax.block_until_ready(state)
  holder = {"state": state}

  def one_step():
    holder["state"], holder["m"] = step(holder["state"], batch)
    jax.block_until_ready(holder["state"])

  step_wall, step_cpu = timed(one_step, args.steps)
  mm_wall, mm_cpu = matmul_rate(256 if args.tiny else 2048)
  row = {"model": f"D={d}, {n_blocks} blocks, {tokens} tokens, batch {b}, all exits + UEMs",
         "devices": jax.device_count(), "cpu_count": os.cpu_count(), "compile_s": compile_s,
         "step_s_wall": step_wall, "step_s_cpu_per_core": step_cpu, "images_per_sec": b / step_wall,
         "analytic_gflop_per_step": analytic / 1e9, "xla_cost_analysis_gflop": xla_flops / 1e9,
         "achieved_gflop_s_wall": analytic / step_wall / 1e9, "matmul_gflop_s_wall": mm_wall,
         "fraction_of_matmul_wall": (analytic / step_wall) / (mm_wall * 1e9),
         "achieved_gflop_s_cpu": analytic / step_cpu / 1e9, "matmul_gflop_s_cpu": mm_cpu,
         "fraction_of_matmul_cpu": (analytic / step_cpu) / (mm_cpu * 1e9),
         "loss": float(holder["m"]["loss"])}
  print(f"{'model':<32}{row['model']}")
  for k, v in row.items():
    if isinstance(v, float):
      print(f"{k:<32}{v:10.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=2)
  return row


if __name__ == "__main__":
  main()
