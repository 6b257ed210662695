"""deediff_jax.data: sources (digits, npz, folder, tfds, captions) and the deterministic pipeline."""
import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image

from deediff_jax.config import base_config
from deediff_jax.data import (DataError, epoch_permutation, flip_mask, global_batch_indices, iterate, load_source,
                              make_batch)

# The real 10k-digit MNIST subset beside the repository (the study scripts' default MNIST_NPZ).
MNIST = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist10k.npz"))
needs_mnist = pytest.mark.skipif(not os.path.exists(MNIST), reason=f"{MNIST} is not on this machine")
SCHEMES = "digits, npz:PATH, folder:PATH, tfds:NAME"


def data_cfg(source="digits", image_size=8, channels=1, **kw):
  d = base_config().data
  d.update(source=source, image_size=image_size, channels=channels, **kw)
  return d


def raises(fn, message):
  """`fn()` raises DataError with exactly `message`, which is one line."""
  with pytest.raises(DataError) as info:
    fn()
  text = str(info.value)
  assert "\n" not in text
  assert text == message
  assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------- sources


def test_digits():
  from sklearn.datasets import load_digits
  src = load_source(data_cfg())
  assert src.num_examples == 1797 and src.image_size == 8 and src.channels == 1 and src.num_classes == 10
  assert src.images.shape == (1797, 8, 8, 1) and src.images.dtype == np.uint8
  ref = load_digits()
  # 0..16 -> 0..255: 16 -> 255, 8 -> 128 (127.5 rounds to even), 0 -> 0.
  np.testing.assert_array_equal(src.images[..., 0], np.round(ref.images * 255 / 16).astype(np.uint8))
  assert src.images.max() == 255 and src.images.min() == 0
  np.testing.assert_array_equal(src.labels, ref.target)
  assert src.labels.dtype == np.int32
  got = src.get([5, 0, 5])
  np.testing.assert_array_equal(got["image"], src.images[[5, 0, 5]])
  np.testing.assert_array_equal(got["label"], ref.target[[5, 0, 5]])
  assert set(got) == {"image", "label"}


@needs_mnist
def test_npz_mnist_train_and_test():
  tr = load_source(data_cfg(f"npz:{MNIST}", 28, 1))
  te = load_source(data_cfg(f"npz:{MNIST}", 28, 1, split="test"))
  raw = np.load(MNIST)
  assert tr.images.shape == (9000, 28, 28, 1) and tr.images.dtype == np.uint8 and tr.labels.shape == (9000,)
  assert te.images.shape == (1000, 28, 28, 1) and te.labels.shape == (1000,)
  assert tr.num_classes == te.num_classes == 10
  np.testing.assert_array_equal(te.get([7])["image"], raw["test_image"][7:8])
  np.testing.assert_array_equal(tr.get([3, 1])["label"], raw["label"][[3, 1]])


def test_npz_relative_path_and_rank3(tmp_path, monkeypatch):
  img = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
  np.savez(tmp_path / "a.npz", image=img)
  monkeypatch.chdir(tmp_path)
  src = load_source(data_cfg("npz:a.npz", 4, 1))
  assert src.labels is None and src.num_classes == 0
  got = src.get([1])
  assert set(got) == {"image"}
  np.testing.assert_array_equal(got["image"], img[1:2, :, :, None])


def test_npz_latent_passthrough(tmp_path):
  lat = np.random.default_rng(0).normal(size=(6, 4, 4, 4)).astype(np.float32) * 3
  np.savez(tmp_path / "lat.npz", image=lat, label=np.arange(6))
  # data.image_size/channels describe the pixels (256x256x3); latents skip that check.
  src = load_source(data_cfg(f"npz:{tmp_path}/lat.npz", 256, 3, latent=True))
  assert src.latent and src.image_size == 4 and src.channels == 4 and src.num_classes == 6
  b = make_batch(src, 0, batch_size=6, seed=1, flip=False)
  idx = global_batch_indices(6, 6, 1, 0)
  np.testing.assert_array_equal(b["image"], lat[idx])  # no scaling
  np.testing.assert_array_equal(b["label"], idx)


def test_scaling_is_exact(tmp_path):
  img = np.array([0, 51, 255, 128], np.uint8).reshape(4, 1, 1, 1) * np.ones((1, 2, 2, 1), np.uint8)
  np.savez(tmp_path / "s.npz", image=img)
  src = load_source(data_cfg(f"npz:{tmp_path}/s.npz", 2, 1))
  b = make_batch(src, 0, batch_size=4, seed=0, flip=False)
  idx = global_batch_indices(4, 4, 0, 0)
  want = {0: -1.0, 51: -0.6, 255: 1.0, 128: 128 / 127.5 - 1}
  for row, i in enumerate(idx):
    np.testing.assert_allclose(b["image"][row], want[int(img[i, 0, 0, 0])], rtol=0, atol=1e-7)
  assert b["image"].dtype == np.float32
  assert b["image"].min() == -1.0 and b["image"].max() == 1.0  # exactly, not 0.99999


def test_npz_errors(tmp_path):
  p = str(tmp_path)
  raises(lambda: load_source(data_cfg(f"npz:{p}/nope.npz")),
         f"npz file not found: {p}/nope.npz (relative paths resolve against the current directory "
         f"{os.getcwd()}); check the path")
  np.savez(tmp_path / "noimg.npz", images=np.zeros((2, 8, 8, 1), np.uint8), label=np.zeros(2, np.int32))
  raises(lambda: load_source(data_cfg(f"npz:{p}/noimg.npz")),
         f"npz file {p}/noimg.npz has no 'image' array (it has: images, label); save images as "
         "image=[N,H,W,C] uint8 (and label=[N] int)")
  np.savez(tmp_path / "f.npz", image=np.zeros((2, 8, 8, 1), np.float32))
  raises(lambda: load_source(data_cfg(f"npz:{p}/f.npz")),
         f"npz file {p}/f.npz: 'image' must be uint8 in 0..255, got dtype float32; convert with "
         "np.clip(x, 0, 255).astype(np.uint8), or set --config.data.latent=True for float autoencoder latents")
  np.savez(tmp_path / "r.npz", image=np.zeros((2, 64), np.uint8))
  raises(lambda: load_source(data_cfg(f"npz:{p}/r.npz")),
         f"npz file {p}/r.npz: 'image' must be [N,H,W,C] (or [N,H,W] for one channel), got shape (2, 64)")
  np.savez(tmp_path / "big.npz", image=np.zeros((2, 28, 28, 3), np.uint8))
  raises(lambda: load_source(data_cfg(f"npz:{p}/big.npz")),
         f"npz file {p}/big.npz: 'image' images are 28x28x3 (HxWxC) but the config expects 8x8x1; set "
         "--config.data.image_size=28 --config.data.channels=3 (and model.image_size/in_channels to match)")
  raises(lambda: load_source(data_cfg(f"npz:{p}/big.npz", 28, 3, split="test")),
         f"npz file {p}/big.npz has no 'test_image' array for data.split=test (it has: image); add "
         "test_image/test_label or use data.split=train")
  np.savez(tmp_path / "lab.npz", image=np.zeros((3, 8, 8, 1), np.uint8), label=np.zeros(2, np.int64))
  raises(lambda: load_source(data_cfg(f"npz:{p}/lab.npz")),
         f"npz file {p}/lab.npz: 'label' has 2 labels for 3 images; store one label per image")
  raises(lambda: load_source(data_cfg(f"npz:{p}/lab.npz", latent=True)),
         f"npz file {p}/lab.npz: data.latent=True expects float latents in 'image', got dtype uint8; set "
         "--config.data.latent=False for uint8 images")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(DataError, match=r"^cannot read npz file .*junk.npz as .npz"):
    load_source(data_cfg(f"npz:{p}/junk.npz"))


def test_unknown_scheme_and_bad_specs():
  raises(lambda: load_source(data_cfg("imagenet:/x")),
         f"unknown data.source 'imagenet:/x'; use one of: {SCHEMES}")
  raises(lambda: load_source(data_cfg("digitz")), f"unknown data.source 'digitz'; use one of: {SCHEMES}")
  raises(lambda: load_source(data_cfg("npz:")),
         "data.source 'npz:' needs a path after 'npz:', e.g. npz:data/train.npz")
  raises(lambda: load_source(data_cfg("digits", 28)),
         "digits images are 8x8x1 (HxWxC) but the config expects 28x28x1; set --config.data.image_size=8 "
         "--config.data.channels=1 (and model.image_size/in_channels to match)")
  raises(lambda: load_source(data_cfg("digits", latent=True)),
         "data.latent=True needs precomputed latents from an npz:PATH source, not 'digits'; set "
         "--config.data.latent=False for images")
  raises(lambda: load_source(data_cfg("digits", split="test")),
         "source digits has only the 'train' split, got data.split='test'; set --config.data.split=train")


# ---------------------------------------------------------------------------- folder


def _png(path, arr):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path)


def test_folder_flat_and_classes(tmp_path):
  rng = np.random.default_rng(0)
  flat = {f"img{i}.png": rng.integers(0, 256, (8, 8), dtype=np.uint8) for i in range(3)}
  for name, a in flat.items():
    _png(str(tmp_path / "flat" / name), a)
  (tmp_path / "flat" / "notes.txt").write_text("ignored")
  src = load_source(data_cfg(f"folder:{tmp_path}/flat", 8, 1))
  assert src.num_examples == 3 and src.labels is None and src.num_classes == 0
  np.testing.assert_array_equal(src.get([0, 2])["image"][..., 0], np.stack([flat["img0.png"], flat["img2.png"]]))

  # Class subdirectories: ids by sorted name ("cat" 0, "dog" 1), RGB files read as L.
  files = {"dog/a.png": 1, "cat/b.png": 0, "cat/c.png": 0, "dog/deep/d.jpg": 1}
  arrs = {}
  for name in files:
    arrs[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _png(str(tmp_path / "cls" / name), arrs[name])
  src = load_source(data_cfg(f"folder:{tmp_path}/cls", 8, 1))
  assert src.num_examples == 4 and src.num_classes == 2
  np.testing.assert_array_equal(src.labels, [0, 0, 1, 1])  # cat/b, cat/c, dog/a, dog/deep/d
  want_gray = np.asarray(Image.fromarray(arrs["cat/c.png"]).convert("L"))
  np.testing.assert_array_equal(src.get([1])["image"][0, ..., 0], want_gray)
  # As RGB the PNGs come back bit for bit.
  src3 = load_source(data_cfg(f"folder:{tmp_path}/cls", 8, 3))
  np.testing.assert_array_equal(src3.get([2])["image"][0], arrs["dog/a.png"])
  assert src3.get([3])["image"].shape == (1, 8, 8, 3)  # the jpg, lossy


def test_folder_resizes_to_image_size(tmp_path):
  a = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)  # H=12, W=16
  _png(str(tmp_path / "r" / "x.png"), a)
  src = load_source(data_cfg(f"folder:{tmp_path}/r", 6, 3))
  # Center crop to 12x12 (columns 2..14), then bilinear to 6x6.
  want = np.asarray(Image.fromarray(a[:, 2:14]).resize((6, 6), Image.BILINEAR))
  np.testing.assert_array_equal(src.images[0], want)


def test_folder_errors(tmp_path):
  p = str(tmp_path)
  raises(lambda: load_source(data_cfg(f"folder:{p}/missing")),
         f"image folder not found: {p}/missing (relative paths resolve against the current directory "
         f"{os.getcwd()}); check the path")
  os.makedirs(tmp_path / "empty" / "sub")
  (tmp_path / "empty" / "readme.txt").write_text("x")
  raises(lambda: load_source(data_cfg(f"folder:{p}/empty")),
         f"image folder {p}/empty has no images (.png, .jpg, .jpeg, .bmp, .webp), neither at its top level nor "
         "in class subdirectories; add images or fix the path")
  _png(f"{p}/mixed/a.png", np.zeros((8, 8), np.uint8))
  _png(f"{p}/mixed/b.png", np.zeros((9, 8), np.uint8))
  raises(lambda: load_source(data_cfg(f"folder:{p}/mixed")),
         f"image folder {p}/mixed has images of mixed sizes: a.png is 8x8 but b.png is 8x9 (WxH); resize them "
         "to one size first")
  _png(f"{p}/bad/a.png", np.zeros((8, 8), np.uint8))
  (tmp_path / "bad" / "b.png").write_bytes(b"\x89PNG garbage")
  with pytest.raises(DataError) as info:
    load_source(data_cfg(f"folder:{p}/bad"))
  msg = str(info.value)
  assert msg.startswith(f"cannot read image file {p}/bad/b.png (UnidentifiedImageError: ")
  assert msg.endswith("); remove or replace it") and "\n" not in msg
  _png(f"{p}/both/top.png", np.zeros((8, 8), np.uint8))
  _png(f"{p}/both/k/x.png", np.zeros((8, 8), np.uint8))
  raises(lambda: load_source(data_cfg(f"folder:{p}/both")),
         f"image folder {p}/both mixes images at its top level (top.png) with class subdirectories (k/); put "
         "every image in a class subdirectory, or none")


# ---------------------------------------------------------------------------- tfds

tfds = pytest.importorskip("tensorflow_datasets")
logging.getLogger("absl").setLevel(logging.ERROR)


def _tiny(i):
  return np.random.default_rng([7, i]).integers(0, 256, (10, 12, 3), dtype=np.uint8)


class DeediffTinyImages(tfds.core.GeneratorBasedBuilder):
  """A real ArrayRecord dataset with PNG-encoded images, built offline without TensorFlow."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(10, 12, 3)), "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):  # label i identifies the image, whatever order the records are stored in
      yield i, {"image": Image.fromarray(_tiny(i)), "label": i}


def test_tfds_local_array_record(tmp_path, monkeypatch):
  DeediffTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  src = load_source(data_cfg("tfds:deediff_tiny_images", 6, 3))
  assert src.num_examples == 5 and src.num_classes == 5 and src.image_size == 6
  got = src.get(np.arange(5))
  assert sorted(got["label"].tolist()) == [0, 1, 2, 3, 4]
  for img, lab in zip(got["image"], got["label"]):
    # 10x12 -> center crop columns 1..11 -> bilinear 6x6
    want = np.asarray(Image.fromarray(_tiny(int(lab))[:, 1:11]).resize((6, 6), Image.BILINEAR))
    np.testing.assert_array_equal(img, want)
  np.testing.assert_array_equal(src.labels[[3, 1]], got["label"][[3, 1]])
  b = make_batch(src, 2, batch_size=4, seed=0, flip=True)
  assert b["image"].shape == (4, 6, 6, 3) and b["image"].dtype == np.float32
  assert load_source(data_cfg("tfds:deediff_tiny_images", 6, 3, split="test")).num_examples == 2


def test_tfds_mock_mnist_cifar_celeba():
  with tfds.testing.mock_data(num_examples=4):
    for name, size, ch in (("mnist", 28, 1), ("cifar10", 32, 3)):
      src = load_source(data_cfg(f"tfds:{name}", size, ch))
      raw = tfds.data_source(name, split="train")
      assert src.num_examples == 4 and src.num_classes == 10
      got = src.get([3, 0])
      np.testing.assert_array_equal(got["image"], np.stack([raw[3]["image"], raw[0]["image"]]))  # as stored
      np.testing.assert_array_equal(got["label"], [raw[3]["label"], raw[0]["label"]])
    raw = tfds.data_source("celeb_a", split="train")
    assert raw[1]["image"].shape == (218, 178, 3)
    # At 128 the resize is the identity, which exposes the crop box: rows 57..185, columns 25..153.
    src = load_source(data_cfg("tfds:celeb_a", 128, 3))
    assert src.labels is None and src.num_classes == 0
    np.testing.assert_array_equal(src.get([1])["image"][0], raw[1]["image"][57:185, 25:153])
    src = load_source(data_cfg("tfds:celeb_a", 64, 3))
    want = np.asarray(Image.fromarray(raw[2]["image"][57:185, 25:153]).resize((64, 64), Image.BILINEAR))
    got = src.get([2])
    assert set(got) == {"image"}
    np.testing.assert_array_equal(got["image"][0], want)


def test_tfds_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  raises(lambda: load_source(data_cfg("tfds:mnist", 28, 1)),
         f"TFDS dataset 'mnist' is not prepared in {tmp_path}; on a machine with internet run `tfds build mnist "
         "--file_format=array_record` (or python -c \"import tensorflow_datasets as tfds; tfds.builder('mnist', "
         "file_format='array_record').download_and_prepare()\") and copy the dataset directory into $TFDS_DATA_DIR "
         "(default ~/tensorflow_datasets)")
  assert os.listdir(tmp_path) == []  # nothing downloaded or created
  raises(lambda: load_source(data_cfg("tfds:no_such_dataset_xyz")),
         "TFDS has no dataset named 'no_such_dataset_xyz'; see https://www.tensorflow.org/datasets/catalog for "
         "names (e.g. tfds:cifar10, tfds:mnist, tfds:celeb_a)")


# ---------------------------------------------------------------------------- captions


def _captions(tmp_path, n=1797, m=20, length=3, dim=4, **over):
  rng = np.random.default_rng(3)
  arrays = dict(features=rng.normal(size=(m, length, dim)).astype(np.float16),
                caption_index=rng.integers(0, m, n), null_features=np.zeros((length, dim), np.float32),
                captions=np.array([f"caption {i}" for i in range(m)]),
                # Further keys encode_text writes; the data layer ignores them.
                mask=np.ones((m, length), bool), encoder=np.array("minilm"), max_length=np.int32(length),
                eval_captions=np.array([], dtype="<U1"))
  arrays.update(over)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  path = str(tmp_path / "cap.npz")
  np.savez(path, **arrays)
  return path, arrays


def test_context(tmp_path):
  path, arr = _captions(tmp_path)
  src = load_source(data_cfg(context_file=path))
  assert src.context.context_len == 3 and src.context.context_dim == 4 and src.context.captions[4] == "caption 4"
  got = src.get([10, 2])
  assert got["context"].dtype == np.float32
  np.testing.assert_array_equal(got["context"], arr["features"][arr["caption_index"][[10, 2]]].astype(np.float32))
  b = make_batch(src, 4, batch_size=8, seed=0, flip=True)
  idx = global_batch_indices(1797, 8, 0, 4)
  np.testing.assert_array_equal(b["context"], arr["features"][arr["caption_index"][idx]].astype(np.float32))
  np.testing.assert_array_equal(b["label"], src.labels[idx])


@needs_mnist
def test_context_errors(tmp_path):
  p = str(tmp_path / "cap.npz")
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file (data.context_file) not found: {p} (relative paths resolve against the current "
         f"directory {os.getcwd()}); check the path")
  _captions(tmp_path, features=None)
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file {p} has no 'features' array (it has: caption_index, null_features, captions, mask, "
         "encoder, max_length, eval_captions); "
         "write it with python -m deediff_jax.data.encode_text")
  _captions(tmp_path, n=100)
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file {p}: 'caption_index' has 100 entries but the train split has 1797 examples; "
         "encode captions for this dataset and split")
  _captions(tmp_path, caption_index=np.full(1797, 20))
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file {p}: 'caption_index' has values in [20, 20] but 'features' has 20 rows")
  _captions(tmp_path, null_features=np.zeros((3, 5), np.float32))
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file {p}: 'null_features' must be float [3, 4] like one row of 'features', got "
         "float32 (3, 5)")
  _captions(tmp_path, features=np.zeros((20, 4), np.float32))
  raises(lambda: load_source(data_cfg(context_file=p)),
         f"caption feature file {p}: 'features' must be float [M, L, D], got float32 (20, 4)")
  _captions(tmp_path, n=1000)
  raises(lambda: load_source(data_cfg(f"npz:{MNIST}", 28, 1, split="test", context_file=p)),
         f"caption feature file {p} has no 'test_caption_index' array for data.split=test; encode captions for "
         "that split or use data.split=train")


# ---------------------------------------------------------------------------- pipeline


def test_epochs_are_permutations():
  n, b = 10, 4  # 3 epochs = 30 positions = 7.5 batches: batches straddle epoch ends
  stream = np.concatenate([global_batch_indices(n, b, 5, s) for s in range(8)])
  for e in range(3):
    chunk = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(chunk), np.arange(n))
    np.testing.assert_array_equal(chunk, epoch_permutation(n, 5, e))
  assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled each epoch
  assert not np.array_equal(global_batch_indices(n, b, 5, 0), global_batch_indices(n, b, 6, 0))
  # A batch larger than the dataset spans several epochs.
  big = global_batch_indices(3, 7, 0, 1)  # positions 7..13: epochs 2, 3, 4
  np.testing.assert_array_equal(big[:2], epoch_permutation(3, 0, 2)[1:])
  np.testing.assert_array_equal(big[2:5], epoch_permutation(3, 0, 3))


def test_resume_determinism():
  src = load_source(data_cfg())
  kw = dict(batch_size=32, seed=3, flip=True)
  run = dict(iterate(src, 0, num_steps=70, prefetch=2, **kw))  # 70*32 > 1797: crosses an epoch
  assert sorted(run) == list(range(70))
  for s in (0, 13, 56, 69):
    fresh = make_batch(src, s, **kw)
    for k in fresh:
      np.testing.assert_array_equal(run[s][k], fresh[k])
  resumed = iterate(src, 56, prefetch=1, **kw)
  for s in range(56, 60):
    step, batch = next(resumed)
    assert step == s
    np.testing.assert_array_equal(batch["image"], run[s]["image"])
  resumed.close()
  serial = dict(iterate(src, 60, num_steps=70, prefetch=0, **kw))
  for s in range(60, 70):
    np.testing.assert_array_equal(serial[s]["image"], run[s]["image"])
  assert not np.array_equal(run[0]["image"], run[1]["image"])


def test_hosts_concatenate_to_single_host():
  src = load_source(data_cfg())
  for step in (0, 57):
    one = make_batch(src, step, batch_size=24, seed=1, flip=True)
    for p in (2, 3, 4):
      parts = [make_batch(src, step, batch_size=24, seed=1, flip=True, process_index=i, process_count=p)
               for i in range(p)]
      for k in one:
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), one[k])
  raises(lambda: make_batch(src, 0, batch_size=10, seed=0, flip=False, process_index=0, process_count=4),
         "batch size 10 is not divisible by the 4 processes; set --config.train.batch_size to a multiple of 4")


def test_flip_flips_exactly_the_chosen_rows():
  src = load_source(data_cfg())
  plain = make_batch(src, 9, batch_size=64, seed=2, flip=False)
  flipped = make_batch(src, 9, batch_size=64, seed=2, flip=True)
  mask = flip_mask(64, 2, 9)
  assert 10 < mask.sum() < 54
  np.testing.assert_array_equal(flipped["image"][mask], plain["image"][mask][:, :, ::-1])
  np.testing.assert_array_equal(flipped["image"][~mask], plain["image"][~mask])
  np.testing.assert_array_equal(flipped["label"], plain["label"])
  # Digits are not mirror-symmetric: the flipped rows really changed.
  assert all(not np.array_equal(a, b) for a, b in zip(flipped["image"][mask], plain["image"][mask]))
  idx = global_batch_indices(1797, 64, 2, 9)
  np.testing.assert_array_equal(plain["image"], src.images[idx].astype(np.float32) / 127.5 - 1)


def test_iterate_stops_thread_and_reraises():
  src = load_source(data_cfg())
  it = iterate(src, 0, batch_size=8, seed=0, flip=False, prefetch=2)
  next(it)
  threads_before_close = list(threading.enumerate())
  it.close()
  from deediff_jax.data.prefetch import THREAD_NAME
  assert any(t.name.startswith(THREAD_NAME) for t in threads_before_close)  # it did run ahead
  assert not any(t.name.startswith(THREAD_NAME) and t.is_alive() for t in threading.enumerate())

  class Broken:
    num_examples, latent = 10, False

    def get(self, idx):
      raise RuntimeError("disk gone")

  with pytest.raises(RuntimeError, match="disk gone"):
    next(iterate(Broken(), 0, batch_size=2, seed=0, flip=False, prefetch=2))
