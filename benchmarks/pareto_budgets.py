"""Who wins at which compute: the best PSNR vs full of each policy family within GFLOPs budgets.

  python benchmarks/pareto_budgets.py benchmarks/results/mnist13_joint/sweep.json \
      [more sweep.json files of the same backbone ...] [--budgets 0.4,0.55,0.7] [--markdown]

Families: every learned exit (uem / uem_no_time / adadiff, one family per sweep file, since each
file is one trained model), and the fixed alternatives a user would pick instead: static,
time_schedule (ASE / DuoDiff / oracle-calibrated), state_cosine, fewer sampler steps (plain
full-depth rows with their own `steps`) and static depth on top of fewer steps; plus the oracle
(the ceiling: not a runnable saving). For each budget b it prints each family's best PSNR among
its rows with gflops_ratio <= b + slack (default 0.03, "about b"), and the verdict of the
"exits that pay" target: the best learned exit is within 0.5 dB of the best fixed alternative.
Then, at <= 60% of the GFLOPs, whether a learned row keeps classifier-FID within 10% and class
accuracy within 2 points of full depth.
"""
from __future__ import annotations

import argparse
import json
import os

LEARNED = ("uem", "uem_no_time", "adadiff")
FIXED = ("static", "time_schedule", "state_cosine", "fewer steps", "static + fewer steps")


def family(row: dict) -> str:
  steps_full = row.get("_steps_full")
  fewer = row.get("steps") is not None and steps_full is not None and row["steps"] < steps_full
  if row["policy"] == "none":
    return "fewer steps" if fewer else "full depth"
  if fewer:
    return f"{row['policy']} + fewer steps"
  return row["policy"]


def load(paths: list[str]) -> tuple[list[dict], dict]:
  rows, full = [], None
  for path in paths:
    with open(path) as f:
      part = json.load(f)
    steps_full = max(r["steps"] for r in part)
    tag = os.path.basename(os.path.dirname(os.path.abspath(path)))
    for r in part:
      r = dict(r, _steps_full=steps_full, _file=tag)
      r["_family"] = family(r)
      if r["_family"] in LEARNED:
        r["_family"] = f"{r['_family']} ({tag})"
      if r["_family"] == "full depth" and full is None:
        full = r
      rows.append(r)
  if full is None:
    raise SystemExit("error: no full-depth 'none' row at sample.steps; include none in sweep.policies")
  return rows, full


def best_within(rows: list[dict], budget: float, slack: float) -> dict:
  """family -> its row with the highest PSNR vs full among rows within the budget."""
  out = {}
  for r in rows:
    if r["_family"] == "full depth" or r.get("psnr_vs_full") is None:
      continue
    if r["gflops_ratio"] <= budget + slack:
      if r["_family"] not in out or r["psnr_vs_full"] > out[r["_family"]]["psnr_vs_full"]:
        out[r["_family"]] = r
  return out


def report(rows: list[dict], full: dict, budgets: list[float], slack: float) -> str:
  fams = sorted({r["_family"] for r in rows} - {"full depth"},
                key=lambda f: (f.split(" (")[0] not in LEARNED, f != "oracle", f))
  lines = ["| family | " + " | ".join(f"≤ {b:.0%} GFLOPs" for b in budgets) + " |",
           "|---|" + "---:|" * len(budgets)]
  best = {b: best_within(rows, b, slack) for b in budgets}
  for f in fams:
    cells = []
    for b in budgets:
      r = best[b].get(f)
      cells.append("—" if r is None else f"{r['psnr_vs_full']:.1f} dB ({r['setting']}, {r['gflops_ratio']:.2f})")
    lines.append(f"| {f} | " + " | ".join(cells) + " |")
  lines.append("")
  for b in budgets:
    learned = [r for f, r in best[b].items() if f.split(" (")[0] in LEARNED]
    fixed = [r for f, r in best[b].items() if f in FIXED]
    if not learned or not fixed:
      lines.append(f"- ≤ {b:.0%}: no learned or no fixed row within the budget")
      continue
    l, x = max(learned, key=lambda r: r["psnr_vs_full"]), max(fixed, key=lambda r: r["psnr_vs_full"])
    ok = l["psnr_vs_full"] >= x["psnr_vs_full"] - 0.5
    lines.append(f"- ≤ {b:.0%}: best learned {l['setting']} ({l['_file']}) {l['psnr_vs_full']:.1f} dB vs best "
                 f"fixed {x['setting']} {x['psnr_vs_full']:.1f} dB: **{'on the front' if ok else 'loses'}** "
                 f"({l['psnr_vs_full'] - x['psnr_vs_full']:+.1f} dB)")
  fid_ok = [r for r in rows if r["_family"].split(" (")[0] in LEARNED and r["gflops_ratio"] <= 0.6 + slack
            and r.get("fid") is not None and full.get("fid") is not None
            and r["fid"] <= 1.1 * full["fid"]
            and (full.get("class_accuracy") is None or r["class_accuracy"] >= full["class_accuracy"] - 0.02)]
  lines.append(f"- ≤ 60% GFLOPs with FID within 10% and accuracy within 2 points of full "
               f"(FID {full.get('fid') or float('nan'):.1f}, accuracy {full.get('class_accuracy') or float('nan'):.3f}): "
               + (", ".join(f"{r['setting']} ({r['_file']}, FID {r['fid']:.1f}, acc {r['class_accuracy']:.3f})"
                            for r in fid_ok) if fid_ok else "**no learned row**"))
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("sweeps", nargs="+")
  ap.add_argument("--budgets", default="0.4,0.55,0.7")
  ap.add_argument("--slack", type=float, default=0.03)
  args = ap.parse_args(argv)
  rows, full = load(args.sweeps)
  print(report(rows, full, [float(b) for b in args.budgets.split(",")], args.slack), end="")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
