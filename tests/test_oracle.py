"""The oracle exit policy on a hand-set model (every exit's eps known exactly), `oracle_exits` on
hand-made arrays, and the oracle-calibrated time_schedule's rules (`calibrate.schedule_from_exits`,
`schedule_ratio`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import sampling
from deediff_jax import early_exit as ee
from deediff_jax.config import base_config
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import make_schedule
from deediff_jax.eval.calibration import time_schedule as cal
from deediff_jax.model import build, init_params
from deediff_jax.policies.oracle import oracle_exits

N = 5          # depth 4 -> 5 blocks


@pytest.fixture(scope="module")
def model():
  # input_skip: every head's 3x3 conv also reads the noisy input x, so a hand-set conv gives
  # eps_i = a_i x + c_i exactly, whatever the blocks compute.
  c = base_config().model
  c.update(embed_dim=32, depth=4, num_heads=2, input_skip=True)
  module = build(c)
  # All-zero parameters of the right shapes (no init to compile): the blocks do not matter here,
  # `hand_set` gives the heads their outputs.
  params = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                  jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0))))
  cfg = module.cfg

  def forward(p, x, t, y, pp, x0_scale, guidance_scale=None):
    return ee.early_exit_forward(p, cfg, x, t, y, policy="oracle", policy_params=pp, x0_scale=x0_scale,
                                 cfg_pairs=guidance_scale is not None, guidance_scale=guidance_scale)
  return dict(cfg=cfg, params=params, forward=jax.jit(forward), forward_cfg=jax.jit(
      lambda p, x, t, y, pp, s, g: forward(p, x, t, y, pp, s, g)))


def hand_set(params, a, c):
  """Params whose exit i (1-based) predicts eps_i = a[i-1] * x + c[i-1]: each head's conv reads only
  the centre tap of its x channel (channel 1 of [prediction, x]), plus a bias."""
  a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
  p = jax.tree_util.tree_map(np.asarray, params)
  k = np.zeros_like(p["exit_heads"]["final_layer"]["kernel"])   # [N-1, 3, 3, 2, 1]
  k[:, 1, 1, 1, 0] = a[:-1]
  p["exit_heads"]["final_layer"] = {"kernel": k, "bias": c[:-1, None]}
  k = np.zeros_like(p["head"]["final_layer"]["kernel"])         # [3, 3, 2, 1]
  k[1, 1, 1, 0] = a[-1]
  p["head"]["final_layer"] = {"kernel": k, "bias": c[-1:]}
  return p


def _run(model, p, x, pp, x0_scale):
  b = x.shape[0]
  eps, st = model["forward"](p, x, jnp.full((b,), 500.0), jnp.arange(b) % 10, pp, jnp.asarray(x0_scale))
  return np.asarray(eps), {k: np.asarray(v) for k, v in st.items()}


def test_hand_set_model_picks_hand_computed_layers(model):
  # eps_i = c_i everywhere, c_N = 0: sample b's x0 distance to the final layer is s_b * c_i.
  c = [4.0, 2.0, 1.0, 0.5, 0.0]
  p = hand_set(model["params"], [0.0] * N, c)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
  s = [0.1, 0.4, 1.0, 2.0, 100.0]
  # tolerance 1.1: 0.1 * 4 = 0.4 -> layer 1; 0.4 * 4 = 1.6 > 1.1, 0.4 * 2 = 0.8 -> 2;
  # 1 * 2 = 2 > 1.1, 1 * 1 = 1 -> 3; 2 * 1 = 2 > 1.1, 2 * 0.5 = 1 -> 4; 100 * 0.5 = 50 -> only 5.
  pp = ee.policy_params_for("oracle", N, threshold=1.1)
  eps, st = _run(model, p, x, pp, s)
  np.testing.assert_array_equal(st["exit_layer"], [1, 2, 3, 4, 5])
  assert st["layers_run"] == 5
  for b, layer in enumerate([1, 2, 3, 4, 5]):
    np.testing.assert_array_equal(eps[b], np.full((8, 8, 1), c[layer - 1], np.float32))
  # min_layers = 3 lifts the earlier exits to 3; the per-sample scale is what decides.
  _, st = _run(model, p, x, ee.policy_params_for("oracle", N, threshold=1.1, min_layers=3), s)
  np.testing.assert_array_equal(st["exit_layer"], [3, 3, 3, 4, 5])
  # A huge tolerance: every sample at layer 1, and the loop would have run 1 block.
  _, st = _run(model, p, x, ee.policy_params_for("oracle", N, threshold=1e9), s)
  np.testing.assert_array_equal(st["exit_layer"], [1] * 5)
  assert st["layers_run"] == 1
  # Tolerance 0: only the final layer (distance exactly 0) qualifies.
  _, st = _run(model, p, x, ee.policy_params_for("oracle", N, threshold=0.0), s)
  np.testing.assert_array_equal(st["exit_layer"], [N] * 5)


def test_distance_is_rms_of_x0_error_not_mean_abs(model):
  # eps_i = a_i x with x = 0 on half the pixels and 2 on the rest; a_N = 0. For a_i = 1 the x0
  # error is 2 on half the pixels: RMS sqrt(2) = 1.414, mean |.| 1.
  a = [1.0, 1.0, 0.5, 0.5, 0.0]
  p = hand_set(model["params"], a, [0.0] * N)
  x = np.zeros((5, 8, 8, 1), np.float32)
  x[:, :, 4:] = 2.0
  s = [1.0, 0.5, 0.8, 2.0, 0.01]
  eps, st = _run(model, p, jnp.asarray(x), ee.policy_params_for("oracle", N, threshold=1.2), s)
  # RMS distances per layer: s * sqrt(2) * (1, 1, .5, .5, 0). Scale 1: 1.41, 1.41, .71 -> layer 3;
  # .5: .71 -> 1; .8: 1.13 -> 1; 2: 2.83, 2.83, 1.41, 1.41 -> 5; .01 -> 1.
  np.testing.assert_array_equal(st["exit_layer"], [3, 1, 1, 5, 1])
  assert st["layers_run"] == 5
  for b, layer in enumerate([3, 1, 1, 5, 1]):
    np.testing.assert_array_equal(eps[b], a[layer - 1] * x[b])
  # Tolerance 1.0 separates RMS from mean |.|: scale .8 gives RMS 1.13 (out) but mean |.| .8 (in).
  _, st = _run(model, p, jnp.asarray(x), ee.policy_params_for("oracle", N, threshold=1.0), s)
  np.testing.assert_array_equal(st["exit_layer"], [3, 1, 3, 5, 1])


def test_cfg_pairs_decide_on_the_guided_prediction(model):
  # eps_i = a_i x, a_N = 0, constant images: cond rows v_c, null rows v_u. The guided prediction
  # (1 + g) eps_c - g eps_u = a_i G with G = (1 + g) v_c - g v_u; its distance to the final (0) is
  # |a_i G| (x0_scale 1).
  a = [1.0, 0.5, 0.25, 0.125, 0.0]
  p = hand_set(model["params"], a, [0.0] * N)
  v_c, v_u = np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, -1.0])
  x = jnp.asarray(np.concatenate([v_c, v_u])[:, None, None, None] * np.ones((6, 8, 8, 1)), jnp.float32)
  t = jnp.full((6,), 500.0)
  y = jnp.array([1, 2, 3, 10, 10, 10])
  pp = ee.policy_params_for("oracle", N, threshold=0.3)

  def run(g):
    eps, st = model["forward_cfg"](p, x, t, y, pp, jnp.float32(1.0), jnp.float32(g))
    return np.asarray(eps), {k: np.asarray(v) for k, v in st.items()}

  # g = 1: G = 1 -> 1, .5, .25 -> layer 3; G = 0 -> layer 1; G = 3 -> 3, 1.5, .75, .375 -> layer 5.
  # Deciding on each row instead (a row exits when both rows of its pair do) would give 3, 4, 3.
  eps, st = run(1.0)
  np.testing.assert_array_equal(st["exit_layer"], [3, 1, 5, 3, 1, 5])
  assert st["layers_run"] == 5
  # Each row returns its own prediction at the pair's layer (the sampler then guides them).
  want = np.array([a[l - 1] for l in (3, 1, 5, 3, 1, 5)]) * np.concatenate([v_c, v_u])
  np.testing.assert_array_equal(eps[:, 0, 0, 0], want.astype(np.float32))
  # g = 0: the conditional prediction alone decides: G = 1 for every pair -> layer 3.
  _, st = run(0.0)
  np.testing.assert_array_equal(st["exit_layer"], [3] * 6)


def test_oracle_needs_x0_scale_and_guidance(model):
  cfg, params = model["cfg"], model["params"]
  x = jnp.zeros((2, 8, 8, 1))
  pp = ee.policy_params_for("oracle", N, threshold=0.1)
  with pytest.raises(ValueError) as e:
    ee.early_exit_forward(params, cfg, x, jnp.zeros((2,)), policy="oracle", policy_params=pp)
  assert str(e.value) == ("exit policy 'oracle' needs x0_scale (sigma/alpha of the step); sample through "
                          "deediff_jax.diffusion.samplers, which passes it")
  # (Traced abstractly: the check comes after the all-exits forward. Under a transform JAX
  # appends a note on its traceback filtering to the message, hence the first line.)
  with pytest.raises(ValueError) as e:
    jax.eval_shape(lambda: ee.early_exit_forward(params, cfg, x, jnp.zeros((2,)), policy="oracle",
                                                 policy_params=pp, x0_scale=1.0, cfg_pairs=True))
  assert str(e.value).splitlines()[0] == "exit policy 'oracle' with cfg_pairs needs guidance_scale"
  eps_fn = sampling.make_eps_fn(params, cfg, "oracle", pp, y=jnp.zeros((2,), jnp.int32))
  with pytest.raises(samplers.SamplerError) as e:
    eps_fn(x, jnp.float32(500.0), jnp.float32(0.5))
  assert str(e.value) == "exit policy 'oracle' needs x0_scale_of (samplers.x0_scale_fn(schedule))"


def test_x0_scale_fn_is_sigma_over_alpha():
  sched = make_schedule("linear", 1000)
  ab = np.asarray(sched.alphas_cumprod, np.float64)
  frac = np.array([1.0, 0.5, 0.0], np.float32)                 # t = 999, 500 (rounded), 0
  want = np.sqrt((1.0 - ab[[999, 500, 0]]) / ab[[999, 500, 0]])
  np.testing.assert_allclose(np.asarray(samplers.x0_scale_fn(sched)(frac)), want, rtol=1e-5)


def test_oracle_exits_on_hand_made_arrays():
  # N = 4 layers, B = 3 samples, 1x2x1 images. Sample 1 is shifted by +10 in every layer: only the
  # distance to its own last layer counts.
  layers = np.array([
      [[1, 7], [0, 2], [0, 1], [0, 0]],     # RMS to the last: 5, sqrt(2), sqrt(.5), 0
      [[.5, .5], [2, 2], [0, 0], [0, 0]],   # .5, 2, 0, 0
      [[3, 3], [3, 3], [3, 3], [0, 0]],     # 3, 3, 3, 0
  ], np.float32)
  layers[1] += 10.0
  eps_all = jnp.asarray(layers.transpose(1, 0, 2)[:, :, None, :, None])   # [N, B, 1, 2, 1]
  scale = jnp.array([1.0, 1.0, 0.1])
  first = lambda tol, m=1, s=scale: np.asarray(oracle_exits(eps_all, s, tol, m)).tolist()
  # tolerance 1.2: sqrt(2) = 1.41 is out (its mean |.| of 1 would be in) -> 0-based 2; .5 -> 0;
  # 0.1 * 3 = .3 -> 0.
  assert first(1.2) == [2, 0, 0]
  assert first(1.2, 2) == [2, 2, 1]          # min_layers 2: no exit at layer 1 (index 0)
  assert first(0.0) == [3, 2, 3]             # exactly equal to the last layer is within 0
  assert first(100.0, 4) == [3, 3, 3]
  assert first(1.2, 1, 2.0) == [3, 0, 3]     # a scalar scale: 2 * .707 = 1.41 > 1.2; 2 * .5 = 1
  # The last layer always qualifies, even when nothing is within the tolerance.
  assert first(-1.0) == [3, 3, 3]


def test_schedule_from_exits_and_ratio():
  # 4 steps x 5 samples; steps 0, 1 in bucket 0, step 2 in bucket 1, step 3 in bucket 2, bucket 3 empty.
  el = np.array([[1, 1, 1, 1, 1],
                 [1, 1, 1, 2, 5],
                 [3, 3, 3, 3, 3],
                 [1, 2, 3, 4, 5]])
  buckets = np.array([0, 0, 1, 2])
  # Bucket 0: sorted [1 x 8, 2, 5]; the 0.9 quantile at position 8.1 is 2 + 0.1 * 3 = 2.3 -> 3.
  # Bucket 1: exactly 3 stays 3. Bucket 2: [1..5] at position 3.6 -> 4.6 -> 5. Bucket 3: no exits,
  # the deepest exit seen (5).
  assert cal.schedule_from_exits(el, buckets, 4) == [3, 3, 5, 5]
  assert cal.schedule_from_exits(el, buckets, 4, quantile=0.5) == [1, 3, 3, 5]
  # The ratio weights buckets by their steps: depths 3, 3, 3, 5 over 4 steps of 5 blocks.
  assert cal.schedule_ratio([3, 3, 5, 5], buckets, 5) == pytest.approx(14 / 20, rel=1e-12)
  assert cal.schedule_ratio([5, 1, 1, 1], buckets, 5) == pytest.approx(12 / 20, rel=1e-12)
