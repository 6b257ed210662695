"""Analytic FLOPs: hand-computed values, XLA cross-checks (within 10%), exit-profile accounting."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.early_exit import early_exit_forward, make_policy_params
from deediff_jax.eval import flops as F
from deediff_jax.model import ModelConfig, build, dummy_inputs
from deediff_jax.model.exits import UEM
from deediff_jax.model.uvit import Block, Head

# The two configs the issue asks for, plus one that covers text context, the time MLP, qkv bias
# and the attention-probe UEM.
DIGITS = ModelConfig(image_size=8, in_channels=1, embed_dim=128, depth=8, num_heads=4, patch_size=2,
                     num_classes=10)
MID = ModelConfig(image_size=28, in_channels=1, embed_dim=256, depth=12, num_heads=8, patch_size=4,
                  num_classes=10)
TEXT = ModelConfig(image_size=8, in_channels=3, embed_dim=32, depth=4, num_heads=4, patch_size=2,
                   context_dim=24, context_len=5, mlp_time_embed=True, qkv_bias=True,
                   uem="attention_probe")
CONFIGS = {"digits": DIGITS, "mid": MID, "text": TEXT}
B = 2  # a batch of 2 also checks that per-image FLOPs scale with the batch
TOL = 0.10


def sds(a):
  return None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)


def abstract_params(module, *args, **kw):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw))["params"]


def random_params(module, cfg, seed=0):
  """Concrete params without running init (eager init is slow on a busy 2-core machine)."""
  x, t, y, ctx = dummy_inputs(cfg, 1)
  shapes = abstract_params(module, x, t, y, ctx, method=module.all_exits)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def close(analytic, xla):
  return abs(analytic - xla) / xla


@pytest.mark.parametrize("name", ["digits", "mid", "text"])
def test_forward_matches_xla(name):
  cfg = CONFIGS[name]
  module = build(cfg)
  x, t, y, ctx = dummy_inputs(cfg, B)
  params = abstract_params(module, x, t, y, ctx, method=module.all_exits)  # no allocation
  xla = F.xla_flops(lambda p, x, t, y, c: module.apply({"params": p}, x, t, y, c),
                    params, sds(x), sds(t), sds(y), sds(ctx))
  analytic = B * F.forward_flops(cfg)
  print(f"{name}: forward analytic {analytic:.4e} xla {xla:.4e} rel.diff {close(analytic, xla):.4%}")
  assert close(analytic, xla) < TOL
  # XLA counts every scanned block: a forward without any blocks would be far off.
  assert analytic - B * F.blocks_flops(cfg, cfg.num_blocks) < 0.5 * xla


@pytest.mark.parametrize("name", ["digits", "mid", "text"])
def test_pieces_match_xla(name):
  cfg = CONFIGS[name]
  h = jax.ShapeDtypeStruct((B, cfg.num_tokens, cfg.embed_dim), jnp.float32)
  temb = jax.ShapeDtypeStruct((B, cfg.embed_dim), jnp.float32)
  zeros = lambda s: jnp.zeros(s.shape, s.dtype)
  for use_skip in (False, True):
    block = Block(cfg, use_skip=use_skip)
    p = abstract_params(block, zeros(h), zeros(h) if use_skip else None)
    xla = F.xla_flops(lambda p, h: block.apply({"params": p}, h, h if use_skip else None)[0], p, h)
    assert close(B * F.block_flops(cfg, use_skip), xla) < TOL, (use_skip, xla)
  head = Head(cfg)
  p = abstract_params(head, zeros(h))
  xla = F.xla_flops(lambda p, h: head.apply({"params": p}, h), p, h)
  assert close(B * F.head_flops(cfg), xla) < TOL
  for kind in ("token_linear", "token_linear_no_time", "attention_probe"):
    uem = UEM(dataclasses.replace(cfg, uem=kind))
    p = abstract_params(uem, zeros(h), zeros(temb))
    xla = F.xla_flops(lambda p, h, e: uem.apply({"params": p}, h, e), p, h, temb)
    assert close(B * F.uem_flops(cfg, kind), xla) < TOL, (kind, xla)
  module = build(cfg)
  x, t, y, ctx = dummy_inputs(cfg, B)
  params = abstract_params(module, x, t, y, ctx, method=module.all_exits)
  xla = F.xla_flops(lambda p, x, t, y, c: module.apply({"params": p}, x, t, y, c, method=module.embed)[0],
                    params, sds(x), sds(t), sds(y), sds(ctx))
  assert close(B * F.embed_flops(cfg), xla) < TOL


TINY = ModelConfig(image_size=4, in_channels=1, embed_dim=8, depth=2, num_heads=2, patch_size=2)


def test_tiny_by_hand():
  # T = 1 time token + 4 patches = 5 tokens, D = 8, 2 heads, MLP hidden 32.
  T, D, H, M = 5, 8, 2, 32
  ln = 7 * T * D + 5 * T                                  # 305
  attn = (2 * T * D * 3 * D                               # qkv, no bias: 1920
          + 2 * T * T * D + H * T * T + 4 * H * T * T     # logits 400, scale 50, softmax 200
          + 2 * T * T * D                                 # weights @ v: 400
          + 2 * T * D * D + T * D)                        # proj + bias: 680
  mlp = 2 * T * D * M + T * M + 64 * T * M + 2 * T * M * D + T * D  # 2720 + 10240 + 2600
  block = ln + attn + T * D + ln + mlp + T * D
  assert block == 19900
  assert F.block_flops(TINY) == 19900
  assert F.block_flops(TINY, use_skip=True) == 19900 + 2 * T * 2 * D * D + T * D == 21220
  assert F.block_flops(TINY, matmul_only=True) == 1920 + 400 + 400 + 640 + 2560 + 2560 == 8480
  # Head: LN 305, decoder_pred 2*5*8*4 + 20, 3x3 conv on 4x4: (3*4-2)^2 = 100 valid taps -> 200, + bias 16.
  assert F.head_flops(TINY) == 305 + 340 + 200 + 16
  # UEM over 4 patch tokens: W_h h per token 2*4*8, W_t temb + b once 2*8 + 1, added to the
  # 4 tokens, sigmoid 3*4, mean 4 + 1.
  assert F.uem_flops(TINY) == 64 + 17 + 4 + 12 + 5
  assert F.uem_flops(TINY, "token_linear_no_time") == 64 + 4 + 12 + 5
  # Embed: patch conv 2*4*4*8 + 32, t*freqs 4, + pos_embed 5*8.
  assert F.embed_flops(TINY) == 256 + 32 + 4 + 40
  # 3 blocks: in, mid, out (with skip).
  assert F.forward_flops(TINY) == 332 + 19900 + 19900 + 21220 + 861
  assert F.forward_flops(TINY, depth=2) == 332 + 19900 + 19900 + 861


@pytest.mark.parametrize("cfg", [DIGITS, MID], ids=["digits", "mid"])
def test_early_exit_is_linear_in_blocks(cfg):
  n, k = cfg.num_blocks, cfg.num_segment_blocks
  emb, head, uem = F.embed_flops(cfg), F.head_flops(cfg), F.uem_flops(cfg)
  plain, skip = F.block_flops(cfg, False), F.block_flops(cfg, True)
  for layers in range(1, n + 1):
    # k in-blocks, then the mid-block (both plain), then out-blocks with skip_linear.
    blocks = min(layers, k + 1) * plain + max(layers - k - 1, 0) * skip
    for heads in (1, 2):
      want = emb + blocks + layers * uem + heads * head
      got = F.early_exit_flops_per_image(cfg, layers, heads_per_step=heads, steps=1, policy="uem")
      assert got == want
    assert F.early_exit_flops_per_image(cfg, layers, steps=1, policy="static") == emb + blocks + head
    assert (F.early_exit_flops_per_image(cfg, layers, steps=1, policy="state_cosine")
            == emb + blocks + layers * F.cosine_flops(cfg) + head)
  # Steps add up, guidance doubles, and full depth with no monitor is the plain forward.
  per_step = [3, n, 1]
  total = sum(F.early_exit_flops_per_image(cfg, l, steps=1) for l in per_step)
  assert F.early_exit_flops_per_image(cfg, per_step) == total
  assert F.early_exit_flops_per_image(cfg, per_step, cfg_factor=2) == 2 * total
  assert F.early_exit_flops_per_image(cfg, n, steps=7, policy="none") == 7 * F.forward_flops(cfg)
  assert F.full_depth_flops_per_image(cfg, 7, cfg_factor=2) == 14 * F.forward_flops(cfg)
  # Fractional depths interpolate between whole depths.
  half = F.blocks_flops(cfg, k + 1.5)
  assert half == pytest.approx(F.blocks_flops(cfg, k + 1) + 0.5 * skip)


def test_exit_profile_and_per_image_flops():
  n = TINY.num_blocks  # 3
  e = np.array([[1, 1, 3, 2],    # step 0: loop runs 3 blocks, heads at layers 1, 2, 3
                [2, 2, 2, 2],    # step 1: 2 blocks, one head
                [3, 1, 3, 1]])   # step 2: 3 blocks, heads at 1 and 3
  prof = F.exit_profile(e)
  np.testing.assert_array_equal(prof["layers_run"], [3, 2, 3])
  np.testing.assert_array_equal(prof["heads"], [3, 1, 2])
  emb, head, uem = F.embed_flops(TINY), F.head_flops(TINY), F.uem_flops(TINY)
  blk = {1: 19900, 2: 39800, 3: 61020}
  want = sum(emb + blk[l] + l * uem + h * head for l, h in [(3, 3), (2, 1), (3, 2)])
  assert F.flops_from_exit_layers(TINY, e, policy="uem") == want
  assert F.flops_from_exit_layers(TINY, e, policy="uem", cfg_factor=2) == 2 * want
  assert F.gflops_per_image(TINY, e, policy="uem") == pytest.approx(want / 1e9)
  # The paper's per-sample accounting: each sample pays for its own blocks, UEMs and one head.
  per = sum(emb + head + np.mean([blk[l] + l * uem for l in row]) for row in e)
  assert F.flops_from_exit_layers(TINY, e, policy="uem", per_sample=True) == pytest.approx(per)
  # Two batches, each its own loop: the mean of the two runs.
  two = np.stack([e, np.full_like(e, n)])
  full = 3 * (emb + blk[3] + 3 * uem + head)
  assert F.flops_from_exit_layers(TINY, two, policy="uem") == pytest.approx((want + full) / 2)
  assert n == 3


def test_profile_matches_the_early_exit_loop():
  # time_schedule with one time fraction per sample makes three different exit depths.
  cfg = TINY
  module = build(cfg)
  params = random_params(module, cfg)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  pp = make_policy_params(cfg.num_blocks, schedule=[1, 2, 3])
  run = jax.jit(lambda p, x: early_exit_forward(p, cfg, x, jnp.full((3,), 500.0), policy="time_schedule",
                                                policy_params=pp, time_frac=jnp.array([1.0, 0.5, 0.0])))
  _, stats = run(params, x)
  exit_layer = np.asarray(stats["exit_layer"])
  np.testing.assert_array_equal(exit_layer, [1, 2, 3])
  prof = F.exit_profile(exit_layer[None])
  assert prof["layers_run"][0] == int(stats["layers_run"]) == 3
  assert prof["heads"][0] == 3
  want = F.embed_flops(cfg) + F.blocks_flops(cfg, 3) + 3 * F.head_flops(cfg)
  assert F.flops_from_exit_layers(cfg, exit_layer[None], policy="time_schedule") == want


def test_unroll_scans_same_numbers_no_loop():
  cfg = ModelConfig(image_size=8, in_channels=1, embed_dim=32, depth=4, num_heads=4, patch_size=2,
                    num_classes=10)
  module = build(cfg)
  params = random_params(module, cfg)
  x, t, y, _ = dummy_inputs(cfg, 2)
  x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  fn = lambda p, x: module.apply({"params": p}, x, t, y)
  np.testing.assert_allclose(jax.jit(F.unroll_scans(fn))(params, x), jax.jit(fn)(params, x),
                             rtol=1e-5, atol=1e-5)
  assert "while" in jax.jit(fn).lower(params, x).as_text()
  assert "while" not in jax.jit(F.unroll_scans(fn)).lower(params, x).as_text()


def test_bad_input_errors():
  with pytest.raises(F.FlopsError, match="pass steps="):
    F.early_exit_flops_per_image(TINY, 2)
  with pytest.raises(F.FlopsError, match=r"must be in \[0, 3\]"):
    F.early_exit_flops_per_image(TINY, [2, 4])
  with pytest.raises(F.FlopsError, match="has 2 entries but steps=3"):
    F.early_exit_flops_per_image(TINY, [2, 3], steps=3)
  with pytest.raises(F.FlopsError, match="unknown exit policy 'fast'"):
    F.early_exit_flops_per_image(TINY, 2, steps=1, policy="fast")
  with pytest.raises(F.FlopsError, match="cfg_factor must be 1"):
    F.early_exit_flops_per_image(TINY, 2, steps=1, cfg_factor=3)
  with pytest.raises(F.FlopsError, match="1-based"):
    F.exit_profile(np.zeros((2, 3), int))
  with pytest.raises(F.FlopsError, match="depth must be an integer in"):
    F.forward_flops(TINY, depth=0)


def test_input_skip_widens_only_the_head_conv():
  skip = dataclasses.replace(TINY, input_skip=True)
  # The 3x3 conv reads 2 channels instead of 1: another 2 * 1 * 1 * 100 valid-tap FLOPs per head.
  assert F.head_flops(skip) == F.head_flops(TINY) + 200
  assert F.block_flops(skip) == F.block_flops(TINY)
  assert F.forward_flops(skip) == F.forward_flops(TINY) + 200
