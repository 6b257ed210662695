"""Caption templates for MNIST digits: the text side of the `mnist_text` task (issue 7).

Each digit gets every template below, filled with its word ("seven") or its numeral ("7").
The templates are split in two disjoint sets:

- `TRAIN_TEMPLATES`: the wordings the model is trained on; `caption_for(label, rng, "train")`
  picks one per example, uniformly, from a caller-seeded NumPy Generator.
- `HELDOUT_TEMPLATES`: wordings never shown in training, with a different sentence structure
  (a subject and a verb: "someone wrote ...", "this picture shows ..."), so that sampling from
  them tests whether the model learned the digit from the text encoder's meaning rather than
  memorising the exact training strings.

Every filled caption names exactly one digit (its own) and is short enough for 16 MiniLM
tokens including [CLS] and [SEP]; `tests/test_encode_text.py` checks both.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "heldout")

# Placeholders: {word} "seven", {num} "7", {a_word} "a seven" / "an eight", {a_num} "a 7" / "an 8".
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num} written thickly",
    "number {word}",
    "{a_num}",
    "{word}, drawn by hand",
    "the number {num}",
    "a picture of the digit {word}",
    "handwritten digit {num}",
    "{a_word} written with a thin pen",
    "a scanned {num} in white ink",
)

HELDOUT_TEMPLATES = (
    "someone wrote down {a_word} here",
    "this picture shows the numeral {num}",
    "what you see is a scribbled {word}",
)


def _article(label: int) -> str:
  # The article follows the spoken word, not its spelling or glyph: "an eight", "an 8", but
  # "a one" (said "won"). Among the digits only eight starts with a vowel sound.
  return "an" if label == 8 else "a"


def fill(template: str, label: int) -> str:
  """One template filled for one digit label (0..9)."""
  label = _check_label(label)
  word = DIGIT_WORDS[label]
  art = _article(label)
  return template.format(word=word, num=str(label), a_word=f"{art} {word}", a_num=f"{art} {label}")


def templates(split: str) -> tuple[str, ...]:
  if split not in SPLITS:
    raise ValueError(f"caption split must be one of {', '.join(SPLITS)}, got {split!r}")
  return TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES


def captions_of(label: int, split: str) -> list[str]:
  """Every caption of `split` for one digit, in template order."""
  return [fill(t, label) for t in templates(split)]


def caption_for(label: int, rng: np.random.Generator, split: str = "train") -> str:
  """A caption for `label`, its template drawn uniformly by `rng` (deterministic given the seed)."""
  tpl = templates(split)
  return fill(tpl[int(rng.integers(len(tpl)))], label)


def captions_for_labels(labels: Sequence[int], rng: np.random.Generator, split: str = "train") -> list[str]:
  """`caption_for` over a label array; one draw per example, vectorised for 60k-image datasets."""
  tpl = templates(split)
  labels = np.asarray(labels)
  for v in np.unique(labels):
    _check_label(v)
  choice = rng.integers(len(tpl), size=labels.shape[0])
  table = [[fill(t, d) for t in tpl] for d in range(10)]
  return [table[int(lab)][int(c)] for lab, c in zip(labels, choice)]


def eval_captions() -> tuple[list[str], np.ndarray]:
  """All held-out captions (digit-major) and their labels: the evaluation prompts."""
  caps, labs = [], []
  for d in range(10):
    for c in captions_of(d, "heldout"):
      caps.append(c)
      labs.append(d)
  return caps, np.asarray(labs, np.int32)


def _check_label(label) -> int:
  if isinstance(label, (bool, np.bool_)) or int(label) != label or not 0 <= int(label) <= 9:
    raise ValueError(f"digit label must be an integer in 0..9, got {label!r}")
  return int(label)
