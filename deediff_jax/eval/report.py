"""What a sweep found, written down: the rows as sweep.json / sweep.csv / a Markdown table, the
run's facts (`run_info`: machine, checkpoint, baseline, quality) as run.json and a header paragraph,
and the pictures: Pareto plots, exit heatmaps, sample grids at matched compute, caption accuracy.
The files are listed in eval/sweep.py's doc.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
from typing import Optional

import jax
import numpy as np

from deediff_jax import policies
from deediff_jax.data.eval_context import load_eval_captions
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.eval.calibration.describe import describe as describe_calibration
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval import plots
from deediff_jax.eval.runner import ROW_KEYS, Context

IDENTICAL_PSNR = fidelity_lib.PSNR_MAX - 1e-6   # a mean this high: every image equal up to rounding
GRID_IMAGES = 100
SWEEP_DIR = "sweep"
TABLE_COLUMNS = (
    ("setting", "setting"), ("layer_ratio_run", "layers run"),
    ("layer_ratio_per_sample", "layer ratio / sample"), ("gflops_per_image", "GFLOPs/img"),
    ("seconds", "s"), ("speedup", "speedup"), ("psnr_vs_full", "PSNR vs full (dB)"),
    ("psnr_worst5", "PSNR worst 5%"), ("fid", "FID"), ("class_accuracy", "class acc."),
)


def machine_info() -> dict:
  dev = jax.devices()[0]
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
          "device": dev.device_kind, "device_count": jax.device_count(), "jax": jax.__version__}


def run_info(ctx: Context) -> dict:
  """The facts behind the table: machine, checkpoint, sampling, baseline, quality."""
  c = ctx.config
  return {
      "machine": machine_info(), "workdir": ctx.workdir, "checkpoint_step": ctx.checkpoint_step,
      "use_ema": bool(c.sample.use_ema), "num_images": ctx.num, "seed": int(c.sample.seed),
      "batch_size": int(c.sample.batch_size), "sampler": str(c.sample.sampler),
      "steps": int(c.sample.steps), "eta": float(c.sample.eta),
      "guidance_scale": float(c.sample.guidance_scale),
      "fidelity_sampler": ctx.fidelity_config.sample.sampler, "layers_total": ctx.cfg.num_blocks,
      "seconds_full": ctx.seconds_full, "seconds_full_runs": list(ctx.seconds_full_runs),
      "gflops_full": ctx.gflops_full,
      "fid_full": ctx.quality_full.get("fid"), "class_accuracy_full": ctx.quality_full.get("class_accuracy"),
      "fid_kind": ctx.quality.fid_kind_name, **ctx.quality.info,
  }


def header_md(info: dict, title: str = "Early-exit sweep") -> str:
  m = info["machine"]
  step = info["checkpoint_step"]
  lines = [f"# {title}", ""]
  text = (f"Machine: {m['platform']}, {m['cpu_count']} CPUs, JAX {m['jax']} on backend "
          f"`{m['backend']}` ({m['device_count']} x {m['device']}). Checkpoint: "
          f"{'step ' + str(step) if step is not None else 'params given in Python'} "
          f"({'EMA' if info['use_ema'] else 'raw'} weights). {info['num_images']} images per setting "
          f"(seed {info['seed']}, batch {info['batch_size']}), sampler {info['sampler']} with "
          f"{info['steps']} steps")
  if info["guidance_scale"]:
    text += f", guidance {info['guidance_scale']:g}"
  text += (f"; every setting starts from the same noise. FID kind: **{info['fid_kind']}**")
  if info.get("num_real"):
    text += f", real statistics from {info['num_real']} images of {info['real_source']} (train split)"
  text += "."
  if info.get("classifier_accuracy") is not None:
    text += (f" Class accuracy = how often the dataset classifier (accuracy "
             f"{info['classifier_accuracy']:.3f} on the {info['classifier_accuracy_on']}) predicts "
             "the requested label.")
  runs = info.get("seconds_full_runs") or [info["seconds_full"]]
  timed = ("timed in this process" if len(runs) == 1 else
           "timed in this process before and after the settings, " +
           " and ".join(f"{v:.3f} s" for v in runs) + ", mean")
  text += (f" Full-depth baseline (plain forward, no exit machinery, {timed}): "
           f"{info['seconds_full']:.3f} s, {info['gflops_full']:.4g} GFLOPs/image")
  if info.get("fid_full") is not None:
    text += f", FID {info['fid_full']:.4g}"
  if info.get("class_accuracy_full") is not None:
    text += f", class accuracy {info['class_accuracy_full']:.3f}"
  text += (f". speedup = seconds_full / seconds; PSNR vs full = mean per-image PSNR against the "
           f"full-depth images ({info['fidelity_sampler']}, deterministic, same noise; worst 5% = "
           "mean over the 5% lowest); layers run = blocks the loop executed / "
           f"{info['layers_total']}.")
  lines.append(text)
  if info.get("calibration"):
    lines += ["", "Calibration: " + describe_calibration(info["calibration"]) + "."]
  if info.get("calibration_per_bucket"):
    lines += ["", "Per-bucket calibration: " + describe_calibration(info["calibration_per_bucket"]) + "."]
  if info.get("captions"):
    acc = info["captions"]["overall_accuracy"]
    lines += ["", f"Text model: class accuracy over the held-out captions {acc['full']:.3f} at full "
              f"depth, {acc['chosen']:.3f} with {info['captions']['setting']}; per caption in `captions.md`."]
  if info.get("grids"):
    lines += ["", "Sample grids at matched compute: " + "; ".join(
        f"`{g['file']}` = {g['setting']} (layers run {g['layer_ratio_run']:.3f})" for g in info["grids"]) + "."]
  return "\n".join(lines) + "\n"


def table_md(rows) -> str:
  cols = [c for c in TABLE_COLUMNS
          if c[0] != "class_accuracy" or any(r.get("class_accuracy") is not None for r in rows)]
  cols = [c for c in cols if c[0] != "fid" or any(r.get("fid") is not None for r in rows)]
  return plots.speed_quality_table_md(rows, cols)


def _scalar(v) -> bool:
  return v is None or isinstance(v, (bool, int, float, str))


def write_csv(path: str, rows) -> str:
  keys = [k for k in ROW_KEYS if all(_scalar(r.get(k)) for r in rows)]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
  return path


def chosen_index(rows, config) -> int:
  """The UEM row the heatmap and grids are matched to (see eval/sweep.py's doc)."""
  calibrated = [i for i, r in enumerate(rows) if r["calibrated"]]
  if calibrated:
    return calibrated[0]
  score = tuple(p.name for p in policies.registered() if p.is_score)
  learned = tuple(n for n in score if policies.get(n).learned)
  want = config.exit.policy if config.exit.policy in score else score[0]
  for names in ((want,), learned, score):
    idx = [i for i, r in enumerate(rows) if r["policy"] in names and r["threshold"] is not None]
    if idx:
      exact = [i for i in idx if math.isclose(rows[i]["threshold"], float(config.exit.threshold),
                                                rel_tol=1e-9, abs_tol=1e-12)]
      if exact:
        return exact[0]
      idx.sort(key=lambda i: rows[i]["threshold"])
      return idx[len(idx) // 2]
  not_none = [i for i, r in enumerate(rows)   # l2c rows are not exit policies (eval/cache_rows.py)
              if r["policy"] not in policies.names() or not policies.get(r["policy"]).full_depth]
  return not_none[0] if not_none else 0


def matched_indices(rows, ref: int) -> dict:
  """policy -> index of its row whose layer_ratio_run is closest to row `ref`'s."""
  target = rows[ref]["layer_ratio_run"]
  out = {rows[ref]["policy"]: ref}
  for i, r in enumerate(rows):
    p = r["policy"]
    if p == rows[ref]["policy"]:
      continue
    if p not in out or abs(r["layer_ratio_run"] - target) < abs(rows[out[p]]["layer_ratio_run"] - target):
      out[p] = i
  return out


def time_labels(config) -> list:
  """The network's time input at each sampling step (heatmap y labels)."""
  schedule = sched_lib.make_schedule(config.diffusion.schedule, int(config.diffusion.timesteps))
  t = np.asarray(samplers.grid_arrays(schedule, int(config.sample.steps))["t_model"])[:-1]
  return [float(round(v, 1)) if schedule.continuous else int(v) for v in t]


def caption_accuracy(classifier, captions, labels, images_by_name: dict) -> list[dict]:
  """Per caption: its digit, its number of images and, for each named image set, the fraction
  the dataset classifier assigns to the caption's digit."""
  preds = {name: np.asarray(classifier.predict(np.asarray(x))) for name, x in images_by_name.items()}
  labels = np.asarray(labels, np.int64)
  out = []
  for caption, idx in plots.group_by_caption(captions):
    row = {"caption": caption, "label": int(labels[idx[0]]), "images": int(len(idx))}
    for name, p in preds.items():
      row[f"accuracy_{name}"] = float(np.mean(p[idx] == labels[idx]))
    out.append(row)
  return out


def caption_table_md(table: list[dict], names: list[str], settings: dict) -> str:
  head = ["caption", "digit", "images"] + [f"accuracy, {settings[n]}" for n in names]
  lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(names)]
  for r in table:
    lines.append(f"| {r['caption']} | {r['label']} | {r['images']} | "
                 + " | ".join(f"{r['accuracy_' + n]:.2f}" for n in names) + " |")
  return "\n".join(lines) + "\n"


def _write_captions(out_dir: str, rows, images, ctx: Context, ref: int, captions, paths: dict) -> Optional[dict]:
  """Text models with labelled held-out captions: captions.{md,json}, accuracy per caption."""
  clf, labels = ctx.quality.classifier, ctx.labels
  if clf is None or labels is None or captions is None:
    return None
  sets = {"full": ctx.images_full, "chosen": images[ref]}
  settings = {"full": "full depth", "chosen": rows[ref]["setting"]}
  table = caption_accuracy(clf, captions, labels, sets)
  # Over all captions this is the class accuracy the sweep already scored for both rows.
  overall = {"full": ctx.quality_full["class_accuracy"], "chosen": rows[ref]["class_accuracy"]}
  summary = {"settings": settings, "overall_accuracy": overall, "chance": 1.0 / clf.num_classes,
             "per_caption": table}
  paths["captions.json"] = write_json(os.path.join(out_dir, "captions.json"), summary)
  md = (f"# Class accuracy per held-out caption\n\nEach caption's samples are classified by the dataset "
        f"classifier; accuracy = the fraction showing the caption's digit (chance {summary['chance']:.2f}). "
        f"Overall: {overall['full']:.3f} at full depth, {overall['chosen']:.3f} with "
        f"{settings['chosen']} (layers run {rows[ref]['layer_ratio_run']:.3f}).\n\n"
        + caption_table_md(table, ["full", "chosen"], settings))
  with open(os.path.join(out_dir, "captions.md"), "w") as f:
    f.write(md)
  paths["captions.md"] = os.path.join(out_dir, "captions.md")
  return {"overall_accuracy": overall, "setting": settings["chosen"]}


def write_outputs(out_dir: str, rows, images, stats, ctx: Context, info: dict) -> dict:
  """All files of eval/sweep.py's doc; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  ref = chosen_index(rows, ctx.config)
  captions = None
  if ctx.cfg.context_dim > 0:
    captions = load_eval_captions(ctx.config, ctx.num)
  grids = []
  for policy, i in matched_indices(rows, ref).items():
    name = f"grid_{policy}.png"
    paths[name] = plots.sample_grid(os.path.join(out_dir, name), images[i], num_classes=ctx.cfg.num_classes,
                                    captions=captions, max_images=GRID_IMAGES)
    grids.append({"file": name, "policy": policy, "setting": rows[i]["setting"],
                  "layer_ratio_run": rows[i]["layer_ratio_run"]})
  info = dict(info, grids=grids, heatmap_setting=rows[ref]["setting"])
  caption_info = _write_captions(out_dir, rows, images, ctx, ref, captions, paths)
  if caption_info is not None:
    info["captions"] = caption_info
  paths["exit_heatmap.png"] = plots.exit_heatmap(
      np.asarray(stats[ref]["exit_layer"]), ctx.cfg.num_blocks, os.path.join(out_dir, "exit_heatmap.png"),
      time_labels(ctx.config),
      title=f"Where samples exit: {rows[ref]['setting']} (layers run {rows[ref]['layer_ratio_run']:.3f})")
  bucketed = [i for i, r in enumerate(rows) if r["calibrated"] and r["threshold_schedule"] and i != ref]
  if bucketed:
    i = bucketed[0]
    paths["exit_heatmap_per_bucket.png"] = plots.exit_heatmap(
        np.asarray(stats[i]["exit_layer"]), ctx.cfg.num_blocks,
        os.path.join(out_dir, "exit_heatmap_per_bucket.png"), time_labels(ctx.config),
        title=f"Where samples exit: {rows[i]['setting']} (layers run {rows[i]['layer_ratio_run']:.3f})")
    info["heatmap_per_bucket_setting"] = rows[i]["setting"]
  # A per-bucket threshold schedule is its own curve in the plots (one point, no value label).
  plot_rows = [dict(r, policy=f"{r['policy']} per bucket", threshold_schedule=None)
               if r["threshold_schedule"] else r for r in rows]
  if any(r["fid"] is not None for r in rows):
    paths["pareto_fid.png"] = plots.pareto_plot(plot_rows, os.path.join(out_dir, "pareto_fid.png"),
                                                x="gflops_per_image", y="fid",
                                                fid_kind=ctx.quality.fid_kind)
  # Rows identical to full depth up to rounding would squash the PSNR axis; they are noted instead.
  psnr_rows = [dict(r, psnr_vs_full=None) if r["psnr_vs_full"] >= IDENTICAL_PSNR else r for r in plot_rows]
  if any(r["psnr_vs_full"] is not None for r in psnr_rows):
    paths["pareto_psnr.png"] = plots.pareto_plot(psnr_rows, os.path.join(out_dir, "pareto_psnr.png"),
                                                 x="gflops_per_image", y="psnr_vs_full")
  else:
    paths["pareto_psnr.png"] = plots.pareto_plot(plot_rows, os.path.join(out_dir, "pareto_psnr.png"),
                                                 x="gflops_per_image", y="psnr_vs_full")
  paths["sweep.json"] = write_json(os.path.join(out_dir, "sweep.json"), rows)
  paths["sweep.csv"] = write_csv(os.path.join(out_dir, "sweep.csv"), rows)
  paths["run.json"] = write_json(os.path.join(out_dir, "run.json"), info)
  md = header_md(info) + "\n" + table_md(rows)
  with open(os.path.join(out_dir, "sweep.md"), "w") as f:
    f.write(md)
  paths["sweep.md"] = os.path.join(out_dir, "sweep.md")
  return paths


def write_json(path: str, obj) -> str:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=_json_default)
  return path


def _json_default(v):
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  raise TypeError(f"not JSON serialisable: {type(v).__name__}")
