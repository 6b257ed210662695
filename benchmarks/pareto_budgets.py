"""Who wins at which compute: the best PSNR vs full of each policy family within GFLOPs budgets.

  python benchmarks/pareto_budgets.py benchmarks/results/mnist13_joint/sweep.json \
      [more sweep.json files of the same backbone ...] [--budgets 0.4,0.55,0.7] [--markdown] [--json -|PATH]

Families: every learned exit (uem / uem_no_time / adadiff, one family per sweep file, since each
file is one trained model), and the fixed alternatives a user would pick instead: static,
time_schedule (ASE / DuoDiff / oracle-calibrated), state_cosine, fewer sampler steps (plain
full-depth rows with their own `steps`) and static depth on top of fewer steps; plus the oracle
(the ceiling: not a runnable saving). For each budget b it prints each family's best PSNR among
its rows with gflops_ratio <= b + slack (default 0.03, "about b"), and the verdict of the
"exits that pay" target: the best learned exit is within 0.5 dB of the best fixed alternative.
Then, at <= 60% of the GFLOPs, whether a learned row keeps classifier-FID within 10% and class
accuracy within 2 points of full depth.

`--json -` (stdout) or `--json PATH` gives the held-out verdict instead, with no slack (a budget b
admits a row when its GFLOPs ratio is <= b; GFLOPs as measured at the sweep's sample.batch_size):
  {"heldout": bool, "full": {"num_images", "fid", "class_accuracy"},
   "budgets": [{"budget", "learned": {"setting", "psnr", "gflops_ratio", ...}, "fixed": {...},
                "diff", "diff_ci": [lo, hi]}]}
"learned" is the best runnable row with a learned component (a learned exit uem / uem_no_time /
adadiff, a Learning-to-Cache router, or both), "fixed" the best of fewer steps, static,
time_schedule (calibrated included), state_cosine and their combinations with fewer steps. When
the sweep ran with sweep.calibration_images > 0 ("heldout": true), each is chosen on its
calibration columns (`choice_gflops_ratio` <= b, the highest `choice_psnr`) and reported with its
held-out columns (psnr_vs_full, gflops_ratio, fid, class_accuracy); otherwise it is chosen and
reported on the same rows ("heldout": false). `diff` is the held-out PSNR difference learned -
fixed and `diff_ci` its paired bootstrap 95% interval over images (deediff_jax/eval/bootstrap.py)
from the sweep's per_image_psnr.npz (null without that file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deediff_jax import policies  # noqa: E402  (the families come from the exit-policy registry)

LEARNED = tuple(p.name for p in policies.registered() if p.learned)
# Runnable rules with no learned signal (not the full-depth row), then the fewer-steps families.
_FIXED_POLICIES = tuple(p.name for p in policies.registered() if p.runnable and not p.learned and not p.full_depth)
FIXED = _FIXED_POLICIES + ("fewer steps", f"{policies.first(value='depth').name} + fewer steps")


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
    for i, r in enumerate(part):
      r = dict(r, _steps_full=steps_full, _file=tag, _index=i, _dir=os.path.dirname(os.path.abspath(path)))
      r["_family"] = family(r)
      if r["_family"] in LEARNED:
        r["_family"] = f"{r['_family']} ({tag})"
      if r["_family"] == "full depth" and full is None:
        full = r
      rows.append(r)
  if full is None:
    raise SystemExit("error: no full-depth 'none' row at sample.steps; include none in sweep.policies")
  return rows, full


def best_within(rows: list[dict], budget: float, slack: float, heldout: bool = False) -> dict:
  """family -> its row with the highest PSNR vs full among rows within the budget.

  On a held-out sweep the choice is made on the calibration columns with no slack (the row's
  held-out columns are what gets printed); otherwise on the rows themselves, within budget + slack.
  """
  key_psnr, key_ratio = ("choice_psnr", "choice_gflops_ratio") if heldout else ("psnr_vs_full", "gflops_ratio")
  limit = budget if heldout else budget + slack
  out = {}
  for r in rows:
    if r["_family"] == "full depth" or r.get(key_psnr) is None or r.get(key_ratio) is None:
      continue
    if r[key_ratio] <= limit:
      if r["_family"] not in out or r[key_psnr] > out[r["_family"]][key_psnr]:
        out[r["_family"]] = r
  return out


def _is_heldout(rows: list[dict]) -> bool:
  scored = [r for r in rows if r["_family"] != "full depth" and r.get("psnr_vs_full") is not None]
  return bool(scored) and all(r.get("choice_psnr") is not None for r in scored)


def _family_table(rows: list[dict], best: dict, budgets: list[float]) -> list[str]:
  """The Markdown table: one line per family, its best row (`best[budget][family]`) per budget."""
  fams = sorted({r["_family"] for r in rows} - {"full depth"},
                key=lambda f: (f.split(" (")[0] not in LEARNED, f != "oracle", f))
  lines = ["| family | " + " | ".join(f"≤ {b:.0%} GFLOPs" for b in budgets) + " |",
           "|---|" + "---:|" * len(budgets)]
  for f in fams:
    cells = []
    for b in budgets:
      r = best[b].get(f)
      cells.append("—" if r is None else f"{r['psnr_vs_full']:.1f} dB ({r['setting']}, {r['gflops_ratio']:.2f})")
    lines.append(f"| {f} | " + " | ".join(cells) + " |")
  return lines


def report(rows: list[dict], full: dict, budgets: list[float], slack: float) -> str:
  if _is_heldout(rows):
    return heldout_report(rows, full, budgets)
  best = {b: best_within(rows, b, slack) for b in budgets}
  lines = _family_table(rows, best, budgets)
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


CACHE_FAMILIES = ("l2c", "l2c+exit")


def _learned(r: dict) -> bool:
  """A runnable row with a learned component: a learned exit, a cache router, or both."""
  if r.get("runnable") is False:
    return False
  cached = (r.get("policy") in CACHE_FAMILIES or r.get("family") in CACHE_FAMILIES
            or r.get("cache_threshold") is not None)
  return cached or r["_family"].split(" (")[0].split(" + ")[0] in LEARNED


def _fixed(r: dict) -> bool:
  if (r.get("runnable") is False or r.get("policy") in CACHE_FAMILIES or r.get("family") in CACHE_FAMILIES
      or r.get("cache_threshold") is not None):
    return False
  fam = r["_family"]
  return fam in FIXED or (fam.endswith(" + fewer steps") and fam[: -len(" + fewer steps")] in FIXED)


def _choose(rows: list, budget: float, heldout: bool):
  key_psnr, key_ratio = ("choice_psnr", "choice_gflops_ratio") if heldout else ("psnr_vs_full", "gflops_ratio")
  ok = [r for r in rows if r.get(key_psnr) is not None and r.get(key_ratio) is not None
        and r[key_ratio] <= budget]
  return max(ok, key=lambda r: (r[key_psnr], -r[key_ratio])) if ok else None


_PER_IMAGE: dict = {}


def _per_image(r: dict):
  path = os.path.join(r["_dir"], "per_image_psnr.npz")
  if path not in _PER_IMAGE:
    _PER_IMAGE[path] = None
    if os.path.isfile(path):
      from deediff_jax.eval.heldout import read_per_image_psnr   # the reader beside its writer
      _PER_IMAGE[path] = read_per_image_psnr(path)
  table = _PER_IMAGE[path]
  return None if table is None else table.get(r["_index"])


def overrides_of(r: dict) -> dict:
  """The config keys that reproduce a sweep row (what benchmarks/bench_wallclock.py times)."""
  policy, cache = r["policy"], None
  if policy in CACHE_FAMILIES:  # labels "l2c T" and "<exit setting> + l2c T" (eval/settings.py)
    exit_label, _, cache = r["setting"].rpartition("l2c ")
    policy = exit_label.split()[0] if policy == "l2c+exit" else "none"
  out = {"exit.policy": policy}
  for key, name in (("threshold", "exit.threshold"), ("threshold_schedule", "exit.threshold_schedule"),
                    ("depth", "exit.depth"), ("schedule", "exit.schedule"), ("aggregate", "exit.aggregate"),
                    ("min_layers", "exit.min_layers"), ("steps", "sample.steps")):
    if r.get(key) not in (None, ""):
      out[name] = r[key]
  if cache is not None:
    out.update({"cache.policy": "l2c", "cache.threshold": float(cache.split()[0])})
  return out


def _point(r: dict) -> dict:
  out = {"setting": r["setting"], "psnr": r["psnr_vs_full"], "gflops_ratio": r["gflops_ratio"],
         "fid": r.get("fid"), "class_accuracy": r.get("class_accuracy"), "file": r["_file"],
         "overrides": overrides_of(r)}
  if r.get("choice_psnr") is not None:
    out.update(choice_psnr=r["choice_psnr"], choice_gflops_ratio=r["choice_gflops_ratio"])
  return out


def json_report(rows: list[dict], full: dict, budgets: list[float]) -> dict:
  """The held-out verdict per budget (the module doc); no slack."""
  scored = [r for r in rows if r["_family"] != "full depth" and r.get("psnr_vs_full") is not None]
  heldout = bool(scored) and all(r.get("choice_psnr") is not None for r in scored)
  out = {"heldout": heldout,
         "full": {"num_images": full.get("num_images"), "fid": full.get("fid"),
                  "class_accuracy": full.get("class_accuracy")},
         "budgets": []}
  for b in budgets:
    learned = _choose([r for r in scored if _learned(r)], b, heldout)
    fixed = _choose([r for r in scored if _fixed(r)], b, heldout)
    entry = {"budget": b, "learned": None if learned is None else _point(learned),
             "fixed": None if fixed is None else _point(fixed), "diff": None, "diff_ci": None}
    if learned is not None and fixed is not None:
      entry["diff"] = learned["psnr_vs_full"] - fixed["psnr_vs_full"]
      a, c = _per_image(learned), _per_image(fixed)
      if a is not None and c is not None and a.shape == c.shape:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from deediff_jax.eval.bootstrap import paired_diff_ci
        diff, lo, hi = paired_diff_ci(a, c)
        entry["diff"], entry["diff_ci"] = diff, [lo, hi]
    out["budgets"].append(entry)
  return out


def heldout_report(rows: list[dict], full: dict, budgets: list[float]) -> str:
  """The Markdown view of a held-out sweep: every choice on calibration noise, no slack, and the
  verdict of issue 22's goal (learned beats fixed by >= 1 dB with the 95% CI above 0; at <= 55% of
  the GFLOPs classifier-FID within 5% and class accuracy within 1 point of full depth)."""
  best = {b: best_within(rows, b, 0.0, heldout=True) for b in budgets}
  lines = ["Each family's best row, chosen on calibration noise (choice_gflops_ratio <= budget, highest "
           "choice_psnr), reported on held-out noise: PSNR vs full (setting, held-out GFLOPs ratio).", ""]
  lines += _family_table(rows, best, budgets)
  lines.append("")
  for e in json_report(rows, full, budgets)["budgets"]:
    b, l, x = e["budget"], e["learned"], e["fixed"]
    if l is None or x is None:
      lines.append(f"- ≤ {b:.0%}: no {'learned' if l is None else 'fixed'} row chosen within the budget")
      continue
    ci = e["diff_ci"]
    met = e["diff"] >= 1.0 and ci is not None and ci[0] > 0
    ci_text = "" if ci is None else f", 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]"
    lines.append(f"- ≤ {b:.0%}: best learned {l['setting']} {l['psnr']:.2f} dB vs best fixed {x['setting']} "
                 f"{x['psnr']:.2f} dB: {e['diff']:+.2f} dB{ci_text}: goal (≥ +1 dB, CI above 0) "
                 f"**{'met' if met else 'missed'}**")
    if b <= 0.55 and full.get("fid") is not None and l.get("fid") is not None:
      fid_ok = l["fid"] <= 1.05 * full["fid"]
      acc_ok = full.get("class_accuracy") is None or l["class_accuracy"] >= full["class_accuracy"] - 0.01
      lines.append(f"  - its classifier-FID {l['fid']:.2f} vs {full['fid']:.2f} at full depth "
                   f"({'within' if fid_ok else 'not within'} 5%), class accuracy {l['class_accuracy']:.3f} vs "
                   f"{full['class_accuracy']:.3f} ({'within' if acc_ok else 'not within'} 1 point)")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("sweeps", nargs="+")
  ap.add_argument("--budgets", default="0.4,0.55,0.7")
  ap.add_argument("--slack", type=float, default=0.03)
  ap.add_argument("--markdown", action="store_true", help="the text output (Markdown; the default)")
  ap.add_argument("--json", default=None, metavar="PATH",
                  help="the held-out verdict as JSON (no slack) to PATH, or '-' for stdout only")
  args = ap.parse_args(argv)
  rows, full = load(args.sweeps)
  if args.json is not None:
    data = json_report(rows, full, [float(b) for b in args.budgets.split(",")])
    text = json.dumps(data, indent=2) + "\n"
    if args.json == "-":
      sys.stdout.write(text)
      return 0
    with open(args.json, "w") as f:
      f.write(text)
  print(report(rows, full, [float(b) for b in args.budgets.split(",")], args.slack), end="")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
