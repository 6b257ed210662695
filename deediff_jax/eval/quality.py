"""Image quality for the sweep: `Quality` scores a set of generated images (FID of sweep.fid_kind
against real-image statistics cached in DIR/fid_stats/, and class accuracy from the dataset
classifier cached in DIR/classifier/); `build_quality` builds it from a `QualitySpec`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from deediff_jax.eval import fid as fid_lib
from deediff_jax.eval.real_data import RealData
from deediff_jax.eval.settings import SweepError
from deediff_jax.model.uvit import ModelConfig

FID_KIND_NAMES = {
    "classifier": "classifier-FID (small CNN features; not comparable to Inception FID)",
    "inception": "Inception FID",
    "none": "none",
}
CLASSIFIER_STEPS = 600      # training steps of the classifier-FID net (sweep.classifier_steps overrides)


@dataclasses.dataclass(frozen=True)
class QualitySpec:
  """What the scorer reads, typed and frozen (`eval/specs.quality_spec` builds it at the edge):
  sweep.fid_kind and its files, the model's conditioning, and the reader of the real images."""
  fid_kind: str
  model: ModelConfig
  source: str = ""                   # data.source (named in the errors)
  latent: bool = False               # data.latent: the samples are autoencoder latents
  autoencoder: str = ""              # data.autoencoder, which decodes them
  inception_weights: str = ""        # sweep.inception_weights
  classifier_steps: int = CLASSIFIER_STEPS   # sweep.classifier_steps (0: CLASSIFIER_STEPS)
  # split -> RealData, or None when that split does not exist (eval/real_data.py, bound to the config).
  real_images: Optional[Callable[[str], Optional[RealData]]] = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class Quality:
  """Scores generated images: FID of `fid_kind` and class accuracy (see eval/sweep.py's doc)."""
  fid_kind: str
  fid_kind_name: str
  real_stats: Optional[tuple] = None
  feature_fn: Any = None
  classifier: Any = None
  num_real: int = 0
  info: dict = dataclasses.field(default_factory=dict)

  def score(self, images, labels=None) -> dict:
    out = {"fid": None, "class_accuracy": None}
    if self.real_stats is not None:
      fake_stats = fid_lib.statistics(self.feature_fn(images))
      out["fid"] = float(fid_lib.frechet_distance(*self.real_stats, *fake_stats))
    if (self.classifier is not None and labels is not None
        and int(np.max(labels)) < self.classifier.num_classes):
      from deediff_jax.eval.classifier import class_accuracy
      out["class_accuracy"] = class_accuracy(self.classifier, images, np.asarray(labels, np.int64))
    return out


def build_quality(spec: QualitySpec, workdir: str) -> Quality:
  """The FID scorer of sweep.fid_kind, plus the classifier for class accuracy when the model is
  conditional and the data are labelled. Real statistics are cached in DIR/fid_stats/."""
  kind = spec.fid_kind
  if kind not in FID_KIND_NAMES:
    raise SweepError(f"sweep.fid_kind is {kind!r}; choose one of {', '.join(FID_KIND_NAMES)}")
  cfg = spec.model
  latent = spec.latent
  q = Quality(fid_kind=kind, fid_kind_name=FID_KIND_NAMES[kind])
  if latent:
    if kind != "none" and not spec.autoencoder:
      raise SweepError(f"sweep.fid_kind={kind} needs images, but data.latent=True (the samples are "
                       "autoencoder latents); set --config.data.autoencoder=autoencoder_kl.pth to decode "
                       "them, or use --config.sweep.fid_kind=none")
    if kind == "none":
      return q
  # Latent models: no small-CNN class accuracy unless it is the FID net (fid_kind=classifier).
  conditional = (cfg.num_classes > 0 or cfg.context_dim > 0) and not latent
  if kind == "inception":
    # Check the weights before any expensive work: a missing file is a one-line error.
    path = spec.inception_weights
    from deediff_jax.eval import inception
    if not path:
      raise SweepError("sweep.fid_kind=inception needs --config.sweep.inception_weights=PATH to "
                       f"pt_inception-2015-12-05-6726825d.pth (download {inception.FID_WEIGHTS_URL}) "
                       "or its .npz conversion; or use --config.sweep.fid_kind=classifier")
    if not os.path.isfile(path):
      raise SweepError(f"sweep.inception_weights {path!r} does not exist; download "
                       f"{inception.FID_WEIGHTS_URL} (see deediff_jax/eval/inception.py)")
  if kind == "none" and not conditional:
    return q
  real = spec.real_images("train")
  if kind != "none":
    q.num_real = int(real.images.shape[0])
    q.info.update(real_source=real.source, real_split="train", num_real=q.num_real)
  if real.labels is not None and (kind == "classifier" or conditional):
    from deediff_jax.eval.classifier import get_classifier
    test = spec.real_images("test")
    if test is not None and test.labels is None:
      test = None
    num_classes = real.num_classes if real.num_classes > 0 else None
    steps = int(spec.classifier_steps or CLASSIFIER_STEPS)
    q.classifier = get_classifier(
        os.path.join(workdir, "classifier"), real.images, real.labels,
        None if test is None else test.images, None if test is None else test.labels,
        num_classes=num_classes, steps=steps)
    q.info.update(classifier_accuracy=float(q.classifier.accuracy),
                  classifier_accuracy_on="test split" if test is not None else "held-out 10% of train")
  elif kind == "classifier":
    raise SweepError(f"sweep.fid_kind=classifier trains a classifier on labelled data, but "
                     f"data.source {spec.source!r} has no labels; use "
                     "--config.sweep.fid_kind=inception (with sweep.inception_weights) or none")
  stats_dir = os.path.join(workdir, "fid_stats")
  if kind == "classifier":
    clf = q.classifier
    q.feature_fn = clf.features
    q.real_stats = fid_lib.cached_statistics(
        os.path.join(stats_dir, "classifier.npz"), lambda: clf.features(real.images),
        key=f"classifier:{clf.fingerprint}:{real.source}:train:{q.num_real}")
  elif kind == "inception":
    from deediff_jax.eval import inception
    path = os.path.abspath(spec.inception_weights)
    params = inception.load_weights(path)
    q.feature_fn = lambda x: inception.features(params, x)
    q.real_stats = fid_lib.cached_statistics(
        os.path.join(stats_dir, "inception.npz"), lambda: q.feature_fn(real.images),
        key=f"inception:{path}:{os.path.getsize(path)}:{real.source}:train:{q.num_real}")
  return q


__all__ = ["CLASSIFIER_STEPS", "FID_KIND_NAMES", "Quality", "QualitySpec", "build_quality"]
