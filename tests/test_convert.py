"""deediff_jax.convert.uvit: official U-ViT PyTorch checkpoints -> deediff_jax params.

Parity is checked against tests/torch_uvit.py, a PyTorch U-ViT with the official parameter
names, randomly initialised in every tensor (biases and LayerNorms included).
"""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_uvit
from deediff_jax.convert import uvit as cu
from deediff_jax.model import build, init_params
from deediff_jax.model.deediff import DeeDiffUViT
from deediff_jax.model.uvit import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def tiny(num_classes=-1, **kw):
  """A torch U-ViT (official arguments) and the matching ModelConfig."""
  tk = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=4)
  tk.update(kw)
  model = torch_uvit.randomize_(torch_uvit.UViT(num_classes=num_classes, **tk), seed=1).eval()
  mc = ModelConfig(image_size=tk["img_size"], in_channels=tk["in_chans"], embed_dim=tk["embed_dim"],
                   depth=tk["depth"], num_heads=tk["num_heads"], patch_size=tk["patch_size"],
                   mlp_ratio=float(tk.get("mlp_ratio", 4.0)), qkv_bias=tk.get("qkv_bias", False),
                   num_classes=max(num_classes - 1, 0), context_dim=tk.get("clip_dim", 0),
                   context_len=tk.get("num_clip_token", 0),
                   mlp_time_embed=tk.get("mlp_time_embed", False))
  return model, mc


def torch_eps(model, x_nhwc, t, y=None, context=None):
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                y=None if y is None else torch.from_numpy(y),
                context=None if context is None else torch.from_numpy(context))
  return out.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC


def flax_eps(mc, params, x, t, y=None, context=None):
  module = build(mc)
  with jax.default_matmul_precision("highest"):  # full f32 matmuls on GPU/TPU too (no TF32/bf16 passes)
    return np.asarray(jax.jit(lambda p, x, t, y, c: module.apply({"params": p}, x, t, y, c))(
        params, x, t, y, context))


def inputs(mc, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, mc.image_size, mc.image_size, mc.in_channels)).astype(np.float32)
  # VPSDE-style inputs 999*t: fractional, from near 0 to near 999.
  t = (np.array([0.0, 0.0123, 0.5, 0.999] * batch, np.float32)[:batch] * 999).astype(np.float32)
  return x, t


# --------------------------------------------------------------------------- parity

VARIANTS = {
    "unconditional": dict(),
    "class_conditional_qkv_bias": dict(num_classes=11, img_size=16, patch_size=4, embed_dim=64, depth=4,
                                       qkv_bias=True),
    "text_context": dict(clip_dim=24, num_clip_token=5, embed_dim=48, num_heads=3, mlp_ratio=2.0),
    "mlp_time_embed": dict(mlp_time_embed=True, in_chans=1, depth=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_torch_uvit(variant):
  model, mc = tiny(**VARIANTS[variant])
  params = cu.convert_backbone(torch_uvit.numpy_state_dict(model), mc)
  x, t = inputs(mc)
  y = ctx = None
  if mc.num_classes:
    y = np.array([0, 3, 9, mc.num_classes], np.int32)  # the last one is the null id
  if mc.context_dim:
    ctx = np.random.default_rng(5).standard_normal((4, mc.context_len, mc.context_dim)).astype(np.float32)
  ref = torch_eps(model, x, t, y, ctx)
  out = flax_eps(mc, params, x, t, y, ctx)
  assert out.shape == ref.shape == x.shape
  assert ref.std() > 0.3  # a real signal, not a near-zero output that would match anything
  assert np.abs(out - ref).max() <= TOL
  if mc.num_classes:
    # y=None on our side is the null class: the official model fed the null id.
    ref_null = torch_eps(model, x, t, np.full((4,), mc.num_classes, np.int64))
    np.testing.assert_allclose(flax_eps(mc, params, x, t, None, None), ref_null, atol=TOL, rtol=0)
    assert np.abs(ref_null - ref)[:3].max() > 1e-2  # the label does change the output


def test_parity_without_final_conv():
  """Official conv=False checkpoints (U-ViT-H): no final_layer; an identity conv is exact."""
  model, mc = tiny(conv=False)
  sd = torch_uvit.numpy_state_dict(model)
  assert not any(k.startswith("final_layer") for k in sd)
  params = cu.convert_backbone(sd, mc, final_conv=False)
  kernel = np.asarray(params["head"]["final_layer"]["kernel"])
  assert kernel.shape == (3, 3, 3, 3) and kernel.sum() == 3.0 and np.all(kernel[1, 1] == np.eye(3))
  x, t = inputs(mc)
  assert np.abs(flax_eps(mc, params, x, t) - torch_eps(model, x, t)).max() <= TOL


def test_explicit_layouts():
  """Each layout rule, element by element, independent of the forward pass."""
  model, mc = tiny(num_classes=11, mlp_time_embed=True, qkv_bias=True, depth=4)
  sd = torch_uvit.numpy_state_dict(model)
  p = cu.convert_backbone(sd, mc)
  a = lambda v: np.asarray(v)
  w = sd["patch_embed.proj.weight"]  # OIHW -> HWIO
  assert a(p["patch_embed"]["kernel"])[1, 0, 2, 5] == w[5, 2, 1, 0]
  assert a(p["head"]["final_layer"]["kernel"])[0, 2, 1, 2] == sd["final_layer.weight"][2, 1, 0, 2]
  # Linear [out, in] -> [in, out]; qkv outputs keep the official (K, H, D) order.
  np.testing.assert_array_equal(a(p["mid_block"]["attn"]["qkv"]["kernel"]), sd["mid_block.attn.qkv.weight"].T)
  np.testing.assert_array_equal(a(p["time_mlp_2"]["kernel"]), sd["time_embed.2.weight"].T)
  # Stacking: layer i of a segment is official block i.
  for i in range(2):
    np.testing.assert_array_equal(a(p["in_blocks"]["attn"]["qkv"]["bias"])[i], sd[f"in_blocks.{i}.attn.qkv.bias"])
    np.testing.assert_array_equal(a(p["out_blocks"]["skip_linear"]["kernel"])[i],
                                  sd[f"out_blocks.{i}.skip_linear.weight"].T)
    np.testing.assert_array_equal(a(p["out_blocks"]["norm2"]["scale"])[i], sd[f"out_blocks.{i}.norm2.weight"])
  np.testing.assert_array_equal(a(p["head"]["norm"]["scale"]), sd["norm.weight"])
  np.testing.assert_array_equal(a(p["label_emb"]["embedding"]), sd["label_emb.weight"])  # 11 rows, null last
  np.testing.assert_array_equal(a(p["pos_embed"]), sd["pos_embed"])
  # Same structure and shapes as the model's own init (backbone half).
  want = jax.eval_shape(lambda: init_params(build(mc), jax.random.PRNGKey(0)))
  want = {k: v for k, v in want.items() if k not in ("exit_heads", "uems")}
  assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(want)
  assert jax.tree_util.tree_map(lambda u, v: u.shape == v.shape and u.dtype == jnp.float32, p, want)
  n = sum(v.size for v in sd.values())
  assert sum(v.size for v in jax.tree_util.tree_leaves(p)) == n  # every tensor once, nothing added


def test_convert_complete_tree_with_fresh_exits():
  model, mc = tiny()  # the CLI test's model config too: the compiled exit init is shared
  sd = torch_uvit.numpy_state_dict(model)
  params = cu.convert(sd, {"model": mc.__dict__, "train": {"seed": 7}})  # full-config form, seed from it
  want = jax.eval_shape(lambda: init_params(build(mc), jax.random.PRNGKey(0)))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: u.shape == v.shape, params, want))
  leaves = lambda tree: jax.tree_util.tree_leaves({k: tree[k] for k in ("exit_heads", "uems")})
  backbone = cu.convert_backbone(sd, mc)
  same7 = cu.merge_with_fresh_exits(backbone, mc, seed=7)
  other = cu.merge_with_fresh_exits(backbone, mc, seed=8)
  assert all(np.array_equal(u, v) for u, v in zip(leaves(params), leaves(same7)))  # seeded: reproducible
  assert not np.array_equal(other["uems"]["linear"]["kernel"], params["uems"]["linear"]["kernel"])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(  # the backbone is the converted one, untouched
      lambda u, v: bool(np.array_equal(u, v)), {k: params[k] for k in backbone}, backbone))
  # The training path (all exits) on converted weights: its last prediction is the official model.
  x, t = inputs(mc)
  with jax.default_matmul_precision("highest"):
    eps_all, u_all = jax.jit(lambda p: build(mc).apply({"params": p}, x, t, method=DeeDiffUViT.all_exits))(params)
  assert eps_all.shape == (mc.num_blocks,) + x.shape and u_all.shape == (mc.num_blocks, 4)
  assert np.abs(np.asarray(eps_all[-1]) - torch_eps(model, x, t)).max() <= TOL


def test_module_prefix_and_torch_tensors():
  model, mc = tiny()
  sd = torch_uvit.numpy_state_dict(model)
  plain = cu.convert_backbone(sd, mc)
  same = lambda p, q: jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(np.array_equal(u, v)), p, q))
  assert same(cu.convert_backbone({f"module.{k}": v for k, v in sd.items()}, mc), plain)  # DataParallel
  assert same(cu.convert_backbone({f"module._orig_mod.{k}": v for k, v in sd.items()}, mc), plain)
  assert same(cu.convert_backbone(model.state_dict(), mc), plain)  # torch tensors directly
  mixed = {("module." + k if k.startswith("in_") else k): v for k, v in sd.items()}
  with pytest.raises(cu.ConversionError) as e:
    cu.convert_backbone(mixed, mc)
  assert str(e.value) == ("some keys start with 'module.' and some do not (e.g. 'pos_embed'); "
                          "pass one model's state_dict, saved from a single wrapper")


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small():
  model, mc = tiny()
  return torch_uvit.numpy_state_dict(model), mc


def _err(cls, sd, mc, **kw):
  with pytest.raises(cls) as e:
    cu.convert_backbone(sd, mc, **kw)
  assert isinstance(e.value, ValueError)
  return str(e.value)


def test_input_skip_config_cannot_take_official_weights(small):
  sd, mc = small
  mc = ModelConfig.from_config(dict(dataclasses.asdict(ModelConfig.from_config(mc)), input_skip=True))
  assert _err(cu.ConversionError, sd, mc) == (
      "official U-ViT checkpoints have no input skip in their heads; "
      "set --config.model.input_skip=False to convert them")


def test_missing_tensor(small):
  sd, mc = small
  sd = {k: v for k, v in sd.items() if k != "in_blocks.0.mlp.fc2.bias"}
  assert _err(cu.MissingTensorError, sd, mc) == (
      "checkpoint lacks tensor 'in_blocks.0.mlp.fc2.bias' (expected shape (32,)); "
      "is this an official U-ViT nnet.pth / nnet_ema.pth state_dict for this config?")


def test_extra_tensor(small):
  sd, mc = small
  sd = dict(sd, **{"foo.weight": np.zeros((2, 2), np.float32)})
  assert _err(cu.UnusedTensorError, sd, mc) == (
      "checkpoint tensor 'foo.weight' (shape (2, 2)) has no place in this model; not a U-ViT parameter: "
      "is this the right file (a U-ViT nnet.pth / nnet_ema.pth, not an optimizer state or an autoencoder)?")


def test_wrong_shape(small):
  sd, mc = small
  sd = dict(sd, **{"mid_block.attn.proj.weight": np.zeros((32, 31), np.float32)})
  assert _err(cu.ShapeMismatchError, sd, mc) == (
      "tensor 'mid_block.attn.proj.weight' has shape (32, 31) but the config expects (32, 32); "
      "check model.embed_dim")
  sd2 = dict(small[0], pos_embed=np.zeros((1, 18, 32), np.float32))
  assert _err(cu.ShapeMismatchError, sd2, mc) == (
      "tensor 'pos_embed' has shape (1, 18, 32) but the config expects (1, 17, 32); tokens = 1 time + "
      "1 class (if num_classes > 0) + context_len + (image_size/patch_size)^2: check model.image_size, "
      "patch_size, num_classes, context_len")


def test_label_table_convention():
  """Official num_classes=11 (10 + null) is our num_classes=10; 11 on our side is a clear error."""
  model, mc = tiny(num_classes=11)
  sd = torch_uvit.numpy_state_dict(model)
  assert sd["label_emb.weight"].shape == (11, 32)
  wrong = ModelConfig(**dict(mc.__dict__, num_classes=11))
  assert _err(cu.ShapeMismatchError, sd, wrong) == (
      "tensor 'label_emb.weight' has shape (11, 32) but the config expects (12, 32); our table has "
      "model.num_classes + 1 rows (null id last) while the official num_classes counts the null row: "
      "set model.num_classes=10")
  uncond = ModelConfig(**dict(mc.__dict__, num_classes=0))
  sd_u = dict(sd, pos_embed=sd["pos_embed"][:, 1:])  # so that only label_emb is left over
  assert _err(cu.UnusedTensorError, sd_u, uncond) == (
      "checkpoint tensor 'label_emb.weight' (shape (11, 32)) has no place in this model; the checkpoint "
      "is class-conditional with 11 label rows: set model.num_classes=10 (the official num_classes counts "
      "the null row, ours does not)")


def test_config_mismatch_hints(small):
  sd, mc = small
  deeper = ModelConfig(**dict(mc.__dict__, depth=4))
  assert _err(cu.MissingTensorError, sd, deeper) == (
      "checkpoint lacks tensor 'in_blocks.1.norm1.weight' (expected shape (32,)) (and 23 more); "
      "the checkpoint has fewer blocks: lower model.depth (now 4)")
  model4, _ = tiny(depth=4)
  assert _err(cu.UnusedTensorError, torch_uvit.numpy_state_dict(model4), mc) == (
      "checkpoint tensor 'in_blocks.1.norm1.weight' (shape (32,)) has no place in this model (and 23 more); "
      "the checkpoint has 2 in_blocks: set model.depth=4 (now 2)")
  biased = ModelConfig(**dict(mc.__dict__, qkv_bias=True))
  assert _err(cu.MissingTensorError, sd, biased) == (
      "checkpoint lacks tensor 'in_blocks.0.attn.qkv.bias' (expected shape (96,)) (and 2 more); "
      "the checkpoint's qkv has no bias: set model.qkv_bias=False")
  timed = ModelConfig(**dict(mc.__dict__, mlp_time_embed=True))
  assert _err(cu.MissingTensorError, sd, timed) == (
      "checkpoint lacks tensor 'time_embed.0.weight' (expected shape (128, 32)) (and 3 more); "
      "the checkpoint has no time MLP: set model.mlp_time_embed=False")
  assert _err(cu.UnusedTensorError, sd, mc, final_conv=False) == (
      "checkpoint tensor 'final_layer.weight' (shape (3, 3, 3, 3)) has no place in this model (and 1 more); "
      "the checkpoint has a final conv: drop final_conv=False (CLI: --no_final_conv)")
  no_conv = {k: v for k, v in sd.items() if not k.startswith("final_layer.")}
  assert _err(cu.MissingTensorError, no_conv, mc) == (
      "checkpoint lacks tensor 'final_layer.weight' (expected shape (3, 3, 3, 3)) (and 1 more); U-ViT "
      "checkpoints trained with conv=False (U-ViT-H) have no final conv: pass final_conv=False "
      "(CLI: --no_final_conv)")


def test_text_context_hint():
  model, mc = tiny(clip_dim=24, num_clip_token=5)
  sd = torch_uvit.numpy_state_dict(model)
  plain = ModelConfig(**dict(mc.__dict__, context_dim=0, context_len=0))
  sd = dict(sd, pos_embed=sd["pos_embed"][:, 5:])
  assert _err(cu.UnusedTensorError, sd, plain) == (
      "checkpoint tensor 'context_embed.weight' (shape (32, 24)) has no place in this model (and 1 more); "
      "the checkpoint is text-conditional: set model.context_dim=24 and model.context_len (77 CLIP tokens "
      "for the official MS-COCO model)")


# --------------------------------------------------------------------------- published configs


def _load_config(name):
  return _load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


@pytest.mark.parametrize("name,torch_kw,millions", [
    ("cifar10_uvit_small", dict(img_size=32, patch_size=2, in_chans=3), (44.0, 44.5)),
    ("mscoco_uvit_small", dict(img_size=32, patch_size=2, in_chans=4, clip_dim=768, num_clip_token=77),
     (44.5, 45.0)),  # "45M" in the paper
])
def test_published_config_key_sets(name, torch_kw, millions):
  """A U-ViT-S with the official arguments converts under our published config, all ~44M weights."""
  config = _load_config(name)
  torch.manual_seed(0)
  model = torch_uvit.UViT(embed_dim=512, depth=12, num_heads=8, **torch_kw)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = cu.convert_backbone(sd, config)
  n = sum(v.size for v in jax.tree_util.tree_leaves(params))
  assert n == sum(v.size for v in sd.values())
  assert millions[0] * 1e6 < n < millions[1] * 1e6


def test_time_convention():
  assert cu.time_convention(_load_config("cifar10_uvit_small")) == (
      "continuous VPSDE (beta 0.1 -> 20), network time input 999*t, sampler euler_maruyama")
  assert cu.time_convention(_load_config("digits")) == (
      "discrete 'linear' schedule, network time input = timestep index 0..999, sampler ddim")


# --------------------------------------------------------------------------- loading


class _Evil:
  """A pickle that would create a file when unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_load_torch_checkpoint_round_trips(tmp_path, small):
  sd, mc = small
  tensors = {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}
  tensors["module.label_emb.weight"] = torch.randn(3, 4, dtype=torch.bfloat16)
  torch.save(tensors, tmp_path / "nnet.pth")
  got = cu.load_torch_checkpoint(tmp_path / "nnet.pth")
  assert set(got) == set(tensors)
  for k, v in sd.items():
    assert got[f"module.{k}"].dtype == np.float32 and np.array_equal(got[f"module.{k}"], v)
  assert got["module.label_emb.weight"].dtype == np.float32  # bfloat16 widened exactly
  np.testing.assert_array_equal(got["module.label_emb.weight"], tensors["module.label_emb.weight"].float().numpy())

  from safetensors.numpy import save_file
  save_file(sd, str(tmp_path / "nnet.safetensors"))
  np.savez(tmp_path / "nnet.npz", **sd)
  for f in ("nnet.safetensors", "nnet.npz"):
    back = cu.load_torch_checkpoint(tmp_path / f)
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_load_never_runs_code(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"pos_embed": torch.zeros(1), "evil": _Evil(str(marker))}, tmp_path / "evil.pth")
  with pytest.raises(cu.CheckpointError) as e:
    cu.load_torch_checkpoint(tmp_path / "evil.pth")
  assert str(e.value).startswith(f"{tmp_path / 'evil.pth'}: refusing to load: it is not a plain tensor "
                                 "state_dict and weights_only=True rejected it (")
  assert not marker.exists()


def test_load_errors(tmp_path):
  with pytest.raises(cu.CheckpointError) as e:
    cu.load_torch_checkpoint(tmp_path / "nope.pth")
  assert str(e.value) == (f"checkpoint file '{tmp_path / 'nope.pth'}' does not exist; pass the path of a "
                          "U-ViT nnet.pth / nnet_ema.pth (or a .safetensors / .npz export of it)")
  torch.save({"nnet": {"pos_embed": torch.zeros(1)}, "step": 3}, tmp_path / "state.pth")
  with pytest.raises(cu.CheckpointError) as e:
    cu.load_torch_checkpoint(tmp_path / "state.pth")
  assert str(e.value) == ("entry 'nnet' is a dict, not a tensor; pass the U-ViT state_dict itself (the "
                          "nnet.pth / nnet_ema.pth file, not a training-state dict)")
  torch.save([torch.zeros(1)], tmp_path / "list.pth")
  with pytest.raises(cu.CheckpointError) as e:
    cu.load_torch_checkpoint(tmp_path / "list.pth")
  assert str(e.value) == (f"{tmp_path / 'list.pth'}: holds a list, not a state_dict; save model.state_dict() "
                          "(the official nnet.pth / nnet_ema.pth are state_dicts)")


# --------------------------------------------------------------------------- CLI


TINY_CONFIG = """
from deediff_jax.config import base_config

def get_config():
  c = base_config()
  c.data.update(image_size=8, channels=3)
  c.model.update(image_size=8, in_channels=3, embed_dim=32, depth=2, num_heads=4, patch_size=2, num_classes=0)
  c.diffusion.schedule = "vpsde"
  c.sample.sampler = "euler_maruyama"
  return c
"""


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "deediff_jax.convert.uvit", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, small):
  sd, _ = small
  (tmp_path / "tiny.py").write_text(TINY_CONFIG)
  bad = {k: torch.from_numpy(v) for k, v in sd.items() if k != "decoder_pred.bias"}
  torch.save(bad, tmp_path / "nnet.pth")
  r = _cli("--torch", str(tmp_path / "nnet.pth"), "--config", str(tmp_path / "tiny.py"), "--out",
           str(tmp_path / "out"))
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "error: checkpoint lacks tensor 'decoder_pred.bias' (expected shape (12,)); is this an official "
      "U-ViT nnet.pth / nnet_ema.pth state_dict for this config?")
  assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_cli_end_to_end(tmp_path, small, capsys):
  """CLI in-process: a DataParallel checkpoint -> export_params dir that load_params reads back."""
  import json

  from deediff_jax.model import count_params
  from deediff_jax.train.checkpoint import load_params
  sd, _ = small
  (tmp_path / "tiny.py").write_text(TINY_CONFIG)
  torch.save({f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "nnet_ema.pth")
  out = tmp_path / "converted"
  args = ["uvit", "--torch", str(tmp_path / "nnet_ema.pth"), "--config", str(tmp_path / "tiny.py"),
          "--config.train.seed=3", "--out", str(out)]
  assert cu.main(args) == 0
  config = _load_config_file(tmp_path / "tiny.py")
  config.train.seed = 3
  want = cu.convert(sd, config, seed=3)
  n_backbone = sum(v.size for v in sd.values())
  n_exits = count_params(want)["exit_heads"] + count_params(want)["uems"]
  assert capsys.readouterr().out.strip() == (
      f"converted {len(sd)} tensors into {out}: {n_backbone:,} backbone parameters from nnet_ema.pth + "
      f"{n_exits:,} fresh exit-head/UEM parameters (seed 3); time: continuous VPSDE (beta 0.1 -> 20), "
      "network time input 999*t, sampler euler_maruyama")
  loaded = load_params(str(out), config)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(want)
  assert all(np.array_equal(np.asarray(u), np.asarray(v))
             for u, v in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(want)))
  saved = json.loads((out / "config.json").read_text())
  assert saved["diffusion"]["schedule"] == "vpsde" and saved["train"]["seed"] == 3
  # The export samples with early exit straight away (--mode sample's code path), with the VPSDE
  # sampler the config names; threshold 0 never exits, so it must equal full depth.
  from deediff_jax import sample
  config.sample.update(steps=3, num_images=4, batch_size=4)
  config.exit.update(policy="uem", threshold=0.0)
  stats = sample.run(config, str(out))
  assert stats["sampler"] == "euler_maruyama" and stats["layer_ratio_run"] == 1.0
  assert stats["psnr_vs_full"] > 60
  assert np.isfinite(np.load(out / "samples.npz")["images"]).all()
  capsys.readouterr()  # drop the sampling progress bar
  # A second export into the same directory is refused, in one line.
  assert cu.main(args) == 2
  assert capsys.readouterr().err.strip() == f"error: {out} already holds checkpoints; export to a new directory"


def test_cli_usage_errors(tmp_path, capsys):
  (tmp_path / "tiny.py").write_text(TINY_CONFIG)
  cases = [
      (["uvit", "--torch", "x.pth", "--out", "o"],
       "error: --config required: python -m deediff_jax.convert.uvit --torch nnet_ema.pth --config "
       "configs/cifar10_uvit_small.py --out DIR"),
      (["uvit", "--config", str(tmp_path / "nope.py"), "--torch", "x.pth", "--out", "o"],
       f"error: cannot load --config '{tmp_path / 'nope.py'}': give an existing Python file with "
       "get_config(), e.g. configs/cifar10_uvit_small.py"),
      (["uvit", "--config", str(tmp_path / "tiny.py"), "--config.model.depthh=4", "--torch", "x.pth"],
       "error: unknown config key in config.model.depthh ('depthh' Did you mean \"depth\" instead of "
       "\"depthh\"?); the keys are in deediff_jax/config.py"),
      (["uvit", "--config", str(tmp_path / "tiny.py"), "--config.model.depth=3", "--torch", "x.pth",
        "--out", "o"],
       "error: model.depth: must be even (depth//2 in-blocks + mid + depth//2 out-blocks), got 3; use 4"),
  ]
  for argv, message in cases:
    assert cu.main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def _load_config_file(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_under_test", str(path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()
