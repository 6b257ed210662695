"""The early-exit while_loop against the all-layers path, hand-computed exits and compile counts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import early_exit as ee
from deediff_jax.config import ConfigError, ExitSpec, base_config
from deediff_jax.model import build, init_params
from deediff_jax.model.deediff import DeeDiffUViT
from deediff_jax.model.exits import UEM

B = 8
TOL = 1e-5


def _model(**over):
  c = base_config().model
  c.update(embed_dim=32, depth=4, num_heads=2, **over)  # 5 blocks, 8x8x1, patch 2, 10 classes
  module = build(c)
  return module, jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))


def _all_exits(module, params, x, t, y=None, ctx=None):
  """(eps_all, u_all) as NumPy, jitted (eager Flax dispatches op by op, which is slow)."""
  f = jax.jit(lambda p, x, t, y, c: module.apply({"params": p}, x, t, y, c, method=DeeDiffUViT.all_exits))
  return tuple(np.asarray(a) for a in f(params, x, t, y, ctx))


@pytest.fixture(scope="module")
def setup():
  module, params = _model()
  cfg = module.cfg
  x = jax.random.normal(jax.random.PRNGKey(1), (B, 8, 8, 1))
  t = jnp.linspace(50.0, 950.0, B)
  y = jnp.arange(B) % 10
  eps_all, u_all = _all_exits(module, params, x, t, y)
  full = jax.jit(lambda p: module.apply({"params": p}, x, t, y))(params)
  return dict(module=module, params=params, cfg=cfg, x=x, t=t, y=y, eps_all=eps_all, u_all=u_all,
              full=np.asarray(full))


@functools.lru_cache(maxsize=None)
def _jitted(fn, cfg, policy, aggregate, cfg_pairs, with_frac):
  """One compiled program per static setting (policy params are traced, so tests reuse it)."""
  def call(p, x, t, y, pp, tf, ctx=None):
    return fn(p, cfg, x, t, y, ctx, policy=policy, policy_params=pp, time_frac=tf if with_frac else None,
              aggregate=aggregate, cfg_pairs=cfg_pairs)
  return jax.jit(call)


def _forward(s, policy, pp, aggregate="all", time_frac=None, y="default", x=None, cfg_pairs=False,
             fn=ee.early_exit_forward):
  yy = s["y"] if isinstance(y, str) else y
  jf = _jitted(fn, s["cfg"], policy, aggregate, cfg_pairs, time_frac is not None)
  eps, st = jf(s["params"], s["x"] if x is None else x, s["t"], yy, pp, time_frac)
  return np.asarray(eps), {k: np.asarray(v) for k, v in st.items()}


def _reference(s, policy, pp, **kw):
  return _forward(s, policy, pp, fn=ee.exit_reference, **kw)


def _first_true(conf):
  """conf [N, B] -> 1-based first True per column (the last layer always exits)."""
  conf = conf.copy()
  conf[-1] = True
  return np.argmax(conf, axis=0) + 1


def _pick(eps_all, exit_layer):
  return eps_all[exit_layer - 1, np.arange(eps_all.shape[1])]


def _midpoints(values, qs):
  """Thresholds halfway between neighbouring observed values (so float rounding cannot flip a
  comparison), at the given quantiles of the sorted values."""
  v = np.unique(np.asarray(values, np.float64))
  return [float((v[j] + v[j + 1]) / 2) for j in sorted({min(int(q * (len(v) - 1)), len(v) - 2) for q in qs})]


def _spread_thresholds(u_all):
  """Thresholds between observed u values at which samples leave at different layers."""
  out = []
  for thr in _midpoints(u_all, [0.1, 0.25, 0.4, 0.55]):
    layers = _first_true(u_all < thr)
    if len(np.unique(layers)) > 1:
      out.append(float(thr))
  assert len(out) >= 2, "random weights gave no threshold with differing exits; change the seed"
  return out


def test_threshold_zero_is_full_depth(setup):
  s = setup
  n = s["cfg"].num_blocks
  eps, st = _forward(s, "uem", ee.make_policy_params(n, threshold=0.0))
  np.testing.assert_allclose(eps, s["full"], atol=TOL)
  assert int(st["layers_run"]) == n
  np.testing.assert_array_equal(st["exit_layer"], np.full(B, n))


@pytest.mark.parametrize("min_layers", [1, 3])
def test_threshold_one_exits_at_first_eligible_layer(setup, min_layers):
  s = setup
  n = s["cfg"].num_blocks
  eps, st = _forward(s, "uem", ee.make_policy_params(n, threshold=1.0, min_layers=min_layers))
  assert int(st["layers_run"]) == min_layers
  np.testing.assert_array_equal(st["exit_layer"], np.full(B, min_layers))
  np.testing.assert_allclose(eps, s["eps_all"][min_layers - 1], atol=TOL)


def test_matches_reference_and_hand_computed_exits(setup):
  s = setup
  n = s["cfg"].num_blocks
  for thr in _spread_thresholds(s["u_all"]):
    for min_layers in (1, 2):
      pp = ee.make_policy_params(n, threshold=thr, min_layers=min_layers)
      eps, st = _forward(s, "uem", pp)
      ref, rst = _reference(s, "uem", pp)
      conf = (s["u_all"] < thr) & (np.arange(1, n + 1)[:, None] >= min_layers)
      expected = _first_true(conf)
      assert len(np.unique(st["exit_layer"])) > 1 or min_layers > 1
      np.testing.assert_array_equal(st["exit_layer"], expected)
      np.testing.assert_array_equal(np.asarray(rst["exit_layer"]), expected)
      assert int(st["layers_run"]) == expected.max() == int(rst["layers_run"])
      np.testing.assert_allclose(eps, np.asarray(ref), atol=TOL)
      np.testing.assert_allclose(eps, _pick(s["eps_all"], expected), atol=TOL)


def test_aggregate_mean(setup):
  s = setup
  n = s["cfg"].num_blocks
  means = s["u_all"].mean(axis=1)
  checked = 0
  for thr in _midpoints(means, np.linspace(0, 1, len(means))[:-1]):  # between consecutive batch means
    layer = int(_first_true((means < thr)[:, None])[0])
    pp = ee.make_policy_params(n, threshold=float(thr))
    eps, st = _forward(s, "uem", pp, aggregate="mean")
    ref, rst = _reference(s, "uem", pp, aggregate="mean")
    np.testing.assert_array_equal(st["exit_layer"], np.full(B, layer))
    assert int(st["layers_run"]) == layer
    np.testing.assert_allclose(eps, s["eps_all"][layer - 1], atol=TOL)
    np.testing.assert_allclose(eps, np.asarray(ref), atol=TOL)
    checked += layer < n
  assert checked >= 1  # at least one threshold exits the batch before the last block


def test_aggregate_last_gives_every_sample_the_deepest_exit(setup):
  # Per-sample decisions as with "all"; the batch stops at the deepest one and every sample
  # takes that block's prediction.
  s = setup
  n = s["cfg"].num_blocks
  u = s["u_all"]                                                    # [N, B]
  checked = 0
  for thr in np.unique(np.quantile(u, [0.3, 0.5, 0.7])):
    deepest = int(_first_true(u < thr).max())
    pp = ee.make_policy_params(n, threshold=float(thr))
    eps, st = _forward(s, "uem", pp, aggregate="last")
    ref, rst = _reference(s, "uem", pp, aggregate="last")
    assert int(st["layers_run"]) == int(rst["layers_run"]) == deepest
    np.testing.assert_array_equal(st["exit_layer"], np.full(B, deepest))
    np.testing.assert_array_equal(rst["exit_layer"], np.full(B, deepest))
    np.testing.assert_allclose(eps, s["eps_all"][deepest - 1], atol=TOL)
    np.testing.assert_allclose(eps, np.asarray(ref), atol=TOL)
    _, st_all = _forward(s, "uem", pp, aggregate="all")              # the same cost as "all"
    assert int(st_all["layers_run"]) == deepest
    checked += deepest < n
  assert checked >= 1


def test_static_depth_equals_head_k(setup):
  s = setup
  n = s["cfg"].num_blocks
  for k in range(1, n + 1):
    eps, st = _forward(s, "static", ee.make_policy_params(n, depth=k))
    assert int(st["layers_run"]) == k
    np.testing.assert_array_equal(st["exit_layer"], np.full(B, k))
    np.testing.assert_allclose(eps, s["eps_all"][k - 1], atol=TOL)


def test_policy_none_runs_full_depth(setup):
  s = setup
  n = s["cfg"].num_blocks
  eps, st = _forward(s, "none", ee.make_policy_params(n, threshold=1.0, depth=1))
  assert int(st["layers_run"]) == n
  np.testing.assert_allclose(eps, s["full"], atol=TOL)


def test_time_schedule_buckets(setup):
  s = setup
  n = s["cfg"].num_blocks
  pp = ee.make_policy_params(n, schedule=[2, 3, 5])
  frac = jnp.asarray([1.0, 0.9, 0.5, 0.2, 0.0, 0.66, 0.7, 0.34])
  # bucket = floor((1 - frac) * 3), clipped: 0, 0, 1, 2, 2, 1, 0, 1 -> depths 2, 2, 3, 5, 5, 3, 2, 3
  expected = np.array([2, 2, 3, 5, 5, 3, 2, 3])
  eps, st = _forward(s, "time_schedule", pp, time_frac=frac)
  np.testing.assert_array_equal(st["exit_layer"], expected)
  assert int(st["layers_run"]) == 5
  np.testing.assert_allclose(eps, _pick(s["eps_all"], expected), atol=TOL)
  # A scalar time_frac (what samplers pass) puts the whole batch in one bucket.
  _, st = _forward(s, "time_schedule", pp, time_frac=jnp.float32(0.95))
  np.testing.assert_array_equal(st["exit_layer"], np.full(B, 2))
  assert int(st["layers_run"]) == 2


def test_state_cosine_hand_computed(setup):
  s = setup
  module, params, n = s["module"], s["params"], s["cfg"].num_blocks
  @jax.jit
  def states(p, x, t, y):
    h0, _ = module.apply({"params": p}, x, t, y, method=DeeDiffUViT.embed)
    return h0, module.apply({"params": p}, h0, method=DeeDiffUViT.hidden_states)
  h0, hs = (np.asarray(a) for a in states(params, s["x"], s["t"], s["y"]))
  prev = np.concatenate([h0[None], hs[:-1]])
  extra = s["cfg"].num_extra_tokens
  a = hs[:, :, extra:].reshape(n, B, -1).astype(np.float64)
  b = prev[:, :, extra:].reshape(n, B, -1).astype(np.float64)
  cos = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))   # [N, B]
  layers = np.arange(1, n + 1)[:, None]
  differing = 0
  for thr in _midpoints(cos[1:], [0.2, 0.5, 0.8]):
    expected = _first_true((cos > thr) & (layers > 1))
    assert expected.min() >= 2  # never at layer 1, whatever the threshold
    eps, st = _forward(s, "state_cosine", ee.make_policy_params(n, threshold=float(thr)))
    np.testing.assert_array_equal(st["exit_layer"], expected)
    np.testing.assert_allclose(eps, _pick(s["eps_all"], expected), atol=TOL)
    differing += len(np.unique(expected)) > 1
  assert differing >= 1
  # threshold -1: every layer from 2 on is confident.
  _, st = _forward(s, "state_cosine", ee.make_policy_params(n, threshold=-1.0))
  np.testing.assert_array_equal(st["exit_layer"], np.full(B, 2))


def test_cfg_pairs_share_exit_layer(setup):
  s = setup
  n = s["cfg"].num_blocks
  half = B // 2
  # Rows [0, half) are conditional, [half, B) their null partners.
  y = jnp.concatenate([jnp.arange(half) % 10, jnp.full((half,), 10)])
  x = jnp.concatenate([s["x"][:half], s["x"][:half]])
  eps_all, u_all = _all_exits(s["module"], s["params"], x, s["t"], y)
  for thr in _spread_thresholds(u_all):
    pp = ee.make_policy_params(n, threshold=thr)
    eps, st = _forward(s, "uem", pp, y=y, x=x, cfg_pairs=True)
    both = (u_all[:, :half] < thr) & (u_all[:, half:] < thr)
    expected = np.concatenate([_first_true(both)] * 2)
    np.testing.assert_array_equal(st["exit_layer"], expected)
    np.testing.assert_array_equal(st["exit_layer"][:half], st["exit_layer"][half:])
    np.testing.assert_allclose(eps, _pick(np.asarray(eps_all), expected), atol=TOL)
    ref, rst = _reference(s, "uem", pp, y=y, x=x, cfg_pairs=True)
    np.testing.assert_allclose(eps, np.asarray(ref), atol=TOL)


def test_thresholds_and_depths_do_not_recompile(setup):
  s = setup
  n = s["cfg"].num_blocks
  traces = {"count": 0}

  def f(p, x, t, y, pp):
    traces["count"] += 1  # Python side effect: runs once per trace, never per call
    return ee.early_exit_forward(p, s["cfg"], x, t, y, policy="uem", policy_params=pp)
  jf = jax.jit(f)
  layers = set()
  for thr in (0.0, 0.3, 0.45, 0.5, 0.6, 1.0):
    for ml in (1, 2):
      _, st = jf(s["params"], s["x"], s["t"], s["y"], ee.make_policy_params(n, threshold=thr, min_layers=ml))
      layers.add(int(st["layers_run"]))
  assert traces["count"] == 1 and jf._cache_size() == 1
  assert len(layers) > 2  # the settings really changed what ran

  static = jax.jit(lambda p, pp: ee.early_exit_forward(p, s["cfg"], s["x"], s["t"], s["y"], policy="static",
                                                         policy_params=pp))
  for d in range(1, n + 1):
    assert int(static(s["params"], ee.make_policy_params(n, depth=d))[1]["layers_run"]) == d
  assert static._cache_size() == 1


def test_text_context_model_with_uem_no_time():
  # One extra model covers two paths: text context tokens and the time-free UEM policy.
  module, params = _model(num_classes=0, context_dim=12, context_len=3, uem="token_linear_no_time")
  cfg = module.cfg
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 8, 8, 1))
  ctx = jax.random.normal(jax.random.PRNGKey(4), (B, 3, 12))
  t = jnp.full((B,), 400.0)
  eps_all, u_all = _all_exits(module, params, x, t, None, ctx)
  thr = _spread_thresholds(u_all)[0]
  pp = ee.make_policy_params(cfg.num_blocks, threshold=thr)
  eps, st = jax.jit(lambda p: ee.early_exit_forward(p, cfg, x, t, None, ctx, policy="uem_no_time",
                                                    policy_params=pp))(params)
  expected = _first_true(u_all < thr)
  assert len(np.unique(expected)) > 1
  np.testing.assert_array_equal(np.asarray(st["exit_layer"]), expected)
  np.testing.assert_allclose(np.asarray(eps), _pick(eps_all, expected), atol=TOL)


def test_exit_spec_and_errors(setup):
  s = setup
  n = s["cfg"].num_blocks
  c = base_config()
  c.model.update(embed_dim=32, depth=4, num_heads=2)
  c.exit.update(policy="time_schedule", schedule="2,3,5", min_layers=2, threshold=0.25)
  spec = ExitSpec.from_config(c, n)
  assert spec.schedule == (2, 3, 5) and spec.min_layers == 2
  name, pp = ee.exit_params(spec, n)
  assert name == "time_schedule"
  np.testing.assert_array_equal(np.asarray(pp["schedule"]), [2, 3, 5])
  # Each policy reads only its own value: a time_schedule carries no threshold.
  assert int(pp["min_layers"]) == 2 and float(pp["threshold"]) == 0.0
  assert int(pp["depth"]) == n  # depth 0 means all blocks
  c.exit.schedule = "2,9"
  with pytest.raises(ConfigError, match="depth 9 is outside"):
    ExitSpec.from_config(c, n)
  with pytest.raises(ValueError, match="uem_no_time' needs a model built with model.uem=token_linear_no_time"):
    ee.early_exit_forward(s["params"], s["cfg"], s["x"], s["t"], s["y"], policy="uem_no_time",
                          policy_params=ee.make_policy_params(n))
  with pytest.raises(ValueError, match="unknown exit policy 'fast'"):
    ee.early_exit_forward(s["params"], s["cfg"], s["x"], s["t"], s["y"], policy="fast",
                          policy_params=ee.make_policy_params(n))
  with pytest.raises(ValueError, match="needs time_frac"):
    ee.early_exit_forward(s["params"], s["cfg"], s["x"], s["t"], s["y"], policy="time_schedule",
                          policy_params=ee.make_policy_params(n))


@pytest.mark.parametrize("kind", ["token_linear", "token_linear_no_time", "attention_probe"])
def test_uem_scores_equal_uem_module(kind):
  c = base_config().model
  c.update(embed_dim=32, depth=2, num_heads=2, uem=kind)
  cfg = build(c).cfg
  h = jax.random.normal(jax.random.PRNGKey(1), (B, cfg.num_tokens, 32))
  temb = jax.random.normal(jax.random.PRNGKey(2), (B, 32))
  p = jax.jit(lambda r: UEM(cfg).init(r, h, temb)["params"])(jax.random.PRNGKey(3))
  p = jax.tree_util.tree_map(lambda a: a + 0.3, p)  # non-zero bias too
  fast, ref = jax.jit(lambda p: (ee.uem_scores(cfg, p, h, temb), UEM(cfg).apply({"params": p}, h, temb)))(p)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-6)


def test_threshold_per_timestep_bucket(setup):
  s = setup
  n = s["cfg"].num_blocks
  thr = _spread_thresholds(s["u_all"])[0]
  pp = ee.make_policy_params(n, threshold=[1.0, thr, 0.0])  # noisiest bucket first
  frac = jnp.asarray([1.0, 0.5, 0.1, 0.9, 0.4, 0.0, 0.8, 0.6])
  # buckets floor((1 - f) * 3): 0, 1, 2, 0, 1, 2, 0, 1
  per_sample_thr = np.array([1.0, thr, 0.0, 1.0, thr, 0.0, 1.0, thr])
  expected = _first_true(s["u_all"] < per_sample_thr[None])
  np.testing.assert_array_equal(expected[[0, 2, 3, 5, 6]], [1, n, 1, n, 1])
  eps, st = _forward(s, "uem", pp, time_frac=frac)
  np.testing.assert_array_equal(st["exit_layer"], expected)
  np.testing.assert_allclose(eps, _pick(s["eps_all"], expected), atol=TOL)
  ref, rst = _reference(s, "uem", pp, time_frac=frac)
  np.testing.assert_allclose(eps, ref, atol=TOL)


def test_input_skip_model_matches_reference():
  """With input_skip the loop hands x_t to whichever head it applies, exactly like all_exits."""
  module, params = _model(input_skip=True)
  cfg = module.cfg
  x = jax.random.normal(jax.random.PRNGKey(3), (B, 8, 8, 1))
  t = jnp.linspace(50.0, 950.0, B)
  y = jnp.arange(B) % 10
  eps_all, u_all = _all_exits(module, params, x, t, y)
  s = dict(params=params, cfg=cfg, x=x, t=t, y=y)
  for thr in _spread_thresholds(u_all):
    pp = ee.make_policy_params(cfg.num_blocks, threshold=thr)
    eps, st = _forward(s, "uem", pp)
    layers = _first_true(u_all < thr)
    np.testing.assert_array_equal(st["exit_layer"], layers)
    np.testing.assert_allclose(eps, _pick(eps_all, layers), atol=TOL)
