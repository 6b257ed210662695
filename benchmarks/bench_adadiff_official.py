"""Our AdaDiff early exit vs the official way of exiting, on the same weights, on this CPU.

  python benchmarks/bench_adadiff_official.py --json benchmarks/results/bench_adadiff_official_cpu.json
  python benchmarks/bench_adadiff_official.py --tiny --json /tmp/b.json   # seconds; the smoke test

"Official" is tests/torch_uvit.py's `AdaDiffUViT`, a PyTorch rendering of the official AdaDiff model
(Tangshengku/AdaDiff libs/uvit.py) written from its description: it runs blocks until the batch exits
and, as the official forward does, decodes every block's hidden state with the shared head
(`inner_state.append(self.output_forward(x, L))`) and scores it with that block's confidence module,
then decodes the exit block once more. "Ours" is `early_exit_forward(..., policy="adadiff",
aggregate="mean")` inside one jitted function, compiled before any timing, on the same weights
converted with `deediff_jax.convert.uvit.convert`.

The model: a CIFAR-like U-ViT (32x32x3, patch 2: 256 patch tokens, D=256, depth 12: 13 blocks,
batch 16), unconditional, random weights. Random confidence modules would give ~0.5 everywhere;
their biases rise with depth (a trained model grows more confident with depth), so thresholds
between the blocks' batch-mean confidences put the exit at an in-block (with patience), the
mid-block and an out-block; threshold 1.0 never exits (full depth, the official default).

Each row times both ways interleaved (ours, official, official, ours, ...) after a warm-up, with
torch and XLA on the same number of threads (all cores of this machine), and reports

  ratio = official seconds / our seconds   (median of the per-pair ratios)

plus the ratio of the fastest runs and of process CPU time (less disturbed by other jobs), and
`ratio_no_decode`: against the same torch loop without the per-block decoding, which separates
the cost of the official per-block decode from the eager-vs-compiled difference. Every row also
checks that both give the same output (max |diff|) and the same exit layer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # torch_uvit: the one copy of the torch models

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_uvit  # noqa: E402
from deediff_jax.convert import uvit as cu  # noqa: E402
from deediff_jax.early_exit import early_exit_forward, make_policy_params  # noqa: E402
from deediff_jax.model.uvit import ModelConfig  # noqa: E402

SIZES = {
    "default": dict(image_size=32, embed_dim=256, depth=12, num_heads=4, patch_size=2, batch=16,
                    repeats=5, exit_blocks=(4, 7, 10)),
    "tiny": dict(image_size=8, embed_dim=32, depth=4, num_heads=4, patch_size=2, batch=2, repeats=1,
                 exit_blocks=(1, 3, 4)),
}


def build_models(size: dict, seed: int = 0):
  """(torch AdaDiff model, ModelConfig, converted params); confidence rising with depth."""
  torch.manual_seed(seed)
  model = torch_uvit.AdaDiffUViT(img_size=size["image_size"], patch_size=size["patch_size"], in_chans=3,
                                 embed_dim=size["embed_dim"], depth=size["depth"], num_heads=size["num_heads"])
  torch_uvit.randomize_(model, seed=seed).eval()
  n = size["depth"] + 1
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for i, lte in enumerate(model.lte_classifer):
      target = 0.55 + 0.4 * i / (n - 1)      # 0.55 at block 1 -> 0.95 at the last block
      lte.lte.weight.mul_(0.2)
      lte.lte.bias.copy_(math.log(target / (1 - target)) + 0.2 * torch.randn(lte.lte.bias.shape, generator=g))
  cfg = ModelConfig(image_size=size["image_size"], in_channels=3, embed_dim=size["embed_dim"],
                    depth=size["depth"], num_heads=size["num_heads"], patch_size=size["patch_size"],
                    exit_style="adadiff")
  params = cu.convert(torch_uvit.numpy_state_dict(model), cfg)
  return model, cfg, params


def thresholds_for(means, exit_blocks):
  """A threshold just under block e's batch-mean confidence and over every earlier block's (so the
  first confident block is e; patience may move an in-block exit one block on), per e."""
  out = []
  for e in exit_blocks:
    below = max(means[:e - 1], default=0.0)
    out.append(float((below + means[e - 1]) / 2) if means[e - 1] > below else float(means[e - 1] - 1e-4))
  return out


def _timed(fn):
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def interleaved(ours, official, no_decode, repeats: int, warmup: int = 1) -> dict:
  """Times the three thunks in alternating order after `warmup` runs of each; per-pair ratios."""
  for _ in range(warmup):
    ours(), official(), no_decode()
  t = {"ours": [], "official": [], "no_decode": []}
  for r in range(repeats):
    order = ("ours", "official", "no_decode") if r % 2 == 0 else ("no_decode", "official", "ours")
    for name in order:
      t[name].append(_timed({"ours": ours, "official": official, "no_decode": no_decode}[name]))
  wall = {k: [w for w, _ in v] for k, v in t.items()}
  cpu = {k: [c for _, c in v] for k, v in t.items()}
  med = statistics.median
  spread = lambda ts: (max(ts) - min(ts)) / med(ts)
  return {
      "seconds_ours": med(wall["ours"]), "seconds_official": med(wall["official"]),
      "seconds_official_no_decode": med(wall["no_decode"]),
      "ratio": med([o / u for o, u in zip(wall["official"], wall["ours"])]),
      "ratio_min": min(wall["official"]) / min(wall["ours"]),
      "ratio_cpu": med(cpu["official"]) / med(cpu["ours"]),
      "ratio_no_decode": med([o / u for o, u in zip(wall["no_decode"], wall["ours"])]),
      "cpu_seconds_ours": med(cpu["ours"]), "cpu_seconds_official": med(cpu["official"]),
      "spread": max(spread(v) for v in wall.values()),
  }


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", required=True, help="where to write the result")
  ap.add_argument("--tiny", action="store_true", help="a tiny model, one repetition (the smoke test)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores JAX uses)")
  args = ap.parse_args(argv)
  size = dict(SIZES["tiny" if args.tiny else "default"])
  size["batch"] = args.batch or size["batch"]
  size["repeats"] = args.repeats or size["repeats"]
  threads = args.threads or len(os.sched_getaffinity(0))  # XLA's CPU client uses every core it may
  prev_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    return _run(size, threads, args.json)
  finally:
    torch.set_num_threads(prev_threads)


def _run(size: dict, threads: int, json_path: str) -> dict:
  model, cfg, params = build_models(size)
  n, b = cfg.num_blocks, size["batch"]
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  t = np.full((b,), 500.0, np.float32)
  x_t, t_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)

  @jax.jit
  def ours(p, x, t, thr):
    return early_exit_forward(p, cfg, x, t, policy="adadiff", policy_params=make_policy_params(n, threshold=thr),
                              aggregate="mean")

  def official(thr, decode=True):
    with torch.no_grad():
      return model(x_t, t_t, thres=thr, decode_every_block=decode)

  with torch.no_grad():
    means = [float(c.mean()) for c in model(x_t, t_t)[3]]  # every block's batch-mean confidence
  settings = [(f"threshold_{thr:.4f}", thr) for thr in thresholds_for(means, size["exit_blocks"])]
  settings.append(("full_depth", 1.0))   # never confident: all blocks (the official default thres=1.0)

  t0 = time.perf_counter()
  jax.block_until_ready(ours(params, x, t, np.float32(1.0)))   # the one compile (thresholds are traced)
  compile_seconds = time.perf_counter() - t0
  print(f"jax {jax.__version__} {jax.devices()}  torch {torch.__version__} threads {threads}  "
        f"machine {platform.machine()} cpus {os.cpu_count()}  batch {b}  tokens {cfg.num_tokens}  "
        f"D {cfg.embed_dim}  blocks {n}  compile {compile_seconds:.1f} s", flush=True)
  rows = []
  for name, thr in settings:
    thr32 = np.float32(thr)
    eps, stats = jax.block_until_ready(ours(params, x, t, thr32))
    eps_ref, layer, inner, _ = official(thr)
    diff = float(np.abs(np.asarray(eps) - eps_ref.numpy().transpose(0, 2, 3, 1)).max())
    timing = interleaved(lambda: jax.block_until_ready(ours(params, x, t, thr32)), lambda: official(thr),
                         lambda: official(thr, decode=False), size["repeats"])
    row = {"name": name, "threshold": thr, "exit_layer_ours": int(np.asarray(stats["exit_layer"])[0]),
           "exit_layer_official": int(layer), "layers_run": int(stats["layers_run"]), "layers_total": n,
           "layers_run_fraction": int(stats["layers_run"]) / n, "official_decodes": len(inner) + 1,
           "max_abs_diff": diff, **timing}
    rows.append(row)
    print(f"{name:18s} exit {row['exit_layer_ours']:2d}/{n} (official {row['exit_layer_official']:2d})  "
          f"ours {row['seconds_ours'] * 1e3:8.1f} ms  official {row['seconds_official'] * 1e3:8.1f} ms "
          f"(no per-block decode {row['seconds_official_no_decode'] * 1e3:8.1f} ms)  ratio {row['ratio']:5.2f} "
          f"(min {row['ratio_min']:4.2f}, cpu {row['ratio_cpu']:4.2f}, vs no-decode {row['ratio_no_decode']:4.2f})  "
          f"max|diff| {diff:.1e}  spread {row['spread'] * 100:3.0f}%", flush=True)

  result = {"model": {"image_size": cfg.image_size, "in_channels": 3, "embed_dim": cfg.embed_dim,
                      "depth": cfg.depth, "num_heads": cfg.num_heads, "patch_size": cfg.patch_size,
                      "tokens": cfg.num_tokens, "blocks": n},
            "batch": b, "repeats": size["repeats"], "threads": threads, "torch_threads": torch.get_num_threads(),
            "jax_version": jax.__version__, "torch_version": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "cpus": os.cpu_count(),
            "compile_seconds": compile_seconds, "block_mean_confidence": means, "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
  with open(json_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {json_path}")
  return result


if __name__ == "__main__":
  main()
