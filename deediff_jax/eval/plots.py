"""Sweep pictures and tables: quality vs compute, the exit heatmap, sample grids, a Markdown table.

Figures are drawn on matplotlib's Agg canvas through the object API (`Figure`), never pyplot:
nothing needs a display, and importing this module does not switch a notebook's backend.
Figures are saved without tight bounding boxes, so a PNG is exactly `figsize * dpi` pixels.
Sample grids are assembled in NumPy and written with PIL, so a tile's pixels are exactly the
image's (no resampling, no colour map).

Every writer creates the parent folder and returns the path it wrote (a str). The plots are
also available as `matplotlib.figure.Figure`s (`pareto_figure`, `exit_heatmap_figure`) for
notebooks.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

# Axis labels with units for the sweep's fields (docs/design.md, "Stable names": `sweep.json`).
AXIS_LABELS = {
    "gflops_per_image": "GFLOPs per image (whole sampling run)",
    "layer_ratio_run": "layers run / full depth",
    "layer_ratio_per_sample": "mean per-sample exit layer / full depth",
    "seconds": "wall-clock seconds",
    "speedup": "speedup vs full depth (x)",
    "psnr_vs_full": "PSNR vs full-depth samples (dB)",
    "mse_vs_full": "MSE vs full-depth samples",
    "class_accuracy": "class accuracy of samples",
}
QUALITY_NAMES = {"psnr_vs_full": "PSNR vs the full-depth model", "mse_vs_full": "MSE vs the full-depth model",
                 "class_accuracy": "class accuracy of samples"}
# Which way is better, for the Pareto front (x is always a cost: lower is better).
HIGHER_IS_BETTER = {"psnr_vs_full": True, "class_accuracy": True, "fid": False, "mse_vs_full": False}
FID_KIND_LABELS = {"inception": "Inception FID", "classifier": "classifier-FID"}
FID_KIND_NOTES = {"classifier": "features of a small classifier trained on the dataset; "
                                "not comparable to Inception FID"}


class PlotError(ValueError):
  """Bad input to a plot or table (one line naming the problem and the fix)."""


def _prepare(path: str) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  return path


def _save(fig: Figure, path: str, dpi: int) -> str:
  FigureCanvasAgg(fig)
  path = _prepare(path)
  fig.savefig(path, dpi=dpi, format="png")
  return path


def _number(v) -> Optional[float]:
  """A finite float, or None for missing / non-numeric / non-finite values."""
  if isinstance(v, bool) or v is None:
    return None
  try:
    f = float(v)
  except (TypeError, ValueError):
    return None
  return f if math.isfinite(f) else None


def fid_label(kind: Optional[str]) -> str:
  if not kind:
    return "FID"
  return FID_KIND_LABELS.get(kind, f"FID ({kind})")


def _axis_label(key: str, fid_kind: Optional[str]) -> str:
  if key == "fid":
    return fid_label(fid_kind) + " (lower is better)"
  return AXIS_LABELS.get(key, key)


def _setting_text(row: Mapping[str, Any]) -> Optional[str]:
  for key in ("threshold", "depth", "schedule"):
    v = row.get(key)
    if v is not None and v != "":
      return f"{v:g}" if isinstance(v, float) else str(v)
  return None


def pareto_front(points: Sequence[tuple], higher_is_better: bool) -> list:
  """The non-dominated (x, y) points, sorted by x: cheaper, or better at equal cost."""
  best = None
  front = []
  for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
    if best is None or (y > best if higher_is_better else y < best):
      front.append((x, y))
      best = y
  return front


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: str, x: str = "gflops_per_image",
                y: str = "fid", label_key: str = "policy", *, fid_kind: Optional[str] = None,
                title: Optional[str] = None, annotate: bool = True,
                figsize=(8.0, 5.0), dpi: int = 100) -> str:
  """Writes `pareto_figure` as a PNG of figsize*dpi pixels; returns the path."""
  fig = pareto_figure(rows, x, y, label_key, fid_kind=fid_kind, title=title, annotate=annotate,
                      figsize=figsize, dpi=dpi)
  return _save(fig, path, dpi)


def pareto_figure(rows: Sequence[Mapping[str, Any]], x: str = "gflops_per_image", y: str = "fid",
                  label_key: str = "policy", *, fid_kind: Optional[str] = None,
                  title: Optional[str] = None, annotate: bool = True,
                  figsize=(8.0, 5.0), dpi: int = 100) -> Figure:
  """Quality (y) vs compute (x), one marked curve per `label_key` value, plus the overall front.

  Rows whose x or y is missing or not finite (e.g. PSNR of the full model against itself)
  are left out and named in a note. `fid_kind` (default: the rows' `fid_kind`) names the FID.
  """
  rows = list(rows)
  if not rows:
    raise PlotError("pareto_plot got no rows; run the sweep first")
  for key in (x, y):
    if not any(_number(r.get(key)) is not None for r in rows):
      keys = sorted({k for r in rows for k in r})
      raise PlotError(f"no row has a numeric {key!r}; choose x/y among {', '.join(keys)}")
  if fid_kind is None:
    fid_kind = next((r["fid_kind"] for r in rows if r.get("fid_kind")), None)

  # Colours and markers follow the order of all labels, so every plot of a sweep matches.
  all_labels = sorted({str(r.get(label_key, "?")) for r in rows})
  groups: dict = {}
  dropped = []
  for r in rows:
    xv, yv = _number(r.get(x)), _number(r.get(y))
    label = str(r.get(label_key, "?"))
    if xv is not None and yv is not None:
      groups.setdefault(label, []).append((xv, yv, r))
    elif label not in dropped:
      dropped.append(label)

  fig = Figure(figsize=figsize, dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  markers = "osD^v<>pPX*h"
  colors = [f"C{i}" for i in range(10)]
  for label, pts in sorted(groups.items()):
    n = all_labels.index(label)
    pts.sort(key=lambda p: p[0])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[n % len(markers)],
            color=colors[n % len(colors)], linestyle="-" if len(pts) > 1 else "none",
            markersize=6, label=label)
    if annotate:
      for xv, yv, r in pts:
        text = _setting_text(r)
        if text is not None:
          ax.annotate(text, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                      color="0.35")
  if dropped:
    ax.text(0.01, 0.01, f"not shown (no finite {y} or {x}): " + ", ".join(dropped),
            transform=ax.transAxes, fontsize=7, color="0.35", va="bottom")
  hib = HIGHER_IS_BETTER.get(y, False)
  front = pareto_front([(p[0], p[1]) for pts in groups.values() for p in pts], hib)
  if len(front) > 1:
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.6",
            linestyle="--", linewidth=1, label="Pareto front", zorder=0)
  ax.set_xlabel(_axis_label(x, fid_kind))
  ax.set_ylabel(_axis_label(y, fid_kind))
  if title is None:
    quality = fid_label(fid_kind) if y == "fid" else QUALITY_NAMES.get(y, y)
    title = f"{quality} vs compute"
    if y == "fid" and fid_kind in FID_KIND_NOTES:
      title += f"\n({FID_KIND_NOTES[fid_kind]})"
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, title=label_key, title_fontsize=8)
  fig.tight_layout()
  return fig


def _exit_layers_steps(exit_layers, num_blocks: int) -> np.ndarray:
  """[steps, B] or [batches, steps, B] 1-based ints -> [steps, samples], range-checked."""
  e = np.asarray(exit_layers)
  if e.ndim == 3:
    e = np.moveaxis(e, 0, 1).reshape(e.shape[1], -1)
  if e.ndim != 2 or e.size == 0:
    raise PlotError(f"exit_layers must be [steps, B] (or [batches, steps, B]) ints, got shape {e.shape}")
  if not np.issubdtype(e.dtype, np.integer):
    if not np.all(e == np.round(e)):
      raise PlotError("exit_layers must be integer block numbers (1-based)")
    e = e.astype(np.int64)
  if e.min() < 1 or e.max() > num_blocks:
    raise PlotError(f"exit_layers must be in [1, {num_blocks}] (1-based blocks of a {num_blocks}-block "
                    f"model), got {e.min()}..{e.max()}; check num_blocks")
  return e


def exit_histogram(exit_layers, num_blocks: int) -> np.ndarray:
  """[steps, num_blocks] fraction of samples exiting after each block (column l-1 = block l), per step."""
  e = _exit_layers_steps(exit_layers, num_blocks)
  counts = np.stack([np.bincount(row - 1, minlength=num_blocks) for row in e])
  return counts / e.shape[1]


def exit_heatmap(exit_layers, num_blocks: int, path: str, time_labels: Optional[Sequence] = None,
                 *, title: Optional[str] = None, figsize=(8.0, 6.0), dpi: int = 100) -> str:
  """Writes `exit_heatmap_figure` as a PNG of figsize*dpi pixels; returns the path."""
  fig = exit_heatmap_figure(exit_layers, num_blocks, time_labels, title=title, figsize=figsize, dpi=dpi)
  return _save(fig, path, dpi)


def exit_heatmap_figure(exit_layers, num_blocks: int, time_labels: Optional[Sequence] = None,
                        *, title: Optional[str] = None, figsize=(8.0, 6.0), dpi: int = 100) -> Figure:
  """Timestep x layer heatmap of where samples exit, noisiest step on top.

  `exit_layers` [steps, B] (1-based), rows in sampling order (row 0 = the first, noisiest step).
  `time_labels` (one per step, e.g. the model's time input) label the y axis. The mean exit
  layer per step is drawn as a line, and the layers the batch ran (the deepest exit) dashed.
  """
  e = _exit_layers_steps(exit_layers, num_blocks)
  hist = exit_histogram(e, num_blocks)
  steps = hist.shape[0]
  if time_labels is not None and len(time_labels) != steps:
    raise PlotError(f"time_labels has {len(time_labels)} entries for {steps} steps; give one per step")

  fig = Figure(figsize=figsize, dpi=dpi)
  ax = fig.add_subplot(1, 1, 1)
  # Cell (step s, block l) is centred at (l, s); origin="upper" puts step 0 (noisiest) on top.
  im = ax.imshow(hist, aspect="auto", origin="upper", cmap="viridis", vmin=0.0, vmax=1.0,
                 interpolation="nearest", extent=(0.5, num_blocks + 0.5, steps - 0.5, -0.5))
  ys = np.arange(steps)
  ax.plot(e.mean(axis=1), ys, color="white", linewidth=1.8, label="mean exit layer")
  ax.plot(e.max(axis=1), ys, color="orange", linewidth=1.0, linestyle="--",
          label="layers run (deepest exit)")
  ax.set_xlim(0.5, num_blocks + 0.5)
  ax.set_ylim(steps - 0.5, -0.5)
  xticks = np.unique(np.linspace(1, num_blocks, min(num_blocks, 13)).round().astype(int))
  ax.set_xticks(xticks)
  ax.set_xlabel("exit layer (block, 1-based)")
  nt = min(steps, 10)
  yticks = np.unique(np.linspace(0, steps - 1, nt).round().astype(int))
  ax.set_yticks(yticks)
  if time_labels is not None:
    ax.set_yticklabels([_tick(time_labels[i]) for i in yticks])
    ax.set_ylabel("timestep (top: noisiest, first sampling step)")
  else:
    ax.set_ylabel("sampling step (top: step 0, noisiest)")
  cbar = fig.colorbar(im, ax=ax)
  cbar.set_label("fraction of samples exiting at this layer")
  ax.legend(loc="lower right", fontsize=8, framealpha=0.7)
  ax.set_title(title or "Where samples exit, per sampling step", fontsize=10)
  fig.tight_layout()
  return fig


def _tick(v) -> str:
  return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def displayable(images) -> np.ndarray:
  """Images for a PNG grid: [-1, 1] pixels as they are; latents (other channel counts, or values
  outside [-1, 1]) -> their first 3 (or 1) channels, each min-max scaled to [-1, 1]."""
  x = np.asarray(images, np.float32)
  if x.shape[-1] in (1, 3) and not np.any(np.abs(x) > 1.0 + 1e-6):
    return x
  x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
  lo = x.min(axis=(0, 1, 2), keepdims=True)
  hi = x.max(axis=(0, 1, 2), keepdims=True)
  return (x - lo) / np.maximum(hi - lo, 1e-8) * 2.0 - 1.0


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 via round((x + 1) / 2 * 255), clipped."""
  return np.clip(np.round((images.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _font():
  return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


LABEL_BAND = 14  # pixels above each tile for a per-image label, and for column labels


def image_grid(images, path: str, nrow: Optional[int] = None, labels: Optional[Sequence] = None,
               *, row_labels: Optional[Sequence] = None, col_labels: Optional[Sequence] = None,
               padding: int = 2, pad_value: float = 1.0, scale: int = 1) -> str:
  """Writes images [N, H, W, C] (C = 1 or 3, or [N, H, W]) in [-1, 1] as one PNG grid.

  `nrow` is the number of images per row (as torchvision's make_grid; default ceil(sqrt(N))).
  Tile (r, c) holds image r*nrow + c and its top-left pixel is at
  (padding + r*(H*scale + padding) [+ label bands], padding + c*(W*scale + padding) [+ row-label width]).
  Without labels the PNG is exactly rows*(H*scale+padding)+padding high and
  nrow*(W*scale+padding)+padding wide. `labels` (one per image) are written above each tile,
  `row_labels` left of each row, `col_labels` above each column. `scale` upsamples by pixel
  repetition, for tiny images. Grayscale gives an 'L' PNG, RGB an 'RGB' PNG.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[0] == 0 or x.shape[-1] not in (1, 3):
    raise PlotError(f"images must be [N, H, W, C] with C = 1 or 3 (values in [-1, 1]), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise PlotError("images contain NaN or Inf; check the sampler output")
  n, h, w, c = x.shape
  if scale < 1 or padding < 0:
    raise PlotError(f"scale must be >= 1 and padding >= 0, got scale={scale}, padding={padding}")
  ncol = int(nrow) if nrow else int(math.ceil(math.sqrt(n)))
  if ncol < 1:
    raise PlotError(f"nrow must be a positive number of images per row, got {nrow}")
  nrows = int(math.ceil(n / ncol))
  for name, seq, want in (("labels", labels, n), ("row_labels", row_labels, nrows),
                          ("col_labels", col_labels, ncol)):
    if seq is not None and len(seq) != want:
      raise PlotError(f"{name} has {len(seq)} entries; give {want} (one per "
                      f"{'image' if name == 'labels' else name[:3]})")

  tiles = _to_uint8(x)
  if scale > 1:
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
  th, tw = h * scale, w * scale
  font = _font()
  probe = ImageDraw.Draw(Image.new("L", (1, 1)))
  band = LABEL_BAND if labels is not None else 0          # above every tile
  top = LABEL_BAND if col_labels is not None else 0       # above the first row
  left = 0
  if row_labels is not None:
    left = max(_text_size(probe, str(t), font)[0] for t in row_labels) + 6
  cell_h, cell_w = th + band + padding, tw + padding
  height = top + padding + nrows * cell_h
  width = left + padding + ncol * cell_w
  pad = _to_uint8(np.asarray(pad_value))
  canvas = np.full((height, width, c), pad, np.uint8)
  origins = []
  for i in range(n):
    r, col = divmod(i, ncol)
    y0 = top + padding + r * cell_h + band
    x0 = left + padding + col * cell_w
    canvas[y0:y0 + th, x0:x0 + tw] = tiles[i]
    origins.append((y0, x0))

  img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # "L" or "RGB"
  if labels is not None or row_labels is not None or col_labels is not None:
    draw = ImageDraw.Draw(img)
    ink = 0 if c == 1 else (0, 0, 0)
    if labels is not None:
      for (y0, x0), t in zip(origins, labels):
        draw.text((x0, y0 - band), str(t), fill=ink, font=font)
    if col_labels is not None:
      for j, t in enumerate(col_labels):
        draw.text((left + padding + j * cell_w, 0), str(t), fill=ink, font=font)
    if row_labels is not None:
      for r, t in enumerate(row_labels):
        _, th_text = _text_size(draw, str(t), font)
        yc = top + padding + r * cell_h + band + th // 2 - th_text // 2
        draw.text((2, yc), str(t), fill=ink, font=font)
  path = _prepare(path)
  img.save(path, format="PNG")
  return path


def group_by_caption(captions: Sequence[str]) -> list[tuple[str, np.ndarray]]:
  """[(caption, indices of its images)] in order of first appearance."""
  order: dict[str, list[int]] = {}
  for i, c in enumerate(captions):
    order.setdefault(str(c), []).append(i)
  return [(c, np.asarray(idx, np.int64)) for c, idx in order.items()]


def caption_grid(images, captions: Sequence[str], path: str, *, max_cols: int = 8,
                 padding: int = 1, scale: int = 1) -> str:
  """One row per distinct caption (first-appearance order), the caption written left of its row.

  A text model's samples are only readable next to the prompt that produced them. Rows hold at
  most `max_cols` images; rows with fewer are filled with white tiles.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if len(captions) != x.shape[0]:
    raise PlotError(f"captions has {len(captions)} entries for {x.shape[0]} images; give one per image")
  groups = group_by_caption(captions)
  ncol = max(1, min(int(max_cols), max(len(idx) for _, idx in groups)))
  blank = np.ones((1,) + x.shape[1:], np.float32)
  rows = []
  for _, idx in groups:
    idx = idx[:ncol]
    rows.append(np.concatenate([x[idx].astype(np.float32), np.repeat(blank, ncol - len(idx), 0)]))
  return image_grid(np.concatenate(rows), path, nrow=ncol, row_labels=[c for c, _ in groups],
                    padding=padding, scale=scale)


def sample_grid(path: str, images, *, labels: Optional[Sequence] = None, num_classes: int = 0,
                captions: Optional[Sequence[str]] = None, max_images: Optional[int] = None) -> str:
  """Writes samples [N, H, W, C] as one PNG grid (`samples.png`, the sweep's `grid_*.png`);
  returns the path. The layout is the first of these that applies:

    captions                 one row per distinct caption, written left of its row (`caption_grid`)
    labels, num_classes > 0  row r holds the images labelled r (classes without images left out,
                             short rows filled with white tiles)
    num_classes > 0          rows of num_classes images, column c labelled c: image i of
                             `data.eval_context.conditioning`'s labels is class i % num_classes
    otherwise                a square grid

  `max_images` keeps the first images (and labels) of the last three layouts; caption rows
  already hold at most `caption_grid`'s max_cols images each, so they show every caption.
  Latents are shown through `displayable`. Tiles are upscaled by pixel repetition,
  max(1, min(4, round(32 / H))): small images become readable without a huge PNG. 1 px padding.
  """
  scale = max(1, min(4, round(32 / np.shape(images)[1])))
  if captions is not None:
    return caption_grid(displayable(images), captions, path, padding=1, scale=scale)
  if max_images is not None:
    images = images[:max_images]
    labels = None if labels is None else labels[:max_images]
  x = displayable(images)
  if labels is not None and num_classes > 0:
    rows = [np.flatnonzero(np.asarray(labels) == k) for k in range(num_classes)]
    rows = [r for r in rows if len(r)]
    ncol = max(len(r) for r in rows)
    blank = np.ones((1,) + x.shape[1:], x.dtype)  # white filler for short rows
    x = np.concatenate([np.concatenate([x[r], np.repeat(blank, ncol - len(r), 0)]) for r in rows])
    return image_grid(x, path, nrow=ncol, padding=1, scale=scale)
  if num_classes > 0:
    ncol = min(num_classes, x.shape[0])
    return image_grid(x, path, nrow=ncol, col_labels=[str(c) for c in range(ncol)], padding=1, scale=scale)
  return image_grid(x, path, padding=1, scale=scale)


def format_value(v) -> str:
  """A table cell: ints as is, floats to about 3-4 significant digits, missing as '—'."""
  if v is None:
    return "—"
  if isinstance(v, (bool, np.bool_)):
    return "yes" if v else "no"
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    f = float(v)
    if math.isnan(f):
      return "—"
    if math.isinf(f):
      return "∞" if f > 0 else "-∞"
    if f == 0:
      return "0"
    a = abs(f)
    if a >= 1000:
      return f"{f:.0f}"
    if a >= 100:
      return f"{f:.1f}"
    if a >= 1:
      return f"{f:.2f}"
    if a >= 1e-3:
      return f"{f:.3g}"
    return f"{f:.2e}"
  if isinstance(v, (list, tuple)):
    return ",".join(format_value(e) for e in v)
  return str(v).replace("|", "\\|").replace("\n", " ")


def speed_quality_table_md(rows: Sequence[Mapping[str, Any]], columns: Iterable) -> str:
  """A Markdown table of `rows` with `columns` (keys, or (key, header) pairs).

  Numeric columns are right-aligned; missing values print as '—'. Ends with a newline.
  """
  cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
  if not cols:
    raise PlotError("speed_quality_table_md needs at least one column")
  rows = list(rows)
  lines = ["| " + " | ".join(format_value(hdr) for _, hdr in cols) + " |"]
  aligns = []
  for key, _ in cols:
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    numeric = bool(vals) and all(isinstance(v, (int, float, np.integer, np.floating))
                                 and not isinstance(v, (bool, np.bool_)) for v in vals)
    aligns.append("---:" if numeric else "---")
  lines.append("| " + " | ".join(aligns) + " |")
  for r in rows:
    lines.append("| " + " | ".join(format_value(r.get(key)) for key, _ in cols) + " |")
  return "\n".join(lines) + "\n"
