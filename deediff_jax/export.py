"""Export a training run's parameters to a params file (`sample.params_file`).

  python -m deediff_jax.export --workdir RUN --out params.npz [--uem-from RUN2] [--float16] [--raw]

Reads RUN/config.json and RUN's latest checkpoint (EMA weights unless --raw), and writes one flat
.npz (train/params_file.py): backbone, exit heads and UEMs/LTEs, plus the model config. A
train.mode=uem_only run already holds the whole tree (its backbone and heads are copied from
train.init_from), so exporting it gives the joint backbone + heads with the retrained UEM.
`--uem-from RUN2` takes the score modules (UEMs/LTEs) from another run of the same architecture
instead. `--float16` halves the file (values cast back to float32 on load). Bad input is one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from deediff_jax.config import EXIT_MODEL_KEYS, ConfigError, base_config, validate
from deediff_jax.tensor_files import CheckpointError


def config_of(workdir: str):
  """The validated config a run was trained with (RUN/config.json on top of the defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist; --workdir must be a training run (it writes config.json)")
  with open(path) as f:
    saved = json.load(f)
  c = base_config()
  for section, values in saved.items():
    if section not in c or not isinstance(values, dict):
      continue
    for key, value in values.items():
      if key in c[section]:
        default = c[section][key]
        c[section][key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
  return validate(c)


def export(workdir: str, out: str, *, uem_from: str = "", float16: bool = False, use_ema: bool = True) -> dict:
  """Writes the params file; returns {"path", "num_params", "bytes"}."""
  from deediff_jax.model.deediff import SCORE_KEYS
  from deediff_jax.train import params_file
  from deediff_jax.train.checkpoint import load_params
  config = config_of(workdir)
  params = dict(load_params(workdir, config, use_ema=use_ema))
  if uem_from:
    other = config_of(uem_from)
    scores = load_params(uem_from, other, use_ema=use_ema)
    for key in EXIT_MODEL_KEYS + ("depth", "embed_dim", "num_heads", "patch_size", "image_size"):
      if other.model.get(key) != config.model.get(key):
        raise CheckpointError(f"--uem-from {uem_from} has model.{key}={other.model.get(key)!r} but "
                              f"{workdir} has {config.model.get(key)!r}; both runs must be the same model")
    taken = [k for k in SCORE_KEYS if k in scores]
    if not taken:
      raise CheckpointError(f"--uem-from {uem_from} has no UEMs/LTEs to take")
    params.update({k: scores[k] for k in taken})
  params_file.save(out, params, config, float16=float16)
  leaves = params_file.flatten(params)
  return {"path": out, "num_params": int(sum(v.size for v in leaves.values())), "bytes": os.path.getsize(out)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True, help="training run (config.json + checkpoints/)")
  ap.add_argument("--out", required=True, help="the .npz to write")
  ap.add_argument("--uem-from", default="", help="take the UEMs/LTEs from this run instead")
  ap.add_argument("--float16", action="store_true", help="store float16 (cast to float32 on load)")
  ap.add_argument("--raw", action="store_true", help="the raw parameters instead of the EMA ones")
  args = ap.parse_args(argv)
  if not args.out.endswith(".npz"):
    print("error: --out must end in .npz", file=sys.stderr)
    return 2
  try:
    info = export(args.workdir, args.out, uem_from=args.uem_from, float16=args.float16, use_ema=not args.raw)
  except (CheckpointError, ConfigError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(f"wrote {info['path']}: {info['num_params']:,} parameters, {info['bytes'] / 1e6:.1f} MB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
