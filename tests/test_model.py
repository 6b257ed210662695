"""The DeeDiff U-ViT: shapes, validation, the scan path vs a layer-by-layer reference, counts."""
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deediff_jax.model import ModelConfig, build, count_params, init_params, slice_layer
from deediff_jax.model.exits import UEM
from deediff_jax.model.uvit import Block, Head, stacked_heads, timestep_embedding, unpatchify

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny(**kw):
  base = dict(image_size=8, in_channels=1, embed_dim=32, depth=4, num_heads=4, patch_size=2)
  base.update(kw)
  return ModelConfig(**base)


def inputs(cfg, b=3, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k1, (b, cfg.image_size, cfg.image_size, cfg.in_channels))
  t = jnp.linspace(3.0, 900.0, b)
  y = jax.random.randint(k2, (b,), 0, cfg.num_classes + 1) if cfg.num_classes else None
  ctx = (jax.random.normal(k3, (b, cfg.context_len, cfg.context_dim))
         if cfg.context_dim else None)
  return x, t, y, ctx


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("kw, tokens", [
    (dict(), 1 + 16),                                  # unconditional: [time][patches]
    (dict(num_classes=10), 2 + 16),                    # [class][time][patches]
    (dict(context_dim=12, context_len=5), 1 + 5 + 16),  # [time][context][patches]
])
def test_shapes(kw, tokens):
  cfg = tiny(**kw)
  assert cfg.num_tokens == tokens
  module = build(cfg)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))  # jitted: eager Flax is slow
  assert params["pos_embed"].shape == (1, tokens, 32)
  x, t, y, ctx = inputs(cfg)
  eps, (eps_all, u_all) = jax.jit(lambda p: (module.apply({"params": p}, x, t, y, ctx),
                                             module.apply({"params": p}, x, t, y, ctx, method=module.all_exits)))(params)
  assert eps.shape == x.shape
  assert eps_all.shape == (cfg.num_blocks,) + x.shape
  assert u_all.shape == (cfg.num_blocks, 3)
  assert bool(jnp.all((u_all > 0) & (u_all < 1)))


def test_depth_gives_depth_plus_one_blocks():
  cfg = tiny(depth=6)
  params = jax.eval_shape(lambda: init_params(build(cfg), jax.random.PRNGKey(0)))  # shapes only
  assert cfg.num_blocks == 7
  assert params["in_blocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
  assert params["out_blocks"]["skip_linear"]["kernel"].shape == (3, 64, 32)
  assert "skip_linear" not in params["in_blocks"] and "skip_linear" not in params["mid_block"]
  assert params["exit_heads"]["decoder_pred"]["kernel"].shape == (6, 32, 4)
  assert params["uems"]["linear"]["kernel"].shape == (7, 64, 1)


@pytest.mark.parametrize("kw, message", [
    (dict(depth=5), "model.depth: must be even (depth//2 in-blocks + mid + depth//2 out-blocks), got 5; use 6"),
    (dict(patch_size=3), "model.patch_size: 3 does not divide image_size 8; pick a divisor of 8"),
    (dict(num_heads=5), "model.num_heads: 5 does not divide embed_dim 32; pick a divisor of 32"),
    (dict(uem="bogus"), "model.uem: unknown kind 'bogus'; choose one of token_linear, token_linear_no_time, attention_probe"),
    (dict(context_dim=8), "model.context_len: set both context_dim and context_len (got 8, 0) or neither"),
])
def test_invalid_sizes_name_the_field(kw, message):
  with pytest.raises(ValueError) as e:
    tiny(**kw)
  assert str(e.value) == message


def test_wrong_input_shape_is_a_clear_error():
  cfg = tiny()
  module = build(cfg)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"x must be \[B, 8, 8, 1\] \(NHWC\), got \(2, 1, 8, 8\)"):
    module.apply({"params": params}, jnp.zeros((2, 1, 8, 8)), jnp.zeros(2))


def reference_all_exits(cfg, params, x, t, y, ctx):
  """Layer-by-layer Python loop over the same stacked params (no scan)."""
  module = build(cfg)
  h, temb = module.apply({"params": params}, x, t, y, ctx, method=module.embed)
  k = cfg.depth // 2
  hs, skips = [], []
  for i in range(k):
    h = Block(cfg).apply({"params": slice_layer(params["in_blocks"], i)}, h)[0]
    skips.append(h)
    hs.append(h)
  h = Block(cfg).apply({"params": params["mid_block"]}, h)[0]
  hs.append(h)
  for j in range(k):
    h = Block(cfg, use_skip=True).apply({"params": slice_layer(params["out_blocks"], j)}, h, skips.pop())[0]
    hs.append(h)
  x_in = x if cfg.input_skip else None
  eps = [Head(cfg).apply({"params": slice_layer(params["exit_heads"], i)}, hs[i], x_in)
         for i in range(len(hs) - 1)]
  eps.append(Head(cfg).apply({"params": params["head"]}, hs[-1], x_in))
  u = [UEM(cfg).apply({"params": slice_layer(params["uems"], i)}, hs[i], temb) for i in range(len(hs))]
  return jnp.stack(eps), jnp.stack(u)


@pytest.mark.parametrize("kw", [dict(num_classes=10), dict(context_dim=12, context_len=5),
                                dict(mlp_time_embed=True, qkv_bias=True, uem="attention_probe"),
                                dict(remat=True, uem="token_linear_no_time"),
                                dict(num_classes=10, input_skip=True)])
def test_scan_path_equals_loop_reference_and_plain_forward(kw):
  cfg = tiny(**kw)
  module = build(cfg)
  # Jitted: eager Flax dispatches op by op, which made this test take ~30 s per case.
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(1))
  x, t, y, ctx = inputs(cfg)
  eps_all, u_all = jax.jit(lambda p: module.apply({"params": p}, x, t, y, ctx, method=module.all_exits))(params)
  ref_eps, ref_u = jax.jit(lambda p: reference_all_exits(cfg, p, x, t, y, ctx))(params)
  np.testing.assert_allclose(eps_all, ref_eps, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(u_all, ref_u, atol=1e-6)
  plain = jax.jit(lambda p: module.apply({"params": p}, x, t, y, ctx))(params)
  np.testing.assert_allclose(eps_all[-1], plain, atol=1e-5)
  # The exits are distinct functions (not all copies of the last head).
  assert float(jnp.abs(eps_all[0] - eps_all[-1]).max()) > 1e-3


def test_remat_does_not_change_numbers_or_gradients():
  cfg, cfg_r = tiny(num_classes=10), tiny(num_classes=10, remat=True)
  params = jax.jit(lambda r: init_params(build(cfg), r))(jax.random.PRNGKey(2))
  x, t, y, ctx = inputs(cfg)

  def loss(c):
    def f(p):
      e, u = build(c).apply({"params": p}, x, t, y, method="all_exits")
      return jnp.sum(e ** 2) + jnp.sum(u)
    return jax.jit(jax.value_and_grad(f))(params)

  (v1, g1), (v2, g2) = loss(cfg), loss(cfg_r)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_null_class_is_the_default_label():
  cfg = tiny(num_classes=10)
  module = build(cfg)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(3))
  x, t, _, _ = inputs(cfg)
  apply = jax.jit(lambda p, y: module.apply({"params": p}, x, t, y))
  a = jax.jit(lambda p: module.apply({"params": p}, x, t, None))(params)
  b = apply(params, jnp.full((3,), 10))
  c = apply(params, jnp.zeros((3,), jnp.int32))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-4
  assert params["label_emb"]["embedding"].shape == (11, 32)


def test_timestep_embedding_is_cos_then_sin():
  emb = timestep_embedding(jnp.array([0.0, 2.0]), 8)
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(2 * freqs), np.sin(2 * freqs)]), rtol=1e-6)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_unpatchify_inverts_the_patch_order():
  # Token (gy, gx) holds pixels (gy*p + p1, gx*p + p2, c) at channel index (p1*p + p2)*C + c.
  p, c, g = 2, 3, 4
  img = np.arange(g * p * g * p * c, dtype=np.float32).reshape(1, g * p, g * p, c)
  tokens = img.reshape(1, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(1, g * g, p * p * c)
  np.testing.assert_array_equal(unpatchify(jnp.asarray(tokens), p, c), img)


@pytest.mark.parametrize("input_skip", [False, True])
def test_stacked_heads_equal_each_head_applied_alone(input_skip):
  # RGB with the input skip: a 6-channel conv input, so the im2col channel order is checked.
  cfg = tiny(in_channels=3, input_skip=input_skip)
  n, b = 3, 2
  hs = jax.random.normal(jax.random.PRNGKey(7), (n, b, cfg.num_tokens, 32))
  x_in = jax.random.normal(jax.random.PRNGKey(8), (b, 8, 8, 3)) if input_skip else None
  # n independent heads; biases and the LayerNorm affine randomised too (they initialise to 0 and 1).
  init = jax.jit(lambda k: jax.tree_util.tree_map(
      lambda a: a + 0.1 * jax.random.normal(k, a.shape), Head(cfg).init(k, hs[0], x_in)["params"]))
  per_head = [init(k) for k in jax.random.split(jax.random.PRNGKey(9), n)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_head)
  got = jax.jit(lambda p: stacked_heads(cfg, p, hs, x_in))(stacked)
  one = jax.jit(lambda p, h: Head(cfg).apply({"params": p}, h, x_in))
  want = jnp.stack([one(p, hs[i]) for i, p in enumerate(per_head)])
  assert got.shape == (n, b, 8, 8, 3)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_token_linear_uem_matches_hand_computation():
  cfg = tiny()
  h = jax.random.normal(jax.random.PRNGKey(4), (2, cfg.num_tokens, 32))
  temb = jax.random.normal(jax.random.PRNGKey(5), (2, 32))
  params = UEM(cfg).init(jax.random.PRNGKey(6), h, temb)["params"]
  w, b = np.asarray(params["linear"]["kernel"])[:, 0], float(params["linear"]["bias"][0])
  tok = np.asarray(h)[:, 1:]                      # drop the time token
  z = tok @ w[:32] + (np.asarray(temb) @ w[32:])[:, None] + b
  expected = (1 / (1 + np.exp(-z))).mean(axis=1)
  np.testing.assert_allclose(UEM(cfg).apply({"params": params}, h, temb), expected, rtol=1e-5)
  # The no-time variant ignores temb entirely.
  cfg_nt = tiny(uem="token_linear_no_time")
  p_nt = UEM(cfg_nt).init(jax.random.PRNGKey(6), h, temb)["params"]
  np.testing.assert_array_equal(UEM(cfg_nt).apply({"params": p_nt}, h, temb),
                                UEM(cfg_nt).apply({"params": p_nt}, h, temb * 0 + 7.0))


def test_cifar10_uvit_small_parameter_count():
  config = load_config("cifar10_uvit_small")
  module = build(config.model)
  shapes = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
  counts = count_params(shapes)
  print("cifar10_uvit_small parameters:", counts)
  assert abs(counts["backbone"] - 44.3e6) / 44.3e6 < 0.01
  # The exits are small next to the backbone (reported separately).
  assert counts["exit_heads"] + counts["uems"] < 0.01 * counts["backbone"]


def test_imagenet_large_has_published_size():
  config = load_config("imagenet256_uvit_large")
  module = build(config.model)
  shapes = jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0)))
  assert module.cfg.num_blocks == 21
  assert shapes["label_emb"]["embedding"].shape == (1001, 1024)
  # U-ViT-L/2 is 287M parameters in the paper.
  assert abs(count_params(shapes)["backbone"] - 287e6) / 287e6 < 0.01


def test_input_skip_conv_reads_the_noisy_input():
  """input_skip: every head's 3x3 conv gets [prediction, x_t]; a centre weight of 1 on x_t with
  everything else zero makes every head output exactly x_t."""
  cfg = tiny(num_classes=10, input_skip=True)
  module = build(cfg)
  params = jax.jit(lambda r: init_params(module, r))(jax.random.PRNGKey(0))
  assert params["head"]["final_layer"]["kernel"].shape == (3, 3, 2, 1)
  assert params["exit_heads"]["final_layer"]["kernel"].shape == (cfg.num_blocks - 1, 3, 3, 2, 1)
  assert "input_skip" not in str(params.keys())  # no new parameter tree, only a wider conv
  kernel = np.zeros((3, 3, 2, 1), np.float32)
  kernel[1, 1, 1, 0] = 1.0  # the x_t channel, centre tap
  def copy_head(p):
    return dict(p, final_layer={"kernel": jnp.asarray(kernel), "bias": jnp.zeros((1,))})
  params = dict(params, head=copy_head(params["head"]),
                exit_heads=dict(params["exit_heads"], final_layer={
                    "kernel": jnp.broadcast_to(kernel, (cfg.num_blocks - 1,) + kernel.shape),
                    "bias": jnp.zeros((cfg.num_blocks - 1, 1))}))
  x, t, y, _ = inputs(cfg)
  eps_all, _ = jax.jit(lambda p: module.apply({"params": p}, x, t, y, method=module.all_exits))(params)
  np.testing.assert_array_equal(np.asarray(eps_all), np.broadcast_to(np.asarray(x), eps_all.shape))
  plain = jax.jit(lambda p: module.apply({"params": p}, x, t, y))(params)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(x))


def test_input_skip_off_is_the_official_head_and_missing_input_is_an_error():
  shapes = jax.eval_shape(lambda: init_params(build(tiny()), jax.random.PRNGKey(0)))
  assert shapes["head"]["final_layer"]["kernel"].shape == (3, 3, 1, 1)
  cfg = tiny(input_skip=True)
  head_params = jax.jit(lambda r: init_params(build(cfg), r))(jax.random.PRNGKey(0))["head"]
  h = jnp.zeros((2, cfg.num_tokens, cfg.embed_dim))
  with pytest.raises(ValueError, match="model.input_skip=True: the head needs the noisy input image x_in"):
    Head(cfg).apply({"params": head_params}, h)
