"""Import of official U-ViT PyTorch checkpoints (baofff/U-ViT `nnet.pth` / `nnet_ema.pth`).

    python -m deediff_jax.convert.uvit --torch nnet_ema.pth --config configs/cifar10_uvit_small.py --out DIR

The output is an `export_params` directory (params-only checkpoint + config.json) that
`--mode sample --workdir DIR` and `--config.train.init_from=DIR` read.

API:
  load_torch_checkpoint(path)                -> {name: np.ndarray}   (.pth/.pt/.ckpt, .safetensors, .npz)
  convert_backbone(state_dict, config)       -> every param the checkpoint holds (all but exit_heads / uems)
  merge_with_fresh_exits(backbone, config, seed) -> complete params, exits freshly initialised
  convert(state_dict, config, seed=None)     -> complete params for `deediff_jax.model.build(config.model)`

The official U-ViT checkpoints have no DeeDiff exits, so `convert` returns the converted backbone
plus exit heads and UEMs freshly initialised (the model's own initialisers, from PRNGKey(seed)),
ready for `train.mode=frozen_backbone` or `finetune`. Sampling with `exit.policy=none` reproduces
the official model.

Official AdaDiff checkpoints (Tangshengku/AdaDiff, `model.exit_style=adadiff`) are a U-ViT plus one
confidence module per block, `lte_classifer.{i}.lte.weight` [p*p*C, D] and `.bias` [p*p*C] for
i = 0..depth (in-blocks, mid-block, out-blocks in running order). They become
params['ltes']['lte']['kernel'] [depth+1, D, p*p*C] (each transposed) and ['bias'] [depth+1, p*p*C];
the p*p*C outputs keep the official '(p1 p2 C)' order, which `unpatchify` reads. There are no exit
heads or UEMs to initialise: every exit decodes with the backbone's head, so `convert` is the
complete model and samples as the official code does with `exit.policy=adadiff`,
`exit.aggregate=mean` (configs/*_adadiff.py). A plain U-ViT checkpoint has no LTEs: convert it
with exit_style=deediff and train fresh ones with `--config.train.init_from=DIR`.

Conventions (every one checked by tests/test_convert.py against a PyTorch U-ViT):
  * Conv2d weight OIHW -> Flax kernel HWIO; inputs are NHWC on our side, NCHW on theirs.
  * Linear weight [out, in] -> Dense kernel [in, out]; LayerNorm weight -> scale.
  * qkv is kept as is: both sides read the 3*D qkv outputs as (3, heads, head_dim)
    ('B L (K H D) -> K B H L D'), so the transpose is the only change.
  * Per-block tensors `in_blocks.{i}.*` / `out_blocks.{i}.*` are stacked on a new axis 0 in
    index order; out-block j consumes the skips LIFO on both sides.
  * Class labels: the official `num_classes` counts the null row (ImageNet: 1001 = 1000 + null,
    null id 1000, last). Our `model.num_classes` does not: ImageNet is num_classes=1000 with a
    table of 1001 rows, null id 1000. The same tensor, two ways of counting.
  * `final_layer` (the 3x3 conv): checkpoints trained with `conv=False` (U-ViT-H) have none;
    pass `final_conv=False` and it becomes an exact identity conv.
  * Checkpoints saved from DataParallel/DDP (`module.` prefix) or torch.compile (`_orig_mod.`)
    are accepted when *every* key carries the prefix.

Every source tensor is used exactly once: a missing, unused or mis-shaped tensor raises a
`ConversionError` (a ValueError) naming it, its expected shape and the config key to fix.
A checkpoint can never run code: torch files are read with `weights_only=True`, npz without
pickle, safetensors is data only. torch is imported lazily, only to read .pth files.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

# Re-exported: the shared error classes (one class each across the package) and the safe loader.
from deediff_jax.tensor_files import (CheckpointError, ConversionError, MissingTensorError,  # noqa: F401
                                      ShapeMismatchError, UnusedTensorError, load_state_dict, to_numpy)

ENTRY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile

# Block modules in the official registration order (state_dict order), with their leaves.
_BLOCK_ORDER = (("skip_linear",), ("norm1",), ("attn", "qkv"), ("attn", "proj"), ("norm2",),
                ("mlp", "fc1"), ("mlp", "fc2"))
# Top-level entries in official order: (flax path of the module or param, official name).
# The backbone head's modules sit at the top level of the official model.
_TOP_ORDER = ((("pos_embed",), "pos_embed"),
              (("patch_embed",), "patch_embed.proj"),
              (("time_mlp_1",), "time_embed.0"),
              (("time_mlp_2",), "time_embed.2"),
              (("label_emb",), "label_emb"),
              (("context_embed",), "context_embed"),
              ("in_blocks", "in_blocks"),
              ("mid_block", "mid_block"),
              ("out_blocks", "out_blocks"),
              (("head", "norm"), "norm"),
              (("head", "decoder_pred"), "decoder_pred"),
              (("head", "final_layer"), "final_layer"))
_LEAF_ORDER = (("kernel", "weight"), ("scale", "weight"), ("embedding", "weight"), ("bias", "bias"))
# AdaDiff's confidence modules, registered after the head: lte_classifer.{i}.lte, one per block.
_LTE_PATH, _LTE_NAME = ("ltes", "lte"), "lte_classifer"
_FRESH_KEYS = ("exit_heads", "uems")  # exits no official checkpoint holds


# ----------------------------------------------------------------------------- loading

_ENTRY_HINT = ("pass the U-ViT state_dict itself (the nnet.pth / nnet_ema.pth file, not a "
               "training-state dict)")


def load_torch_checkpoint(path) -> dict[str, np.ndarray]:
  """Reads a flat {name: tensor} checkpoint as NumPy arrays, never executing code from it.

  .pth/.pt/.ckpt/.bin: `torch.load(map_location='cpu', weights_only=True)` (torch imported here
  only). .safetensors: safetensors.numpy. .npz: numpy without pickle. bfloat16 becomes float32.
  `tensor_files.load_state_dict` with U-ViT's wording.
  """
  return load_state_dict(
      path, what="checkpoint file",
      missing_hint="pass the path of a U-ViT nnet.pth / nnet_ema.pth (or a .safetensors / .npz export of it)",
      entry_hint=_ENTRY_HINT,
      not_mapping_hint="; save model.state_dict() (the official nnet.pth / nnet_ema.pth are state_dicts)")


# ----------------------------------------------------------------------------- conversion


def _model_config(config):
  """config.model of a full config, or a model config (ConfigDict, dict, ModelConfig) itself."""
  from deediff_jax.model.uvit import ModelConfig
  if isinstance(config, ModelConfig):
    return config
  if isinstance(config, Mapping) or hasattr(config, "to_dict"):
    if "model" in config:
      return ModelConfig.from_config(config["model"])
  return ModelConfig.from_config(config)


def _config_seed(config) -> int:
  try:
    return int(config["train"]["seed"])
  except (KeyError, TypeError, AttributeError):
    return 0


def strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a `module.` (DataParallel/DDP) or `_orig_mod.` (torch.compile) prefix carried by every key."""
  sd = dict(state_dict)
  changed = True
  while changed and sd:
    changed = False
    for prefix in ENTRY_PREFIXES:
      has = [k.startswith(prefix) for k in sd]
      if all(has):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
      elif any(has):
        odd = next(k for k, h in zip(sd, has) if not h)
        raise ConversionError(f"some keys start with {prefix!r} and some do not (e.g. {odd!r}); "
                              "pass one model's state_dict, saved from a single wrapper")
  return sd


def _flax_shapes(mc):
  """Shapes of the params of build(mc) that a checkpoint holds, without allocating them: the
  backbone, plus the confidence modules (`ltes`) under exit_style=adadiff."""
  import jax

  from deediff_jax.model import build, init_params
  shapes = jax.eval_shape(lambda: init_params(build(mc), jax.random.PRNGKey(0)))
  return {k: v for k, v in shapes.items() if k not in _FRESH_KEYS}


def _get(tree, path):
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _leaves(subtree, path):
  """(flax path, official leaf name, flax shape) for a module's params in official order."""
  node = _get(subtree, path)
  if node is None:
    return []
  if not isinstance(node, Mapping):  # a bare parameter (pos_embed)
    return [(path, None, tuple(node.shape))]
  out = []
  for leaf, torch_leaf in _LEAF_ORDER:
    if leaf in node:
      out.append((path + (leaf,), torch_leaf, tuple(node[leaf].shape)))
  return out


def _spec(mc, flax_backbone):
  """[(official name, flax path, layer index or None, per-layer flax shape)] in official order."""
  k = mc.num_segment_blocks
  spec = []
  for entry, torch_name in _TOP_ORDER:
    if entry in ("in_blocks", "out_blocks"):
      for i in range(k):
        for mod in _BLOCK_ORDER:
          for path, leaf, shape in _leaves(flax_backbone, (entry,) + mod):
            spec.append((f"{torch_name}.{i}.{'.'.join(mod)}.{leaf}", path, i, shape[1:]))
    elif entry == "mid_block":
      for mod in _BLOCK_ORDER:
        for path, leaf, shape in _leaves(flax_backbone, (entry,) + mod):
          spec.append((f"{torch_name}.{'.'.join(mod)}.{leaf}", path, None, shape))
    else:
      for path, leaf, shape in _leaves(flax_backbone, entry):
        spec.append((torch_name if leaf is None else f"{torch_name}.{leaf}", path, None, shape))
  for i in range(mc.num_blocks if _get(flax_backbone, _LTE_PATH) is not None else 0):
    for path, leaf, shape in _leaves(flax_backbone, _LTE_PATH):
      spec.append((f"{_LTE_NAME}.{i}.lte.{leaf}", path, i, shape[1:]))
  return spec


def _torch_shape(path, flax_shape):
  """The official tensor's shape for a Flax parameter of this shape."""
  if path[-1] == "kernel" and len(flax_shape) == 4:  # HWIO <- OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if path[-1] == "kernel" and len(flax_shape) == 2:  # [in, out] <- [out, in]
    return flax_shape[::-1]
  return flax_shape


def _to_flax_layout(path, arr):
  if path[-1] == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if path[-1] == "kernel" and arr.ndim == 2:
    return arr.T                      # [out, in] -> [in, out]
  return arr                          # LayerNorm weight->scale, biases, embedding table, pos_embed


_BLOCK_RE = re.compile(r"^(in_blocks|out_blocks)\.(\d+)\.")
_LTE_RE = re.compile(r"^lte_classifer\.(\d+)\.")


def _missing_hint(name, names, mc):
  if name.endswith(".attn.qkv.bias"):
    return "the checkpoint's qkv has no bias: set model.qkv_bias=False"
  if name.startswith("time_embed."):
    return "the checkpoint has no time MLP: set model.mlp_time_embed=False"
  if name.startswith("label_emb."):
    return "the checkpoint is not class-conditional: set model.num_classes=0"
  if name.startswith("context_embed."):
    return "the checkpoint is not text-conditional: set model.context_dim=0 and model.context_len=0"
  if name.startswith("final_layer."):
    return ("U-ViT checkpoints trained with conv=False (U-ViT-H) have no final conv: pass "
            "final_conv=False (CLI: --no_final_conv)")
  if name.endswith(".skip_linear.weight") or name.endswith(".skip_linear.bias"):
    return "out-blocks need long-skip weights; checkpoints trained with skip=False are not supported"
  m = _BLOCK_RE.match(name)
  if m and not any(n.startswith(m.group(0)) for n in names):  # the whole block is absent
    return f"the checkpoint has fewer blocks: lower model.depth (now {mc.depth})"
  if _LTE_RE.match(name):
    if not any(_LTE_RE.match(n) for n in names):
      return ("the checkpoint has no AdaDiff confidence modules (lte_classifer.*), e.g. a plain U-ViT "
              "nnet.pth: convert it with model.exit_style=deediff (--config.train.init_from=DIR then "
              "trains fresh ones for exit_style=adadiff)")
    return (f"is this an official AdaDiff nnet.pth / nnet_ema.pth state_dict for this config? It has one "
            f"lte_classifer per block, model.depth + 1 = {mc.num_blocks}")
  return "is this an official U-ViT nnet.pth / nnet_ema.pth state_dict for this config?"


def _unused_hint(name, shapes, mc):
  if name.endswith(".attn.qkv.bias"):
    return "the checkpoint's qkv has a bias: set model.qkv_bias=True"
  if name.startswith("time_embed."):
    return "the checkpoint has a time MLP: set model.mlp_time_embed=True"
  if name == "label_emb.weight":
    rows = shapes[name][0]
    return (f"the checkpoint is class-conditional with {rows} label rows: set model.num_classes={rows - 1} "
            "(the official num_classes counts the null row, ours does not)")
  if name == "context_embed.weight" and len(shapes[name]) == 2:
    return (f"the checkpoint is text-conditional: set model.context_dim={shapes[name][1]} and "
            "model.context_len (77 CLIP tokens for the official MS-COCO model)")
  if name.startswith("final_layer."):
    return "the checkpoint has a final conv: drop final_conv=False (CLI: --no_final_conv)"
  m = _BLOCK_RE.match(name)
  if m:
    top = max(int(mm.group(2)) for mm in map(_BLOCK_RE.match, shapes) if mm and mm.group(1) == m.group(1))
    return f"the checkpoint has {top + 1} {m.group(1)}: set model.depth={2 * (top + 1)} (now {mc.depth})"
  if _LTE_RE.match(name):
    if not mc.has_ltes:
      return ("the checkpoint is an official AdaDiff model with per-block confidence modules: set "
              "model.exit_style=adadiff (and exit.policy=adadiff, exit.aggregate=mean)")
    top = max(int(mm.group(1)) for mm in map(_LTE_RE.match, shapes) if mm)
    return (f"the checkpoint has {top + 1} lte_classifer modules but AdaDiff has one per block, "
            f"model.depth + 1 = {mc.num_blocks}")
  return ("not a U-ViT parameter: is this the right file (a U-ViT nnet.pth / nnet_ema.pth, "
          "not an optimizer state or an autoencoder)?")


def _shape_hint(name, arr_shape, mc):
  if name == "label_emb.weight":
    return (f"our table has model.num_classes + 1 rows (null id last) while the official num_classes "
            f"counts the null row: set model.num_classes={arr_shape[0] - 1}")
  if name == "pos_embed":
    return ("tokens = 1 time + 1 class (if num_classes > 0) + context_len + (image_size/patch_size)^2: "
            "check model.image_size, patch_size, num_classes, context_len")
  if name.startswith("patch_embed."):
    return "check model.embed_dim, in_channels and patch_size"
  if name.startswith(("decoder_pred.", "final_layer.")):
    return "check model.patch_size and in_channels"
  if name.startswith("context_embed."):
    return "check model.context_dim and embed_dim"
  if ".mlp.fc" in name or name.startswith("time_embed."):
    return "check model.embed_dim and mlp_ratio"
  if _LTE_RE.match(name):
    return ("AdaDiff's confidence module is Linear(embed_dim -> patch_size^2 * in_channels): check "
            "model.embed_dim, patch_size and in_channels")
  return "check model.embed_dim"


def convert_backbone(state_dict: Mapping[str, Any], config, *, final_conv: bool = True) -> dict:
  """Official U-ViT state_dict -> the backbone params of `build(config.model)`.

  Returns every top-level key except `exit_heads` and `uems`: under model.exit_style=adadiff
  that includes the official AdaDiff confidence modules (`ltes`). Raises MissingTensorError,
  ShapeMismatchError or UnusedTensorError (all ConversionError, a ValueError) naming the tensor.
  `final_conv=False`: the checkpoint has no `final_layer` (official conv=False); an identity
  3x3 conv takes its place, which is exact.
  """
  import jax.numpy as jnp

  mc = _model_config(config)
  if mc.input_skip:
    raise ConversionError("official U-ViT checkpoints have no input skip in their heads; "
                          "set --config.model.input_skip=False to convert them")
  sd = strip_prefix(state_dict)
  flax_backbone = _flax_shapes(mc)
  spec = _spec(mc, flax_backbone)

  expected_names = {name for name, *_ in spec}
  missing, bad_shape = [], []
  arrays = {}
  for name, path, _, flax_shape in spec:
    want = _torch_shape(path, flax_shape)
    if not final_conv and name.startswith("final_layer."):
      continue
    if name not in sd:
      missing.append(name)
      continue
    arr = to_numpy(name, sd[name], _ENTRY_HINT)
    if tuple(arr.shape) != tuple(want):
      bad_shape.append((name, tuple(arr.shape), want))
      continue
    arrays[name] = np.asarray(arr, np.float32)

  if missing:
    first = missing[0]
    want = next(_torch_shape(p, s) for n, p, _, s in spec if n == first)
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise MissingTensorError(f"checkpoint lacks tensor {first!r} (expected shape {want}){more}; "
                             f"{_missing_hint(first, sd, mc)}")
  if bad_shape:
    name, got, want = bad_shape[0]
    more = f" (and {len(bad_shape) - 1} more)" if len(bad_shape) > 1 else ""
    raise ShapeMismatchError(f"tensor {name!r} has shape {got} but the config expects {want}{more}; "
                             f"{_shape_hint(name, got, mc)}")
  used = expected_names if final_conv else {n for n in expected_names if not n.startswith("final_layer.")}
  unused = [n for n in sd if n not in used]
  if unused:
    shapes = {n: tuple(np.shape(to_numpy(n, v, _ENTRY_HINT))) for n, v in sd.items()}
    first = unused[0]
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise UnusedTensorError(f"checkpoint tensor {first!r} (shape {shapes[first]}) has no place in this "
                            f"model{more}; {_unused_hint(first, shapes, mc)}")

  # Assemble the tree; stacked segments take layer i at index i.
  out: dict = {}
  stacks: dict = {}
  for name, path, layer, flax_shape in spec:
    if name not in arrays:  # final_layer with final_conv=False
      c = mc.in_channels
      if path[-1] == "kernel":
        ident = np.zeros((3, 3, c, c), np.float32)
        ident[1, 1] = np.eye(c, dtype=np.float32)  # centre tap = identity: the conv passes x through
        value = ident
      else:
        value = np.zeros(flax_shape, np.float32)
    else:
      value = _to_flax_layout(path, arrays[name])
    if layer is None:
      _set(out, path, value)
    else:
      stacks.setdefault(path, []).append(value)
  for path, layers in stacks.items():
    _set(out, path, np.stack(layers, axis=0))
  return _to_jax(out, jnp)


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _to_jax(tree, jnp):
  if isinstance(tree, dict):
    return {k: _to_jax(v, jnp) for k, v in tree.items()}
  return jnp.asarray(tree)


@functools.lru_cache(maxsize=8)
def _exit_initializer(mc):
  """A compiled rng -> {exit_heads, uems} (adadiff: {ltes}) init for this model config (one
  compile per config)."""
  import jax
  import jax.numpy as jnp

  from deediff_jax.model import build
  module = build(mc)
  hs = jnp.zeros((mc.num_blocks, 1, mc.num_tokens, mc.embed_dim), jnp.float32)
  temb = jnp.zeros((1, mc.embed_dim), jnp.float32)

  x_in = (jnp.zeros((1, mc.image_size, mc.image_size, mc.in_channels), jnp.float32)
          if mc.input_skip else None)
  keys = ("ltes",) if mc.has_ltes else ("exit_heads", "uems")

  def init_exits(m, hs, temb):
    if mc.has_ltes:
      return m.ltes(hs)
    return m.exit_heads(hs[:-1], x_in), m.uems(hs, temb)

  def init(rng):
    params = module.init(rng, hs, temb, method=init_exits)["params"]
    return {k: params[k] for k in keys}

  return jax.jit(init)


def merge_with_fresh_exits(backbone: Mapping[str, Any], config, seed: int | None = None) -> dict:
  """Backbone params + exit heads and UEMs (adadiff: confidence modules) freshly initialised
  from PRNGKey(seed).

  Only the exit modules are initialised (with the model's own initialisers; no full-model
  init, which matters for U-ViT-L/H). `seed=None` takes config.train.seed (0 when given only
  a model config). Any exit params already in `backbone` are replaced.
  """
  import jax

  from deediff_jax.model.deediff import EXIT_KEYS
  mc = _model_config(config)
  if seed is None:
    seed = _config_seed(config)
  params = {k: v for k, v in backbone.items() if k not in EXIT_KEYS}
  params.update(_exit_initializer(mc)(jax.random.PRNGKey(seed)))
  return params


def convert(state_dict: Mapping[str, Any], config, *, seed: int | None = None,
            final_conv: bool = True) -> dict:
  """Official U-ViT state_dict -> complete params for `deediff_jax.model.build(config.model)`.

  The backbone comes from the checkpoint (`convert_backbone`); exit heads and UEMs, which the
  official checkpoints lack, are freshly initialised from `seed` (`merge_with_fresh_exits`).
  Under model.exit_style=adadiff the checkpoint is an official AdaDiff one and holds every
  parameter (backbone + `lte_classifer` confidence modules), so nothing is initialised and
  `seed` is unused. `config` is the full ml_collections config or `config.model`.
  """
  params = convert_backbone(state_dict, config, final_conv=final_conv)
  if _model_config(config).has_ltes:
    return params
  return merge_with_fresh_exits(params, config, seed)


def time_convention(config) -> str:
  """One line: what the network's time input means under this config."""
  schedule = config.diffusion.schedule
  if schedule == "vpsde":
    what = "continuous VPSDE (beta 0.1 -> 20), network time input 999*t"
  else:
    what = (f"discrete '{schedule}' schedule, network time input = timestep index "
            f"0..{config.diffusion.timesteps - 1}")
  return f"{what}, sampler {config.sample.sampler}"


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
  """`python -m deediff_jax.convert.uvit --torch PATH --config FILE --out DIR [--config.KEY=VALUE]`.

  Returns the exit code: 0, or 2 with a one-line `error: ...` on stderr for bad input.
  Flags live in a private FlagValues, so this is callable in-process (tests, notebooks).
  """
  from absl import flags
  from ml_collections import config_flags

  from deediff_jax.config import ConfigError, validate
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "configs/NAME.py with get_config(); then "
                                  "--config.KEY=VALUE overrides", flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("torch", None, "official U-ViT checkpoint: nnet.pth / nnet_ema.pth "
                      "(or .safetensors / .npz)", flag_values=fv)
  flags.DEFINE_string("out", None, "new directory for the deediff_jax params checkpoint", flag_values=fv)
  flags.DEFINE_integer("seed", None, "seed of the fresh exit heads / UEMs (default: config.train.seed)",
                       flag_values=fv)
  flags.DEFINE_bool("no_final_conv", False, "the checkpoint was trained with conv=False (no "
                    "final_layer, e.g. U-ViT-H)", flag_values=fv)

  def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    return 2

  try:
    rest = fv(argv)
  except flags.Error as e:
    return fail(" ".join(str(e).split()))
  except (AttributeError, KeyError) as e:  # config_flags: an override naming no config key
    given = [a.split("=")[0].lstrip("-") for a in argv if re.match(r"^--?config\.", a)]
    why = e
    while isinstance(why, BaseException) and why.args:  # AttributeError(KeyError(text))
      why = why.args[0]
    return fail(f"unknown config key in {', '.join(given)} ({' '.join(str(why).split())}); "
                "the keys are in deediff_jax/config.py")
  if len(rest) > 1:
    return fail(f"unexpected arguments {rest[1:]}; use --torch PATH --config FILE --out DIR")
  missing = [f"--{n}" for n in ("config", "torch", "out") if fv[n].value is None]
  if missing:
    return fail(f"{', '.join(missing)} required: python -m deediff_jax.convert.uvit --torch nnet_ema.pth "
                "--config configs/cifar10_uvit_small.py --out DIR")
  try:
    config = fv.config
    config.model  # noqa: B018 -- a failed load only surfaces on first access
  except OSError:
    return fail(f"cannot load --config {fv['config'].config_filename!r}: give an existing Python file "
                "with get_config(), e.g. configs/cifar10_uvit_small.py")
  from deediff_jax.train import checkpoint as ckpt
  from deediff_jax.model import count_params
  seed = fv.seed if fv.seed is not None else _config_seed(config)
  try:
    config = validate(config)
    sd = load_torch_checkpoint(fv.torch)
    params = convert(sd, config, seed=seed, final_conv=not fv.no_final_conv)
    ckpt.export_params(fv.out, params, config)
  except (ConversionError, CheckpointError, ConfigError) as e:  # CheckpointError is ckpt's too
    return fail(e)
  counts = count_params(params)
  if _model_config(config).has_ltes:
    print(f"converted {len(sd)} tensors into {fv.out}: {counts['backbone']:,} backbone + {counts['ltes']:,} "
          f"confidence-module parameters from {os.path.basename(fv.torch)} (official AdaDiff); time: "
          f"{time_convention(config)}")
    return 0
  print(f"converted {len(sd)} tensors into {fv.out}: {counts['backbone']:,} backbone parameters from "
        f"{os.path.basename(fv.torch)} + {counts['exit_heads'] + counts['uems']:,} fresh exit-head/UEM "
        f"parameters (seed {seed}); time: {time_convention(config)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
