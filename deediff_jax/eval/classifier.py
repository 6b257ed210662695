"""Classifier-FID for small datasets: a small CNN trained on the dataset is the feature net.

Inception v3 expects 299x299 natural photos; on 8x8 digits or 28x28 MNIST its features
say little. Here a small CNN (conv32 -> pool -> conv64 -> pool -> dense128 -> classes) is
trained in JAX on the dataset itself, and

- **classifier-FID** is the Fréchet distance between Gaussians fitted to its penultimate
  (dense128, post-ReLU) features of real and generated images;
- **class accuracy** of class-conditional samples is how often its prediction equals the
  class the sample was conditioned on.

Classifier-FID is NOT comparable to Inception FID, nor across datasets or classifiers
(another seed gives another feature space): use it only to compare samplers, policies and
thresholds against each other with one cached classifier.

The trained classifier is cached in a directory (`classifier.npz` params +
`classifier.json` metadata: image shape, classes, held-out accuracy, training-data
fingerprint). `get_classifier` reuses the cache when the fingerprint of the data and
training settings matches, and otherwise trains (seconds for digits, well under a minute
for 9k MNIST images on 2 CPU cores) and overwrites it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deediff_jax.eval import fid as fid_lib

FID_KIND = "classifier"
NOTE = ("classifier-FID: Fréchet distance in the penultimate features of a small CNN trained on "
        "this dataset; not comparable to Inception FID or across datasets/classifiers")
ARCH = "conv32-pool-conv64-pool-dense{F}-v1"  # part of the cache fingerprint: edit on any change
PARAMS_FILE, META_FILE = "classifier.npz", "classifier.json"
_log = logging.getLogger(__name__)


class ClassifierError(ValueError):
  """Bad images/labels for the classifier (shape, dtype, range, label values)."""


class ClassifierNet(nn.Module):
  """NHWC images in [-1, 1] -> (logits [B, classes], features [B, feature_dim])."""
  num_classes: int
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="conv1")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 8 -> 4, 28 -> 14
    x = nn.relu(nn.Conv(64, (3, 3), padding="SAME", name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))  # 4 -> 2, 14 -> 7
    h = nn.relu(nn.Dense(self.feature_dim, name="dense")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name="logits")(h), h


@dataclasses.dataclass
class Classifier:
  """A trained feature net. `trained` is True when this call trained it (False: from cache)."""
  params: Any
  num_classes: int
  image_shape: tuple
  feature_dim: int
  accuracy: float                 # held-out accuracy measured after training
  fingerprint: str
  trained: bool
  meta: dict

  def _run(self, images, batch_size):
    x = _check_images(images, self.image_shape)
    if x.shape[0] == 0:
      return np.zeros((0, self.num_classes), np.float32), np.zeros((0, self.feature_dim), np.float32)
    chunk = max(1, min(int(batch_size), x.shape[0]))
    logits, feats = [], []
    for start in range(0, x.shape[0], chunk):
      part = x[start:start + chunk]
      n = part.shape[0]
      if n < chunk:  # pad so that one compiled shape serves every batch
        part = np.concatenate([part, np.zeros((chunk - n,) + part.shape[1:], part.dtype)])
      lg, ft = _forward(self.params, jnp.asarray(part), self.num_classes, self.feature_dim)
      logits.append(np.asarray(lg)[:n])
      feats.append(np.asarray(ft)[:n])
    return np.concatenate(logits), np.concatenate(feats)

  def features(self, images, batch_size: int = 1000) -> np.ndarray:
    """Penultimate features [B, feature_dim] (float32) of images in [-1, 1]."""
    return self._run(images, batch_size)[1]

  def predict(self, images, batch_size: int = 1000) -> np.ndarray:
    """Predicted class ids [B] (int32)."""
    return self._run(images, batch_size)[0].argmax(-1).astype(np.int32)

  def statistics(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features, e.g. for `fid.cached_statistics` of the real data."""
    return fid_lib.statistics(self.features(images))


@functools.partial(jax.jit, static_argnames=("num_classes", "feature_dim"))
def _forward(params, x, num_classes, feature_dim):
  return ClassifierNet(num_classes, feature_dim).apply({"params": params}, x)


def _check_images(images, image_shape=None) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]  # [N, H, W] grayscale
  if x.ndim != 4:
    raise ClassifierError(f"images must be [N, H, W] or [N, H, W, C], got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ClassifierError(f"images must be floats in [-1, 1], got dtype {x.dtype}; scale uint8 "
                          "images with x / 127.5 - 1")
  if x.size and not np.isfinite(x).all():
    raise ClassifierError("images contain NaN or Inf")
  if x.size and np.abs(x).max() > 2.0:
    raise ClassifierError(f"images must be in [-1, 1], got max |x| = {np.abs(x).max():.4g}; scale "
                          "[0, 255] images with x / 127.5 - 1")
  if image_shape is not None and tuple(x.shape[1:]) != tuple(image_shape):
    raise ClassifierError(f"the classifier was trained on images of shape {tuple(image_shape)}, got "
                          f"{tuple(x.shape[1:])}; use a classifier cache for this dataset")
  return x.astype(np.float32)


def _check_labels(labels, n, num_classes, what) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,):
    raise ClassifierError(f"{what} must be a vector of {n} class ids, got shape {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ClassifierError(f"{what} must be integer class ids, got dtype {y.dtype}")
  if n and (y.min() < 0 or y.max() >= num_classes):
    raise ClassifierError(f"{what} must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  return y.astype(np.int32)


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, seed: int = 0,
                     steps: int = 600, batch_size: int = 64, lr: float = 1e-3,
                     feature_dim: int = 128):
  """Trains ClassifierNet with Adam on (images [N,H,W,C] in [-1,1], labels [N]); returns params.

  Data order is a seeded permutation per epoch, so a seed gives the same classifier.
  """
  n = images.shape[0]
  model = ClassifierNet(num_classes, feature_dim)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1,) + images.shape[1:], jnp.float32))["params"]
  # Cosine decay: the last steps settle, which makes the cached classifier less seed-noisy.
  opt = optax.adamw(optax.cosine_decay_schedule(lr, steps, alpha=0.05), weight_decay=1e-4)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A Python loop of jitted steps, not lax.scan: XLA:CPU runs convolutions inside a
  # while loop several times slower (measured here: MNIST > 5 min vs ~1 min).
  batch_size = min(batch_size, n)
  per_epoch = n // batch_size  # drop the ragged tail: one compiled batch shape
  rng = np.random.default_rng(seed)
  order = None
  for i in range(steps):
    if i % per_epoch == 0:
      order = rng.permutation(n)
    idx = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
    params, opt_state = step(params, opt_state, images[idx], labels[idx])
  return jax.device_get(params)


def _fingerprint(arrays, settings: dict) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(settings, sort_keys=True).encode())
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:20]


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _unflatten(flat):
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *path, leaf = key.split("/")
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(v)
  return tree


def _load_cache(cache_dir, fingerprint) -> Optional[tuple[dict, Any]]:
  meta_path, params_path = os.path.join(cache_dir, META_FILE), os.path.join(cache_dir, PARAMS_FILE)
  if not (os.path.isfile(meta_path) and os.path.isfile(params_path)):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("fingerprint") != fingerprint:
      _log.info("classifier cache %s was trained on other data/settings; retraining", cache_dir)
      return None
    with np.load(params_path, allow_pickle=False) as z:
      params = _unflatten({k: z[k] for k in z.files})
  except (OSError, ValueError, KeyError) as e:
    _log.warning("classifier cache %s is unreadable (%s); retraining", cache_dir, e)
    return None
  return meta, params


def _save_cache(cache_dir, meta, params):
  os.makedirs(cache_dir, exist_ok=True)
  # Params first, metadata last (each written then renamed): a crash in between leaves an
  # old or missing json whose fingerprint cannot match, so the cache is retrained, not trusted.
  tmp = os.path.join(cache_dir, f".{PARAMS_FILE}.tmp{os.getpid()}.npz")
  np.savez(tmp, **_flatten(params))
  os.replace(tmp, os.path.join(cache_dir, PARAMS_FILE))
  tmp = os.path.join(cache_dir, f".{META_FILE}.tmp{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(cache_dir, META_FILE))


def get_classifier(cache_dir: str, images, labels, test_images=None, test_labels=None, *,
                   seed: int = 0, num_classes: Optional[int] = None, steps: int = 600,
                   batch_size: int = 64, lr: float = 1e-3, feature_dim: int = 128) -> Classifier:
  """The classifier for this labelled dataset: from `cache_dir` if it matches, else trained.

  images: [N, H, W] or [N, H, W, C] floats in [-1, 1]; labels: [N] ints. Accuracy is
  measured on (test_images, test_labels) when given, else on a seeded 10% of the data held
  out from training. `num_classes` defaults to max(label) + 1.
  """
  x = _check_images(images)
  if x.shape[0] < 2:
    raise ClassifierError(f"need at least 2 labelled images to train the classifier, got {x.shape[0]}")
  y_raw = np.asarray(labels)
  if num_classes is None:
    if y_raw.size == 0 or not np.issubdtype(y_raw.dtype, np.integer):
      raise ClassifierError(f"labels must be integer class ids, got dtype {y_raw.dtype}")
    num_classes = int(y_raw.max()) + 1
  if num_classes < 2:
    raise ClassifierError(f"need at least 2 classes to train a classifier, got {num_classes}")
  y = _check_labels(y_raw, x.shape[0], num_classes, "labels")
  if (test_images is None) != (test_labels is None):
    raise ClassifierError("give both test_images and test_labels, or neither")
  if test_images is not None:
    tx = _check_images(test_images, x.shape[1:])
    ty = _check_labels(test_labels, tx.shape[0], num_classes, "test_labels")
    train_x, train_y = x, y
  else:
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = max(1, x.shape[0] // 10)
    tx, ty = x[perm[:n_test]], y[perm[:n_test]]
    train_x, train_y = x[perm[n_test:]], y[perm[n_test:]]

  settings = dict(arch=ARCH.format(F=feature_dim), seed=seed, steps=steps, batch_size=batch_size,
                  lr=lr, num_classes=num_classes)
  fingerprint = _fingerprint([train_x, train_y, tx, ty], settings)

  cached = _load_cache(cache_dir, fingerprint)
  if cached is not None:
    meta, params = cached
    return Classifier(params=params, num_classes=num_classes, image_shape=tuple(x.shape[1:]),
                      feature_dim=feature_dim, accuracy=float(meta["accuracy"]),
                      fingerprint=fingerprint, trained=False, meta=meta)

  t0 = time.time()
  params = train_classifier(train_x, train_y, num_classes, seed=seed, steps=steps,
                            batch_size=batch_size, lr=lr, feature_dim=feature_dim)
  seconds = time.time() - t0
  clf = Classifier(params=params, num_classes=num_classes, image_shape=tuple(x.shape[1:]),
                   feature_dim=feature_dim, accuracy=0.0, fingerprint=fingerprint, trained=True,
                   meta={})
  clf.accuracy = class_accuracy(clf, tx, ty)
  clf.meta = dict(kind=FID_KIND, note=NOTE, image_shape=list(clf.image_shape),
                  num_classes=num_classes, feature_dim=feature_dim, accuracy=clf.accuracy,
                  num_train=int(train_x.shape[0]), num_test=int(tx.shape[0]),
                  fingerprint=fingerprint, train=settings, train_seconds=round(seconds, 2))
  _save_cache(cache_dir, clf.meta, params)
  _log.info("trained classifier in %.1fs, held-out accuracy %.4f; cached in %s", seconds,
            clf.accuracy, cache_dir)
  return clf


def class_accuracy(classifier: Classifier, images, labels) -> float:
  """Fraction of images whose predicted class equals `labels` (e.g. the conditioning class)."""
  x = _check_images(images, classifier.image_shape)
  y = _check_labels(labels, x.shape[0], classifier.num_classes, "labels")
  if x.shape[0] == 0:
    raise ClassifierError("class_accuracy needs at least one image")
  return float(np.mean(classifier.predict(x) == y))


def classifier_fid(classifier: Classifier, real_images, fake_images) -> float:
  """classifier-FID (see NOTE) between real and generated images.

  `real_images` may also be a precomputed (mu, sigma) pair, e.g. from
  `fid.cached_statistics(path, lambda: classifier.statistics(real), key=classifier.fingerprint)`.
  """
  if isinstance(real_images, (tuple, list)) and len(real_images) == 2:
    mu_r, sigma_r = real_images
  else:
    mu_r, sigma_r = classifier.statistics(real_images)
  return fid_lib.frechet_distance(mu_r, sigma_r, *classifier.statistics(fake_images))


__all__ = ["Classifier", "ClassifierError", "ClassifierNet", "FID_KIND", "NOTE", "get_classifier",
           "train_classifier", "class_accuracy", "classifier_fid"]
