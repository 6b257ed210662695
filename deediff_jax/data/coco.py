"""MS-COCO caption files (`annotations/captions_*.json`): the first caption of each image.

U-ViT draws one of an image's five captions per training step; our recipe keeps one, the
caption with the lowest annotation id, so that an image and its caption line up by position.
Used by `encode_latents --coco-captions` (training captions, in the order of the encoded files)
and `encode_text --eval-captions captions_val2014.json` (held-out captions, in image-id order).
"""
from __future__ import annotations

import json
import os
from typing import Sequence


class CocoCaptionsError(ValueError):
  """A missing or malformed COCO captions file; the CLIs print it as one line."""


def is_coco_captions(obj) -> bool:
  """Whether parsed JSON looks like a COCO captions file (a dict with images and annotations)."""
  return isinstance(obj, dict) and "annotations" in obj and "images" in obj


def first_captions(annotations: str, ann: dict | None = None) -> tuple[dict, dict]:
  """({file basename: image id}, {image id: first caption}) of a captions_*.json; whitespace in
  captions is collapsed to single spaces. `ann`: the file's already parsed JSON, if at hand."""
  if ann is None and not os.path.isfile(annotations):
    raise CocoCaptionsError(f"{annotations} not found; give a COCO annotations/captions_*.json")
  try:
    if ann is None:
      with open(annotations) as f:
        ann = json.load(f)
    ids = {os.path.basename(im["file_name"]): im["id"] for im in ann["images"]}
    first: dict = {}
    for a in sorted(ann["annotations"], key=lambda a: a["id"]):
      first.setdefault(a["image_id"], " ".join(str(a["caption"]).split()))
  except (ValueError, KeyError, TypeError) as e:
    raise CocoCaptionsError(f"{annotations} is not a COCO captions file ({type(e).__name__}: {e})") from None
  return ids, first


def captions_for_files(annotations: str, files: Sequence[str]) -> list[str]:
  """The first caption of each image file (matched by basename), in the order of `files`."""
  ids, first = first_captions(annotations)
  out = []
  for rel in files:
    name = os.path.basename(rel)
    if name not in ids or ids[name] not in first:
      raise CocoCaptionsError(f"image {rel} has no caption in {annotations}; encode the matching split "
                              "(train2014 with captions_train2014.json)")
    out.append(first[ids[name]])
  return out


def captions_by_image_id(annotations: str, ann: dict | None = None) -> list[str]:
  """The first caption of every captioned image, in increasing image id (e.g. the 40,504 val2014
  images for held-out sampling captions). `ann`: the parsed JSON, if at hand."""
  _, first = first_captions(annotations, ann)
  if not first:
    raise CocoCaptionsError(f"{annotations} has no captions")
  return [first[i] for i in sorted(first)]
