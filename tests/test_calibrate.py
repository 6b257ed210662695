"""Calibrated thresholds on a tiny model whose UEM outputs are set by hand.

The UEMs' kernels are zero and their biases logit(U[i]), so u_i = U[i] for every sample, token and
step: a threshold t makes every sample exit at the first block with U[i] < t, and both layer
ratios are exactly that layer / N. Calibration must land inside the interval of thresholds that
gives the target layer, and the PSNR variant must return the threshold of the shallowest exit
whose measured PSNR is above the floor. The per-bucket search is also checked on a synthetic
probe whose buckets respond differently and interact.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import sampling
from deediff_jax.config import base_config
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import make_schedule
from deediff_jax.config import ExitSpec
from deediff_jax.data.eval_context import conditioning
from deediff_jax.early_exit import by_bucket, exit_params, make_policy_params
from deediff_jax.eval import specs
from deediff_jax.eval.calibration import describe as D
from deediff_jax.eval.calibration import spec as S
from deediff_jax.eval.calibration import threshold as T
from deediff_jax.eval.calibration import time_schedule as TS
from deediff_jax.eval import fidelity as F
from deediff_jax.model import build, init_params

U = np.array([0.9, 0.7, 0.5, 0.3, 0.1])   # u per block (5 blocks: depth 4)
N = len(U)


def _config(**sample):
  c = base_config()
  c.model.update(embed_dim=32, depth=4, num_heads=2)        # 8x8x1, class-conditional
  c.sample.update(steps=4, batch_size=8, num_images=8, **sample)
  return c


@pytest.fixture(scope="module")
def model():
  c = _config()
  module = build(c.model)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  uems = params["uems"]["linear"]
  params["uems"] = {"linear": {"kernel": jnp.zeros_like(uems["kernel"]),
                               "bias": jnp.asarray(np.log(U / (1 - U)).reshape(N, 1), jnp.float32)}}
  # So that deeper exits are closer to full depth (a PSNR that rises with depth): every exit
  # head is the final head, and the out-blocks' long skips pass x through (kernel [I; 0]), which
  # makes every block residual.
  params["exit_heads"] = jax.tree_util.tree_map(lambda h: jnp.broadcast_to(h, (N - 1,) + h.shape),
                                                params["head"])
  d = c.model.embed_dim
  k = c.model.depth // 2
  params["out_blocks"]["skip_linear"] = {
      "kernel": jnp.broadcast_to(jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0), (k, 2 * d, d)),
      "bias": jnp.zeros((k, d))}
  return params


def _exit_layer(threshold):
  below = np.flatnonzero(U < threshold)
  return int(below[0]) + 1 if below.size else N


def _calibrate(params, config, **kw):
  """calibrate_threshold on the request of `config`, with its calibration noise."""
  spec = specs.calibration_spec(config)
  return T.calibrate_threshold(params, spec, S.calibration_rng(spec.seed), **kw)


def _ratio_of(params, config, threshold):
  pp = make_policy_params(N, threshold=threshold)
  labels, _, _ = conditioning(config, 8)
  _, st = sampling.sample(params, config, S.calibration_rng(config.sweep.calibration_seed), 8, policy="uem",
                          policy_params=pp, labels=labels)
  return sampling.summarize(st, N)


@pytest.mark.parametrize("target,layer", [(0.6, 3), (0.4, 2)])
def test_target_layer_ratio_is_hit(model, target, layer):
  c = _config()
  c.exit.target_layer_ratio = target
  threshold, report = _calibrate(model, c)
  # Exiting at `layer` needs U[layer-1] < t <= U[layer-2].
  assert U[layer - 1] < threshold <= U[layer - 2]
  assert _exit_layer(threshold) == layer
  assert report["method"] == "target_layer_ratio" and report["metric"] == "layer_ratio_run"
  assert report["within_tolerance"] and report["threshold"] == threshold
  assert report["achieved"]["layer_ratio_run"] == pytest.approx(layer / N, abs=1e-12)
  assert report["calibration_images"] == 8 and report["sampler"] == "ddim"
  # Every probe's measured ratio is the hand-computed one for its threshold.
  for p in report["probes"]:
    assert p["layer_ratio_run"] == pytest.approx(_exit_layer(p["threshold"]) / N, abs=1e-12)
  # Re-measured independently of the calibration code: the same ratio.
  again = _ratio_of(model, c, threshold)
  assert abs(again["layer_ratio_run"] - target) <= report["tolerance"]
  assert again["layer_ratio_per_sample"] == pytest.approx(layer / N, abs=1e-12)


def test_target_ratio_calibrates_a_time_schedule_when_asked(model, capsys):
  # exit.calibrate=time_schedule: a uem config with a target layer ratio samples with a
  # time_schedule from the oracle's exits, and says so; a PSNR floor still calibrates the uem
  # threshold. The default (calibrate=policy) calibrates the uem threshold itself.
  default = _config()
  default.exit.target_layer_ratio = 0.6
  assert default.exit.calibrate == "policy" and not S.calibrates_schedule(specs.calibration_spec(default))
  c = _config()
  c.exit.update(target_layer_ratio=0.6, calibrate="time_schedule")
  assert S.calibrates_schedule(specs.calibration_spec(c))
  out_config, report = specs.calibrated(model, c)
  assert c.exit.policy == "uem" and c.exit.schedule == ""              # the given config stays
  c = out_config
  assert report["method"] == "oracle_time_schedule" and c.exit.policy == "time_schedule"
  assert c.exit.schedule == report["schedule"] and c.exit.threshold == 0.1
  assert len(report["schedule"].split(",")) == S.schedule_buckets(specs.calibration_spec(c)) == min(S.DEFAULT_SCHEDULE_BUCKETS,
                                                                            c.sample.steps)
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("calibrated time_schedule ") and out[1] == D.switch_note("uem")
  floor = _config()
  floor.exit.update(min_psnr=20.0, calibrate="time_schedule")
  assert not S.calibrates_schedule(specs.calibration_spec(floor))
  policy = _config()
  policy.exit.update(target_layer_ratio=0.6, calibrate="policy")
  assert not S.calibrates_schedule(specs.calibration_spec(policy))


def test_calibrated_returns_a_config_with_the_threshold_and_prints(model, capsys):
  c = _config()
  assert specs.calibrated(model, c) == (c, None)                           # not asked: the same config
  c.exit.update(target_layer_ratio=0.6, calibrate="policy")
  out_config, report = specs.calibrated(model, c)
  assert c.exit.threshold == 0.1 and out_config.exit.threshold == report["threshold"]
  out = capsys.readouterr().out
  assert out.startswith(f"calibrated exit.threshold={report['threshold']:.6g} (uem): layer_ratio_run 0.600")
  assert "target layer_ratio_run 0.6 ± 0.02" in out


def test_unreachable_and_bad_requests(model):
  c = _config()
  c.exit.update(target_layer_ratio=0.2, min_layers=3)
  with pytest.raises(S.CalibrationError, match=r"target_layer_ratio=0.2 is below the smallest "
                                               r"layer_ratio_run policy uem reaches on this model "
                                               r"\(0.600 at threshold 1"):
    _calibrate(model, c)
  c = _config()
  c.exit.target_layer_ratio = 1.0                  # full depth: known without sampling
  threshold, report = _calibrate(model, c)
  assert threshold == 0.0 and report["probes"] == [] and report["achieved"]["layer_ratio_run"] == 1.0
  c.exit.policy = "static"
  with pytest.raises(S.CalibrationError, match="exit.policy is 'static'; use --config.exit.policy=uem"):
    _calibrate(model, c)
  c = _config()
  c.exit.update(target_layer_ratio=0.5, max_psnr_drop=10.0)
  with pytest.raises(S.CalibrationError, match="set only one of"):
    _calibrate(model, c)
  with pytest.raises(S.CalibrationError, match="nothing to calibrate"):
    T.calibrate_threshold(model, specs.calibration_spec(_config()), jax.random.PRNGKey(0))


def test_psnr_floor_from_max_psnr_drop():
  c = _config()
  assert S.psnr_floor(specs.calibration_spec(c)) is None and not S.wanted(specs.calibration_spec(c))
  c.exit.max_psnr_drop = 20.0
  np.testing.assert_allclose(S.PSNR_8BIT, 10 * math.log10(4 * 12 * 255 ** 2 / 4), rtol=1e-12)
  np.testing.assert_allclose(S.psnr_floor(specs.calibration_spec(c)), S.PSNR_8BIT - 20.0)
  assert S.wanted(specs.calibration_spec(c))


def test_psnr_floor_picks_the_shallowest_exit_above_the_floor(model):
  # A stochastic configured sampler: the PSNR search must switch to DDIM eta=0.
  c = _config(sampler="ddpm")
  det = specs.deterministic_config(c)
  rng = S.calibration_rng(c.sweep.calibration_seed)
  labels, _, _ = conditioning(c, 8)
  full, _ = sampling.sample(model, det, rng, 8, plain=True, labels=labels)
  # With u fixed per block, a uem threshold is the static depth of its exit layer.
  psnr = {}
  for depth in range(1, N + 1):
    imgs, _ = sampling.sample(model, det, rng, 8, policy="static",
                              policy_params=make_policy_params(N, depth=depth), labels=labels)
    psnr[depth] = F.fidelity(full, imgs)["psnr_vs_full"]
  # The shallowest depth L such that every depth >= L is above a floor and every shallower one
  # below it (so the answer is unique), and the floor halfway.
  layer = next(L for L in range(2, N + 1)
               if min(psnr[d] for d in range(L, N + 1)) > max(psnr[d] for d in range(1, L)))
  floor = 0.5 * (min(psnr[d] for d in range(layer, N + 1)) + max(psnr[d] for d in range(1, layer)))
  assert layer < N           # the search has to find an early exit, not just full depth
  c.exit.max_psnr_drop = S.PSNR_8BIT - floor
  threshold, report = T.calibrate_threshold(model, specs.calibration_spec(c), rng)
  assert report["method"] == "psnr_floor" and report["sampler"] == "ddim"
  np.testing.assert_allclose(report["psnr_floor"], floor, rtol=1e-12)
  assert _exit_layer(threshold) == layer
  assert report["achieved"]["psnr_vs_full"] >= floor
  np.testing.assert_allclose(report["achieved"]["psnr_vs_full"], psnr[layer], rtol=1e-6)
  # Measured again with the returned threshold: above the floor; one layer shallower is not.
  imgs, _ = sampling.sample(model, det, rng, 8, policy="uem",
                            policy_params=make_policy_params(N, threshold=threshold), labels=labels)
  assert F.fidelity(full, imgs)["psnr_vs_full"] >= floor
  assert psnr[layer - 1] < floor


# ----------------------------------------------------------------------------- per timestep bucket

@pytest.mark.parametrize("schedule,steps,k", [("linear", 4, 2), ("cosine", 25, 5), ("linear", 7, 3),
                                              ("cosine", 10, 10)])
def test_step_buckets_match_the_policy_bucketing(schedule, steps, k):
  c = base_config()
  c.diffusion.schedule = schedule
  c.sample.steps = steps
  frac = samplers.grid_arrays(make_schedule(schedule, 1000), steps)["time_frac"][:-1]
  # early_exit's own bucketing of a [K] threshold, step by step (values[b] = b).
  want = [int(by_bucket(jnp.arange(k), f, 1, "test")[0]) for f in frac]
  got = S.step_buckets(specs.calibration_spec(c).sampler, k)
  assert got.tolist() == want
  assert got[0] == 0 and got[-1] == k - 1 and set(got.tolist()) == set(range(k))


def test_guided_holds_each_bucket_to_the_schedule_share(model, monkeypatch, capsys):
  # exit.calibrate=guided: the oracle-calibrated schedule (stubbed here: 5 blocks in the noisy
  # bucket, 3 in the clean one) sets each bucket's target; the noisy bucket never exits (a = 0,
  # threshold 0) and the clean one exits at block 3 (U[2] < t <= U[1]).
  c = _config()
  c.exit.update(target_layer_ratio=0.8, calibrate="guided", calibration_buckets=2)
  assert S.guided(specs.calibration_spec(c)) and not S.calibrates_schedule(specs.calibration_spec(c))
  seen = {}

  def fake_schedule(params, spec, rng, *, target, buckets, num=None):
    seen.update(target=target, buckets=buckets)
    return [N, 3], {"schedule": f"{N},3"}
  monkeypatch.setattr(TS, "calibrate_time_schedule", fake_schedule)
  c, report = specs.calibrated(model, c)
  assert seen == {"target": 0.8, "buckets": 2}
  thresholds = report["threshold"]
  assert thresholds[0] == 0.0 and U[2] < thresholds[1] <= U[1]
  assert report["method"] == "guided_per_bucket" and report["bucket_targets"] == [1.0, 3 / N]
  assert report["achieved"]["per_bucket"] == [pytest.approx(1.0), pytest.approx(3 / N)]
  assert report["within_tolerance"] and report["target"] == 0.8 and report["schedule"] == f"{N},3"
  assert c.exit.policy == "uem" and c.exit.threshold_schedule == D.schedule_text(thresholds)
  assert capsys.readouterr().out.startswith("calibrated exit.threshold_schedule=0,")


def test_per_bucket_target_is_hit_and_carried_by_threshold_schedule(model, capsys):
  c = _config()
  c.exit.update(target_layer_ratio=0.6, calibration_buckets=2)
  thresholds, report = _calibrate(model, c)
  assert isinstance(thresholds, list) and len(thresholds) == 2
  for t in thresholds:                      # every bucket exits at block 3: U[2] < t <= U[1]
    assert U[2] < t <= U[1]
  assert report["method"] == "target_layer_ratio_per_bucket" and report["buckets"] == 2
  assert report["within_tolerance"] and report["threshold"] == thresholds
  assert report["achieved"]["per_bucket"] == [pytest.approx(0.6, abs=1e-12)] * 2
  assert report["achieved"]["layer_ratio_run"] == pytest.approx(0.6, abs=1e-12)
  for p in report["probes"]:                # hand-computed: each bucket exits at its own layer
    assert p["per_bucket"] == [pytest.approx(_exit_layer(t) / N, abs=1e-12) for t in p["threshold"]]
  # calibrated writes exit.threshold_schedule (not exit.threshold), and sampling with that
  # config reproduces the measured ratio.
  c2 = _config()
  c2.exit.update(target_layer_ratio=0.6, calibration_buckets=2, calibrate="policy")
  c2, report2 = specs.calibrated(model, c2)
  assert c2.exit.threshold == 0.1 and c2.exit.threshold_schedule == D.schedule_text(report2["threshold"])
  assert [float(v) for v in c2.exit.threshold_schedule.split(",")] == report2["threshold"]
  out = capsys.readouterr().out
  assert out.startswith(f"calibrated exit.threshold_schedule={thresholds[0]:.4g},{thresholds[1]:.4g} (uem)")
  assert "in each of 2 timestep buckets (measured 0.600/0.600, noisiest first)" in out
  policy, pp = exit_params(ExitSpec.from_config(c2, N), N)
  assert np.asarray(pp["threshold"]).tolist() == pytest.approx(report2["threshold"])
  labels, _, _ = conditioning(c2, 8)
  _, st = sampling.sample(model, c2, S.calibration_rng(c2.sweep.calibration_seed), 8, policy=policy, policy_params=pp, labels=labels)
  assert sampling.summarize(st, N)["layer_ratio_run"] == pytest.approx(0.6, abs=1e-12)


def test_per_bucket_search_on_interacting_buckets():
  """Three buckets with different responses, each pushed by the one before it (an early exit at a
  noisy step changes the input of the next): every bucket must still end within tolerance."""
  target, tol = 0.5, 0.01
  slopes = np.array([0.3, 0.8, 1.0])          # bucket 0 barely responds: its a must go far

  def ratios(a):
    r = np.empty(3)
    for b in range(3):
      push = 0.15 * a[b - 1] if b > 0 else 0.0
      r[b] = np.clip(1.0 - slopes[b] * a[b] + push, 0.0, 1.0)
    return r

  calls = []

  def probe(a):
    a = np.asarray(a, np.float64)
    calls.append(a.copy())
    return {"threshold": a.tolist(), "layer_ratio_run": float(ratios(a).mean()),
            "layer_ratio_per_sample": 0.0, "per_bucket": ratios(a).tolist(), "_a": a}

  # Bucket 0 reaches at least 0.7 > target: it stays at a = 1, the others are solved.
  best = T.search_ratio_buckets(probe, target, tol, "layer_ratio_run", "uem", 3)
  assert best["_a"][0] == 1.0 and best["per_bucket"][0] == pytest.approx(0.7)
  assert abs(best["per_bucket"][1] - target) <= tol and abs(best["per_bucket"][2] - target) <= tol
  assert len(calls) <= T.MAX_BUCKET_PROBES and calls[0].tolist() == [1.0, 1.0, 1.0]
  # A reachable bucket 0: all three within tolerance, and the answer is a measured probe.
  slopes[0] = 0.9
  calls.clear()
  best = T.search_ratio_buckets(probe, target, tol, "layer_ratio_run", "uem", 3)
  assert all(abs(v - target) <= tol for v in best["per_bucket"])
  assert any(np.array_equal(best["_a"], a) for a in calls)
  np.testing.assert_allclose(best["per_bucket"], ratios(best["_a"]))
  # No bucket can reach the target: a one-line error with the smallest reachable value.
  with pytest.raises(S.CalibrationError, match=r"below the smallest layer_ratio_run policy uem reaches "
                                               r"in every timestep bucket on this model \(at least 0.100"):
    T.search_ratio_buckets(probe, 0.05, tol, "layer_ratio_run", "uem", 3)


def test_per_bucket_requests_that_cannot_work(model):
  c = _config()
  c.exit.update(target_layer_ratio=0.6, calibration_buckets=5)      # 4 sampling steps
  with pytest.raises(S.CalibrationError, match=r"exit.calibration_buckets=5 exceeds sample.steps=4"):
    _calibrate(model, c)


def test_allocate_levels_spends_the_mse_budget_where_it_saves_most():
  # Two buckets of 4 steps each (full cost 4). Bucket 0 saves 2 for an MSE of 0.1 (ratio 20) or 3
  # for 0.5; bucket 1 saves 1 for 0.02 (ratio 50) or 2 for 0.3.
  costs, mses, full = [[2.0, 1.0], [3.0, 2.0]], [[0.1, 0.5], [0.02, 0.3]], [4.0, 4.0]
  assert T.allocate_levels(costs, mses, 0.01, full) == [-1, -1]   # nothing fits
  assert T.allocate_levels(costs, mses, 0.05, full) == [-1, 0]    # the best ratio first
  assert T.allocate_levels(costs, mses, 0.13, full) == [0, 0]     # then bucket 0's first level
  # 0.12 spent; bucket 1's second level adds 0.28 (ratio 1/0.28 = 3.6), bucket 0's adds 0.4 (2.5).
  assert T.allocate_levels(costs, mses, 0.41, full) == [0, 1]
  assert T.allocate_levels(costs, mses, 1.00, full) == [1, 1]


@pytest.mark.parametrize("floor", [5.0, 99.0])
def test_per_bucket_psnr_floor_is_met(model, floor):
  """exit.calibration_buckets with a PSNR floor: the result is a measured probe that meets it; a
  lenient floor buys real savings, an impossible one leaves full depth."""
  c = _config()
  c.exit.update(min_psnr=floor, calibration_buckets=2)
  thr, report = _calibrate(model, c)
  assert report["method"] == "psnr_floor_per_bucket" and len(thr) == 2
  assert report["achieved"]["psnr_vs_full"] >= floor
  if floor == 5.0:
    assert report["achieved"]["layer_ratio_run"] < 1.0
  else:
    assert report["achieved"]["layer_ratio_run"] == 1.0
