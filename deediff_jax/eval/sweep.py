"""`--mode sweep`: policies x thresholds on one checkpoint -> cost, speed, fidelity and FID.

  python -m deediff_jax.main --config configs/mnist.py --workdir DIR --mode sweep

For every setting built from `config.sweep` (`settings_from_config`):

  uem / uem_no_time   one row per `sweep.thresholds` value                  (key `threshold`)
  static              one row per `sweep.depths` (empty: every depth 1..N)  (key `depth`)
  time_schedule       one row per `sweep.time_schedules` (';'-separated; empty: a few noisy-
                      shallow schedules derived from N, `default_time_schedules`) (key `schedule`)
  state_cosine        one row per `sweep.cosine_thresholds` value           (key `threshold`)
  adadiff             one row per `sweep.confidence_thresholds` value (exit_style=adadiff models;
                      in the default policy list it takes uem's place for them) (key `threshold`)
  oracle              one row per `sweep.oracle_tolerances` value: the ceiling of any exit policy
                      on this model (every block runs; cost = the depth it would stop at;
                      `runnable` is False: these rows are not savings you can have)
  none                one row (full depth through the early-exit loop), plus one plain
                      full-depth row per `sweep.step_fractions` value with that share of
                      `sample.steps` (fewer sampler steps: what a user tries first; PSNR against
                      the full-step samples from the same noise), and `sweep.combo_depths` static
                      depths at each of those step counts >= 60% (early exit on top of fewer steps)

plus, when `exit.target_layer_ratio` / `exit.max_psnr_drop` / `exit.min_psnr` ask for it, one
calibrated row (`eval/calibrate.py`) of exit.policy (uem unless it is another score policy;
adadiff for adadiff models), and with `exit.calibration_buckets` = K > 1 a second one right after
it, calibrated per timestep bucket (key `threshold_schedule`, one threshold per bucket, noisiest
first). With `exit.target_layer_ratio` and time_schedule in the policies, also a time_schedule
calibrated from the oracle's exits to the same target (`calibrate.calibrate_time_schedule`): the
strongest fixed rule, no guessed schedule.

Every setting samples the same `sweep.num_images` images: the same initial noise, sampler noise
and labels (`sampling.sample` derives them from `sample.seed` and the batch index only), with
the configured sampler. Each run is timed after its program is compiled (a warm-up with cheap
policy values: thresholds and depths are traced, so one compile serves all of a policy's
values), and the plain full-depth sampler (`module.apply`, no exit machinery) is timed in the
same process, before and after the settings (the mean of both; `retime_baseline`):
`speedup = seconds_full / seconds`. Fidelity (`psnr_vs_full` ...) compares each
setting's images with the plain full-depth images from the same noise under a deterministic
sampler: the configured one if it is deterministic (then the same runs serve both), else DDIM
with eta=0 in an extra, untimed run. `gflops_per_image` is `eval/flops.gflops_per_image` on
the exit layers each batch really had (the loop's real cost: the deepest exit of the batch).
Quality is the FID of `sweep.fid_kind` against real-image statistics cached under
DIR/fid_stats/, and, for class-conditional models, `class_accuracy`: how often the dataset
classifier (`eval/classifier.py`, cached in DIR/classifier/, trained on the train split, its
accuracy measured on the test split when there is one) predicts the requested label.

Files in DIR/sweep/:
  sweep.json      one row per setting (`ROW_KEYS`; DESIGN §9)
  sweep.csv       the scalar fields of the same rows
  sweep.md        a header paragraph (machine, checkpoint step, images, FID kind, baseline) and
                  the table (also printed)
  run.json        that header's facts as data (machine, baseline, calibration, grids)
  pareto_fid.png  FID vs GFLOPs per image, one curve per policy (not written for fid_kind=none)
  pareto_psnr.png PSNR vs full depth vs GFLOPs per image (rows at the 100 dB cap, i.e. every
                  image identical up to float rounding, are left out and named in a note)
  exit_heatmap.png  timestep x exit layer for the chosen UEM row: the calibrated one if any,
                  else the row with exit.threshold, else the middle threshold of the list
  exit_heatmap_per_bucket.png  the same for the per-bucket calibrated row, when there is one
  grid_<policy>.png samples of each policy's row whose layer_ratio_run is closest to the
                  chosen UEM row's (matched compute); text models: one row per caption
  captions.{md,json}  text models with labelled held-out captions: class accuracy per caption,
                  full depth and the chosen UEM row

`evaluate.py` (`--mode eval`) reuses `prepare`/`evaluate` for the configured setting alone.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import time
from typing import Any, Optional

import jax
import numpy as np
from tqdm import tqdm

from deediff_jax import sampling
from deediff_jax.config import (POLICIES, SCORE_POLICIES, UEM_POLICIES, parse_depth_schedule, parse_floats,
                                parse_threshold_schedule)
from deediff_jax.data.eval_context import load_eval_captions
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion import schedule as sched_lib
from deediff_jax.early_exit import make_policy_params, policy_params_for
from deediff_jax.eval import calibrate as cal_lib
from deediff_jax.eval import fid as fid_lib
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval import flops as flops_lib
from deediff_jax.eval import plots
from deediff_jax.eval.decode import decoder_for
from deediff_jax.model.uvit import ModelConfig

FID_KIND_NAMES = {
    "classifier": "classifier-FID (small CNN features; not comparable to Inception FID)",
    "inception": "Inception FID",
    "none": "none",
}
MAX_REAL_IMAGES = 10000     # real images for the classifier and the FID statistics (seeded subset)
CLASSIFIER_STEPS = 600      # training steps of the classifier-FID net (sweep.classifier_steps overrides)
IDENTICAL_PSNR = fidelity_lib.PSNR_MAX - 1e-6   # a mean this high: every image equal up to rounding
GRID_IMAGES = 100
DEFAULT_POLICIES = "uem,static,time_schedule,state_cosine,oracle,none"   # base_config's sweep.policies
THRESHOLD_KEYS = {             # policy -> (its sweep values key, an example)
    "uem": ("sweep.thresholds", "0.05,0.1,0.2"), "uem_no_time": ("sweep.thresholds", "0.05,0.1,0.2"),
    "state_cosine": ("sweep.cosine_thresholds", "0.9,0.95,0.99"),
    "adadiff": ("sweep.confidence_thresholds", "0.85,0.9,0.95"),
    "oracle": ("sweep.oracle_tolerances", "0.01,0.03,0.1"),
}
SWEEP_DIR = "sweep"
# Every row has every key (None where it does not apply), in this order.
ROW_KEYS = (
    "policy", "setting", "threshold", "threshold_schedule", "depth", "schedule", "calibrated", "runnable",
    "layer_ratio_run", "layer_ratio_per_sample", "gflops_per_image", "gflops_ratio",
    "seconds", "seconds_full", "speedup",
    "psnr_vs_full", "psnr_worst5", "psnr_p5", "mse_vs_full", "mse_worst5", "mse_p95",
    "fid", "fid_kind", "class_accuracy",
    "aggregate", "min_layers", "sampler", "steps", "fidelity_sampler", "num_images",
    "guidance_scale", "checkpoint_step",
    "layers_run_per_step", "mean_exit_layer_per_step", "calibration",
)
TABLE_COLUMNS = (
    ("setting", "setting"), ("layer_ratio_run", "layers run"),
    ("layer_ratio_per_sample", "layer ratio / sample"), ("gflops_per_image", "GFLOPs/img"),
    ("seconds", "s"), ("speedup", "speedup"), ("psnr_vs_full", "PSNR vs full (dB)"),
    ("psnr_worst5", "PSNR worst 5%"), ("fid", "FID"), ("class_accuracy", "class acc."),
)


class SweepError(ValueError):
  """A sweep that cannot run as configured (one line naming the problem and the fix)."""


# ----------------------------------------------------------------------------- settings

@dataclasses.dataclass
class Setting:
  """One exit setting: a policy and the value it is swept over."""
  policy: str
  threshold: Optional[float] = None      # uem / uem_no_time / state_cosine
  threshold_schedule: Optional[str] = None  # the same, one threshold per timestep bucket ("0.1,0.2")
  depth: Optional[int] = None            # static
  schedule: Optional[str] = None         # time_schedule, e.g. "3,5,6,9" (noisiest bucket first)
  calibration: Optional[dict] = None     # the calibration report, for a calibrated threshold
  steps: Optional[int] = None            # sampler steps when not sample.steps (fewer-steps rows)
  plain: bool = False                    # the plain full-depth forward (fewer-steps rows)

  @property
  def runnable(self) -> bool:
    """False for the oracle: its cost is what it would run, but it runs every block."""
    return self.policy != "oracle"

  def label(self) -> str:
    if self.policy in SCORE_POLICIES or self.policy == "oracle":
      if self.threshold_schedule is not None:
        text = (f"{self.policy} per bucket "
                + "/".join(f"{v:.3g}" for v in parse_floats(self.threshold_schedule, "threshold_schedule")))
      else:
        text = f"{self.policy} {self.threshold:g}"
      if self.policy == "oracle":
        text += " (ceiling)"
    elif self.policy == "static":
      text = f"static {self.depth}"
    elif self.policy == "time_schedule":
      text = f"time_schedule {self.schedule}"
    else:
      text = self.policy
    if self.calibration is not None:
      text += " (calibrated)"
    if self.steps is not None:
      text += f" @ {self.steps} steps"
    return text

  def policy_params(self, num_blocks: int, min_layers: int = 1) -> dict:
    """The traced policy parameters: `early_exit.policy_params_for`, the one path from a setting
    to them that every mode uses (exit.min_layers applies to every policy, as in --mode sample)."""
    threshold = None
    if self.policy in SCORE_POLICIES or self.policy == "oracle":
      threshold = (parse_threshold_schedule(self.threshold_schedule, self.policy)
                   if self.threshold_schedule is not None else float(self.threshold))
    return policy_params_for(self.policy, num_blocks, threshold=threshold, depth=self.depth,
                             schedule=_ints(self.schedule) if self.schedule else None,
                             min_layers=min_layers)


def _ints(text: str) -> list[int]:
  return [int(v) for v in str(text).split(",") if v.strip()]


def default_time_schedules(num_blocks: int) -> list[str]:
  """A few ASE-style schedules, shallow at noisy steps: fractions of N per bucket, noisiest first."""
  n = num_blocks

  def d(frac):
    return max(1, min(n, math.ceil(frac * n - 1e-9)))

  # The last two are DuoDiff switches: a shallow network above a switch time, full depth below.
  candidates = [[d(1 / 3), d(1 / 2), d(2 / 3), n], [d(1 / 2), d(2 / 3), n, n],
                [d(1 / 4), d(1 / 3), d(1 / 2), d(2 / 3), n], [d(1 / 2), n], [d(1 / 3), n]]
  out = []
  for c in candidates:
    text = ",".join(str(v) for v in c)
    if text not in out:
      out.append(text)
  return out


def parse_policies(config, cfg: ModelConfig) -> list[str]:
  names = []
  text = str(config.sweep.policies)
  if cfg.exit_style == "adadiff" and text == DEFAULT_POLICIES:
    text = text.replace("uem,", "adadiff,")  # the default list, for a model whose exits are AdaDiff's
  for name in (s.strip() for s in text.split(",")):
    if not name:
      continue
    if name not in POLICIES:
      raise SweepError(f"sweep.policies has unknown policy {name!r}; choose among {', '.join(POLICIES)}")
    if name not in names:
      names.append(name)
  if not names:
    raise SweepError(f"sweep.policies is empty; give e.g. --config.sweep.policies=uem,static,none")
  bad = [p for p in names if p in UEM_POLICIES] if cfg.exit_style == "adadiff" else (
      ["adadiff"] if "adadiff" in names else [])
  if bad:
    raise SweepError(f"sweep.policies has {bad[0]}, which this model (model.exit_style={cfg.exit_style}) "
                     f"cannot run; use {'adadiff' if bad[0] != 'adadiff' else 'uem'} instead")
  if "uem_no_time" in names and cfg.uem != "token_linear_no_time":
    raise SweepError("sweep.policies has uem_no_time, which needs a model trained with "
                     "model.uem=token_linear_no_time; drop it from sweep.policies")
  return names


def settings_from_config(config, num_blocks: Optional[int] = None) -> list[Setting]:
  """The sweep's settings, in the order of sweep.policies (see the module doc)."""
  cfg = ModelConfig.from_config(config.model)
  n = cfg.num_blocks if num_blocks is None else num_blocks
  w = config.sweep
  out: list[Setting] = []
  for policy in parse_policies(config, cfg):
    if policy in SCORE_POLICIES or policy == "oracle":
      key, example = THRESHOLD_KEYS[policy]
      values = parse_floats(w[key.split(".")[1]], key)
      if not values:
        raise SweepError(f"{key} is empty but sweep.policies has {policy}; give values like {example}")
      if policy != "state_cosine" and min(values) < 0:
        raise SweepError(f"{key} must be >= 0, got {min(values)}")
      out += [Setting(policy, threshold=float(v)) for v in dict.fromkeys(values)]
    elif policy == "static":
      depths = (list(range(1, n + 1)) if not str(w.depths).strip()
                else parse_depth_schedule(w.depths, n, key="sweep.depths"))
      out += [Setting("static", depth=int(v)) for v in dict.fromkeys(depths)]
    elif policy == "time_schedule":
      texts = ([t for t in str(w.time_schedules).split(";") if t.strip()]
               or default_time_schedules(n))
      scheds = [",".join(str(v) for v in parse_depth_schedule(t, n, key="sweep.time_schedules"))
                for t in texts]
      out += [Setting("time_schedule", schedule=s) for s in dict.fromkeys(scheds)]
    else:
      out.append(Setting("none"))
      out += fewer_steps_settings(config, n)
  return out


def fewer_steps_settings(config, num_blocks: int) -> list[Setting]:
  """Plain full-depth rows at sweep.step_fractions of sample.steps, and sweep.combo_depths static
  depths at those step counts that keep >= 60% of the steps (exit on top of fewer steps)."""
  steps = int(config.sample.steps)
  fracs = parse_floats(config.sweep.get("step_fractions", ""), "sweep.step_fractions")
  if any(not 0 < f < 1 for f in fracs):
    raise SweepError(f"sweep.step_fractions must be in (0, 1), got {config.sweep.step_fractions!r}")
  counts = list(dict.fromkeys(max(1, int(round(f * steps))) for f in fracs))
  counts = [c for c in counts if c < steps]
  out = [Setting("none", steps=c, plain=True) for c in counts]
  combo = str(config.sweep.get("combo_depths", "")).strip()
  if combo:
    depths = parse_depth_schedule(combo, num_blocks, key="sweep.combo_depths")
    out += [Setting("static", depth=d, steps=c) for c in counts if c >= 0.6 * steps for d in depths]
  return out


def setting_from_exit_config(config) -> Setting:
  """The one setting config.exit describes (for `--mode eval`)."""
  cfg = ModelConfig.from_config(config.model)
  e = config.exit
  if e.policy in SCORE_POLICIES or e.policy == "oracle":
    if str(e.get("threshold_schedule", "")).strip():
      return Setting(e.policy, threshold_schedule=cal_lib.schedule_text(
          parse_threshold_schedule(e.threshold_schedule, e.policy)))
    return Setting(e.policy, threshold=float(e.threshold))
  if e.policy == "static":
    return Setting("static", depth=int(e.depth) if e.depth > 0 else cfg.num_blocks)
  if e.policy == "time_schedule":
    if not str(e.schedule).strip():  # calibrated later (exit.target_layer_ratio)
      return Setting("time_schedule", schedule=str(cfg.num_blocks))
    return Setting("time_schedule",
                   schedule=",".join(str(v) for v in parse_depth_schedule(e.schedule, cfg.num_blocks)))
  return Setting("none")


# ----------------------------------------------------------------------------- quality (FID)

@dataclasses.dataclass
class RealData:
  images: np.ndarray               # float32 [-1, 1]
  labels: Optional[np.ndarray]
  num_classes: int
  source: str
  split: str


def real_images(config, split: str = "train", max_images: int = MAX_REAL_IMAGES) -> Optional[RealData]:
  """Real images of config.data's `split` scaled to [-1, 1] (at most `max_images`, a seeded
  subset), or None when that split does not exist (only for split != 'train')."""
  if bool(config.data.get("latent", False)):  # the images the latents were encoded from (eval/decode.py)
    from deediff_jax.eval.decode import real_pixels
    got = real_pixels(config, split, max_images)
    return None if got is None else RealData(*got, source=str(config.data.source), split=split)
  from deediff_jax.data.sources import DataError, load_source
  dc = config.data.copy_and_resolve_references()
  dc.split = split
  dc.context_file = ""        # captions are not needed for images
  try:
    src = load_source(dc)
  except DataError:
    if split == "train":
      raise
    return None
  n = src.num_examples
  idx = (np.arange(n) if n <= max_images
         else np.sort(np.random.default_rng(0).permutation(n)[:max_images]))
  batch = src.get(idx)
  images = batch["image"].astype(np.float32) / 127.5 - 1.0
  return RealData(images=images, labels=batch.get("label"), num_classes=int(src.num_classes),
                  source=str(config.data.source), split=split)


@dataclasses.dataclass
class Quality:
  """Scores generated images: FID of `fid_kind` and class accuracy (see the module doc)."""
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


def build_quality(config, workdir: str) -> Quality:
  """The FID scorer of sweep.fid_kind, plus the classifier for class accuracy when the model is
  conditional and the data are labelled. Real statistics are cached in DIR/fid_stats/."""
  kind = str(config.sweep.fid_kind)
  if kind not in FID_KIND_NAMES:
    raise SweepError(f"sweep.fid_kind is {kind!r}; choose one of {', '.join(FID_KIND_NAMES)}")
  cfg = ModelConfig.from_config(config.model)
  latent = bool(config.data.get("latent", False))
  q = Quality(fid_kind=kind, fid_kind_name=FID_KIND_NAMES[kind])
  if latent:
    if kind != "none" and not str(config.data.get("autoencoder", "") or ""):
      raise SweepError(f"sweep.fid_kind={kind} needs images, but data.latent=True (the samples are "
                       "autoencoder latents); set --config.data.autoencoder=autoencoder_kl.pth to decode "
                       "them, or use --config.sweep.fid_kind=none")
    if kind == "none":
      return q
  # Latent models: no small-CNN class accuracy unless it is the FID net (fid_kind=classifier).
  conditional = (cfg.num_classes > 0 or cfg.context_dim > 0) and not latent
  if kind == "inception":
    # Check the weights before any expensive work: a missing file is a one-line error.
    path = str(config.sweep.inception_weights)
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
  real = real_images(config, "train")
  if kind != "none":
    q.num_real = int(real.images.shape[0])
    q.info.update(real_source=real.source, real_split="train", num_real=q.num_real)
  if real.labels is not None and (kind == "classifier" or conditional):
    from deediff_jax.eval.classifier import get_classifier
    test = real_images(config, "test")
    if test is not None and test.labels is None:
      test = None
    num_classes = real.num_classes if real.num_classes > 0 else None
    steps = int(config.sweep.get("classifier_steps", 0) or CLASSIFIER_STEPS)
    q.classifier = get_classifier(
        os.path.join(workdir, "classifier"), real.images, real.labels,
        None if test is None else test.images, None if test is None else test.labels,
        num_classes=num_classes, steps=steps)
    q.info.update(classifier_accuracy=float(q.classifier.accuracy),
                  classifier_accuracy_on="test split" if test is not None else "held-out 10% of train")
  elif kind == "classifier":
    raise SweepError(f"sweep.fid_kind=classifier trains a classifier on labelled data, but "
                     f"data.source {config.data.source!r} has no labels; use "
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
    path = os.path.abspath(str(config.sweep.inception_weights))
    params = inception.load_weights(path)
    q.feature_fn = lambda x: inception.features(params, x)
    q.real_stats = fid_lib.cached_statistics(
        os.path.join(stats_dir, "inception.npz"), lambda: q.feature_fn(real.images),
        key=f"inception:{path}:{os.path.getsize(path)}:{real.source}:train:{q.num_real}")
  return q


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass
class Context:
  """Everything the settings share: params, inputs, the full-depth baseline, the scorer."""
  config: Any
  fidelity_config: Any
  params: Any
  cfg: ModelConfig
  num: int
  rng: Any
  cond: dict
  quality: Quality
  checkpoint_step: Optional[int] = None
  workdir: str = ""
  images_full: Optional[np.ndarray] = None        # plain full depth, configured sampler (timed)
  images_full_fidelity: Optional[np.ndarray] = None
  seconds_full: float = float("nan")
  seconds_full_runs: list = dataclasses.field(default_factory=list)
  gflops_full: float = float("nan")
  quality_full: dict = dataclasses.field(default_factory=dict)
  compiled: set = dataclasses.field(default_factory=set)
  # Latent models with data.autoencoder: latents -> images (eval/decode.py), applied to every
  # sample set before fidelity, FID and grids; None: the samples are scored as they are.
  decode: Any = None

  def decoded(self, images):
    return images if self.decode is None else self.decode(images)

  @property
  def deterministic(self) -> bool:
    return self.fidelity_config is self.config

  @property
  def cfg_factor(self) -> int:
    return 2 if float(self.config.sample.guidance_scale) != 0.0 else 1

  @property
  def labels(self):
    return self.cond["labels"]


CHEAP_THRESHOLD = {"uem": 2.0, "uem_no_time": 2.0,      # u < 2 always
                   "state_cosine": -2.0, "adadiff": -1.0,   # cos > -2, confidence > -1 always
                   "oracle": 1e30}                           # every layer within tolerance


def _cheap_params(setting: Setting, n: int, min_layers: int) -> dict:
  """Policy values of the same shapes (a per-bucket threshold stays an array of its length) that
  exit as early as possible: a fast warm-up run that compiles the timed program."""
  if setting.policy in CHEAP_THRESHOLD:
    value = CHEAP_THRESHOLD[setting.policy]
    if setting.threshold_schedule is not None:
      value = [value] * len(parse_floats(setting.threshold_schedule, "threshold_schedule"))
    return make_policy_params(n, threshold=value, min_layers=min_layers)
  if setting.policy == "static":
    return make_policy_params(n, depth=1, min_layers=min_layers)
  if setting.policy == "time_schedule":
    return make_policy_params(n, schedule=[1] * len(_ints(setting.schedule)), min_layers=min_layers)
  return make_policy_params(n, min_layers=min_layers)


def _sample(ctx: Context, config, *, plain=False, setting: Optional[Setting] = None, pp=None):
  kw = dict(plain=True) if plain else dict(policy=setting.policy, policy_params=pp)
  return sampling.sample(ctx.params, config, ctx.rng, ctx.num, **kw, **ctx.cond)


def _warm_up(ctx: Context, config, *, plain=False, setting: Optional[Setting] = None) -> None:
  """Compiles (once per sampler x steps x policy x schedule and threshold shapes) every batch
  shape of the run, so nothing compiles inside a timed call."""
  thr_len = (len(parse_floats(setting.threshold_schedule, "threshold_schedule"))
             if setting is not None and setting.threshold_schedule is not None else 0)
  key = (config.sample.sampler, int(config.sample.steps), "plain" if plain else setting.policy,
         len(_ints(setting.schedule)) if setting is not None and setting.schedule else 0, thr_len)
  if key in ctx.compiled:
    return
  n = ctx.cfg.num_blocks
  kw = (dict(plain=True) if plain else
        dict(policy=setting.policy, policy_params=_cheap_params(setting, n, int(config.exit.min_layers))))
  # Ahead of time: every batch shape of the run is compiled and nothing is sampled.
  sampling.sample(ctx.params, config, ctx.rng, ctx.num, compile_only=True, **kw, **ctx.cond)
  ctx.compiled.add(key)


def _timed(ctx: Context, config=None, **kw):
  """(images, stats, seconds) with the configured sampler; compiled beforehand."""
  config = ctx.config if config is None else config
  _warm_up(ctx, config, **{k: v for k, v in kw.items() if k in ("plain", "setting")})
  t0 = time.perf_counter()
  images, stats = _sample(ctx, config, **kw)
  return images, stats, time.perf_counter() - t0


def with_steps(config, steps: Optional[int]):
  """`config` itself, or a copy that samples with `steps` steps."""
  if steps is None or int(steps) == int(config.sample.steps):
    return config
  c = config.copy_and_resolve_references()
  c.sample.steps = int(steps)
  return c


def check_local(workdir) -> None:
  """The sweep writes plots, caches and tables with local file I/O."""
  if "://" in str(workdir):
    raise SweepError(f"--mode sweep/eval write their files to a local directory, got --workdir "
                     f"{workdir}; copy the checkpoint to a local --workdir (e.g. gsutil -m cp -r)")


def load_checkpoint(config, workdir: str) -> tuple:
  """(params, step) of the latest checkpoint in `workdir`, EMA weights unless sample.use_ema=False."""
  from deediff_jax.train.checkpoint import latest_step, load_params
  params = load_params(workdir, config, use_ema=bool(config.sample.use_ema))
  return params, latest_step(workdir)


def prepare(config, workdir: str, *, num: Optional[int] = None, params=None, step: Optional[int] = None,
            quality: Optional[Quality] = None) -> Context:
  """Loads the checkpoint (unless `params` are given), builds the scorer (unless given) and runs
  the timed full-depth baseline."""
  cfg = ModelConfig.from_config(config.model)
  check_local(workdir)
  if params is None:
    params, step = load_checkpoint(config, workdir)
  num = int(config.sweep.num_images) if num is None else int(num)
  if num < 2:
    raise SweepError(f"sweep.num_images must be >= 2 (FID needs a covariance), got {num}")
  quality = build_quality(config, workdir) if quality is None else quality
  ctx = Context(config=config, fidelity_config=fidelity_lib.deterministic_config(config), params=params,
                cfg=cfg, num=num, rng=jax.random.PRNGKey(int(config.sample.seed)),
                cond=dict(zip(("labels", "context", "null_context"), cal_lib.conditioning(config, num))),
                quality=quality, checkpoint_step=step, workdir=str(workdir), decode=decoder_for(config))
  ctx.images_full, _, ctx.seconds_full = _timed(ctx, plain=True)
  ctx.images_full = ctx.decoded(ctx.images_full)  # after the timing: decoding is not sampling
  ctx.seconds_full_runs = [ctx.seconds_full]
  if ctx.deterministic:
    ctx.images_full_fidelity = ctx.images_full
  else:
    ctx.images_full_fidelity = ctx.decoded(_sample(ctx, ctx.fidelity_config, plain=True)[0])
  ctx.gflops_full = flops_lib.full_depth_flops_per_image(cfg, int(config.sample.steps),
                                                         cfg_factor=ctx.cfg_factor) / 1e9
  ctx.quality_full = quality.score(ctx.images_full, ctx.labels)
  return ctx


def retime_baseline(ctx: Context, rows) -> None:
  """Times the plain full-depth sampler again, after the settings, and puts the mean of both
  timings into every row's seconds_full and speedup: on a shared machine the load drifts during
  a sweep, and the two timings (in run.json) show by how much."""
  _, _, again = _timed(ctx, plain=True)
  ctx.seconds_full_runs = ctx.seconds_full_runs + [again]
  ctx.seconds_full = float(np.mean(ctx.seconds_full_runs))
  for r in rows:
    r["seconds_full"] = ctx.seconds_full
    r["speedup"] = ctx.seconds_full / r["seconds"]


def check_params_for(settings, params) -> None:
  if any(s.policy != "none" for s in settings) and not ({"exit_heads", "ltes"} & set(params)):
    raise SweepError("this checkpoint has no exit heads/UEMs (a bare backbone); train them first "
                     "(--config.train.mode=frozen_backbone) or use --config.sweep.policies=none")


def gflops_from_stats(cfg: ModelConfig, stats: dict, policy: str, cfg_factor: int = 1) -> float:
  """GFLOPs per image of a `sampling.sample` run: each batch's loop cost, weighted by its size."""
  el = np.asarray(stats["exit_layer"])                          # [steps, num]
  sizes = np.asarray(stats["batch_sizes"], np.int64)
  parts = np.split(el, np.cumsum(sizes)[:-1], axis=1)
  per = [flops_lib.gflops_per_image(cfg, p, policy=policy, cfg_factor=cfg_factor) for p in parts]
  return float(np.sum(np.asarray(per) * sizes) / np.sum(sizes))


def evaluate(ctx: Context, setting: Setting) -> tuple[dict, np.ndarray, dict]:
  """Samples, times and scores one setting -> (row, images, stats)."""
  n = ctx.cfg.num_blocks
  config = with_steps(ctx.config, setting.steps)
  min_layers = int(config.exit.min_layers)
  pp = setting.policy_params(n, min_layers)
  kw = dict(plain=True) if setting.plain else dict(setting=setting, pp=pp)
  images, stats, seconds = _timed(ctx, config, **kw)
  images = ctx.decoded(images)
  if ctx.deterministic:
    images_fid = images
  else:
    fid_config = with_steps(ctx.fidelity_config, setting.steps)
    _warm_up(ctx, fid_config, **{k: v for k, v in kw.items() if k != "pp"})
    images_fid = ctx.decoded(_sample(ctx, fid_config, **kw)[0])
  fidelity = fidelity_lib.fidelity(ctx.images_full_fidelity, images_fid)
  summary = sampling.summarize(stats, n)
  gflops = (flops_lib.full_depth_flops_per_image(ctx.cfg, int(config.sample.steps), cfg_factor=ctx.cfg_factor) / 1e9
            if setting.plain else gflops_from_stats(ctx.cfg, stats, setting.policy, ctx.cfg_factor))
  quality = ctx.quality.score(images, ctx.labels)
  row = {
      "policy": setting.policy, "setting": setting.label(),
      "threshold": setting.threshold, "threshold_schedule": setting.threshold_schedule,
      "depth": setting.depth, "schedule": setting.schedule,
      "calibrated": setting.calibration is not None, "runnable": setting.runnable,
      "layer_ratio_run": summary["layer_ratio_run"],
      "layer_ratio_per_sample": summary["layer_ratio_per_sample"],
      "gflops_per_image": gflops, "gflops_ratio": gflops / ctx.gflops_full,
      "seconds": seconds, "seconds_full": ctx.seconds_full, "speedup": ctx.seconds_full / seconds,
      **{k: fidelity[k] for k in fidelity_lib.KEYS},
      "fid": quality["fid"], "fid_kind": ctx.quality.fid_kind_name,
      "class_accuracy": quality["class_accuracy"],
      "aggregate": str(config.exit.aggregate), "min_layers": min_layers,
      "sampler": str(config.sample.sampler), "steps": int(config.sample.steps),
      "fidelity_sampler": (f"{ctx.fidelity_config.sample.sampler}"
                           + (" eta=0" if ctx.fidelity_config.sample.sampler == "ddim" else "")),
      "num_images": ctx.num, "guidance_scale": float(config.sample.guidance_scale),
      "checkpoint_step": ctx.checkpoint_step,
      "layers_run_per_step": [float(v) for v in summary["layers_run_per_step"]],
      "mean_exit_layer_per_step": [float(v) for v in summary["mean_exit_layer_per_step"]],
      "calibration": setting.calibration,
  }
  assert tuple(row) == ROW_KEYS
  return row, images, stats


# ----------------------------------------------------------------------------- reports

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
    lines += ["", "Calibration: " + cal_lib.describe(info["calibration"]) + "."]
  if info.get("calibration_per_bucket"):
    lines += ["", "Per-bucket calibration: " + cal_lib.describe(info["calibration_per_bucket"]) + "."]
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
  """The UEM row the heatmap and grids are matched to (see the module doc)."""
  calibrated = [i for i, r in enumerate(rows) if r["calibrated"]]
  if calibrated:
    return calibrated[0]
  want = config.exit.policy if config.exit.policy in SCORE_POLICIES else "uem"
  for policies in ((want,), UEM_POLICIES, SCORE_POLICIES):
    idx = [i for i, r in enumerate(rows) if r["policy"] in policies and r["threshold"] is not None]
    if idx:
      exact = [i for i in idx if math.isclose(rows[i]["threshold"], float(config.exit.threshold),
                                                rel_tol=1e-9, abs_tol=1e-12)]
      if exact:
        return exact[0]
      idx.sort(key=lambda i: rows[i]["threshold"])
      return idx[len(idx) // 2]
  not_none = [i for i, r in enumerate(rows) if r["policy"] != "none"]
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


def _displayable(images: np.ndarray) -> np.ndarray:
  """Images for a PNG grid: [-1, 1] pixels as they are; latents -> 3 (or 1) channels min-max scaled."""
  x = np.asarray(images, np.float32)
  if x.shape[-1] in (1, 3) and not np.any(np.abs(x) > 1.0 + 1e-6):
    return x
  x = x[..., :3] if x.shape[-1] >= 3 else x[..., :1]
  lo = x.min(axis=(0, 1, 2), keepdims=True)
  hi = x.max(axis=(0, 1, 2), keepdims=True)
  return (x - lo) / np.maximum(hi - lo, 1e-8) * 2.0 - 1.0


def write_grid(path: str, images: np.ndarray, num_classes: int, captions: Optional[list] = None) -> str:
  scale = max(1, min(4, round(32 / images.shape[1])))
  if captions is not None:  # text models: one row per caption, the prompt beside its images
    return plots.caption_grid(_displayable(images), captions, path, scale=scale)
  x = _displayable(images[:GRID_IMAGES])
  if num_classes > 0:
    ncol = min(num_classes, x.shape[0])
    return plots.image_grid(x, path, nrow=ncol, col_labels=[str(c) for c in range(ncol)], scale=scale)
  return plots.image_grid(x, path, scale=scale)


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
  """All files of the module doc; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  ref = chosen_index(rows, ctx.config)
  captions = None
  if ctx.cfg.context_dim > 0:
    captions = load_eval_captions(ctx.config, ctx.num)
  grids = []
  for policy, i in matched_indices(rows, ref).items():
    name = f"grid_{policy}.png"
    paths[name] = write_grid(os.path.join(out_dir, name), images[i], ctx.cfg.num_classes, captions)
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


# ----------------------------------------------------------------------------- the mode

def _calibration_policy(config) -> str:
  if config.exit.policy in SCORE_POLICIES:
    return config.exit.policy
  return "adadiff" if config.model.get("exit_style", "deediff") == "adadiff" else "uem"


def calibrated_setting(ctx: Context, policy: Optional[str] = None, buckets: Optional[int] = None) -> Setting:
  """Calibrates `policy` (default: exit.policy when it is a score policy, else uem) on a held-out
  batch of one sampling batch (`calibrate.calibration_rng`), and prints what was chosen.
  `buckets` overrides exit.calibration_buckets (K > 1: a per-bucket threshold schedule)."""
  config = ctx.config
  policy = _calibration_policy(config) if policy is None else policy
  num = min(int(config.sample.batch_size), ctx.num)
  threshold, report = cal_lib.calibrate_threshold(ctx.params, config, cal_lib.calibration_rng(config),
                                                  policy=policy, num=num, buckets=buckets)
  print(cal_lib.describe(report))
  if isinstance(threshold, (list, tuple)):
    return Setting(policy, threshold_schedule=cal_lib.schedule_text(threshold), calibration=report)
  return Setting(policy, threshold=float(threshold), calibration=report)


def start(config, workdir: str, settings, *, params=None,
          calibration_policy: Optional[str] = None) -> Context:
  """Cheap checks first (a calibration request, the workdir, exits in the checkpoint), then
  `prepare`: a bad request fails before any sampling."""
  if cal_lib.wanted(config) and calibration_policy != "time_schedule":  # schedules: calibrate_time_schedule
    cal_lib.check_request(config, calibration_policy or _calibration_policy(config))
  check_local(workdir)
  step = None
  if params is None:
    params, step = load_checkpoint(config, workdir)
  check_params_for(settings, params)
  return prepare(config, workdir, params=params, step=step)


def run(config, workdir: str, *, params=None, progress: bool = True) -> list[dict]:
  """`--mode sweep`: evaluates every setting and writes DIR/sweep/*; returns the rows."""
  cfg = ModelConfig.from_config(config.model)
  settings = settings_from_config(config, cfg.num_blocks)
  ctx = start(config, workdir, settings, params=params)
  calibration = calibration_per_bucket = None
  if cal_lib.wanted(config):
    # The scalar calibration always; with exit.calibration_buckets = K > 1 the per-bucket one
    # too, right after it, so the table compares the two at the same target.
    cs = calibrated_setting(ctx, buckets=1)
    calibration = cs.calibration
    extra = [cs]
    if cal_lib.buckets_of(config) > 1:
      extra.append(calibrated_setting(ctx))
      calibration_per_bucket = extra[-1].calibration
    last = max((i for i, s in enumerate(settings) if s.policy == cs.policy), default=len(settings) - 1)
    settings[last + 1:last + 1] = extra
    target = float(config.exit.target_layer_ratio)
    if target > 0 and any(s.policy == "time_schedule" for s in settings):
      k = cal_lib.buckets_of(config) if cal_lib.buckets_of(config) > 1 else cal_lib.DEFAULT_SCHEDULE_BUCKETS
      k = min(k, int(config.sample.steps))
      sched, report = cal_lib.calibrate_time_schedule(
          ctx.params, config, cal_lib.calibration_rng(config), target=target, buckets=k,
          num=min(int(config.sample.batch_size), ctx.num))
      print(cal_lib.describe(report))
      last = max(i for i, s in enumerate(settings) if s.policy == "time_schedule")
      settings.insert(last + 1, Setting("time_schedule", schedule=",".join(str(v) for v in sched),
                                        calibration=report))
  rows, images, stats = [], [], []
  bar = tqdm(settings, desc="sweep", unit="setting", disable=not progress)
  for s in bar:
    bar.set_postfix_str(s.label())
    row, imgs, st = evaluate(ctx, s)
    rows.append(row)
    images.append(imgs)
    stats.append(st)
  retime_baseline(ctx, rows)
  info = run_info(ctx)
  if calibration is not None:
    info["calibration"] = calibration
  if calibration_per_bucket is not None:
    info["calibration_per_bucket"] = calibration_per_bucket
  out_dir = os.path.join(str(workdir), SWEEP_DIR)
  write_outputs(out_dir, rows, images, stats, ctx, info)
  with open(os.path.join(out_dir, "sweep.md")) as f:
    print(f.read())
  return rows


__all__ = ["ROW_KEYS", "Setting", "SweepError", "build_quality", "calibrated_setting", "check_params_for",
           "chosen_index", "default_time_schedules", "load_checkpoint",
           "evaluate", "gflops_from_stats", "matched_indices", "prepare", "run", "run_info",
           "retime_baseline", "settings_from_config", "setting_from_exit_config", "start", "table_md",
           "header_md", "write_json"]
