"""Learning-to-Cache (deediff_jax/caching.py, train/router.py) and `dpm_solver_2s`.

The parity reference is a PyTorch rendering of the official dynamic U-ViT
(horseee/learning-to-cache U-ViT/libs/uvit_dynamic.py: blocks that return their two residual
updates and add cached ones, separate conditional/unconditional caches, the reset rule keyed on
the call counter, `load_ranking`) driving the official singlestep DPM-Solver++ order 2 with two
network calls per evaluation (sample_ldm_discrete.py's cfg_nnet), written here from that
description on top of tests/torch_uvit.py.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax import caching, sampling
from deediff_jax.config import base_config, validate
from deediff_jax.diffusion import samplers
from deediff_jax.diffusion.schedule import discrete_betas, make_schedule
from deediff_jax.early_exit import early_exit_forward, make_policy_params
from deediff_jax.model.deediff import DeeDiffUViT, build, init_params
from deediff_jax.model.uvit import Block, Head, ModelConfig

sys.path.insert(0, os.path.dirname(__file__))

N_T = 1000


# ----------------------------------------------------------------------------- the sampler's times

def test_dpm_solver_2s_calls_the_network_at_t_times_n():
  """Discrete schedules: evaluations at t * N on t = linspace(1, 1/N, NFE/2 + 1) and at the
  intermediate inverse_lambda(lambda_s + h/2), in that order; time_frac = (t N - 1)/(N - 1)."""
  sched = make_schedule("linear", N_T)
  seen = []

  def eps_fn(x, t_model, time_frac):
    jax.debug.callback(lambda t, f: seen.append((float(t), float(f))), t_model, time_frac, ordered=True)
    return jnp.zeros_like(x), {"exit_layer": jnp.ones((x.shape[0],), jnp.int32), "layers_run": jnp.int32(1)}

  jax.block_until_ready(samplers.run_sampler("dpm_solver_2s", eps_fn, sched, 6, jnp.ones((1, 2, 2, 1)), None))
  jax.effects_barrier()
  g = samplers.dpm_solver_2s_grid(sched, 6)
  got = np.array([float(t) for t, _ in seen])
  np.testing.assert_allclose(got, np.stack([g["t_model_s"], g["t_model_s1"]], 1).reshape(-1), rtol=1e-6)
  np.testing.assert_allclose(g["t"], np.linspace(1, 1 / N_T, 4))
  np.testing.assert_allclose(g["t_model_s"], np.linspace(1, 1 / N_T, 4)[:-1] * N_T)
  np.testing.assert_allclose(g["t_model_s1"], g["s1"] * N_T)
  assert np.all((g["s1"] < g["t"][:-1]) & (g["s1"] > g["t"][1:]))
  lam = lambda t: np.interp(t, np.arange(1, N_T + 1) / N_T, 0.5 * np.log(np.asarray(sched.alphas_cumprod, np.float64)))
  la = lam(g["s1"])
  np.testing.assert_allclose(la - 0.5 * np.log(-np.expm1(2 * la)), g["lam"][:-1] + (g["lam"][1:] - g["lam"][:-1]) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(g["time_frac_s"], (g["t_model_s"] - 1) / (N_T - 1))
  np.testing.assert_allclose([f for _, f in seen][::2], g["time_frac_s"], rtol=1e-6)
  with pytest.raises(samplers.SamplerError, match="even"):
    samplers.dpm_solver_2s_grid(sched, 5)


def test_dpm_solver_2s_solves_the_gaussian_ode():
  """On Gaussian data the exact noise predictor makes the ODE solution closed form: 2S converges
  to it at second order (the exact update formulas are checked against torch below)."""
  from test_dpm_solver_fast import MU, S, alpha_sigma_np, make_eps_fn
  sched = make_schedule("stable", N_T)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (256, 2, 2, 1)), np.float64)
  a1, s1 = alpha_sigma_np("stable", N_T, 1.0)
  a0, s0 = alpha_sigma_np("stable", N_T, 1.0 / N_T)
  # Probability-flow map between Gaussian marginals N(a mu, a^2 S^2 + s^2).
  target = a0 * MU + (x - a1 * MU) * np.sqrt((a0 ** 2 * S ** 2 + s0 ** 2) / (a1 ** 2 * S ** 2 + s1 ** 2))
  errs = []
  eps_fn = make_eps_fn("stable")
  for nfe in (10, 50):
    out, _ = jax.jit(lambda x: samplers.run_sampler("dpm_solver_2s", eps_fn, sched, nfe, x, None))(
        jnp.asarray(x, jnp.float32))
    errs.append(np.max(np.abs(np.asarray(out) - target)))
  assert errs[1] < 0.06 and errs[1] < errs[0] / 5   # second order (dpm_solver_fast at 50: 0.03)


# ----------------------------------------------------------------------------- router files

def _official_router_file(path, probs):
  """A real torch.save of the official `torch.nn.ModuleList([Router(2N) ...]).state_dict()`."""
  torch = pytest.importorskip("torch")

  class Router(torch.nn.Module):
    def __init__(self, num):
      super().__init__()
      self.prob = torch.nn.Parameter(torch.randn(num))

    def forward(self, x=None):
      return torch.sigmoid(self.prob)

  routers = torch.nn.ModuleList([Router(probs.shape[1]) for _ in range(probs.shape[0])])
  with torch.no_grad():
    for r, p in zip(routers, probs):
      r.prob.copy_(torch.from_numpy(np.asarray(p, np.float32)))
  torch.save(routers.state_dict(), path)
  return routers


def _official_rank(routers, nfe, thres):
  """load_ranking's loop: rank[idx] = indices of scores > thres for idx in 1 .. nfe//2 - 1."""
  rank = [None] * nfe
  for idx, router in enumerate(routers[:nfe // 2]):
    if idx != 0:
      rank[idx] = (router() > thres).float().nonzero().squeeze(0)
  return rank


def test_reuse_schedule_matches_official_load_ranking(tmp_path):
  torch = pytest.importorskip("torch")
  nfe, n = 8, 3
  probs = np.zeros((nfe, 2 * n), np.float32)
  probs[1] = [3, -3, 0.1, -0.1, 5, -5]       # scores .95 .05 .52 .48 .99 .007
  probs[2] = [-3, -3, -3, -3, -3, -3]
  probs[3] = [4, 4, 4, 4, 4, 4]
  probs[5] = [-9, -9, -9, -9, -9, -9]         # row 5 > nfe/2 - 1: never read
  path = str(tmp_path / "dpm8_router.pth")
  routers = _official_router_file(path, probs)
  scores = caching.load_router(path)
  assert scores.dtype == np.float32 and scores.shape == (nfe, 2 * n)
  with torch.no_grad():
    np.testing.assert_array_equal(scores, np.stack([r().numpy() for r in routers]))
  for thr in (0.0, 0.5, 0.9, 1.5):
    reuse = caching.reuse_schedule(scores, thr, nfe // 2)
    rank = _official_rank(routers, nfe, thr)
    want = np.zeros((nfe // 2, n, 2), bool)
    for k in range(1, nfe // 2):
      for l in range(2 * n):
        want[k, l // 2, l % 2] = not bool(l in rank[k])   # the official membership test
    np.testing.assert_array_equal(reuse, want, err_msg=f"threshold {thr}")
  by_hand = caching.reuse_schedule(scores, 0.5, 4)
  np.testing.assert_array_equal(by_hand[1], [[False, True], [False, True], [False, True]])
  assert by_hand[2].all() and not by_hand[3].any() and not by_hand[0].any()
  # The public names and the converter CLI: the official file as our npz, same decisions.
  from deediff_jax.convert import l2c
  assert l2c.main([path, str(tmp_path / "conv.npz"), "--steps", str(nfe)]) == 0
  np.testing.assert_array_equal(l2c.load_router(tmp_path / "conv.npz"), scores)
  # Our npz round-trips and needs no torch; the wrong step count or size is one line.
  caching.save_router(tmp_path / "r.npz", probs, sampler="dpm_solver_2s", steps=nfe, num_blocks=n)
  r = caching.read_router(tmp_path / "r.npz")
  np.testing.assert_array_equal(r.scores, scores)
  assert (r.sampler, r.steps) == ("dpm_solver_2s", nfe)
  with pytest.raises(caching.CacheError, match="needs 10"):
    caching.reuse_schedule(scores, 0.5, 5)
  with pytest.raises(caching.CacheError, match="blocks"):
    caching.check_router(r, num_blocks=5, sampler="dpm_solver_2s", steps=nfe)
  with pytest.raises(caching.CacheError, match="sample.sampler=dpm_solver_2s"):
    caching.check_router(r, num_blocks=n, sampler="ddim", steps=nfe)
  with pytest.raises(caching.CacheError, match="sample.steps=8"):
    caching.check_router(r, num_blocks=n, sampler="dpm_solver_2s", steps=10)


def test_ddim_schedule_alternates_as_the_dit_version():
  s = np.full((5, 4), 0.1, np.float32)   # 5 steps, 2 blocks: everything below the threshold
  reuse = caching.reuse_schedule(s, 0.5, 5, "ddim")
  # step j reuses iff j >= 1 and 4 - j is even: j = 2, 4 (rows 2 and 0)
  assert [bool(reuse[j].any()) for j in range(5)] == [False, False, True, False, True]


# ----------------------------------------------------------------------------- torch reference

def _torch_dynamic_uvit(**kw):
  torch = pytest.importorskip("torch")
  import torch_uvit

  class DynBlock(torch_uvit.Block):
    def forward(self, x, skip=None, reuse_att=None, reuse_mlp=None):
      if self.skip_linear is not None:
        x = self.skip_linear(torch.cat([x, skip], dim=-1))
      a = reuse_att if reuse_att is not None else self.attn(self.norm1(x))
      x = x + a
      m = reuse_mlp if reuse_mlp is not None else self.mlp(self.norm2(x))
      return x + m, (a, m)

  class DynUViT(torch_uvit.UViT):
    def __init__(self, **kw):
      super().__init__(**kw)
      d = dict(dim=kw["embed_dim"], num_heads=kw["num_heads"])
      depth = kw["depth"]
      self.in_blocks = torch.nn.ModuleList([DynBlock(**d) for _ in range(depth // 2)])
      self.mid_block = DynBlock(**d)
      self.out_blocks = torch.nn.ModuleList([DynBlock(**d, skip=True) for _ in range(depth // 2)])
      self.depth = depth + 1
      self.reset()

    def reset(self):
      self.cur_step_idx = 0
      self.cond_cache = [None] * self.depth
      self.uncond_cache = [None] * self.depth

    def load_ranking(self, path, num_steps, timestep_map, thres):
      sd = torch.load(path, map_location="cpu", weights_only=True)
      scores = [torch.sigmoid(sd[f"{k}.prob"]) for k in range(num_steps)]
      self.rank = [None] * num_steps
      for idx in range(1, num_steps // 2):
        self.rank[idx] = (scores[idx] > thres).float().nonzero().squeeze(0)
      self.timestep_map = {t: i for i, t in enumerate(timestep_map)}

    def forward(self, x, timesteps, y=None):
      x, l = self.embed(x, timesteps, y)
      if self.cur_step_idx % 4 == 2:
        self.cond_cache = [None] * self.depth
        self.uncond_cache = [None] * self.depth
      cache = self.cond_cache if self.cur_step_idx % 2 == 0 else self.uncond_cache
      key = round(timesteps[0].item())
      router_idx = self.timestep_map.get(key)

      def run(i, blk, x, skip=None):
        ra = rm = None
        if cache[i] is not None:
          if 2 * i not in self.rank[router_idx]:
            ra = cache[i][0]
          if 2 * i + 1 not in self.rank[router_idx]:
            rm = cache[i][1]
        x, cache[i] = blk(x, skip, reuse_att=ra, reuse_mlp=rm)
        return x

      skips, i = [], 0
      for blk in self.in_blocks:
        x = run(i, blk, x)
        skips.append(x)
        i += 1
      x = run(i, self.mid_block, x)
      i += 1
      for blk in self.out_blocks:
        x = run(i, blk, x, skips.pop())
        i += 1
      self.cur_step_idx += 1
      return self.output_forward(x, l)

  return DynUViT(**kw)


def _torch_dpm2s(model, x, y, null, scale, nfe, betas):
  """sample_ldm_discrete.py: model_fn(x, t) = cfg_nnet(x, t * N); DPM_Solver(..., predict_x0=True)
  .sample(x, steps=nfe, eps=1/N, T=1, order=2, method='singlestep')."""
  import torch
  n = len(betas)
  knots_t = torch.linspace(1.0 / n, 1.0, n)
  knots_la = 0.5 * torch.cumsum(torch.log(1 - torch.tensor(betas).float()), 0)

  def interp(v, xp, fp):
    k = torch.clamp(torch.searchsorted(xp, v.reshape(1)), 1, len(xp) - 1)[0]
    return fp[k - 1] + (v - xp[k - 1]) * (fp[k] - fp[k - 1]) / (xp[k] - xp[k - 1])

  log_alpha = lambda t: interp(t, knots_t, knots_la)
  sigma = lambda t: torch.sqrt(1 - torch.exp(2 * log_alpha(t)))
  lam = lambda t: log_alpha(t) - torch.log(sigma(t))

  def inv_lam(l):
    la = -0.5 * torch.logaddexp(torch.zeros_like(l), -2 * l)
    return interp(la, torch.flip(knots_la, [0]), torch.flip(knots_t, [0]))

  def cfg_nnet(x, t):
    tt = torch.full((x.shape[0],), float(t * n))
    cond = model(x, tt, y=y)
    unc = model(x, tt, y=null)
    return cond + scale * (cond - unc)

  def x0_of(x, t):
    return (x - sigma(t) * cfg_nnet(x, t)) / torch.exp(log_alpha(t))

  ts = torch.linspace(1.0, 1.0 / n, nfe // 2 + 1)
  for i in range(nfe // 2):
    s, t = ts[i], ts[i + 1]
    h = lam(t) - lam(s)
    r1 = 0.5
    s1 = inv_lam(lam(s) + r1 * h)
    xs0 = x0_of(x, s)
    u = sigma(s1) / sigma(s) * x - torch.exp(log_alpha(s1)) * torch.expm1(-r1 * h) * xs0
    x01 = x0_of(u, s1)
    at = torch.exp(log_alpha(t))
    x = sigma(t) / sigma(s) * x - at * torch.expm1(-h) * xs0 - (0.5 / r1) * at * torch.expm1(-h) * (x01 - xs0)
  return x, ts


def test_cached_sampler_matches_official_dynamic_uvit(tmp_path):
  """CFG (two calls per evaluation in the reference, one doubled batch here), NFE 10, thresholds
  0 (nothing reused), 0.5 and 1.5 (everything the rule allows is reused): <= 1e-4 relative."""
  torch = pytest.importorskip("torch")
  import torch_uvit
  from deediff_jax.convert import uvit as cu
  tk = dict(img_size=8, patch_size=2, in_chans=2, embed_dim=32, depth=4, num_heads=4, num_classes=5)
  model = torch_uvit.randomize_(_torch_dynamic_uvit(**tk), seed=3).eval()
  n_blocks, nfe, scale, batch = 5, 10, 0.7, 3   # NFE 10: no grid time t*N ends in .5 (rounding ties)
  c = base_config()
  c.model.update(image_size=8, in_channels=2, embed_dim=32, depth=4, num_heads=4, patch_size=2, num_classes=4)
  c.data.update(image_size=8, channels=2, latent=True)
  c.diffusion.schedule = "stable"
  c.exit.policy = "none"
  c.sample.update(sampler="dpm_solver_2s", steps=nfe, batch_size=batch, guidance_scale=scale)
  probs = np.random.default_rng(0).normal(size=(nfe, 2 * n_blocks)).astype(np.float32) * 2
  router = str(tmp_path / "router.pth")
  _official_router_file(router, probs)
  c.cache.update(policy="l2c", router=router)
  validate(c)
  params = cu.convert(torch_uvit.numpy_state_dict(model), c)
  x = np.random.default_rng(1).standard_normal((batch, 8, 8, 2)).astype(np.float32)
  labels = np.array([0, 3, 1])
  betas = discrete_betas("stable", N_T)
  reused = []
  for thr in (0.0, 0.5, 1.5):
    model.load_ranking(router, nfe, np.round(np.linspace(1.0, 1.0 / N_T, nfe // 2 + 1) * N_T), thr)
    model.reset()
    with torch.no_grad():
      ref, _ = _torch_dpm2s(model, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.tensor(labels),
                            torch.tensor([4] * batch), scale, nfe, betas)
    ref = ref.numpy().transpose(0, 2, 3, 1)
    c.cache.threshold = thr
    with jax.default_matmul_precision("highest"):
      out, st = sampling.sample(params, c, jax.random.PRNGKey(0), batch, labels=labels, x_init=x)
    rel = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert rel <= 1e-4, (thr, rel)
    reused.append(int(np.sum(n_blocks - st["att_run"]) + np.sum(n_blocks - st["mlp_run"])))
  assert reused[0] == 0 and reused[-1] == 2 * n_blocks * (nfe // 2 - 1) and 0 < reused[1] < reused[-1]


# ----------------------------------------------------------------------------- cache + exit

@functools.lru_cache(maxsize=None)
def _tiny(depth=4, classes=0):
  """A tiny model with every parameter random (no zero-initialised head hides a mistake)."""
  mc = ModelConfig(image_size=4, in_channels=1, embed_dim=16, depth=depth, num_heads=2, patch_size=2,
                   num_classes=classes)
  params = jax.jit(lambda k: init_params(build(mc), k))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  return mc, jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v) + 0.3 * rng.standard_normal(v.shape),
                                                          jnp.float32), params)


def test_cache_with_exit_equals_hand_trace():
  """Evaluation 1 exits after 2 blocks (static depth 2): blocks 1-2 are cached, 3-5 are not.
  Evaluation 2 (depth 4, every sublayer allowed to reuse): blocks 1-2 add evaluation 1's
  updates, block 3 (not reached before) and block 4 (an out-block) compute, block 5 never runs;
  the output is exit head 4's."""
  mc, params = _tiny()
  x1, x2 = (np.asarray(jax.random.normal(jax.random.PRNGKey(s), (2, 4, 4, 1))) for s in (7, 8))
  t1, t2 = jnp.full((2,), 500.0), jnp.full((2,), 480.0)
  st0 = caching.init_cache(mc, 2)
  _, s1 = early_exit_forward(params, mc, x1, t1, policy="static", policy_params=make_policy_params(5, depth=2),
                             cache=st0, reuse=jnp.ones((5, 2), bool))
  assert s1["layers_run"] == 2 and list(np.asarray(s1["cache"]["valid"])) == [1, 1, 0, 0, 0]
  eps2, s2 = early_exit_forward(params, mc, x2, t2, policy="static", policy_params=make_policy_params(5, depth=4),
                                cache=s1["cache"], reuse=jnp.ones((5, 2), bool))
  assert s2["layers_run"] == 4 and s2["att_run"] == 2 and s2["mlp_run"] == 2

  module = DeeDiffUViT(mc)
  take = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)

  @jax.jit
  def by_hand(params):
    # Evaluation 1: the updates of blocks 1 and 2.
    h, _ = module.apply({"params": params}, x1, t1, method=DeeDiffUViT.embed)
    cached = []
    for i in range(2):
      p = take(params["in_blocks"], i)
      a = caching.attn_update(mc, p, h)
      m = caching.mlp_update(mc, p, h + a)
      cached.append((a, m))
      h = h + a + m
    # Evaluation 2.
    h, _ = module.apply({"params": params}, x2, t2, method=DeeDiffUViT.embed)
    skips = []
    for a, m in cached:
      h = h + a + m
      skips.append(h)
    h = Block(mc).apply({"params": params["mid_block"]}, h)[0]
    h = Block(mc, use_skip=True).apply({"params": take(params["out_blocks"], 0)}, h, skips[-1])[0]
    return cached, Head(mc).apply({"params": take(params["exit_heads"], 3)}, h)

  cached, want = by_hand(params)
  np.testing.assert_allclose(s1["cache"]["att"][0], cached[0][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1["cache"]["mlp"][1], cached[1][1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eps2, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- router training

def test_router_loss_and_gradient_by_hand():
  """loss = mean_b sum (eps_full - eps_blend)^2 + lambda sum sigmoid(p), with the blend written out
  block by block here; its gradient in the logits against central differences of that loss."""
  from deediff_jax.train import router as router_lib
  mc, params = _tiny()          # the hand trace's model (one init compile for both tests)
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 1))
  t = jnp.full((2,), 300.0)
  y = None
  _, att, mlp = jax.jit(lambda p: caching.sublayer_forward(p, mc, x * 0.9 + 0.1, t + 20, y))(params)
  prob = jnp.array([0.3, -1.0, 2.0, 0.0, -0.5, 1.2, 0.7, -2.0, 1.0, -0.3])
  lam = 0.05
  take = lambda tree, j: jax.tree_util.tree_map(lambda a: a[j], tree)

  @jax.jit
  def by_hand(p):
    s = 1 / (1 + jnp.exp(-p))
    full = build(mc).apply({"params": params}, x, t, y)
    h, _ = DeeDiffUViT(mc).apply({"params": params}, x, t, y, method=DeeDiffUViT.embed)
    k = mc.num_segment_blocks
    blocks = ([take(params["in_blocks"], j) for j in range(k)] + [params["mid_block"]]
              + [take(params["out_blocks"], j) for j in range(k)])
    skips = []
    for i, pb in enumerate(blocks):
      h = caching.skip_in(mc, pb, h, skips.pop() if i > k else None)   # LIFO long skips
      h = h + s[2 * i] * caching.attn_update(mc, pb, h) + (1 - s[2 * i]) * att[i]
      h = h + s[2 * i + 1] * caching.mlp_update(mc, pb, h) + (1 - s[2 * i + 1]) * mlp[i]
      if i < k:
        skips.append(h)
    student = Head(mc).apply({"params": params["head"]}, h)
    return jnp.mean(jnp.sum((full - student) ** 2, axis=(1, 2, 3))) + lam * jnp.sum(s)

  loss_fn = jax.jit(lambda p: router_lib.router_loss(p, params, mc, x, t, y, att, mlp, lam))
  loss, (data, l1) = loss_fn(prob)
  np.testing.assert_allclose(loss, by_hand(prob), rtol=1e-5)
  np.testing.assert_allclose(l1, np.sum(1 / (1 + np.exp(-np.asarray(prob, np.float64)))), rtol=1e-6)
  grad = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(prob)
  e = 1e-2
  fd = np.array([(by_hand(prob.at[i].add(e)) - by_hand(prob.at[i].add(-e))) / (2 * e) for i in range(10)])
  # The gradient of the hand-written loss (autodiff of an independent implementation) must match
  # tightly; central differences in float32 carry O(e^2) truncation and rounding (~1e-4), so they
  # check only that both gradients are the loss's.
  np.testing.assert_allclose(grad, jax.grad(by_hand)(prob), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad, fd, rtol=2e-3, atol=5e-4)
  # All scores 1: the student is the full model and only the L1 term is left.
  _, (data1, _) = loss_fn(jnp.full((10,), 40.0))
  assert float(data1) < 1e-8


def test_l1_lambda_scales_with_output_size():
  from deediff_jax.train import router as router_lib
  c = base_config()
  c.model.update(image_size=14, in_channels=1)
  c.cache.l1_weight = 0.1
  assert router_lib.l1_lambda(c) == pytest.approx(0.1 * 196 / 4096)


def test_router_trains_from_a_params_file(tmp_path):
  """train.mode=router with sample.params_file and no train.init_from: the frozen backbone is the
  file's, so the logits equal those trained on the same parameters passed in directly."""
  from deediff_jax.train import params_file
  from deediff_jax.train import router as router_lib
  mc, params = _tiny(classes=3)
  c = base_config()
  c.model.update(image_size=4, in_channels=1, embed_dim=16, depth=4, num_heads=2, patch_size=2, num_classes=3)
  c.data.update(image_size=4, channels=1)
  c.sample.update(sampler="ddim", steps=4, guidance_scale=0.0)
  c.train.update(mode="router", init_from="", num_steps=2, warmup_steps=1, log_every=1, checkpoint_every=2)
  c.sample.params_file = params_file.save(str(tmp_path / "params.npz"), params, c)
  c = validate(c)   # no init_from: the params file is the backbone
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(-1, 1, (2, 4, 4, 1)).astype(np.float32), "label": np.array([0, 2])}
             for _ in range(2)]
  from_file = router_lib.train_router(c, str(tmp_path / "a"), batch_fn=lambda i: batches[i], progress=False)
  direct = router_lib.train_router(c, str(tmp_path / "b"), params=params, batch_fn=lambda i: batches[i],
                                   progress=False)
  assert from_file.shape == (4, 2 * mc.num_blocks)
  np.testing.assert_array_equal(from_file, direct)
  assert os.path.isfile(tmp_path / "a" / "router.npz")


# ----------------------------------------------------------------------------- from the config

def test_cache_keys_reach_every_caller_as_the_schedule_built_by_hand(tmp_path):
  """config.cache is read once into a CacheSpec: `sampling.sample` with cache.policy=l2c gives the
  images of passing the hand-built reuse schedule, the sweep's cache rows and the calibration edge
  build that same schedule (at their own threshold / sampler), and a sampler that cannot cache is
  one line."""
  from deediff_jax.config import CacheSpec, SamplerSpec
  from deediff_jax.eval import cache_rows, specs
  mc, params = _tiny()
  prob = np.random.default_rng(3).normal(size=(4, 2 * mc.num_blocks)).astype(np.float32)
  router = str(tmp_path / "router.npz")
  caching.save_router(router, prob, sampler="ddim", steps=4, num_blocks=mc.num_blocks)
  c = base_config()
  c.model.update(image_size=4, in_channels=1, embed_dim=16, depth=4, num_heads=2, patch_size=2, num_classes=0)
  c.data.update(image_size=4, channels=1)
  c.sample.update(sampler="ddim", steps=4, guidance_scale=0.0, batch_size=3)
  c.exit.policy = "none"
  c.cache.update(router=router, threshold=0.4)
  scores = 1.0 / (1.0 + np.exp(-prob))
  by_hand = caching.reuse_schedule(scores, 0.4, 4, "ddim")
  assert by_hand.any() and not by_hand.all()

  plain_rng = jax.random.PRNGKey(5)
  want, _ = sampling.sample(params, c, plain_rng, 3, reuse=by_hand)
  c.cache.policy = "l2c"
  got, stats = sampling.sample(params, c, plain_rng, 3)
  np.testing.assert_array_equal(got, want)
  assert np.sum(stats["att_run"]) < np.sum(stats["layers_run"])   # it did reuse

  np.testing.assert_array_equal(cache_rows.reuse_for(CacheSpec.from_config(c), 0.7, mc.num_blocks),
                                caching.reuse_schedule(scores, 0.7, 4, "ddim"))
  spec = specs.calibration_spec(c)
  np.testing.assert_array_equal(spec.reuse(SamplerSpec.from_config(c)), by_hand)
  with pytest.raises(caching.CacheError, match="router was trained for sample.steps=4"):
    spec.reuse(SamplerSpec(sampler="ddim", steps=6, batch_size=3))
  with pytest.raises(caching.CacheError, match="works with sample.sampler dpm_solver_2s or ddim, got ddpm"):
    caching.reuse_for(CacheSpec(policy="l2c", router=router, sampler="ddpm", steps=4), mc.num_blocks)
