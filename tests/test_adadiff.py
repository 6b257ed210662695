"""model.exit_style=adadiff against the official AdaDiff formulation (Tangshengku/AdaDiff).

The reference is tests/torch_uvit.py's `AdaDiffUViT`, a PyTorch rendering of the official model
written from its description (official parameter names, shared head, per-block confidence modules,
the official exit loop with its patience flag and batch-mean threshold), randomly initialised in
every tensor and converted with `deediff_jax.convert.uvit.convert`. Also: the official loss terms
(sde.py's mos / mos_lte / mos_layer_wise) against hand computation, the converter's errors on
AdaDiff checkpoints, the four published AdaDiff configs, and a smoke run of the benchmark.
"""
import dataclasses
import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_uvit
from deediff_jax.config import load_config_file
from deediff_jax.convert import uvit as cu
from deediff_jax.diffusion.losses import adadiff_loss
from deediff_jax.early_exit import early_exit_forward, exit_reference, make_policy_params
from deediff_jax.model import build, init_params
from deediff_jax.model.deediff import BACKBONE_KEYS, DeeDiffUViT
from deediff_jax.model.uvit import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
DEPTH = 6   # 3 in-blocks, so patience can arm at block 1 and exit at block 3 (not consecutive)
# Target batch-mean confidences per block (set through the LTE biases): the exits below depend on
# their order, m2 < m1 < m4 < m3 < m5 (blocks 1..5), and m6, m7 below m1.
TARGETS = (0.62, 0.33, 0.88, 0.76, 0.95, 0.55, 0.30)


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """The torch models here are tiny: on a loaded 2-core machine two threads make each call ~100x
  slower (spinning threads), one thread is milliseconds."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


def ada_pair(num_classes=-1, seed=1, depth=DEPTH):
  """A torch AdaDiff U-ViT (official arguments, random weights) and the matching ModelConfig."""
  torch.manual_seed(seed)
  model = torch_uvit.AdaDiffUViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=depth,
                                 num_heads=4, num_classes=num_classes)
  torch_uvit.randomize_(model, seed=seed).eval()
  g = torch.Generator().manual_seed(seed + 100)
  with torch.no_grad():  # confidence levels that order the blocks as TARGETS does
    for target, lte in zip(TARGETS, model.lte_classifer):
      lte.lte.weight.mul_(0.5)
      lte.lte.bias.copy_(math.log(target / (1 - target)) + 0.3 * torch.randn(lte.lte.bias.shape, generator=g))
  mc = ModelConfig(image_size=8, in_channels=3, embed_dim=32, depth=depth, num_heads=4, patch_size=2,
                   num_classes=max(num_classes - 1, 0), exit_style="adadiff")
  return model, mc


def inputs(batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, 3)).astype(np.float32)
  t = (np.array([0.0, 0.0123, 0.5, 0.999] * batch, np.float32)[:batch] * 999).astype(np.float32)
  return x, t


def run_torch(model, x_nhwc, t, y=None, thres=None):
  """(eps NHWC, exit layer, [N] per-block decodings NHWC, [N] confidence maps NHWC)."""
  with torch.no_grad():
    eps, layer, inner, conf = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                                    y=None if y is None else torch.from_numpy(y).long(), thres=thres)
  nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)
  return nhwc(eps), layer, [nhwc(a) for a in inner], [nhwc(a) for a in conf]


class Jax:
  """The model's jitted forwards on converted params (one compile per function and shape)."""

  def __init__(self, mc, params):
    self.mc, self.params = mc, params
    module = build(mc)
    n = mc.num_blocks
    # module.apply (the plain forward) and all_exits (the training path), compiled together.
    self.full = jax.jit(lambda p, x, t, y: (module.apply({"params": p}, x, t, y),
                                            module.apply({"params": p}, x, t, y, method=DeeDiffUViT.all_exits)))
    kw = lambda thr, patience=True: dict(policy="adadiff", aggregate="mean",
                                         policy_params=make_policy_params(n, threshold=thr, patience=patience))
    self.early_exit = jax.jit(lambda p, x, t, y, thr, pairs: early_exit_forward(p, mc, x, t, y, cfg_pairs=pairs,
                                                                                **kw(thr)), static_argnums=5)
    self.no_patience = jax.jit(lambda p, x, t, y, thr: early_exit_forward(p, mc, x, t, y, **kw(thr, False)))
    self.reference = jax.jit(lambda p, x, t, y, thr: exit_reference(p, mc, x, t, y, **kw(thr)))

  def __call__(self, name, *args):
    with jax.default_matmul_precision("highest"):
      return jax.tree_util.tree_map(np.asarray, getattr(self, name)(self.params, *args))


@functools.lru_cache(maxsize=None)
def _pair(kind):
  """(torch model, ModelConfig, Jax on the converted params, state_dict), built once per kind."""
  model, mc = ada_pair(num_classes=11 if kind == "class_conditional" else -1)
  sd = torch_uvit.numpy_state_dict(model)
  params = cu.convert(sd, {"model": dataclasses.asdict(mc), "train": {"seed": 0}})  # full-config form
  return model, mc, Jax(mc, params), sd


@pytest.fixture(scope="module", params=["unconditional", "class_conditional"])
def setup(request):
  model, mc, jx, sd = _pair(request.param)
  x, t = inputs()
  y = np.array([0, 3, 9, mc.num_classes], np.int32) if mc.num_classes else None  # the last one is the null id
  return model, mc, jx, sd, x, t, y


def designed_thresholds(means):
  """Thresholds (from the torch model's own batch-mean confidences) and the exit they must give.

  Blocks 1..3 are in-blocks, 4 the mid-block, 5..7 out-blocks. Without patience every one of the
  first four would exit earlier (at the first block over the threshold)."""
  m = dict(enumerate(means, start=1))
  assert m[2] < m[1] < m[4] < m[3] < m[5] and max(m[6], m[7]) < m[1], m  # the design holds
  return [
      (m[2] - 0.05, 2),              # blocks 1 and 2 confident: 1 arms, 2 exits (patience; else 1)
      ((m[2] + m[1]) / 2, 3),        # 1 arms, 2 is not confident, 3 exits: the flag stays armed
      ((m[1] + m[4]) / 2, 4),        # 3 arms (the last in-block), the mid-block exits at once (else 3)
      ((m[4] + m[3]) / 2, 5),        # 3 arms, mid not confident, out-block 5 exits at once (else 3)
      (m[5] + 0.02, 7),              # nothing is confident: the last block
  ]


def first_over(means, thr):
  """The exit without the patience rule: the first block over the threshold (else the last)."""
  over = [i + 1 for i, v in enumerate(means) if v > thr]
  return over[0] if over else len(means)


# --------------------------------------------------------------------------- parity


def test_full_depth_parity(setup):
  """module.apply, all_exits[-1], every block's shared-head decoding and every confidence map."""
  model, mc, jx, _, x, t, y = setup
  eps_ref, layer, inner, conf = run_torch(model, x, t, y)
  assert layer == mc.num_blocks and len(inner) == len(conf) == mc.num_blocks
  assert eps_ref.std() > 0.3
  eps, (eps_all, conf_all) = jx("full", x, t, y)
  assert np.abs(eps - eps_ref).max() <= TOL
  assert eps_all.shape == conf_all.shape == (mc.num_blocks,) + x.shape
  assert np.abs(eps_all[-1] - eps_ref).max() <= TOL
  # Each exit decodes with the backbone's head; each confidence map keeps the official
  # '(p1 p2 C)' pixel/channel order (any other order would move values between pixels).
  assert np.abs(eps_all - np.stack(inner)).max() <= TOL
  assert np.abs(conf_all - np.stack(conf)).max() <= TOL
  assert np.stack(conf).std(axis=(1, 2, 3, 4)).min() > 0.05  # maps with structure, not constants


def test_early_exit_parity_with_official_loop(setup):
  """Same output (1e-4) and exit layer as the official loop, for in-block exits with patience
  (consecutive and not), the mid-block, an out-block and no exit; exit_reference too."""
  model, mc, jx, _, x, t, y = setup
  means = [float(c.mean()) for c in run_torch(model, x, t, y)[3]]
  patience_mattered = 0
  for thr, want in designed_thresholds(means):
    eps_ref, layer, inner, _ = run_torch(model, x, t, y, thres=thr)
    assert layer == want, (thr, layer, want)
    assert len(inner) == layer  # the official loop decodes every block it ran
    eps, stats = jx("early_exit", x, t, y, np.float32(thr), False)
    assert np.abs(eps - eps_ref).max() <= TOL, thr
    np.testing.assert_array_equal(stats["exit_layer"], np.full(4, layer))
    assert int(stats["layers_run"]) == layer
    if mc.num_classes:  # exit_reference (all blocks, then pick) too; once is enough
      eps2, stats2 = jx("reference", x, t, y, np.float32(thr))
      assert np.abs(eps2 - eps_ref).max() <= TOL
      np.testing.assert_array_equal(stats2["exit_layer"], np.full(4, layer))
    patience_mattered += first_over(means, thr) != layer
    # exit.patience=False (the official text model's rule): the first confident block exits.
    model.patience = False
    try:
      eps_np, layer_np, _, _ = run_torch(model, x, t, y, thres=thr)
    finally:
      model.patience = True
    assert layer_np == first_over(means, thr)
    eps, stats = jx("no_patience", x, t, y, np.float32(thr))
    assert np.abs(eps - eps_np).max() <= TOL
    np.testing.assert_array_equal(stats["exit_layer"], np.full(4, layer_np))
  assert patience_mattered == 4  # every in-block / mid-block case differs without the patience rule
  # The exit output is the exit block's shared-head decoding, not the full model's.
  assert np.abs(run_torch(model, x, t, y, thres=designed_thresholds(means)[0][0])[0]
                - run_torch(model, x, t, y)[0]).max() > 1e-2


def test_cfg_pairs_each_half_decides_alone():
  """Classifier-free guidance: the official code makes two network calls (conditional, null) that
  exit independently; cfg_pairs=True with aggregate="mean" must give each half its own exit."""
  model, mc, jx = _pair("class_conditional")[:3]
  x, t = inputs()
  y = np.array([0, 3, 9, 5], np.int32)
  null = np.full(4, mc.num_classes, np.int32)
  m_c = np.array([c.mean() for c in run_torch(model, x, t, y)[3]])
  m_u = np.array([c.mean() for c in run_torch(model, x, t, null)[3]])
  # A threshold between the two halves' confidences at some block, at which the official calls
  # leave at different blocks; then two at which they may agree.
  split = next(thr for thr in (m_c + m_u) / 2
               if run_torch(model, x, t, y, thres=thr)[1] != run_torch(model, x, t, null, thres=thr)[1])
  x2, t2, y2 = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([y, null])
  differ = []
  for thr in (split, TARGETS[0] - 0.1, 0.99):
    eps, stats = jx("early_exit", x2, t2, y2, np.float32(thr), True)
    for half, labels in ((slice(0, 4), y), (slice(4, 8), null)):
      eps_ref, layer, _, _ = run_torch(model, x, t, labels, thres=thr)
      assert np.abs(eps[half] - eps_ref).max() <= TOL
      np.testing.assert_array_equal(stats["exit_layer"][half], np.full(4, layer))
    differ.append(stats["exit_layer"][0] != stats["exit_layer"][4])
  assert differ[0]  # the halves really did leave at different blocks


# --------------------------------------------------------------------------- losses


def official_loss_torch(eps_all, conf_all, eps):
  """sde.py's LSimple for noise_pred, written from its description, per sample then batch-mean:
  mos(noise - pred_N) + mos_lte (mean over layers of mos(c_i - (1 - tanh|pred_i - noise|)), the
  target detached) + mos_layer_wise (sum over layers of w_i mos(noise - pred_i), w_i = mean(c_i) /
  sum_j mean(c_j) over the whole batch, not detached)."""
  mos = lambda a: a.pow(2).flatten(1).mean(-1)
  n = len(eps_all)
  lte = sum(mos(conf_all[i] - (1 - torch.tanh(torch.abs(eps_all[i] - eps))).detach()) / n for i in range(n))
  means = torch.stack([conf_all[i].mean() for i in range(n)])
  w = means / means.sum()
  layer = sum(w[i] * mos(eps - eps_all[i]) for i in range(n))
  return (mos(eps - eps_all[-1]) + lte + layer).mean()


def test_loss_terms_and_gradients_equal_hand_computation():
  rng = np.random.default_rng(3)
  n, b = 3, 2
  eps = rng.standard_normal((b, 2, 2, 2)).astype(np.float32)
  scale = np.array([0.9, 0.5, 0.2]).reshape(n, 1, 1, 1, 1)        # deeper layers err less
  eps_all = (eps[None] + scale * rng.standard_normal((n, b, 2, 2, 2))).astype(np.float32)
  conf = rng.uniform(0.1, 0.9, (n, b, 2, 2, 2)).astype(np.float32)
  lam, beta = 0.7, 1.3
  total, m = jax.jit(lambda e, c, e0: adadiff_loss(e, c, e0, lambda_u=lam, beta_ual=beta))(eps_all, conf, eps)

  # By hand (numpy, float64).
  e, c, e0 = eps_all.astype(np.float64), conf.astype(np.float64), eps.astype(np.float64)
  mse = ((e - e0[None]) ** 2).mean(axis=(2, 3, 4))                    # [N, B]
  target = 1 - np.tanh(np.abs(e - e0[None]))
  l_simple = mse[-1].mean()
  l_conf = ((c - target) ** 2).mean(axis=(1, 2, 3, 4)).sum() / n
  layer_mean = c.mean(axis=(1, 2, 3, 4))                               # [N]
  s = layer_mean.sum()
  per_layer = mse.mean(axis=1)                                         # [N]
  l_layer = (layer_mean / s * per_layer).sum()
  np.testing.assert_allclose(m["loss_simple"], l_simple, rtol=1e-5)
  np.testing.assert_allclose(m["loss_confidence"], l_conf, rtol=1e-5)
  np.testing.assert_allclose(m["loss_layerwise"], l_layer, rtol=1e-5)
  np.testing.assert_allclose(total, l_simple + lam * l_conf + beta * l_layer, rtol=1e-5)

  # d total / d conf: the confidence term, plus the layer-wise term through w_i (not detached):
  # d l_layer / d mean(c_i) = (per_layer_i - l_layer) / s, and d mean(c_i) / d c = 1 / (B H W C).
  p = c[0].size
  want = lam * 2 * (c - target) / (n * p) + beta * ((per_layer - l_layer) / s)[:, None, None, None, None] / p
  g = jax.jit(jax.grad(lambda cc: adadiff_loss(jnp.asarray(eps_all), cc, jnp.asarray(eps), lambda_u=lam,
                                               beta_ual=beta)[0]))(jnp.asarray(conf))
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)
  layer_part = beta * ((per_layer - l_layer) / s)
  assert np.abs(layer_part).max() > 1e-2  # the part through w_i is not negligible here

  # Against torch autograd of the official per-sample formula (lambda = beta = 1), value and both
  # gradients (eps_all also gets gradient from every layer's MSE, none through the target).
  te, tc, t0 = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (eps_all, conf, eps))
  ref = official_loss_torch(te, tc, t0)
  ref.backward()
  (total1, _), (g_e, g_c) = jax.jit(jax.value_and_grad(
      lambda ee, cc: adadiff_loss(ee, cc, jnp.asarray(eps)), argnums=(0, 1), has_aux=True))(
          jnp.asarray(eps_all), jnp.asarray(conf))
  np.testing.assert_allclose(total1, ref.item(), rtol=1e-5)
  np.testing.assert_allclose(g_c, tc.grad.numpy(), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_e, te.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_confidence_loss_never_reaches_the_backbone():
  """The LTEs read stop-gradient tokens and the target is detached: the confidence loss gives the
  backbone exactly zero gradient and every LTE a non-zero one. (What reaches the LTEs through the
  layer-wise weights w_i is checked on tensors above.)"""
  model, mc = ada_pair(depth=2)
  params = cu.convert(torch_uvit.numpy_state_dict(model), mc)
  module = build(mc)
  x, t = inputs(batch=2)
  eps = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

  def loss_confidence(p):
    eps_all, conf_all = module.apply({"params": p}, x, t, method=DeeDiffUViT.all_exits)
    return adadiff_loss(eps_all, conf_all, jnp.asarray(eps))[1]["loss_confidence"]

  g = jax.jit(jax.grad(loss_confidence))(params)
  backbone = [k for k in params if k in BACKBONE_KEYS]
  assert backbone and set(params) == set(backbone) | {"ltes"}
  for k in backbone:
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree_util.tree_leaves(g[k])), k
  assert float(jnp.abs(g["ltes"]["lte"]["kernel"]).max(axis=(1, 2)).min()) > 0.0  # every LTE learns
  assert float(jnp.abs(g["ltes"]["lte"]["bias"]).max(axis=1).min()) > 0.0


# --------------------------------------------------------------------------- converter


@pytest.fixture(scope="module")
def small():
  _, mc, _, sd = _pair("unconditional")
  return sd, mc


def _err(cls, sd, mc):
  with pytest.raises(cls) as e:
    cu.convert(sd, mc)
  assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
  return str(e.value)


def test_converter_layout_and_every_tensor_once(small):
  sd, mc = small
  n, pd = mc.num_blocks, 2 * 2 * 3
  names = [k for k in sd if k.startswith("lte_classifer.")]
  assert len(names) == 2 * n == 2 * (mc.depth + 1)          # one weight + bias per block
  assert list(sd)[-2 * n:] == names                          # registered after the head
  params = cu.convert(sd, mc)
  kernel, bias = np.asarray(params["ltes"]["lte"]["kernel"]), np.asarray(params["ltes"]["lte"]["bias"])
  assert kernel.shape == (n, 32, pd) and bias.shape == (n, pd)
  for i in range(n):
    np.testing.assert_array_equal(kernel[i], sd[f"lte_classifer.{i}.lte.weight"].T)
    np.testing.assert_array_equal(bias[i], sd[f"lte_classifer.{i}.lte.bias"])
  want = jax.eval_shape(lambda: init_params(build(mc), jax.random.PRNGKey(0)))
  assert "exit_heads" not in want and "uems" not in want       # nothing to initialise fresh
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == sum(v.size for v in sd.values())
  assert sum(v.size for v in jax.tree_util.tree_leaves(cu.convert_backbone(sd, mc))) == sum(
      v.size for v in sd.values())


def test_converter_missing_lte(small):
  sd, mc = small
  sd = {k: v for k, v in sd.items() if k != "lte_classifer.3.lte.weight"}
  assert _err(cu.MissingTensorError, sd, mc) == (
      "checkpoint lacks tensor 'lte_classifer.3.lte.weight' (expected shape (12, 32)); is this an official "
      "AdaDiff nnet.pth / nnet_ema.pth state_dict for this config? It has one lte_classifer per block, "
      "model.depth + 1 = 7")
  plain = {k: v for k, v in small[0].items() if not k.startswith("lte_classifer.")}  # a U-ViT checkpoint
  assert _err(cu.MissingTensorError, plain, mc) == (
      "checkpoint lacks tensor 'lte_classifer.0.lte.weight' (expected shape (12, 32)) (and 13 more); the "
      "checkpoint has no AdaDiff confidence modules (lte_classifer.*), e.g. a plain U-ViT nnet.pth: convert "
      "it with model.exit_style=deediff (--config.train.init_from=DIR then trains fresh ones for "
      "exit_style=adadiff)")


def test_converter_extra_tensor(small):
  sd, mc = small
  extra = dict(sd, **{"lte_classifer.7.lte.weight": np.zeros((12, 32), np.float32),
                      "lte_classifer.7.lte.bias": np.zeros((12,), np.float32)})
  assert _err(cu.UnusedTensorError, extra, mc) == (
      "checkpoint tensor 'lte_classifer.7.lte.weight' (shape (12, 32)) has no place in this model (and 1 "
      "more); the checkpoint has 8 lte_classifer modules but AdaDiff has one per block, model.depth + 1 = 7")
  foo = dict(sd, **{"foo.weight": np.zeros((2, 2), np.float32)})
  assert _err(cu.UnusedTensorError, foo, mc) == (
      "checkpoint tensor 'foo.weight' (shape (2, 2)) has no place in this model; not a U-ViT parameter: "
      "is this the right file (a U-ViT nnet.pth / nnet_ema.pth, not an optimizer state or an autoencoder)?")
  deediff = ModelConfig(**dict(dataclasses.asdict(mc), exit_style="deediff"))
  assert _err(cu.UnusedTensorError, sd, deediff) == (
      "checkpoint tensor 'lte_classifer.0.lte.weight' (shape (12, 32)) has no place in this model (and 13 "
      "more); the checkpoint is an official AdaDiff model with per-block confidence modules: set "
      "model.exit_style=adadiff (and exit.policy=adadiff, exit.aggregate=mean)")


def test_converter_mis_shaped_lte(small):
  sd, mc = small
  bad = dict(sd, **{"lte_classifer.2.lte.weight": np.zeros((12, 31), np.float32)})
  assert _err(cu.ShapeMismatchError, bad, mc) == (
      "tensor 'lte_classifer.2.lte.weight' has shape (12, 31) but the config expects (12, 32); AdaDiff's "
      "confidence module is Linear(embed_dim -> patch_size^2 * in_channels): check model.embed_dim, "
      "patch_size and in_channels")
  bad = dict(sd, **{"lte_classifer.6.lte.bias": np.zeros((48,), np.float32)})  # patch 4's p*p*C
  assert _err(cu.ShapeMismatchError, bad, mc) == (
      "tensor 'lte_classifer.6.lte.bias' has shape (48,) but the config expects (12,); AdaDiff's "
      "confidence module is Linear(embed_dim -> patch_size^2 * in_channels): check model.embed_dim, "
      "patch_size and in_channels")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,threshold,schedule,base", [
    ("cifar10_adadiff", 0.92, "vpsde", "cifar10_uvit_small"),
    ("celeba64_adadiff", 0.95, "vpsde", "celeba64_uvit_small"),
    ("imagenet256_adadiff", 0.92, "vpsde", "imagenet256_uvit_large"),   # eval_ldm.py: continuous time
    ("mscoco_adadiff", 0.87, "stable", "mscoco_uvit_small"),
])
def test_published_adadiff_configs(name, threshold, schedule, base):
  """The official thresholds (eval_cifar.sh, eval_celeba.sh, eval_imagenet.sh, eval_coco.sh) on the
  published architectures and samplers."""
  config = load_config_file(os.path.join(REPO, "configs", f"{name}.py"))  # validates
  assert config.model.exit_style == "adadiff" and config.exit.policy == "adadiff"
  assert config.exit.aggregate == "mean" and config.exit.threshold == threshold
  assert config.diffusion.schedule == schedule
  plain = load_config_file(os.path.join(REPO, "configs", f"{base}.py"))
  arch = ("image_size", "in_channels", "embed_dim", "depth", "num_heads", "patch_size", "num_classes",
          "context_dim", "context_len", "mlp_time_embed", "qkv_bias")
  assert {k: config.model[k] for k in arch} == {k: plain.model[k] for k in arch}
  assert config.sample.guidance_scale == plain.sample.guidance_scale


# --------------------------------------------------------------------------- benchmark


def test_benchmark_runs_at_tiny_size(tmp_path):
  spec = importlib.util.spec_from_file_location("bench_adadiff_official",
                                                os.path.join(REPO, "benchmarks", "bench_adadiff_official.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "bench.json"
  result = bench.main(["--tiny", "--threads", "1", "--json", str(out)])
  assert out.exists()
  rows = {r["name"]: r for r in result["rows"]}
  assert "full_depth" in rows and len(rows) >= 3 and result["torch_threads"] == 1
  for r in rows.values():
    assert r["seconds_ours"] > 0 and r["seconds_official"] > 0 and r["ratio"] > 0
    assert r["max_abs_diff"] <= TOL and r["exit_layer_ours"] == r["exit_layer_official"]
