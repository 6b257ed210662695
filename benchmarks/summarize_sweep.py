"""Which exit settings meet a quality target, per policy, from one or more sweep.json files.

  python benchmarks/summarize_sweep.py benchmarks/results/mnist_scratch/sweep.json \
      [--fid-slack 0.10] [--acc-drop 0.02] [--markdown]

Target (issue 5): classifier-FID at most `fid-slack` above the full-depth row and class accuracy
at most `acc-drop` below it. For each policy it prints the setting that runs the fewest layers
(`layer_ratio_run`, the real cost) while meeting the target, or the policy's best-FID row with
"missed" when none does. The full-depth reference is the sweep's `none` row. A target relative
to a model that does not work means nothing: when the full-depth class accuracy is below
`--min-full-accuracy` (default 0.5) the verdict is "n/a" and a warning names the accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def load_rows(path: str) -> list[dict]:
  with open(path) as f:
    rows = json.load(f)
  if not isinstance(rows, list) or not rows or "policy" not in rows[0]:
    raise SystemExit(f"error: {path} is not a sweep.json (a list of rows with 'policy'); "
                     "run --mode sweep first")
  return rows


def reference(rows: list[dict]) -> dict:
  full = [r for r in rows if r["policy"] == "none"]
  if not full:
    raise SystemExit("error: the sweep has no 'none' (full depth) row; include none in sweep.policies")
  return full[0]


def meets(row: dict, full: dict, fid_slack: float, acc_drop: float) -> bool:
  ok = True
  if full.get("fid") is not None and row.get("fid") is not None:
    ok &= row["fid"] <= full["fid"] * (1.0 + fid_slack)
  if full.get("class_accuracy") is not None and row.get("class_accuracy") is not None:
    ok &= row["class_accuracy"] >= full["class_accuracy"] - acc_drop
  return bool(ok)


def best_per_policy(rows: list[dict], fid_slack: float, acc_drop: float) -> list[dict]:
  """One summary per policy (order of first appearance), `met` saying whether the target held."""
  full = reference(rows)
  out = []
  for policy in dict.fromkeys(r["policy"] for r in rows):
    if policy == "none":
      continue
    mine = [r for r in rows if r["policy"] == policy]
    good = [r for r in mine if meets(r, full, fid_slack, acc_drop)]
    if good:
      pick = min(good, key=lambda r: (r["layer_ratio_run"], r.get("fid") or 0.0))
    else:
      pick = min(mine, key=lambda r: (r.get("fid") if r.get("fid") is not None else 0.0))
    out.append(dict(policy=policy, setting=pick["setting"], met=bool(good),
                    layers_saved=1.0 - pick["layer_ratio_run"],
                    layers_saved_per_sample=1.0 - pick["layer_ratio_per_sample"],
                    gflops_ratio=pick.get("gflops_ratio"), speedup=pick["speedup"],
                    psnr_vs_full=pick["psnr_vs_full"], fid=pick.get("fid"),
                    class_accuracy=pick.get("class_accuracy")))
  return out


def _f(v, fmt):
  return "—" if v is None else format(v, fmt)


def full_model_works(full: dict, min_full_accuracy: float) -> bool:
  acc = full.get("class_accuracy")
  return acc is None or acc >= min_full_accuracy


def markdown(summary: list[dict], full: dict, works: bool = True) -> str:
  lines = ["| policy | best setting meeting the target | target met | layers saved (run) | "
           "layers saved (per sample) | speedup | PSNR vs full (dB) | FID | class acc. |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|",
           f"| full depth | none | — | 0% | 0% | 1.00 | — | {_f(full.get('fid'), '.3g')} | "
           f"{_f(full.get('class_accuracy'), '.3f')} |"]
  for s in summary:
    verdict = ("n/a (full model fails)" if not works else "yes" if s["met"] else "no (best FID shown)")
    lines.append(f"| {s['policy']} | {s['setting']} | {verdict} | "
                 f"{s['layers_saved']:.0%} | {s['layers_saved_per_sample']:.0%} | {s['speedup']:.2f} | "
                 f"{s['psnr_vs_full']:.1f} | {_f(s['fid'], '.3g')} | {_f(s['class_accuracy'], '.3f')} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("sweeps", nargs="+", help="sweep.json files")
  ap.add_argument("--fid-slack", type=float, default=0.10)
  ap.add_argument("--acc-drop", type=float, default=0.02)
  ap.add_argument("--min-full-accuracy", type=float, default=0.5,
                  help="below this full-depth class accuracy the target is not judged")
  ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
  args = ap.parse_args(argv)
  for path in args.sweeps:
    if not os.path.isfile(path):
      print(f"error: {path} does not exist; run --mode sweep first", file=sys.stderr)
      return 2
    rows = load_rows(path)
    summary = best_per_policy(rows, args.fid_slack, args.acc_drop)
    full = reference(rows)
    works = full_model_works(full, args.min_full_accuracy)
    print(f"## {path} (FID within {args.fid_slack:.0%}, class accuracy within {args.acc_drop:.2f})\n")
    if not works:
      print(f"warning: the full-depth model's class accuracy is {full['class_accuracy']:.3f} "
            f"(< {args.min_full_accuracy}): it does not produce the requested classes, so meeting the "
            "target relative to it means nothing; train longer first\n")
      for s in summary:
        s["met"] = None
    if args.markdown:
      print(markdown(summary, full, works))
    else:
      print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
