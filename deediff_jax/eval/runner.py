"""Measures exit settings on one checkpoint: `prepare`/`start` build the shared `Context` (params,
inputs, the timed plain full-depth baseline, the scorer); `evaluate` samples one setting with a
program compiled beforehand (`_warm_up`), times the sampling call alone (`sampling.timed`) and
scores it into one row of `ROW_KEYS`; `retime_baseline` times the baseline again after the settings.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import numpy as np

from deediff_jax import sampling
from deediff_jax import policies
from deediff_jax.config import CacheSpec, parse_floats
from deediff_jax.data.eval_context import conditioning
from deediff_jax.eval import cache_rows
from deediff_jax.eval import fidelity as fidelity_lib
from deediff_jax.eval import flops as flops_lib
from deediff_jax.eval import specs
from deediff_jax.eval.calibration import spec as cal_spec
from deediff_jax.eval.calibration.describe import describe, schedule_text
from deediff_jax.eval.calibration.resolve import calibrate_guided
from deediff_jax.eval.calibration.threshold import calibrate_threshold
from deediff_jax.eval.decode import decoder_for
from deediff_jax.eval.quality import Quality, build_quality
from deediff_jax.eval.settings import Setting, SweepError, cheap_params, schedule_depths
from deediff_jax.model.uvit import ModelConfig

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


def _reuse(config, setting: Optional[Setting], n: int):
  """Learning-to-Cache rows: their reuse schedule; every other row: no cache (False)."""
  return cache_rows.reuse_for(CacheSpec.from_config(config), None if setting is None else setting.cache_threshold, n)


def _sample(ctx: Context, config, *, plain=False, setting: Optional[Setting] = None, pp=None):
  kw = (dict(plain=True) if plain else
        dict(policy=setting.policy, policy_params=pp, reuse=_reuse(config, setting, ctx.cfg.num_blocks)))
  return sampling.sample(ctx.params, config, ctx.rng, ctx.num, **kw, **ctx.cond)


def _warm_up(ctx: Context, config, *, plain=False, setting: Optional[Setting] = None) -> None:
  """Compiles (once per sampler x steps x policy x schedule and threshold shapes) every batch
  shape of the run, so nothing compiles inside a timed call."""
  thr_len = (len(parse_floats(setting.threshold_schedule, "threshold_schedule"))
             if setting is not None and setting.threshold_schedule is not None else 0)
  key = (config.sample.sampler, int(config.sample.steps), "plain" if plain else setting.policy,
         len(schedule_depths(setting.schedule)) if setting is not None and setting.schedule else 0, thr_len,
         setting is not None and setting.cache_threshold is not None)
  if key in ctx.compiled:
    return
  n = ctx.cfg.num_blocks
  kw = (dict(plain=True) if plain else
        dict(policy=setting.policy, policy_params=cheap_params(setting, n, int(config.exit.min_layers),
                                                              bool(config.exit.patience))))
  # Ahead of time: every batch shape of the run is compiled and nothing is sampled.
  if not plain:
    kw["reuse"] = _reuse(config, setting, n)
  sampling.compile_ahead(functools.partial(sampling.sample, ctx.params, config, ctx.rng, ctx.num), dict(**kw, **ctx.cond))
  ctx.compiled.add(key)


def _sample_timed(ctx: Context, config=None, **kw):
  """(images, stats, seconds) with the configured sampler: compiled first (`_warm_up`), then only
  the sampling call is on the clock (`sampling.timed`)."""
  config = ctx.config if config is None else config
  _warm_up(ctx, config, **{k: v for k, v in kw.items() if k in ("plain", "setting")})
  (images, stats), seconds = sampling.timed(_sample, ctx, config, **kw)
  return images, stats, seconds


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
  """(params, step) of the latest checkpoint in `workdir`, EMA weights unless sample.use_ema=False;
  with sample.params_file, that file's parameters (train/params_file.py) and step None."""
  if str(config.sample.params_file).strip():
    from deediff_jax.train import params_file
    return params_file.load_for(config), None
  from deediff_jax.train.checkpoint import load_params
  # with_step: after a fallback from a damaged newest checkpoint, the step actually read.
  return load_params(workdir, config, use_ema=bool(config.sample.use_ema), with_step=True)


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
  quality = build_quality(specs.quality_spec(config), workdir) if quality is None else quality
  ctx = Context(config=config, fidelity_config=specs.deterministic_config(config), params=params,
                cfg=cfg, num=num, rng=jax.random.PRNGKey(int(config.sample.seed)),
                cond=dict(zip(("labels", "context", "null_context"), conditioning(config, num))),
                quality=quality, checkpoint_step=step, workdir=str(workdir), decode=decoder_for(config))
  ctx.images_full, _, ctx.seconds_full = _sample_timed(ctx, plain=True)
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
  _, _, again = _sample_timed(ctx, plain=True)
  ctx.seconds_full_runs = ctx.seconds_full_runs + [again]
  ctx.seconds_full = float(np.mean(ctx.seconds_full_runs))
  for r in rows:
    r["seconds_full"] = ctx.seconds_full
    r["speedup"] = ctx.seconds_full / r["seconds"]


def check_params_for(settings, params) -> None:
  if any(s.exit_policy.needs_exits for s in settings) and not ({"exit_heads", "ltes"} & set(params)):
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
  pp = setting.policy_params(n, min_layers, bool(config.exit.patience))
  kw = dict(plain=True) if setting.plain else dict(setting=setting, pp=pp)
  images, stats, seconds = _sample_timed(ctx, config, **kw)
  images = ctx.decoded(images)
  if ctx.deterministic:
    images_for_fidelity = images
  else:
    fidelity_run_config = with_steps(ctx.fidelity_config, setting.steps)
    _warm_up(ctx, fidelity_run_config, **{k: v for k, v in kw.items() if k != "pp"})
    images_for_fidelity = ctx.decoded(_sample(ctx, fidelity_run_config, **kw)[0])
  fidelity = fidelity_lib.fidelity(ctx.images_full_fidelity, images_for_fidelity)
  stats["per_image_psnr"] = fidelity_lib.per_image_psnr(ctx.images_full_fidelity, images_for_fidelity)  # bootstrap CIs
  summary = sampling.summarize(stats, n)
  gflops = (flops_lib.full_depth_flops_per_image(ctx.cfg, int(config.sample.steps), cfg_factor=ctx.cfg_factor) / 1e9
            if setting.plain else gflops_from_stats(ctx.cfg, stats, setting.policy, ctx.cfg_factor))
  if "att_run" in stats:  # Learning-to-Cache: the reused sublayers ran nothing
    gflops = cache_rows.gflops_per_image(ctx.cfg, stats, setting.policy, ctx.cfg_factor)
  quality = ctx.quality.score(images, ctx.labels)
  row = {
      "policy": setting.family, "setting": setting.label(),
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


def _calibration_policy(config) -> str:
  """exit.policy when it is calibratable, else the first learned calibratable policy the model runs."""
  if policies.get(config.exit.policy).calibratable:
    return config.exit.policy
  cfg = ModelConfig.from_config(config.model)
  return next(p.name for p in policies.registered()
              if p.calibratable and p.learned and p.model_problem(cfg) is None)


def calibrated_setting(ctx: Context, policy: Optional[str] = None, buckets: Optional[int] = None) -> Setting:
  """Calibrates `policy` (default: exit.policy when it is a score policy, else uem) on a held-out
  batch of one sampling batch (`calibration.spec.calibration_rng`), and prints what was chosen.
  `buckets` overrides exit.calibration_buckets (K > 1: a per-bucket threshold schedule)."""
  config = ctx.config
  request = specs.calibration_spec(config)
  policy = _calibration_policy(config) if policy is None else policy
  num = min(int(config.sample.batch_size), ctx.num)
  rng = cal_spec.calibration_rng(request.seed)
  if cal_spec.guided(request) and buckets is None:
    threshold, report = calibrate_guided(ctx.params, request, rng, policy=policy, num=num)
  else:
    threshold, report = calibrate_threshold(ctx.params, request, rng, policy=policy, num=num, buckets=buckets)
  print(describe(report))
  if isinstance(threshold, (list, tuple)):
    return Setting(policy, threshold_schedule=schedule_text(threshold), calibration=report)
  return Setting(policy, threshold=float(threshold), calibration=report)


def start(config, workdir: str, settings, *, params=None,
          calibration_policy: Optional[str] = None) -> Context:
  """Cheap checks first (a calibration request, the workdir, exits in the checkpoint), then
  `prepare`: a bad request fails before any sampling."""
  request = specs.calibration_spec(config)
  if cal_spec.wanted(request) and calibration_policy != cal_spec.schedule_policy():  # calibrate_time_schedule
    cal_spec.check_request(request, calibration_policy or _calibration_policy(config))
  check_local(workdir)
  step = None
  if params is None:
    params, step = load_checkpoint(config, workdir)
  check_params_for(settings, params)
  return prepare(config, workdir, params=params, step=step)
