"""Calibrated exits: pick the threshold (or the depth schedule) from a target instead of guessing.

Two targets (set one):

* `exit.target_layer_ratio` = r in (0, 1]: the threshold whose **layer_ratio_run** (blocks the
  early-exit loop actually ran / full depth, averaged over sampling steps: the real compute,
  see `sampling.summarize`) on the calibration batch is within `tolerance` of r. Set
  `exit.calibration_metric=layer_ratio_per_sample` to target the paper's per-sample ratio
  instead. The run ratio depends on the batch (with aggregate="all" the loop runs until the
  slowest sample exits), so the calibration batch is by default one batch of
  min(sample.batch_size, sample.num_images) images, the batch the sampler will really use
  (`exit.calibration_images` overrides). The ratio is measured with the configured sampler.
* a PSNR floor: the LARGEST (most aggressive) threshold whose `psnr_vs_full` (mean per-image
  PSNR against the full-depth samples from the same noise, `eval/fidelity.py`) on the
  calibration batch stays >= the floor, measured with a deterministic sampler (the configured
  one if it is deterministic, else DDIM eta=0). The floor is `exit.min_psnr` (dB) when set,
  else `PSNR_8BIT - exit.max_psnr_drop`: PSNR_8BIT = 10*log10(4 / ((2/255)^2 / 12)) ≈ 58.9 dB
  is the PSNR of 8-bit quantisation noise, i.e. the level at which early-exit samples are, on
  average, the full-depth samples as saved in a PNG. `max_psnr_drop=20` allows samples ~20 dB
  worse than that (floor ≈ 38.9 dB). (PSNR against the full model is infinite at full depth,
  so a "drop" needs a finite reference; this is the one that means "visibly the same".)

The modules, one job each; none of them reads a ConfigDict (`eval/specs.py` builds the
`CalibrationSpec` once at each mode's edge and writes a calibrated config back there):

  spec.py           `CalibrationSpec` and the request's rules: which target, which floor, the
                    checks before any sampling, the calibration noise, the timestep buckets
  batch.py          one sampling run of the calibration batch from the spec
  threshold.py      the threshold searches (scalar or per timestep bucket; ratio or PSNR floor)
  time_schedule.py  a time_schedule calibrated from the oracle's exits
  resolve.py        a request -> its calibrated values (`Calibrated`) and the report; guided
  describe.py       the one-line reports and the exit.threshold_schedule text

The calibration batch uses its own noise (`spec.calibration_rng`: sweep.calibration_seed folded
with a fixed stream id, independent of sample.seed), so the images that are finally evaluated are
not the ones it was tuned on.
"""
