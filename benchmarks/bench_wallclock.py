"""Wall clock at equal quality: each chosen setting against full depth at the full step count.

  python benchmarks/bench_wallclock.py --config configs/mnist13.py \
      --settings benchmarks/results/mnist13/pareto_budgets.json \
      --json benchmarks/results/mnist13/wallclock.json --batches 1,8,100 --repeats 5 \
      --config.sample.params_file=benchmarks/models/mnist13/params.npz

`--settings` is either `pareto_budgets.py --json` output (each budget's "learned" and "fixed"
point, by their `overrides`) or a JSON list of {"name", "overrides": {config key: value}}.

For every batch size b, each setting samples b images (one batch) from the same noise as the
plain full-depth sampler with the config's own step count (`sampling.sample(..., plain=True)`).
Every program is compiled ahead of time and run once untimed; then the runs are interleaved
(full, setting A, full, setting B, ..., repeated `--repeats` times, the order rotated each round)
so that load drift on a shared machine hits both sides of a pair alike. Each setting's speedup is
the median of its paired ratios seconds_full / seconds (the full run timed just before it), with
min and max. The JSON records the machine, the batch sizes, the repeats and every raw time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deediff_jax import sampling  # noqa: E402
from deediff_jax.config import load_config_file, validate  # noqa: E402


def read_settings(path: str) -> list:
  """[{"name", "overrides"}] from a settings list or from pareto_budgets.py --json output."""
  with open(path) as f:
    data = json.load(f)
  if isinstance(data, list):
    return [{"name": d["name"], "overrides": dict(d.get("overrides", {}))} for d in data]
  out, seen = [], set()
  for b in data.get("budgets", []):
    for side in ("learned", "fixed"):
      point = b.get(side) or {}
      if "overrides" not in point:
        continue
      key = json.dumps(point["overrides"], sort_keys=True)
      if key in seen:
        continue
      seen.add(key)
      out.append({"name": f"{point.get('setting', side)} ({side}, budget {b['budget']})",
                  "overrides": dict(point["overrides"]), "budget": b["budget"], "side": side,
                  "gflops_ratio": point.get("gflops_ratio"), "psnr": point.get("psnr")})
  return out


def load_params(config, workdir: str):
  if str(config.sample.get("params_file", "") or ""):
    from deediff_jax.train import params_file
    return params_file.load_for(config)
  from deediff_jax.train.checkpoint import load_params as load_ckpt
  return load_ckpt(workdir, config, use_ema=True)


def parse_value(text: str):
  """A --config.KEY=VALUE string as the Python value it spells (numbers, booleans, else text)."""
  import ast
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return {"true": True, "false": False}.get(text.lower(), text)


def apply_overrides(config, overrides: dict):
  """A validated copy of `config` with {'a.b': value} set (ints become floats where the key is)."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    node[leaf] = value
  return validate(c)


def _seconds(params, c, rng, num, labels, kw) -> float:
  return sampling.timed(sampling.sample, params, c, rng, num, labels=labels, **kw)[1]


def run(config, params, settings: list, batches: list, repeats: int, progress: bool = True) -> dict:
  from tqdm import tqdm
  n_cls = int(config.model.num_classes)
  rng = jax.random.PRNGKey(int(config.sample.seed))
  rows = []
  # One tick per sampling run (the untimed warm-ups and every timed pair), weighted by batch size,
  # so the ETA holds while batch 100 dominates the total.
  runs = (1 + len(settings)) + 2 * repeats * len(settings)
  bar = tqdm(total=runs * sum(batches), desc="wallclock", unit="img", disable=not progress,
             file=sys.stderr)
  for b in batches:
    base = apply_overrides(config, {"sample.batch_size": b})
    labels = (np.arange(b) % n_cls) if n_cls > 0 else None
    full = (base, dict(plain=True))
    variants = [(s, apply_overrides(base, dict(s["overrides"], **{"sample.batch_size": b}))) for s in settings]
    for c, kw in [full] + [(c, {}) for _, c in variants]:  # compile everything before timing
      bar.set_postfix_str(f"batch {b}: compiling")
      sampling.sample(params, c, rng, b, labels=labels, compile_only=True, **kw)
      _seconds(params, c, rng, b, labels, kw)  # one untimed run of each program
      bar.update(b)
    bar.set_postfix_str(f"batch {b}: timing")
    pairs = {j: [] for j in range(len(variants))}
    for r in range(repeats):
      # Each setting is paired with a full-depth run timed right before it; the order of the
      # settings rotates every round so that no setting always follows the same neighbour.
      for j in list(range(len(variants)))[r % len(variants):] + list(range(len(variants)))[:r % len(variants)]:
        s, c = variants[j]
        pairs[j].append((_seconds(params, base, rng, b, labels, full[1]), _seconds(params, c, rng, b, labels, {})))
        bar.update(2 * b)
    for j, (s, _) in enumerate(variants):
      ratios = [f / t for f, t in pairs[j]]
      rows.append({"batch": b, "name": s["name"], "overrides": s["overrides"],
                   "budget": s.get("budget"), "side": s.get("side"), "gflops_ratio": s.get("gflops_ratio"),
                   "psnr": s.get("psnr"),
                   "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                   "speedup_max": max(ratios),
                   "seconds_median": statistics.median(t for _, t in pairs[j]),
                   "seconds_full_median": statistics.median(f for f, _ in pairs[j]),
                   "pairs": pairs[j]})
      bar.write(f"batch {b:4d}  {s['name']:60s}  {statistics.median(ratios):5.2f}x  "
                f"[{min(ratios):.2f}, {max(ratios):.2f}]")
  bar.close()
  return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                      "jax": jax.__version__},
          "sampler": str(config.sample.sampler), "steps": int(config.sample.steps),
          "guidance_scale": float(config.sample.guidance_scale), "repeats": repeats,
          "batches": batches, "rows": rows}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", default="", help="checkpoint workdir (unless sample.params_file is set)")
  p.add_argument("--settings", required=True)
  p.add_argument("--json", required=True)
  p.add_argument("--batches", default="1,8,100")
  p.add_argument("--repeats", type=int, default=5)
  args, rest = p.parse_known_args(argv)
  overrides = {}
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      p.error(f"unknown argument {item!r}; config overrides look like --config.KEY=VALUE")
    key, value = item[len("--config."):].split("=", 1)
    overrides[key] = parse_value(value)
  config = apply_overrides(load_config_file(args.config), overrides)
  params = load_params(config, args.workdir)
  settings = read_settings(args.settings)
  out = run(config, params, settings, [int(b) for b in args.batches.split(",")], args.repeats)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
