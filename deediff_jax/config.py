"""The config schema: every key with its default, and validation with one-line errors.

Config files in `configs/` start from `base_config()` and change what they need. A key
that is not in the schema is an error (a typo must never be silently ignored), and so is
a value of the wrong kind, an impossible size or an unknown enum value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from deediff_jax import policies   # the exit policies (exit.policy): their registry

AGGREGATES = ("all", "mean", "last")
SAMPLERS = ("ddpm", "ddim", "dpm_solver", "euler_maruyama", "dpm_solver_fast", "dpm_solver_2s")
SCHEDULES = ("linear", "cosine", "stable", "vpsde")
TRAIN_MODES = ("scratch", "finetune", "frozen_backbone", "uem_only", "router")
CACHE_POLICIES = ("none", "l2c")   # Learning-to-Cache (deediff_jax/caching.py)
# deediff: the paper's text (a head per block, a per-sample timestep-aware UEM); adadiff: the
# official AdaDiff code (every exit decodes with the backbone's shared head, a per-pixel
# confidence module "LTE" on stop-gradient patch tokens).
EXIT_STYLES = ("deediff", "adadiff")
UEM_TARGETS = ("eps", "x0", "fidelity")
TIME_WEIGHTINGS = ("uniform", "min_snr")
FID_KINDS = ("classifier", "inception", "none")


class ConfigError(ValueError):
  """A bad config value; `main` prints it as one line and exits with code 2."""


# ----------------------------------------------------------------------------- typed model config

UEM_KINDS = ("token_linear", "token_linear_no_time", "attention_probe")


# The model keys of the exits alone, not of the backbone (a run may take another run's exits).
EXIT_MODEL_KEYS = ("exit_style", "uem")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable, validated view of `config.model` (Flax module attributes must hash)."""
  image_size: int
  in_channels: int
  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  num_classes: int = 0        # 0: unconditional. Else the table has num_classes+1 rows (null id = num_classes).
  context_dim: int = 0        # 0: no text context. Else width of the precomputed text-encoder tokens.
  context_len: int = 0        # number of context tokens (e.g. 77 for CLIP).
  mlp_time_embed: bool = False
  # Every head's final 3x3 conv also reads the noisy input x_t (concatenated channels). Off in
  # U-ViT. At low SNR an eps-prediction must reproduce x_t almost pixel for pixel (sigma/alpha
  # magnifies any copy error in the x0 a sampler derives), which a patchified transformer learns
  # slowly; this path makes the copy a single conv weight. See docs/design.md "Our additions".
  input_skip: bool = False
  uem: str = "token_linear"
  exit_style: str = "deediff"
  remat: bool = False
  dtype: str = "float32"      # compute dtype; parameters stay float32.

  def __post_init__(self):
    def bad(field, msg):
      raise ValueError(f"model.{field}: {msg}")
    for f in ("image_size", "in_channels", "embed_dim", "depth", "num_heads", "patch_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or v <= 0:
        bad(f, f"must be a positive integer, got {v!r}")
    if self.depth % 2:
      bad("depth", f"must be even (depth//2 in-blocks + mid + depth//2 out-blocks), got {self.depth}; use {self.depth + 1}")
    if self.image_size % self.patch_size:
      bad("patch_size", f"{self.patch_size} does not divide image_size {self.image_size}; pick a divisor of {self.image_size}")
    if self.embed_dim % self.num_heads:
      bad("num_heads", f"{self.num_heads} does not divide embed_dim {self.embed_dim}; pick a divisor of {self.embed_dim}")
    if self.embed_dim % 2:
      bad("embed_dim", f"must be even for the [cos, sin] time embedding, got {self.embed_dim}")
    if self.mlp_ratio <= 0:
      bad("mlp_ratio", f"must be positive, got {self.mlp_ratio}")
    if self.num_classes < 0:
      bad("num_classes", f"must be >= 0 (0 = unconditional), got {self.num_classes}")
    if self.context_dim < 0 or self.context_len < 0:
      bad("context_dim", "context_dim and context_len must be >= 0")
    if (self.context_dim > 0) != (self.context_len > 0):
      bad("context_len", f"set both context_dim and context_len (got {self.context_dim}, {self.context_len}) or neither")
    if self.uem not in UEM_KINDS:
      bad("uem", f"unknown kind {self.uem!r}; choose one of {', '.join(UEM_KINDS)}")
    if self.exit_style not in EXIT_STYLES:
      bad("exit_style", f"unknown style {self.exit_style!r}; choose one of {', '.join(EXIT_STYLES)}")
    if self.dtype not in ("float32", "bfloat16"):
      bad("dtype", f"must be float32 or bfloat16, got {self.dtype!r}")

  @property
  def has_ltes(self) -> bool:
    """The official AdaDiff exits (exit_style=adadiff): one shared head, per-pixel confidence
    modules (LTEs); else DeeDiff's per-block heads and UEMs."""
    return self.exit_style == "adadiff"

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds from an ml_collections ConfigDict, a dict or a ModelConfig."""
    if isinstance(cfg, ModelConfig):
      return cfg
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "mlp_ratio" in kw:
      kw["mlp_ratio"] = float(kw["mlp_ratio"])
    return cls(**kw)

  @property
  def num_blocks(self) -> int:
    return self.depth + 1

  @property
  def num_segment_blocks(self) -> int:
    return self.depth // 2

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_extra_tokens(self) -> int:
    return int(self.num_classes > 0) + 1 + self.context_len

  @property
  def num_tokens(self) -> int:
    return self.num_extra_tokens + self.num_patches

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.in_channels

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # the config module itself needs no JAX
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


@dataclasses.dataclass(frozen=True)
class ExitSpec:
  """Typed, frozen view of `config.exit` for one run: read once at the edge (`from_config`), then
  passed to the core (`early_exit.exit_params` turns it into the traced policy values).
  `policy` is a registered exit policy (deediff_jax/policies/); the schedules are parsed."""
  policy: str
  threshold: float = 0.0
  threshold_schedule: Any = None     # a tuple of thresholds per timestep bucket (noisiest first), or None
  depth: int = 0                     # 0 = all blocks
  schedule: Any = None               # a tuple of depths per timestep bucket (noisiest first), or None
  aggregate: str = "all"
  min_layers: int = 1
  patience: bool = True

  @classmethod
  def from_config(cls, config, num_blocks: int, policy: str | None = None) -> "ExitSpec":
    """config.exit -> ExitSpec; `policy` overrides exit.policy. Raises ConfigError (one line)."""
    e = config.exit
    policy = e.policy if policy is None else policy
    try:
      pol = policies.get(policy)
    except policies.UnknownPolicy as err:
      raise ConfigError(f"config key 'exit.policy': {err}") from None
    schedule = (tuple(parse_depth_schedule(e.schedule, num_blocks, key="exit.schedule"))
                if pol.value == "schedule" else None)
    threshold_schedule = None
    if pol.is_score and str(e.threshold_schedule).strip():
      threshold_schedule = tuple(parse_threshold_schedule(e.threshold_schedule, policy))
    return cls(policy=policy, threshold=float(e.threshold), threshold_schedule=threshold_schedule,
               depth=int(e.depth), schedule=schedule, aggregate=str(e.aggregate),
               min_layers=int(e.min_layers), patience=bool(e.patience))


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Typed, frozen view of what sampling reads from `config.sample`, `config.diffusion` and
  `config.data` (read once at the edge by `from_config`)."""
  sampler: str
  steps: int
  batch_size: int
  guidance_scale: float = 0.0
  eta: float = 0.0
  schedule: str = "linear"
  timesteps: int = 1000
  latent: bool = False               # latent models: samples are not clipped to [-1, 1]

  @classmethod
  def from_config(cls, config) -> "SamplerSpec":
    s = config.sample
    return cls(sampler=str(s.sampler), steps=int(s.steps), batch_size=int(s.batch_size),
               guidance_scale=float(s.guidance_scale), eta=float(s.eta),
               schedule=str(config.diffusion.schedule), timesteps=int(config.diffusion.timesteps),
               latent=bool(config.data.latent))


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Typed, frozen view of `config.cache` and the sampler it reuses across (read once at the edge
  by `from_config`; deediff_jax/caching.py builds the reuse schedule from it)."""
  policy: str = "none"               # none | l2c
  router: str = ""                   # the router file ("" when none is given)
  threshold: float = 0.9             # a sublayer is recomputed where its router score > threshold
  sampler: str = "ddim"
  steps: int = 25

  @property
  def enabled(self) -> bool:
    return self.policy == "l2c"

  @classmethod
  def from_config(cls, config) -> "CacheSpec":
    c = config.get("cache", None)
    sampler, steps = str(config.sample.sampler), int(config.sample.steps)
    if c is None:
      return cls(sampler=sampler, steps=steps)
    return cls(policy=str(c.policy), router=str(c.router).strip(), threshold=float(c.threshold),
               sampler=sampler, steps=steps)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Typed, frozen view of `config.loss` (read once at the edge by `from_config`): the training
  step and `diffusion.losses.configured_loss` take it inside the jitted step, not the ConfigDict."""
  lambda_u: float = 1.0
  beta_ual: float = 1.0
  stop_grad_ual_weight: bool = True
  layer_loss: float = 0.0
  uem_target: str = "eps"
  cfg_dropout: float = 0.1
  time_weighting: str = "uniform"
  min_snr_gamma: float = 5.0

  @classmethod
  def from_config(cls, config) -> "LossSpec":
    l = config.loss
    return cls(lambda_u=float(l.lambda_u), beta_ual=float(l.beta_ual),
               stop_grad_ual_weight=bool(l.stop_grad_ual_weight), layer_loss=float(l.layer_loss),
               uem_target=str(l.uem_target), cfg_dropout=float(l.cfg_dropout),
               time_weighting=str(l.time_weighting), min_snr_gamma=float(l.min_snr_gamma))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.image_size = 8            # the network's own input size (latent size for latent models)
  m.in_channels = 1           # image (or latent) channels
  m.embed_dim = 128           # D, the transformer width
  m.depth = 8                 # even; gives depth + 1 blocks
  m.num_heads = 4             # attention heads; must divide embed_dim
  m.patch_size = 2            # p: p x p patches, embedded by a conv with kernel = stride = p
  m.mlp_ratio = 4.0           # MLP hidden width / D
  m.qkv_bias = False          # bias on the qkv projection (U-ViT: off)
  m.num_classes = 10          # 0 = unconditional; else a table of num_classes + 1 rows (null id last)
  m.context_dim = 0           # >0: text-conditional on precomputed encoder tokens of this width
  m.context_len = 0           # number of context tokens (77 for CLIP)
  m.mlp_time_embed = False    # Linear(4D)-SiLU-Linear(D) on the time token (U-ViT: off)
  m.input_skip = False        # every head's 3x3 conv also sees the noisy input x_t (U-ViT: off; see docs/design.md)
  m.uem = "token_linear"      # token_linear | token_linear_no_time | attention_probe
  m.exit_style = "deediff"    # deediff (paper: head + UEM per block) | adadiff (official code: shared head, per-pixel confidence)
  m.remat = False             # rematerialise blocks in training (less memory, more compute)
  m.dtype = "float32"         # compute dtype: float32 | bfloat16

  c.data = d = ml_collections.ConfigDict()
  d.source = "digits"         # digits | npz:PATH | folder:PATH | tfds:NAME | latents:DIR (data/encode_latents.py)
  d.image_size = 8            # dataset image size (resized/cropped to it for folder/tfds)
  d.channels = 1              # 1 (grayscale) or 3 (RGB)
  d.flip = False              # random horizontal flips
  d.split = "train"           # dataset split to train on
  d.context_file = ""         # npz of caption features for text models (see data/encode_text.py)
  d.latent = False            # True: the source yields autoencoder latents (model size != data size)
  d.autoencoder = ""          # latent models: autoencoder_kl.pth (or .npz) that decodes samples to images

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"   # linear | cosine | stable | vpsde
  c.diffusion.timesteps = 1000      # T of discrete schedules
  c.diffusion.time_labels = "uvit"  # the network's time input: U-ViT's 1-based labels n = 1..N (t * N); recorded in every checkpoint

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_u = 1.0       # weight of L_u (uncertainty regression)
  c.loss.beta_ual = 1.0       # weight of L_UAL (uncertainty-aware layer loss)
  c.loss.stop_grad_ual_weight = True  # no gradient into u through the (1 - u) UAL weight
  c.loss.layer_loss = 0.0     # weight of an optional unweighted sum of per-layer MSEs
  c.loss.uem_target = "eps"   # what the UEM regresses: eps (paper) | x0 (sampler's x0 error) | fidelity (distance to the model's own final output)
  c.loss.cfg_dropout = 0.1    # probability of replacing the condition by the null one
  c.loss.time_weighting = "uniform"  # per-sample weight of the eps-MSE terms: uniform (paper) | min_snr (Min-SNR-gamma; diffusion/losses.py)
  c.loss.min_snr_gamma = 5.0  # gamma of time_weighting=min_snr

  c.train = t = ml_collections.ConfigDict()
  t.mode = "scratch"          # scratch | finetune | frozen_backbone | uem_only (only UEMs/LTEs learn, from init_from) | router (only a Learning-to-Cache router learns, for sample.sampler/steps; docs/caching.md)
  t.num_steps = 2000          # optimiser steps
  t.batch_size = 128          # global batch (all hosts and devices)
  t.lr = 1e-3                 # peak AdamW learning rate
  t.weight_decay = 0.03       # AdamW weight decay
  t.warmup_steps = 100        # linear warmup steps
  t.lr_schedule = "cosine"    # cosine | constant (after the warmup)
  t.grad_clip = 1.0           # global-norm gradient clipping (0 = off)
  t.ema_rate = 0.999          # EMA decay of the parameters used for sampling
  t.checkpoint_every = 500    # steps between checkpoints
  t.keep_checkpoints = 2      # checkpoints kept in the workdir
  t.log_every = 50            # steps between metrics (the only host syncs)
  t.seed = 0                  # seeds init, data order and per-step RNG
  t.init_from = ""            # checkpoint dir (or converted weights, or a params .npz of this model) for finetune / frozen_backbone / uem_only
  t.grad_accum = 1            # microbatches per step (batch_size must divide)
  t.distributed = False       # call jax.distributed.initialize() (multi-host)
  t.sample_at_end = True      # write samples + sample_stats.json when training ends
  t.stop_at = 0               # >0: checkpoint and stop at this step, keeping the num_steps schedule (resume later)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: all devices not used by fsdp
  c.mesh.fsdp = 1             # devices that shard large parameters

  c.exit = e = ml_collections.ConfigDict()
  e.policy = "uem"            # uem | uem_no_time | static | time_schedule | state_cosine | adadiff | oracle | none
  e.threshold = 0.1           # uem: exit when u < threshold; state_cosine: cosine > threshold; adadiff: confidence > threshold; oracle: x0 RMS tolerance
  e.threshold_schedule = ""   # score policies: comma-separated thresholds per timestep bucket, noisy -> clean (overrides threshold)
  e.aggregate = "all"         # all (each sample keeps its own exit) | mean (one batch decision on the mean score) | last (each sample decides as with all; all take the last block run)
  e.min_layers = 1            # no exit before this many blocks ran
  e.patience = True           # adadiff: the first confident in-block only arms, the next exits (official image models; their text model: False)
  e.depth = 0                 # static policy: blocks to run (0 = all)
  e.schedule = ""             # time_schedule: comma-separated depths per timestep bucket, noisy -> clean
  e.target_layer_ratio = 0.0  # >0: calibrate to this layer ratio (what is calibrated: exit.calibrate)
  e.calibrate = "policy"      # what target_layer_ratio calibrates for a learned/score policy: policy (exit.policy's own threshold; the default: the calibrated time_schedule was the worst row on the Quickstart model) | time_schedule (a depth per timestep bucket from the oracle's exits) | guided (the policy's threshold per timestep bucket, each bucket held to the calibrated time_schedule's share)
  e.max_psnr_drop = 0.0       # >0: calibrate to psnr_vs_full >= 58.9 dB (8-bit quantisation) minus this
  e.min_psnr = 0.0            # >0: calibrate to psnr_vs_full >= this many dB
  e.calibration_metric = "layer_ratio_run"   # layer_ratio_run (real cost) | layer_ratio_per_sample (paper)
  e.calibration_tolerance = 0.02  # allowed distance to target_layer_ratio
  e.calibration_images = 0    # 0: min(sample.batch_size, sample.num_images)
  e.calibration_buckets = 1   # >1: calibrate one threshold per timestep bucket to target_layer_ratio each

  c.cache = ml_collections.ConfigDict()
  c.cache.policy = "none"     # none | l2c (Learning-to-Cache: sublayers reuse their previous update; sampler dpm_solver_2s or ddim; docs/caching.md)
  c.cache.router = ""         # l2c: router file (official .pth or ours, .npz from train.mode=router)
  c.cache.threshold = 0.9     # l2c: a sublayer is recomputed where its router score > threshold, reused otherwise (official: 0.9)
  c.cache.l1_weight = 0.1     # train.mode=router: lambda of the L1 term, given for a 4x32x32 output (official); scaled by H*W*C/4096

  c.sample = s = ml_collections.ConfigDict()
  s.sampler = "ddim"          # ddpm | ddim | dpm_solver | euler_maruyama | dpm_solver_fast | dpm_solver_2s (singlestep order 2, even steps = NFE)
  s.steps = 50                # sampler steps (network evaluations per image, before CFG)
  s.num_images = 64           # images written by --mode sample
  s.batch_size = 64           # images per sampling batch
  s.guidance_scale = 0.0      # U-ViT convention: eps = (1 + s) eps_cond - s eps_null
  s.eta = 0.0                 # DDIM noise (0 = deterministic)
  s.seed = 0                  # initial noise seed (same for early exit and full depth)
  s.use_ema = True            # sample with the EMA parameters
  s.params_file = ""          # a params file (python -m deediff_jax.export) read instead of the workdir's checkpoint (sample, eval, sweep, tune)

  c.sweep = w = ml_collections.ConfigDict()
  w.policies = "uem,static,time_schedule,state_cosine,oracle,none"  # policies to sweep (adadiff models: adadiff replaces uem)
  w.thresholds = "0.02,0.04,0.06,0.08,0.1,0.13,0.16,0.2,0.25,0.3"  # uem thresholds
  w.cosine_thresholds = "0.9,0.95,0.97,0.98,0.99,0.995"  # state_cosine thresholds
  w.confidence_thresholds = "0.8,0.85,0.9,0.92,0.95,0.97"  # adadiff thresholds (exit when confidence > it)
  w.oracle_tolerances = "0.01,0.03,0.1,0.3"  # oracle tolerances (RMS x0 distance to the final layer)
  w.step_fractions = "0.3,0.45,0.6,0.75"  # full-depth rows with this share of sample.steps (fewer steps)
  w.combo_depths = ""         # static depths also run at the step_fractions >= 0.6 (exit + fewer steps)
  w.depths = ""               # static depths; empty = every depth
  w.time_schedules = ""       # ';'-separated time_schedule strings; empty = a few defaults
  w.num_images = 256          # images per setting (same noise for every setting)
  w.fid_kind = "classifier"   # classifier | inception | none
  w.inception_weights = ""    # path to pt_inception-2015-12-05-*.pth (or converted .npz)
  w.classifier_steps = 600    # training steps of the classifier-FID feature net
  w.calibration_seed = 1      # seed of the calibration noise every choice is made on (threshold/schedule calibration, best row per family, tune's pick); sample.seed's noise is held out
  w.calibration_images = 0    # >0: every row is also measured on this many calibration images (choice_psnr, choice_gflops_ratio: what pareto_budgets picks on)

  c.tune = u = ml_collections.ConfigDict()
  u.budget = 0.0              # --mode tune: GFLOPs budget as a fraction of full depth at sample.steps (measured at sample.batch_size; admits ratio <= budget)
  u.budgets = ""              # --mode tune instead of tune.budget: several budgets in one run (e.g. 0.4,0.55,0.7), sharing the full-depth runs and every repeated measurement; one file per budget (tune.out with {budget}; default DIR/tuned_{budget}.json)
  u.min_psnr = 0.0            # --mode tune instead of a budget: the cheapest setting with PSNR vs full >= this (dB)
  u.file = ""                 # --mode sample|eval: apply the overrides of a tuned.json written by --mode tune
  u.out = ""                  # --mode tune: where to write tuned.json (empty = DIR/tuned.json); its router path is relative to it
  u.calibration_images = 200  # images the search measures on (sweep.calibration_seed's noise)
  u.heldout_images = 0        # images the pick is validated on (sample.seed's noise); 0 = sweep.num_images
  u.buckets = 4               # timestep buckets of the per-bucket thresholds and the calibrated time schedule
  u.timing_repeats = 5        # paired, interleaved timings of the pick against full depth (median ratio)
  u.families = ""            # --mode tune: families searched, comma-separated among learned,time_schedule,static,fewer_steps,static_fewer_steps,l2c (empty = all)
  w.cache_thresholds = "0,0.3,0.5,0.7,0.9,0.95"  # l2c / l2c+exit rows (sweep.policies): cache.threshold values (needs cache.router)
  w.cache_exits = ""          # l2c+exit rows: ';'-separated exit settings POLICY[:VALUE] (uem:0.1;static:9;time_schedule:5,9,13); empty: config.exit's
  return c


def _flatten(cfg, prefix=""):
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _type_ok(default: Any, value: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, type(default))


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ConfigError (one line, naming the key and the fix) or returns cfg."""
  schema = _flatten(base_config())
  given = _flatten(cfg)
  for key, value in given.items():
    if key not in schema:
      close = [k for k in schema if k.split(".")[-1] == key.split(".")[-1]]
      close.sort(key=lambda k: k.startswith("cache."))  # cache.threshold repeats exit.threshold's name
      hint = f" (did you mean {close[0]}?)" if close else ""
      raise ConfigError(f"unknown config key '{key}'{hint}; see deediff_jax/config.py for the schema")
    if not _type_ok(schema[key], value):
      raise ConfigError(f"config key '{key}' must be {type(schema[key]).__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # nan, inf: never a setting
      raise ConfigError(f"config key '{key}' is {value}; give a finite number (default "
                        f"--config.{key}={schema[key]!r})")

  def enum(key, allowed):
    v = given.get(key, schema[key])
    if v not in allowed:
      raise ConfigError(f"config key '{key}' is {v!r}; choose one of {', '.join(allowed)}")

  enum("exit.policy", policies.names())
  enum("exit.aggregate", AGGREGATES)
  enum("sample.sampler", SAMPLERS)
  enum("diffusion.schedule", SCHEDULES)
  enum("diffusion.time_labels", ("uvit",))
  enum("train.mode", TRAIN_MODES)
  enum("cache.policy", CACHE_POLICIES)
  if cfg.sample.sampler == "dpm_solver_2s" and cfg.sample.steps % 2:
    raise ConfigError(f"sample.sampler=dpm_solver_2s takes an even sample.steps (network evaluations, "
                      f"two per solver step), got {cfg.sample.steps}; use {cfg.sample.steps + 1}")
  if cfg.cache.policy == "l2c" and cfg.sample.sampler not in ("dpm_solver_2s", "ddim"):
    raise ConfigError(f"cache.policy=l2c works with sample.sampler dpm_solver_2s or ddim, got "
                      f"{cfg.sample.sampler}")
  if cfg.cache.policy == "l2c" and not str(cfg.cache.router).strip():
    raise ConfigError("cache.policy=l2c needs cache.router=PATH (an official router .pth or one "
                      "trained with --config.train.mode=router)")
  if cfg.train.mode == "router" and cfg.sample.sampler not in ("dpm_solver_2s", "ddim"):
    raise ConfigError(f"train.mode=router trains for sample.sampler dpm_solver_2s or ddim, got "
                      f"{cfg.sample.sampler}")
  if cfg.cache.l1_weight < 0:
    raise ConfigError(f"cache.l1_weight must be >= 0, got {cfg.cache.l1_weight}")
  enum("model.exit_style", EXIT_STYLES)
  enum("loss.uem_target", UEM_TARGETS)
  enum("loss.time_weighting", TIME_WEIGHTINGS)
  if cfg.loss.min_snr_gamma <= 0:
    raise ConfigError(f"loss.min_snr_gamma must be > 0, got {cfg.loss.min_snr_gamma}")
  enum("sweep.fid_kind", FID_KINDS)
  enum("train.lr_schedule", ("cosine", "constant"))
  if not 0.0 <= cfg.loss.cfg_dropout < 1.0:
    raise ConfigError(f"loss.cfg_dropout must be in [0, 1), got {cfg.loss.cfg_dropout}")

  try:
    mc = ModelConfig.from_config(cfg.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if cfg.data.image_size <= 0 or cfg.data.channels <= 0:
    raise ConfigError("data.image_size and data.channels must be positive")
  if cfg.diffusion.timesteps < 2:
    raise ConfigError(f"diffusion.timesteps must be >= 2, got {cfg.diffusion.timesteps}")
  if cfg.diffusion.schedule == "vpsde" and cfg.sample.sampler in ("ddpm",):
    raise ConfigError("sample.sampler 'ddpm' needs a discrete schedule; use euler_maruyama, ddim or "
                      "dpm_solver with diffusion.schedule=vpsde")
  if cfg.sample.sampler == "euler_maruyama" and cfg.diffusion.schedule != "vpsde":
    raise ConfigError("sample.sampler 'euler_maruyama' needs diffusion.schedule=vpsde")
  for key in ("train.num_steps", "train.batch_size", "train.log_every", "train.checkpoint_every",
              "train.keep_checkpoints", "train.grad_accum", "sample.steps", "sample.num_images",
              "sample.batch_size"):
    if given.get(key, schema[key]) <= 0:
      raise ConfigError(f"config key '{key}' must be positive, got {given.get(key)}")
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by train.grad_accum "
                      f"{cfg.train.grad_accum}")
  if cfg.train.lr <= 0:
    raise ConfigError(f"train.lr must be positive, got {cfg.train.lr}; e.g. --config.train.lr=1e-3")
  for key in ("weight_decay", "grad_clip", "warmup_steps"):
    if cfg.train[key] < 0:
      raise ConfigError(f"train.{key} must be >= 0, got {cfg.train[key]}")
  if not 0.0 <= cfg.train.ema_rate < 1.0:
    raise ConfigError(f"train.ema_rate must be in [0, 1), got {cfg.train.ema_rate}")
  if not 0.0 <= cfg.exit.target_layer_ratio <= 1.0:
    raise ConfigError(f"exit.target_layer_ratio must be in [0, 1] (0 = off), got {cfg.exit.target_layer_ratio}")
  for key in ("max_psnr_drop", "min_psnr"):
    if cfg.exit[key] < 0:
      raise ConfigError(f"exit.{key} must be >= 0 (0 = off), got {cfg.exit[key]}")
  enum("exit.calibration_metric", ("layer_ratio_run", "layer_ratio_per_sample"))
  enum("exit.calibrate", ("time_schedule", "policy", "guided"))
  if cfg.exit.calibration_tolerance <= 0:
    raise ConfigError(f"exit.calibration_tolerance must be positive, got {cfg.exit.calibration_tolerance}")
  if cfg.exit.calibration_images < 0:
    raise ConfigError(f"exit.calibration_images must be >= 0 (0 = one sampling batch), got "
                      f"{cfg.exit.calibration_images}")
  if cfg.sweep.num_images < 2:
    raise ConfigError(f"sweep.num_images must be >= 2 (FID needs a covariance), got {cfg.sweep.num_images}")
  if cfg.sample.guidance_scale != 0 and mc.num_classes == 0 and mc.context_dim == 0:
    raise ConfigError("sample.guidance_scale needs a conditional model (model.num_classes or "
                      "model.context_dim); set --config.sample.guidance_scale=0")
  policy = policies.get(cfg.exit.policy)
  if cfg.exit.threshold < 0 and not policy.negative_thresholds:  # cosines may be negative
    raise ConfigError(f"exit.threshold must be >= 0 for exit.policy={cfg.exit.policy}, got {cfg.exit.threshold}")
  if str(cfg.exit.threshold_schedule).strip():
    parse_threshold_schedule(cfg.exit.threshold_schedule, cfg.exit.policy)
  if cfg.exit.calibration_buckets < 1:
    raise ConfigError(f"exit.calibration_buckets must be >= 1 (1 = one threshold), got "
                      f"{cfg.exit.calibration_buckets}")
  if cfg.exit.calibration_buckets > cfg.sample.steps:
    raise ConfigError(f"exit.calibration_buckets={cfg.exit.calibration_buckets} exceeds sample.steps="
                      f"{cfg.sample.steps}, so some buckets would hold no sampling step; use at most "
                      f"{cfg.sample.steps}")
  if not 1 <= cfg.exit.min_layers <= mc.num_blocks:
    raise ConfigError(f"exit.min_layers must be in [1, {mc.num_blocks}] (the model has "
                      f"{mc.num_blocks} blocks), got {cfg.exit.min_layers}")
  if not 0 <= cfg.exit.depth <= mc.num_blocks:
    raise ConfigError(f"exit.depth must be in [0, {mc.num_blocks}] (0 = all), got {cfg.exit.depth}")
  problem = policy.model_problem(mc)
  if problem:
    raise ConfigError(f"config key 'exit.policy': {problem}")
  if cfg.loss.uem_target != "eps" and mc.exit_style == "adadiff":
    raise ConfigError("loss.uem_target applies to exit_style=deediff; adadiff uses the official "
                      "confidence target, so leave loss.uem_target=eps")
  if policy.value == "schedule" and (str(cfg.exit.schedule).strip() or cfg.exit.target_layer_ratio <= 0):
    # An empty schedule is fine when exit.target_layer_ratio calibrates one.
    parse_depth_schedule(cfg.exit.schedule, mc.num_blocks, key="exit.schedule")
  # The router's frozen backbone may also come from a params file (python -m deediff_jax.export).
  from_file = cfg.train.mode == "router" and str(cfg.sample.params_file).strip()
  if cfg.train.mode in ("finetune", "frozen_backbone", "uem_only", "router") and not cfg.train.init_from \
     and not from_file:
    raise ConfigError(f"train.mode={cfg.train.mode} needs train.init_from=DIR (a checkpoint "
                      "workdir or converted U-ViT weights)"
                      + (" or sample.params_file=FILE" if cfg.train.mode == "router" else ""))
  if not cfg.data.latent and (mc.image_size != cfg.data.image_size or mc.in_channels != cfg.data.channels):
    # Latent models differ on purpose (data.latent=True); pixel models must agree.
    raise ConfigError(f"model.image_size/in_channels ({mc.image_size}, {mc.in_channels}) must match "
                      f"data.image_size/channels ({cfg.data.image_size}, {cfg.data.channels})")
  return cfg


def parse_depth_schedule(text: str, num_blocks: int, key: str = "exit.schedule") -> list[int]:
  """'4,6,9,13' -> [4, 6, 9, 13]: a depth per timestep bucket, from the noisiest bucket."""
  try:
    depths = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"config key '{key}' must be comma-separated integers like '4,7,{num_blocks}', "
                      f"got {text!r}") from None
  if not depths:
    raise ConfigError(f"config key '{key}' is empty; give depths per timestep bucket like '4,7,{num_blocks}'")
  for v in depths:
    if not 1 <= v <= num_blocks:
      raise ConfigError(f"config key '{key}': depth {v} is outside [1, {num_blocks}]")
  return depths


def parse_threshold_schedule(text: str, policy: str = "", key: str = "exit.threshold_schedule") -> list[float]:
  """'0.05,0.1,0.2' -> [0.05, 0.1, 0.2]: a score-policy threshold per timestep bucket, noisiest first
  (negative values only for a policy that allows them)."""
  values = parse_floats(text, key)
  if not values:
    raise ConfigError(f"config key '{key}' is empty; give thresholds per timestep bucket like '0.05,0.1,0.2'")
  if min(values) < 0 and not (policy and policies.get(policy).negative_thresholds):
    raise ConfigError(f"config key '{key}': thresholds must be >= 0 (u is in (0, 1)), got {min(values)}")
  return values


def parse_floats(text: str, key: str) -> list[float]:
  try:
    values = [float(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"config key '{key}' must be comma-separated numbers, got {text!r}") from None
  bad = [v for v in values if not math.isfinite(v)]
  if bad:
    raise ConfigError(f"config key '{key}' holds {bad[0]}; give finite numbers, got {text!r}")
  return values


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file loaded by path (not validated): for scripts and for config
  files that start from another one (e.g. configs/*_adadiff.py)."""
  import importlib.util
  import os
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} not found; pass e.g. configs/digits.py")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_config_file(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py`'s get_config(), applies {'a.b': value} overrides and validates.

  For notebooks and scripts; the CLI does the same through ml_collections.config_flags.
  """
  cfg = config_from_file(path)
  for key, value in (overrides or {}).items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"unknown config key '{key}'; see deediff_jax/config.py for the schema")
    node[leaf] = value
  return validate(cfg)


def reference_markdown() -> str:
  """The config reference table (key, default, meaning) of docs/config.md, from base_config's source.

  The meaning is each key's trailing comment in `base_config`, so the reference cannot drift from
  the code: tests/test_docs.py checks docs/config.md holds exactly this text.
  """
  import inspect
  import re
  src = inspect.getsource(base_config)
  alias = dict(re.findall(r"c\.(\w+) = (\w) = ml_collections", src))       # c.model = m -> m: model
  alias = {v: k for k, v in alias.items()}
  comments = {}
  for line in src.splitlines():
    m = re.match(r"\s+(?:c\.(\w+)|(\w))\.(\w+) = [^#]*?(?:#\s*(.*))?$", line)
    if not m or m.group(3) == "ml_collections":
      continue
    section = m.group(1) or alias.get(m.group(2))
    if section:
      comments[f"{section}.{m.group(3)}"] = (m.group(4) or "").strip()
  rows = ["| key | default | meaning |", "|---|---|---|"]
  for key, value in _flatten(base_config()).items():
    shown = f"`{value!r}`" if not isinstance(value, str) else (f"`{value}`" if value else "`''`")
    rows.append(f"| `{key}` | {shown} | {comments.get(key, '').replace('|', '&#124;')} |")
  return "\n".join(rows) + "\n"


REFERENCE_FILE = "docs/config.md"
REFERENCE_MARKERS = ("<!-- config-reference:start -->\n", "<!-- config-reference:end -->")


def update_reference(path: str = REFERENCE_FILE) -> bool:
  """Rewrites the config reference between the markers of docs/config.md; True if it changed."""
  with open(path) as f:
    text = f.read()
  start, end = REFERENCE_MARKERS
  head, rest = text.split(start, 1)
  _, tail = rest.split(end, 1)
  new = head + start + reference_markdown() + end + tail
  if new != text:
    with open(path, "w") as f:
      f.write(new)
  return new != text


if __name__ == "__main__":  # python -m deediff_jax.config: refresh docs/config.md's reference
  print(f"{REFERENCE_FILE} updated" if update_reference() else f"{REFERENCE_FILE} already up to date")
