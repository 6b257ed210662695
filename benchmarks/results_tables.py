"""The Markdown tables of docs/results.md and the README, generated from a study's committed files.

  python benchmarks/results_tables.py benchmarks/results/mnist13            # every table
  python benchmarks/results_tables.py benchmarks/results/mnist13 --only tune

Reads, from the study folder: `pareto_budgets.json` (the per-budget learned vs fixed comparison),
`tuned_*.json` (--mode tune's picks), `sweep.json` (every held-out row) and `wallclock.json`.
tests/test_docs.py checks that docs/results.md holds these tables verbatim, so a regenerated
study cannot leave stale numbers behind.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

TABLES = ("headline", "tune", "sweep", "wallclock")


def _load(folder: str, name: str):
  with open(os.path.join(folder, name)) as f:
    return json.load(f)


def _pct(b: float) -> str:
  return f"≤ {round(100 * b)}%"


def _ci(lo_hi, sign=True) -> str:
  f = "{:+.2f}" if sign else "{:.2f}"
  return "[" + ", ".join(f.format(v) for v in lo_hi) + "]"


def describe(setting: str, overrides: dict | None = None) -> str:
  """A sweep or tune setting name in words ('none @ 12 steps' -> '12 steps at full depth')."""
  s = setting.replace(" aggregate=last", "").replace(" aggregate=all", "")
  if s.startswith("none @ ") and s.endswith(" steps"):
    return f"{s[len('none @ '):]} at full depth"
  if s == "none":
    steps = (overrides or {}).get("sample.steps")
    return f"full depth, {steps} steps" if steps else "full depth"
  words = {"uem per bucket ": "UEM per-bucket thresholds ", "uem ": "UEM ", "static ": "static depth ",
           "time_schedule ": "time schedule ", "l2c ": "L2C router ", " + l2c ": " + L2C "}
  for k, v in words.items():
    s = s.replace(k, v)
  if "@" in s:
    base, _, steps = s.partition(" @ ")
    s = f"{base} on {steps}"
  return s


def headline(folder: str) -> str:
  """One row per budget: the best learned and the best fixed point (chosen on calibration noise,
  scored held out) and their paired difference."""
  p = _load(folder, "pareto_budgets.json")
  rows = ["| budget (GFLOPs) | best learned policy | best fixed alternative | learned − fixed [95% CI] |",
          "|---|---|---|---:|"]
  for b in p["budgets"]:
    side = []
    for k in ("learned", "fixed"):
      r = b[k]
      side.append("none within the budget" if r is None else
                  f"{describe(r['setting'], r.get('overrides'))}: {r['psnr']:.1f} dB at {r['gflops_ratio']:.2f}")
    diff = "—" if b["diff"] is None else f"{b['diff']:+.2f} {_ci(b['diff_ci'])}"
    rows.append(f"| {_pct(b['budget'])} | {side[0]} | {side[1]} | {diff} |")
  return "\n".join(rows)


def tune(folder: str) -> str:
  files = [_load(folder, os.path.basename(f)) for f in glob.glob(os.path.join(folder, "tuned_*.json"))]
  rows = ["| budget | tune's pick | GFLOPs | PSNR vs full (dB) [95% CI] | classifier-FID | class acc. | speedup | "
          "runner-up: PSNR, pick − runner-up [95% CI] |",
          "|---|---|---:|---:|---:|---:|---:|---|"]
  for t in sorted(files, key=lambda t: t["budget"]):
    h, r = t["heldout"], t.get("runner_up")
    fid = "—" if h.get("fid") is None else f"{h['fid']:.2f}"
    acc = "—" if h.get("class_accuracy") is None else f"{h['class_accuracy']:.3f}"
    speed = f"{h['speedup']:.2f}× ({h['speedup_min']:.2f}–{h['speedup_max']:.2f})"
    if r:
      ru = (f"{r['family'].replace('_', ' ')}: {describe(r['setting'], r.get('overrides'))}, "
            f"{r['heldout']['psnr']:.2f} dB, {r['diff']:+.2f} {_ci(r['diff_ci'])}")
    else:
      ru = "—"
    rows.append(f"| {_pct(t['budget'])} | {t['family'].replace('_', ' ')}: {describe(t['setting'], t['overrides'])} | "
                f"{t['gflops_ratio']:.2f} | {h['psnr']:.2f} {_ci(h['psnr_ci'], sign=False)} | {fid} | {acc} | "
                f"{speed} | {ru} |")
  return "\n".join(rows)


def sweep(folder: str) -> str:
  rows = ["| setting | GFLOPs ratio | PSNR vs full (dB) | worst 5% | classifier-FID | class acc. |",
          "|---|---:|---:|---:|---:|---:|"]
  data = sorted(_load(folder, "sweep.json"), key=lambda r: (r["setting"] != "none", r["gflops_ratio"]))
  for r in data:
    full = r["setting"] == "none"
    name = f"full depth, {r['steps']} steps" if full else describe(r["setting"])
    psnr = "—" if full or r.get("psnr_vs_full") is None else f"{r['psnr_vs_full']:.2f}"
    worst = "—" if full or r.get("psnr_worst5") is None else f"{r['psnr_worst5']:.2f}"
    fid = "—" if r.get("fid") is None else f"{r['fid']:.2f}"
    acc = "—" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}"
    rows.append(f"| {name} | {r['gflops_ratio']:.2f} | {psnr} | {worst} | {fid} | {acc} |")
  return "\n".join(rows)


def wallclock(folder: str) -> str:
  w = _load(folder, "wallclock.json")
  rows = ["| batch | point (budget) | GFLOPs ratio (batch 100) | PSNR vs full (dB, batch 100) | "
          "speedup vs full depth, median (min–max) |",
          "|---:|---|---:|---:|---:|"]
  for r in w["rows"]:
    name = r["name"]
    setting, _, rest = name.rpartition(" (")
    point = f"{describe(setting, r.get('overrides'))} ({rest}" if setting else name
    rows.append(f"| {r['batch']} | {point} | {r['gflops_ratio']:.2f} | {r['psnr']:.2f} | "
                f"{r['speedup_median']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) |")
  return "\n".join(rows)


SOURCES = {"headline": "pareto_budgets.json", "tune": "tuned_*.json", "sweep": "sweep.json",
           "wallclock": "wallclock.json"}


def tables(folder: str, only=TABLES) -> dict:
  """{table name: Markdown} for each table in `only` whose source file the folder holds."""
  makers = {"headline": headline, "tune": tune, "sweep": sweep, "wallclock": wallclock}
  return {name: makers[name](folder) for name in only if glob.glob(os.path.join(folder, SOURCES[name]))}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("folder", help="a study's results folder, e.g. benchmarks/results/mnist13")
  ap.add_argument("--only", choices=TABLES, action="append", help="one table (repeatable); default all")
  args = ap.parse_args(argv)
  if not os.path.isdir(args.folder):
    print(f"error: {args.folder} is not a folder; pass a study's results folder (benchmarks/results/mnist13)",
          file=sys.stderr)
    return 2
  wanted = tuple(args.only or TABLES)
  out = tables(args.folder, wanted)
  for name in wanted:
    if name not in out:
      print(f"note: no {name} table: {os.path.join(args.folder, SOURCES[name])} is missing (run the "
            f"study's stage that writes it, benchmarks/mnist13_study.sh)", file=sys.stderr)
  for name, text in out.items():
    print(f"<!-- {name} -->\n{text}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
