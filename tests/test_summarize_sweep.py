"""benchmarks/summarize_sweep.py: the per-policy pick under a quality target, on hand-made rows."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "summarize_sweep.py")
spec = importlib.util.spec_from_file_location("summarize_sweep", _PATH)
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def row(policy, setting, ratio, fid, acc, **kw):
  return dict(policy=policy, setting=setting, layer_ratio_run=ratio, layer_ratio_per_sample=ratio - 0.05,
              gflops_ratio=ratio, speedup=1 / ratio, psnr_vs_full=30.0, fid=fid, class_accuracy=acc, **kw)


ROWS = [row("uem", "uem 0.1", 0.8, 10.5, 0.97), row("uem", "uem 0.2", 0.5, 10.9, 0.96),
        row("uem", "uem 0.3", 0.4, 11.2, 0.97),            # FID 12% above full: misses
        row("static", "static 3", 0.3, 20.0, 0.90), row("static", "static 5", 0.6, 14.0, 0.95),
        row("none", "none", 1.0, 10.0, 0.975)]


def test_best_per_policy_picks_fewest_layers_meeting_the_target():
  out = {s["policy"]: s for s in S.best_per_policy(ROWS, 0.10, 0.02)}
  assert list(out) == ["uem", "static"]
  assert out["uem"]["setting"] == "uem 0.2" and out["uem"]["met"]
  assert out["uem"]["layers_saved"] == pytest.approx(0.5)
  assert out["uem"]["layers_saved_per_sample"] == pytest.approx(0.55)
  # No static row meets it: the best-FID row is shown and marked as missed.
  assert out["static"]["setting"] == "static 5" and not out["static"]["met"]
  # A looser accuracy bound changes nothing for static (FID still 40% above), a looser FID one does.
  assert {s["policy"]: s["setting"] for s in S.best_per_policy(ROWS, 0.15, 0.02)}["uem"] == "uem 0.3"


def test_cli_markdown_and_errors(tmp_path, capsys):
  p = tmp_path / "sweep.json"
  p.write_text(json.dumps(ROWS))
  assert S.main([str(p), "--markdown"]) == 0
  md = capsys.readouterr().out
  assert "| uem | uem 0.2 | yes | 50% | 55% | 2.00 | 30.0 | 10.9 | 0.960 |" in md
  assert "| static | static 5 | no (best FID shown) |" in md
  assert S.main([str(tmp_path / "missing.json")]) == 2
  assert "does not exist; run --mode sweep first" in capsys.readouterr().err
  p.write_text(json.dumps([r for r in ROWS if r["policy"] != "none"]))
  with pytest.raises(SystemExit, match="no 'none'"):
    S.main([str(p)])


def test_a_full_model_at_chance_gets_no_verdict(tmp_path, capsys):
  rows = [dict(r, class_accuracy=0.11) for r in ROWS]
  p = tmp_path / "sweep.json"
  p.write_text(json.dumps(rows))
  assert S.main([str(p), "--markdown"]) == 0
  out = capsys.readouterr().out
  assert "warning: the full-depth model's class accuracy is 0.110 (< 0.5)" in out
  assert "| uem | uem 0.2 | n/a (full model fails) |" in out and "| yes |" not in out
