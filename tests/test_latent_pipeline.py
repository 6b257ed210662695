"""Latent diffusion end to end at tiny size: images -> encode_latents (a small KL autoencoder, same
code as KL-f8) -> latents:DIR -> train -> --mode sample (decoded images) -> --mode sweep (FID and
PSNR vs full of the decoded images), run as docs/latent.md's ImageNet/COCO recipe commands with tiny
overrides; plus the latents source (memory-mapped, a fresh latent per step, deterministic) and
the encoder's flips, resumption and one-line errors."""
import contextlib
import io
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest


import jax  # noqa: E402  (after the cache settings)
import ml_collections  # noqa: E402
from PIL import Image  # noqa: E402

from deediff_jax.data import encode_latents as E  # noqa: E402
from deediff_jax.data import pipeline, sources  # noqa: E402
from deediff_jax.model import autoencoder as ae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## The recipes"
TINY_AE = ae.AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)   # 16x16x3 -> 8x8x4
PER_CLASS = 6          # 10 digit classes x 6 images = 60 images, 120 entries with --flip
COCO_TRAIN, COCO_VAL = 10, 3   # COCO stand-ins: captioned train2014 / val2014 images
ENCODE_TINY = ["--config.data.image_size=16", "--config.model.image_size=8", "--batch-size", "16",
               "--shard-size", "48", "--no-progress"]
MAIN_TINY = ["--config.data.image_size=16", "--config.model.image_size=8", "--config.model.embed_dim=32",
             "--config.model.depth=2", "--config.model.num_heads=2", "--config.model.num_classes=10",
             "--config.mesh.fsdp=1", "--config.train.num_steps=2", "--config.train.batch_size=8",
             "--config.train.warmup_steps=1", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
             "--config.sample.num_images=8", "--config.sample.batch_size=8", "--config.sample.steps=3",
             "--config.sweep.num_images=8", "--config.sweep.policies=uem", "--config.sweep.thresholds=0.5",
             "--config.sweep.step_fractions=", "--config.sweep.fid_kind=none"]
# COCO: no classes; the tiny CLIP's 32-wide tokens (77 of them, as ViT-L/14 gives).
COCO_TINY = [a for a in MAIN_TINY if not a.startswith("--config.model.num_classes")] + [
    "--config.model.context_dim=32"]


def recipe_commands() -> dict:
  """{'imagenet': [argv...], 'coco': [argv...]}: the `python -m deediff_jax.*` lines of the recipes in
  docs/latent.md, continuation lines joined."""
  with open(os.path.join(ROOT, "docs", "latent.md")) as f:
    text = f.read()
  section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
  out = {"imagenet": [], "coco": []}
  for block in re.findall(r"```bash\n(.*?)```", section, re.S):
    name = "coco" if "configs/mscoco_uvit_small.py" in block else "imagenet"
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
      if line.startswith("python -m deediff_jax."):
        out[name].append(shlex.split(line.split("  #")[0]))
  return out


def _digit_images():
  from sklearn.datasets import load_digits
  d = load_digits()
  idx = np.concatenate([np.flatnonzero(d.target == k)[:PER_CLASS] for k in range(10)])
  x = np.round(d.images[idx] * 255 / 16).astype(np.uint8)
  x = np.repeat(np.repeat(x, 2, 1), 2, 2)[..., None].repeat(3, -1)       # 16x16x3
  x[..., 1] = 255 - x[..., 1]                                           # not grey: channels differ
  return x, d.target[idx].astype(np.int32)


def _cli(module, argv):
  """(exit code, stderr) of `python -m module argv` run in this process (compiles are shared)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    if module == "deediff_jax.main":
      from deediff_jax import main as cli
      code = cli.main(["deediff_jax.main", *argv])
    elif module == "deediff_jax.data.encode_latents":
      code = E.main(argv)
    elif module == "deediff_jax.data.encode_text":
      from deediff_jax.data import encode_text
      code = encode_text.main(argv)
    else:
      raise AssertionError(f"the recipe runs an unexpected module {module}")
  return code, err.getvalue()


def _substitute(argv, subst):
  out = []
  for a in argv:
    for old, new in subst.items():
      a = a.replace(old, new)
    out.append(a)
  return out


def _run_recipe(tmp, name, tiny_for):
  """Runs the README's `name` recipe commands in `tmp` (the working directory the recipe assumes)
  with tiny overrides; returns {(name, i): (argv, (exit code, stderr))}."""
  subst = {"configs/": os.path.join(ROOT, "configs") + "/",
           "assets/stable-diffusion/autoencoder_kl.pth": str(tmp / "ae.npz"), "/ckpt/": f"{tmp}/ckpt/"}
  results = {}
  cwd = os.getcwd()
  os.chdir(tmp)
  try:
    for i, argv in enumerate(recipe_commands()[name]):
      module = argv[2]
      results[(name, i)] = (argv, _cli(module, _substitute(argv[3:], subst) + tiny_for[module]))
  finally:
    os.chdir(cwd)
  return results


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  """The README's ImageNet recipe end to end at tiny size: class folders of images -> encode_latents
  -> train -> sample (decoded) -> sweep, in a scratch directory."""
  tmp = tmp_path_factory.mktemp("latent_recipe")
  images, labels = _digit_images()
  for i, (x, y) in enumerate(zip(images, labels)):
    d = tmp / "imagenet" / "train" / f"n{y:08d}"
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(x).save(d / f"img_{i:03d}.png")
  params = ae.init_params(TINY_AE, seed=0)
  E.export_npz(params, str(tmp / "ae.npz"))
  results = _run_recipe(tmp, "imagenet", {"deediff_jax.data.encode_latents": ENCODE_TINY,
                                          "deediff_jax.main": MAIN_TINY})
  return dict(tmp=tmp, params=params, images=images, labels=labels, cmds=recipe_commands(), results=results)


@pytest.fixture(scope="module")
def coco_recipe(recipe):
  """The README's MS-COCO recipe at tiny size, beside the ImageNet one (same autoencoder): COCO-style
  train2014 images and captions_{train,val}2014.json, a tiny random CLIP in clip-vit-large-patch14/,
  then encode_latents -> encode_text -> train -> sample -> sweep."""
  tmp, images = recipe["tmp"], recipe["images"]
  coco = tmp / "coco" / "train2014"
  coco.mkdir(parents=True)
  (tmp / "coco" / "annotations").mkdir()
  for split, n, first_id in (("train2014", COCO_TRAIN, 9), ("val2014", COCO_VAL, 500)):
    ann = {"images": [], "annotations": []}
    for i in range(n):
      name = f"COCO_{split}_{i + first_id:012d}.jpg"
      if split == "train2014":
        Image.fromarray(images[i]).save(coco / name, quality=95)
      ann["images"].append({"id": i + first_id, "file_name": name})
      ann["annotations"] += [{"id": 100 + 2 * i, "image_id": i + first_id, "caption": f"a digit  number {i}\n"},
                             {"id": 99 - i, "image_id": i + first_id, "caption": f"{split[:-4]} caption {i}"}]
    (tmp / "coco" / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
  from tiny_clip import save_tiny_clip
  save_tiny_clip(tmp / "clip-vit-large-patch14")
  results = _run_recipe(tmp, "coco", {"deediff_jax.data.encode_latents": ENCODE_TINY,
                                      "deediff_jax.data.encode_text": ["--no-progress"],
                                      "deediff_jax.main": COCO_TINY})
  return dict(recipe, results=results)


# --------------------------------------------------------------------------- the README recipe


def _modes(cmds):
  return [c[c.index("--mode") + 1] if "--mode" in c else c[2] for c in cmds]


def _assert_all_ran(results, cmds):
  assert len(results) == len(cmds)
  for key, (argv, (code, stderr)) in results.items():
    assert code == 0, (key, " ".join(argv), stderr[-3000:])


def test_imagenet_recipe_commands_run_at_tiny_size(recipe):
  cmds = recipe["cmds"]["imagenet"]
  assert _modes(cmds) == ["deediff_jax.data.encode_latents", "deediff_jax.main", "sample", "sweep"]
  _assert_all_ran(recipe["results"], cmds)


def test_encoded_imagenet_dir(recipe):
  out = recipe["tmp"] / "imagenet256_latents"
  index = json.loads((out / "index.json").read_text())
  n = len(recipe["images"])
  assert index["format"] == sources.LATENTS_FORMAT and index["flip"] is True
  assert index["num_images"] == n and index["num_examples"] == 2 * n
  assert index["moments_shape"] == [8, 8, 8] and index["latent_channels"] == 4 and index["num_classes"] == 10
  assert [s["num_examples"] for s in index["shards"]] == [48, 48, 2 * n - 96]
  assert index["source"] == f"folder:{out.parent / 'imagenet' / 'train'}" and index["resize"] == "adm"
  assert not (out / "encode_settings.json").exists()
  files = (out / "files.txt").read_text().splitlines()
  assert len(files) == n and files[0].startswith("n00000000/")
  # Entry 2i is image i (folder order: classes sorted), 2i + 1 its mirror; same label.
  moments = np.concatenate([np.load(out / s["moments"]) for s in index["shards"]])
  labels = np.concatenate([np.load(out / s["labels"]) for s in index["shards"]])
  assert moments.dtype == np.float16
  reader = E.open_images(index["source"], 16)
  x, y = reader.read(np.arange(n))
  np.testing.assert_array_equal(labels, np.repeat(y, 2))
  np.testing.assert_array_equal(y, np.sort(recipe["labels"]))
  x = x.astype(np.float32) / 127.5 - 1
  want = np.asarray(ae.encode_moments(recipe["params"], np.concatenate([x[:8], x[:8, :, ::-1]])))
  np.testing.assert_allclose(moments[0:16:2], want[:8], atol=2e-2, rtol=2e-3)
  np.testing.assert_allclose(moments[1:16:2], want[8:], atol=2e-2, rtol=2e-3)


def test_coco_recipe_commands_run_at_tiny_size(coco_recipe):
  cmds = coco_recipe["cmds"]["coco"]
  assert _modes(cmds) == ["deediff_jax.data.encode_latents", "deediff_jax.data.encode_text", "deediff_jax.main",
                          "sample", "sweep"]
  _assert_all_ran(coco_recipe["results"], cmds)


def test_coco_encoding_writes_one_caption_per_entry(coco_recipe):
  out = coco_recipe["tmp"] / "mscoco256_latents"
  index = json.loads((out / "index.json").read_text())
  assert index["num_examples"] == COCO_TRAIN and index["labels"] is False and index["resize"] == "lanczos"
  assert all(s["labels"] is None for s in index["shards"])
  captions = (out / "captions.txt").read_text().splitlines()
  # The first caption by annotation id, whitespace collapsed, in the files' (sorted) order.
  assert captions == [f"train caption {i}" for i in range(COCO_TRAIN)]
  assert (out / "files.txt").read_text().splitlines() == [f"COCO_train2014_{i + 9:012d}.jpg"
                                                           for i in range(COCO_TRAIN)]


def test_coco_text_model_trains_and_samples_held_out_captions(coco_recipe):
  """The COCO recipe end to end: CLIP features of the train captions and of val2014's first
  captions, a text-conditional latent model trained on them, decoded samples for the held-out
  captions and a sweep of the decoded images."""
  tmp = coco_recipe["tmp"]
  f = np.load(tmp / "mscoco_clip_features.npz")
  assert f["features"].shape == (COCO_TRAIN, 77, 32) and str(f["encoder"]) == "clip"
  np.testing.assert_array_equal(f["caption_index"], np.arange(COCO_TRAIN))
  assert [str(c) for c in f["eval_captions"]] == [f"val caption {i}" for i in range(COCO_VAL)]
  assert f["eval_features"].shape == (COCO_VAL, 77, 32) and "eval_labels" not in f.files
  wd = tmp / "ckpt" / "coco"
  metrics = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
  z = np.load(wd / "samples.npz")
  assert sorted(z.files) == ["captions", "images", "labels", "latents"]
  assert z["images"].shape == (8, 16, 16, 3) and z["latents"].shape == (8, 8, 8, 4)
  assert [str(c) for c in z["captions"]] == [f"val caption {i % COCO_VAL}" for i in range(8)]
  np.testing.assert_allclose(np.clip(ae.decode_batched(coco_recipe["params"], z["latents"], 8), -1, 1), z["images"],
                             atol=1e-4)
  stats = json.loads((wd / "sample_stats.json").read_text())
  assert np.isfinite(stats["psnr_vs_full"]) and stats["sampler"] == "dpm_solver_fast"
  rows = json.loads((wd / "sweep" / "sweep.json").read_text())
  assert [r["setting"] for r in rows] == ["uem 0.5"] and np.isfinite(rows[0]["psnr_vs_full"])


def test_sample_writes_decoded_images_and_keeps_latents(recipe):
  wd = recipe["tmp"] / "ckpt" / "in256"
  z = np.load(wd / "samples.npz")
  assert sorted(z.files) == ["images", "labels", "latents"]
  images, latents = z["images"], z["latents"]
  assert images.shape == (8, 16, 16, 3) and latents.shape == (8, 8, 8, 4)
  assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
  np.testing.assert_allclose(np.clip(ae.decode_batched(recipe["params"], latents, 8), -1, 1), images, atol=1e-4)
  with Image.open(wd / "samples.png") as im:
    assert im.mode == "RGB"
  stats = json.loads((wd / "sample_stats.json").read_text())
  assert np.isfinite(stats["psnr_vs_full"]) and stats["fidelity_sampler"] == "dpm_solver_fast"
  metrics = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)


def test_sweep_scores_decoded_images(recipe):
  out = recipe["tmp"] / "ckpt" / "in256" / "sweep"
  rows = json.loads((out / "sweep.json").read_text())
  assert [r["setting"] for r in rows] == ["uem 0.5"]
  assert np.isfinite(rows[0]["psnr_vs_full"]) and rows[0]["fid"] is None    # fid_kind=none on the CLI
  with Image.open(out / "grid_uem.png") as im:
    assert im.mode == "RGB"


def test_fid_compares_decoded_samples_with_the_images_the_latents_came_from(recipe):
  """The sweep's scorer sees decoded [-1, 1] images and real images read back through index.json
  (a cheap feature net stands in for Inception / the classifier, which have their own tests)."""
  from deediff_jax.eval import fid as fid_lib
  from deediff_jax.eval import quality, real_data, runner, settings, specs
  tmp = recipe["tmp"]
  config = E._load_config(os.path.join(ROOT, "configs", "imagenet256_uvit_large.py"), MAIN_TINY + [
      f"--config.data.source=latents:{tmp / 'imagenet256_latents'}",
      f"--config.data.autoencoder={tmp / 'ae.npz'}"])
  real = real_data.real_images(config)
  reader = E.open_images(f"folder:{tmp / 'imagenet' / 'train'}", 16)
  x, y = reader.read(np.arange(reader.num_examples))
  np.testing.assert_array_equal(real.images, x.astype(np.float32) / 127.5 - 1)
  np.testing.assert_array_equal(real.labels, y)
  assert real_data.real_images(config, "test") is None
  seen = []

  def features(images):
    seen.append(images.shape)
    assert images.min() >= -1 and images.max() <= 1
    return np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)

  q = quality.Quality(fid_kind="classifier", fid_kind_name="pixel statistics (test)",
                    real_stats=fid_lib.statistics(features(real.images)), feature_fn=features)
  ctx = runner.prepare(config, str(tmp / "ckpt" / "in256"), num=8, quality=q)
  row, images, _ = runner.evaluate(ctx, settings.Setting("uem", threshold=0.5))
  assert images.shape == (8, 16, 16, 3) and ctx.images_full.shape == (8, 16, 16, 3)
  assert seen[1:] == [(8, 16, 16, 3)] * 2 and np.isfinite(row["fid"]) and np.isfinite(row["psnr_vs_full"])
  # The CLI sweep scored the same decoded images: the same PSNR vs full.
  cli_rows = json.loads((tmp / "ckpt" / "in256" / "sweep" / "sweep.json").read_text())
  assert row["psnr_vs_full"] == pytest.approx(cli_rows[0]["psnr_vs_full"], rel=1e-6)
  # Without data.autoencoder a latent model's samples are not images: FID refuses, in one line.
  config.data.autoencoder = ""
  config.sweep.fid_kind = "inception"
  with pytest.raises(settings.SweepError, match="set --config.data.autoencoder"):
    quality.build_quality(specs.quality_spec(config), str(tmp / "x"))


def test_psnr_floor_calibration_scores_decoded_images(recipe, monkeypatch):
  """exit.min_psnr on a latent model is a floor on the decoded images' PSNR, like the sweep's."""
  from deediff_jax.eval import fidelity as fidelity_lib, specs
  from deediff_jax.eval.calibration import threshold as cal_threshold
  from deediff_jax.train import checkpoint as ckpt
  tmp = recipe["tmp"]
  config = E._load_config(os.path.join(ROOT, "configs", "imagenet256_uvit_large.py"), MAIN_TINY + [
      f"--config.data.source=latents:{tmp / 'imagenet256_latents'}", f"--config.data.autoencoder={tmp / 'ae.npz'}",
      "--config.exit.min_psnr=20", "--config.exit.calibration_images=8"])
  params = ckpt.load_params(str(tmp / "ckpt" / "in256"), config)
  seen = []
  real = fidelity_lib.fidelity

  def spy(reference, images):
    seen.append((reference.shape, images.shape))
    return real(reference, images)
  monkeypatch.setattr(fidelity_lib, "fidelity", spy)
  _, report = cal_threshold.calibrate_threshold(params, specs.calibration_spec(config), jax.random.PRNGKey(0),
                                             policy="uem")
  assert seen and set(seen) == {((8, 16, 16, 3), (8, 16, 16, 3))}
  assert report["method"] == "psnr_floor" and report["achieved"]["psnr_vs_full"] >= 20


# --------------------------------------------------------------------------- the latents: source


def _latents_config(path, **kw):
  return ml_collections.ConfigDict(dict(source=f"latents:{path}", image_size=16, channels=3, latent=True,
                                        flip=False, split="train", **kw))


def test_latents_source_memory_maps_and_draws_a_fresh_latent_per_step(recipe):
  out = recipe["tmp"] / "imagenet256_latents"
  src = sources.load_source(_latents_config(out))
  assert src.num_examples == 2 * len(recipe["images"]) and (src.image_size, src.channels) == (8, 4)
  assert src.num_classes == 10 and src.latent
  assert all(isinstance(m, np.memmap) and m.mode == "r" for m in src.images.shards)   # nothing loaded whole
  stored = np.concatenate([np.asarray(m, np.float32) for m in src.images.shards])
  idx = np.array([97, 3, 50, 3, 0])
  np.testing.assert_array_equal(src.get(idx)["image"], stored[idx])               # moments, across shards

  kw = dict(batch_size=8, seed=3, flip=False)
  b5 = pipeline.make_batch(src, 5, **kw)
  assert b5["image"].shape == (8, 8, 8, 4) and b5["image"].dtype == np.float32
  np.testing.assert_array_equal(b5["image"], pipeline.make_batch(src, 5, **kw)["image"])   # pure in (seed, step)
  rows = pipeline.global_batch_indices(src.num_examples, 8, 3, 5)
  mean, logvar = np.split(stored[rows], 2, axis=-1)
  noise = np.stack([np.random.default_rng([3, 2, 5, r]).standard_normal((8, 8, 4), np.float32) for r in range(8)])
  want = ae.SCALE_FACTOR * (mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * noise)
  np.testing.assert_allclose(b5["image"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(b5["label"], src.labels[rows])
  # Any number of hosts together load exactly the one-host batch.
  halves = [pipeline.make_batch(src, 5, process_index=p, process_count=2, **kw)["image"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), b5["image"])
  # The same example at another step gets another draw (fresh latents), around the same mean.
  n = src.num_examples
  step_b = next(s for s in range(6, 200) if rows[0] in pipeline.global_batch_indices(n, 8, 3, s))
  pos = int(np.flatnonzero(pipeline.global_batch_indices(n, 8, 3, step_b) == rows[0])[0])
  other = pipeline.make_batch(src, step_b, **kw)["image"][pos]
  assert not np.array_equal(other, b5["image"][0])


def test_latents_source_errors_are_one_line(recipe, tmp_path):
  out = recipe["tmp"] / "imagenet256_latents"
  cases = [
      (_latents_config(out, ), dict(flip=True), "data.flip=True"),
      (_latents_config(out), dict(latent=False), "set --config.data.latent=True"),
      (_latents_config(tmp_path / "nope"), {}, "latents directory not found"),
      (_latents_config(tmp_path), {}, "has no index.json"),
  ]
  for dc, change, words in cases:
    dc.update(change)
    with pytest.raises(sources.DataError) as e:
      sources.load_source(dc)
    assert words in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the encoder CLI


def test_encode_latents_resumes_and_refuses_bad_input(recipe, tmp_path):
  tmp = recipe["tmp"]
  np.savez(tmp_path / "img.npz", image=recipe["images"][:20], label=recipe["labels"][:20])
  base = ["--config", os.path.join(ROOT, "configs", "imagenet256_uvit_large.py"), "--autoencoder",
          str(tmp / "ae.npz"), "--source", f"npz:{tmp_path / 'img.npz'}", "--out", str(tmp_path / "lat")]
  small = ENCODE_TINY[:2] + ["--shard-size", "8", "--batch-size", "16", "--no-progress"]
  code, err = _cli("deediff_jax.data.encode_latents", base + small)
  assert code == 0, err
  index = json.loads((tmp_path / "lat" / "index.json").read_text())
  assert [s["num_examples"] for s in index["shards"]] == [8, 8, 4] and index["flip"] is False
  first = np.load(tmp_path / "lat" / "moments_00001.npy")
  # An interrupted run (no index yet, one shard missing) resumes and rewrites only what is missing.
  os.remove(tmp_path / "lat" / "index.json")
  os.remove(tmp_path / "lat" / "moments_00001.npy")
  (tmp_path / "lat" / "encode_settings.json").write_text(json.dumps(
      {k: v for k, v in index.items() if k in ("source", "num_images", "image_size", "channels", "resize",
                                                "flip", "dtype", "moments_shape", "autoencoder")}
      | {"shard_size": 8}))
  kept = os.stat(tmp_path / "lat" / "moments_00000.npy").st_mtime_ns
  code, err = _cli("deediff_jax.data.encode_latents", base + small)
  assert code == 0, err
  assert os.stat(tmp_path / "lat" / "moments_00000.npy").st_mtime_ns == kept
  np.testing.assert_array_equal(np.load(tmp_path / "lat" / "moments_00001.npy"), first)

  bad = {
      "missing_weights": (["--autoencoder", str(tmp_path / "none.pth")], "autoencoder weights", "not found"),
      "bad_source": (["--source", "ftp:x"], "unknown image source", "folder:PATH"),
      "missing_folder": (["--source", f"folder:{tmp_path / 'nothing'}"], "image folder not found", "check"),
      "done_already": ([], "already holds encoded latents", "--out"),
      "model_mismatch": (["--config.model.image_size=32"], "8x8x4 latents", "model.image_size"),
  }
  for name, (extra, *words) in bad.items():
    code, err = _cli("deediff_jax.data.encode_latents", base + ENCODE_TINY + extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("encode_latents: error: "), (name, err)
    for w in words:
      assert w in lines[0], (name, lines[0])
  assert issubclass(E.EncodeLatentsError, ValueError)
