"""Sweep plots and tables: PNG sizes, the exit histogram, exact grid pixels, exact Markdown."""
import numpy as np
import pytest
from PIL import Image

from deediff_jax.eval import plots as P


def sweep_rows():
  rows = [dict(policy="uem", threshold=th, gflops_per_image=10 - 20 * th, layer_ratio_run=1 - 2 * th,
               fid=5 + 30 * th ** 2, psnr_vs_full=40 - 50 * th, fid_kind="classifier")
          for th in (0.2, 0.02, 0.1, 0.05)]   # unsorted on purpose
  rows += [dict(policy="static", depth=d, gflops_per_image=float(d), layer_ratio_run=d / 9,
                fid=5.0 + (9 - d) ** 2, psnr_vs_full=20.0 + 2 * d, fid_kind="classifier")
           for d in (7, 5, 9)]
  rows.append(dict(policy="none", gflops_per_image=10.0, layer_ratio_run=1.0, fid=5.0,
                   psnr_vs_full=float("inf"), fid_kind="classifier"))
  return rows


def png(path):
  img = Image.open(path)
  img.load()
  return img


def test_pareto_plot_sizes(tmp_path):
  rows = sweep_rows()
  out = P.pareto_plot(rows, tmp_path / "a" / "pareto.png")
  assert str(out) == str(tmp_path / "a" / "pareto.png")
  img = png(out)
  assert img.size == (800, 500)
  # Not a blank canvas: curves, text and a legend give many colours.
  assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50
  img = png(P.pareto_plot(rows, tmp_path / "psnr.png", x="layer_ratio_run", y="psnr_vs_full",
                          figsize=(4, 3), dpi=50))
  assert img.size == (200, 150)
  with pytest.raises(P.PlotError, match="no row has a numeric 'flops'"):
    P.pareto_plot(rows, tmp_path / "x.png", x="flops")


def test_pareto_figure_content():
  fig = P.pareto_figure(sweep_rows())
  ax = fig.axes[0]
  lines = {l.get_label(): l for l in ax.get_lines()}
  # One curve per policy, sorted by x; the front is drawn too.
  assert set(lines) == {"none", "static", "uem", "Pareto front"}
  np.testing.assert_allclose(lines["uem"].get_xdata(), [6.0, 8.0, 9.0, 9.6])
  np.testing.assert_allclose(lines["uem"].get_ydata(), [6.2, 5.3, 5.075, 5.012])
  np.testing.assert_allclose(lines["static"].get_xdata(), [5.0, 7.0, 9.0])
  assert lines["uem"].get_marker() != lines["static"].get_marker()
  assert "GFLOPs" in ax.get_xlabel()
  assert ax.get_ylabel().startswith("classifier-FID")
  assert "classifier-FID" in ax.get_title() and "not comparable to Inception FID" in ax.get_title()
  # PSNR of the full model against itself is infinite: left out, and said so.
  ax = P.pareto_figure(sweep_rows(), x="layer_ratio_run", y="psnr_vs_full").axes[0]
  assert "none" not in {l.get_label() for l in ax.get_lines()}
  assert any("not shown" in t.get_text() and "none" in t.get_text() for t in ax.texts)
  assert ax.get_ylabel() == "PSNR vs full-depth samples (dB)"


def test_pareto_front():
  pts = [(5, 21.0), (6, 6.2), (7, 9.0), (8, 5.3), (9, 5.0), (9, 5.08), (10, 5.0)]
  assert P.pareto_front(pts, higher_is_better=False) == [(5, 21.0), (6, 6.2), (8, 5.3), (9, 5.0)]
  pts = [(0.5, 30.0), (0.6, 30.0), (0.8, 35.0), (0.7, 34.0), (0.9, 33.0)]
  assert P.pareto_front(pts, higher_is_better=True) == [(0.5, 30.0), (0.7, 34.0), (0.8, 35.0)]


def test_exit_histogram_by_hand():
  e = np.array([[1, 1, 3, 2],
                [2, 2, 2, 2],
                [3, 1, 3, 3]])
  hist = P.exit_histogram(e, 4)
  np.testing.assert_allclose(hist, [[0.5, 0.25, 0.25, 0.0],
                                    [0.0, 1.0, 0.0, 0.0],
                                    [0.25, 0.0, 0.75, 0.0]])
  rng = np.random.default_rng(0)
  big = rng.integers(1, 14, size=(50, 37))
  h = P.exit_histogram(big, 13)
  assert h.shape == (50, 13)
  np.testing.assert_allclose(h.sum(axis=1), 1.0)
  # [batches, steps, B]: each step pools the samples of every batch.
  two = np.stack([e, np.full_like(e, 4)])
  np.testing.assert_allclose(P.exit_histogram(two, 4), (hist + np.eye(4)[[3, 3, 3]]) / 2)
  with pytest.raises(P.PlotError, match=r"must be in \[1, 2\]"):
    P.exit_histogram(e, 2)
  with pytest.raises(P.PlotError, match="integer block numbers"):
    P.exit_histogram(e + 0.5, 4)


def test_exit_heatmap_png(tmp_path):
  rng = np.random.default_rng(1)
  e = np.clip(np.round(np.linspace(2, 9, 40)[:, None] + rng.normal(0, 1.5, (40, 16))), 1, 9).astype(int)
  img = png(P.exit_heatmap(e, 9, tmp_path / "heat.png",
                           time_labels=list(np.linspace(999, 0, 40).round().astype(int))))
  assert img.size == (800, 600)
  assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50
  assert png(P.exit_heatmap(e, 9, tmp_path / "h2.png", figsize=(5, 4), dpi=60)).size == (300, 240)
  with pytest.raises(P.PlotError, match="time_labels has 3 entries for 40 steps"):
    P.exit_heatmap(e, 9, tmp_path / "h3.png", time_labels=[1, 2, 3])


def test_exit_heatmap_orientation_and_overlay():
  e = np.array([[1, 1, 2, 2],     # step 0 (noisiest): shallow exits
                [3, 3, 3, 4],
                [4, 4, 4, 4]])    # last step: full depth
  ax = P.exit_heatmap_figure(e, 4, time_labels=[999, 500, 0]).axes[0]
  np.testing.assert_allclose(ax.images[0].get_array(), P.exit_histogram(e, 4))
  bottom, top = ax.get_ylim()
  assert top < bottom and top == -0.5          # row 0 (the first, noisiest step) is on top
  assert [t.get_text() for t in ax.get_yticklabels()] == ["999", "500", "0"]
  assert "noisiest" in ax.get_ylabel()
  lines = {l.get_label(): l for l in ax.get_lines()}
  np.testing.assert_allclose(lines["mean exit layer"].get_xdata(), [1.5, 3.25, 4.0])
  np.testing.assert_allclose(lines["mean exit layer"].get_ydata(), [0, 1, 2])
  np.testing.assert_allclose(lines["layers run (deepest exit)"].get_xdata(), [2, 4, 4])


def _exact(values):
  """Floats in [-1, 1] that map back to exactly these uint8 values."""
  return np.asarray(values, np.float64) / 127.5 - 1.0


def test_image_grid_exact_pixels_gray(tmp_path):
  # 3 images of 2x3 pixels, 2 per row, 1 px padding: 2 rows.
  vals = np.arange(3 * 2 * 3).reshape(3, 2, 3, 1) * 10
  out = P.image_grid(_exact(vals), tmp_path / "g.png", nrow=2, padding=1)
  img = png(out)
  assert img.mode == "L"
  assert img.size == (2 * (3 + 1) + 1, 2 * (2 + 1) + 1)     # (width 9, height 7)
  a = np.asarray(img)
  np.testing.assert_array_equal(a[1:3, 1:4], vals[0, ..., 0])
  np.testing.assert_array_equal(a[1:3, 5:8], vals[1, ..., 0])
  np.testing.assert_array_equal(a[4:6, 1:4], vals[2, ..., 0])   # tile (row 1, col 0)
  pad = np.ones_like(a, bool)
  pad[1:3, 1:4] = pad[1:3, 5:8] = pad[4:6, 1:4] = False
  assert np.all(a[pad] == 255)                              # padding and the empty tile: white


def test_image_grid_exact_pixels_rgb_and_scale(tmp_path):
  rng = np.random.default_rng(2)
  vals = rng.integers(0, 256, size=(4, 2, 2, 3))
  img = png(P.image_grid(_exact(vals), tmp_path / "rgb.png", padding=0, scale=2))
  assert img.mode == "RGB" and img.size == (8, 8)           # default 2 per row
  a = np.asarray(img)
  np.testing.assert_array_equal(a[4:8, 4:8], vals[3].repeat(2, 0).repeat(2, 1))
  # Values outside [-1, 1] are clipped, not wrapped.
  clipped = np.asarray(png(P.image_grid(np.array([[[[-3.0]], [[3.0]]]]), tmp_path / "c.png", padding=0)))
  np.testing.assert_array_equal(clipped, [[0], [255]])


def test_image_grid_labels(tmp_path):
  x = _exact(np.full((6, 8, 8, 1), 100))
  plain = png(P.image_grid(x, tmp_path / "p.png", nrow=3))
  labeled = png(P.image_grid(x, tmp_path / "l.png", nrow=3, labels=list("012345"),
                             row_labels=["uem 0.1", "static 7"], col_labels=["a", "b", "c"]))
  w, h = plain.size
  assert h == 2 * (8 + 2) + 2
  assert labeled.size[1] == h + 2 * P.LABEL_BAND + P.LABEL_BAND   # a band per row + column labels
  assert labeled.size[0] > w
  assert (np.asarray(labeled) < 100).any()                  # dark text was drawn
  with pytest.raises(P.PlotError, match="labels has 2 entries; give 6"):
    P.image_grid(x, tmp_path / "e.png", labels=["a", "b"])
  with pytest.raises(P.PlotError, match="C = 1 or 3"):
    P.image_grid(np.zeros((2, 4, 4, 2)), tmp_path / "e.png")


def test_caption_grid_rows_per_caption(tmp_path):
  # Five images of three captions, interleaved: rows follow first appearance, short rows are
  # padded with white tiles, and the result is image_grid of exactly that arrangement.
  vals = [10, 20, 30, 40, 50]
  x = np.stack([np.full((4, 4, 1), v / 127.5 - 1.0) for v in vals]).astype(np.float32)
  caps = ["a seven", "number one", "a seven", "a four", "a seven"]
  assert [(c, list(i)) for c, i in P.group_by_caption(caps)] == [
      ("a seven", [0, 2, 4]), ("number one", [1]), ("a four", [3])]
  got = np.asarray(png(P.caption_grid(x, caps, tmp_path / "c.png", padding=1)))
  white = np.ones((4, 4, 1), np.float32)
  arranged = np.stack([x[0], x[2], x[4], x[1], white, white, x[3], white, white])
  want = np.asarray(png(P.image_grid(arranged, tmp_path / "w.png", nrow=3, padding=1,
                                     row_labels=["a seven", "number one", "a four"])))
  np.testing.assert_array_equal(got, want)
  # At most max_cols images per row.
  narrow = png(P.caption_grid(x, caps, tmp_path / "n.png", padding=1, max_cols=2))
  assert narrow.size[0] < got.shape[1] and narrow.size[1] == got.shape[0]
  with pytest.raises(P.PlotError, match="captions has 2 entries for 5 images"):
    P.caption_grid(x, caps[:2], tmp_path / "e.png")


def test_sample_grid_layouts(tmp_path):
  """The one grid writer of --mode sample and the sweep: each layout is image_grid (or
  caption_grid) of exactly its arrangement, upscaled max(1, min(4, round(32 / H))), 1 px padding."""
  vals = np.arange(1, 7)
  x = np.stack([np.full((8, 8, 1), v / 127.5 - 1.0) for v in vals]).astype(np.float32)

  def same(got, want):
    np.testing.assert_array_equal(np.asarray(png(got)), np.asarray(png(want)))

  # Labelled: row r holds class r's images; a class without images has no row.
  same(P.sample_grid(tmp_path / "l.png", x, labels=[0, 2, 0, 2, 2, 0], num_classes=3),
       P.image_grid(np.stack([x[0], x[2], x[5], x[1], x[3], x[4]]), tmp_path / "lw.png", nrow=3,
                    padding=1, scale=4))
  # Class columns with column labels, the first max_images images.
  same(P.sample_grid(tmp_path / "c.png", x, num_classes=2, max_images=4),
       P.image_grid(x[:4], tmp_path / "cw.png", nrow=2, col_labels=["0", "1"], padding=1, scale=4))
  # Captions: every image, whatever max_images.
  caps = ["a", "b", "a", "b", "a", "c"]
  same(P.sample_grid(tmp_path / "t.png", x, captions=caps, max_images=2),
       P.caption_grid(x, caps, tmp_path / "tw.png", padding=1, scale=4))
  # Unlabelled: a square grid. The scale is capped at 4 and never below 1.
  same(P.sample_grid(tmp_path / "s.png", x[:5]),
       P.image_grid(x[:5], tmp_path / "sw.png", padding=1, scale=4))
  assert png(P.sample_grid(tmp_path / "big.png", np.zeros((1, 64, 64, 3)))).size == (66, 66)
  assert png(P.sample_grid(tmp_path / "mid.png", np.zeros((1, 12, 12, 1)))).size == (38, 38)  # 3x
  assert png(P.sample_grid(tmp_path / "tiny.png", np.zeros((1, 4, 4, 1)))).size == (18, 18)   # 4x, not 8x


def test_markdown_table_exact():
  rows = [
      {"policy": "none", "threshold": None, "layer_ratio_run": 1.0, "gflops_per_image": 12.3456,
       "fid": 8.3333, "speedup": 1.0, "steps": 50},
      {"policy": "uem", "threshold": 0.075, "layer_ratio_run": 0.61234, "gflops_per_image": 7.5,
       "fid": 123.456, "speedup": 1.55, "steps": 50},
      {"policy": "a|b", "threshold": 0.0001234, "layer_ratio_run": float("nan"),
       "gflops_per_image": 4321.9, "fid": 0.0, "speedup": True, "steps": 50},
  ]
  md = P.speed_quality_table_md(rows, ["policy", "threshold", ("layer_ratio_run", "layers run"),
                                       ("gflops_per_image", "GFLOPs/img"), "fid", "steps"])
  assert md == (
      "| policy | threshold | layers run | GFLOPs/img | fid | steps |\n"
      "| --- | ---: | ---: | ---: | ---: | ---: |\n"
      "| none | — | 1.00 | 12.35 | 8.33 | 50 |\n"
      "| uem | 0.075 | 0.612 | 7.50 | 123.5 | 50 |\n"
      "| a\\|b | 1.23e-04 | — | 4322 | 0 | 50 |\n")
  assert P.format_value(True) == "yes" and P.format_value(float("inf")) == "∞"
