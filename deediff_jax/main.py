"""The command line: flags -> validated config -> mode.

  python -m deediff_jax.main --config configs/NAME.py --workdir DIR \
      [--mode train|sample|sweep|eval|tune] [--config.KEY=VALUE ...]

`train` (the default) resumes from DIR automatically and ends by sampling. Bad input (flags,
config, data, checkpoints) is one line on stderr, `error: ...`, and exit code 2; a run that
diverges (NaN/Inf) is one line and exit code 1; SIGTERM/SIGINT during training saves a
checkpoint at the step reached and is one line and exit code 128 + the signal (143, 130).
"""
from __future__ import annotations

import difflib
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

MODES = ("train", "sample", "sweep", "eval", "tune")
_MODE_MODULES = {"sweep": "deediff_jax.eval.sweep", "eval": "deediff_jax.eval.evaluate",
                 "tune": "deediff_jax.eval.tune"}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")


class UsageError(ValueError):
  """Bad command-line flags."""


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _check_argv(argv: list[str]) -> None:
  """Checks what absl would report badly: a missing config file, an unknown --config.KEY."""
  from deediff_jax.config import base_config, _flatten
  config_path = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      config_path = argv[i + 1]
    elif arg.startswith("--config="):
      config_path = arg.split("=", 1)[1]
  if config_path is None:
    raise UsageError("missing --config; pass --config configs/NAME.py (e.g. configs/digits.py)")
  path = config_path.split(":", 1)[0]  # config_flags allows FILE:ARG
  if not os.path.isfile(path):
    raise UsageError(f"config file not found: {path}; pass --config configs/NAME.py (e.g. configs/digits.py)")
  schema = _flatten(base_config())
  sections = {k.split(".")[0] for k in schema}
  for arg in argv[1:]:
    m = re.match(r"--(?:no)?config\.([A-Za-z0-9_.]+)(=|$)", arg)
    if not m:
      continue
    key = m.group(1)
    if key in schema or key in sections:
      continue
    close = ([k for k in schema if k.split(".")[-1] == key.split(".")[-1]]
             or difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6))
    hint = f"; did you mean --config.{close[0]}?" if close else "; see deediff_jax/config.py for the keys"
    raise UsageError(f"unknown config key '{key}' in {arg.split('=')[0]}{hint}")


def _reset_flags() -> None:
  """A second main() in one process (a notebook, the tests) starts from the defaults."""
  if FLAGS.is_parsed():
    for name in [n for n in FLAGS if n.startswith("config.")]:
      delattr(FLAGS, name)  # the previous run's --config.KEY override flags
    FLAGS.unparse_flags()


def _parse(argv: list[str]):
  _check_argv(argv)
  _reset_flags()
  saved_argv = sys.argv
  # config_flags defines one flag per --config.KEY override from sys.argv when it parses: let it
  # see this argv (main(argv) may be called with other arguments than the process's own).
  sys.argv = list(argv)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    raise UsageError(f"{_one_line(e)}; see --helpfull") from None
  finally:
    sys.argv = saved_argv
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {' '.join(rest[1:])}; flags look like --config.train.lr=1e-3")
  if not FLAGS.workdir:
    raise UsageError("missing --workdir; pass --workdir DIR (a local path or gs://bucket/dir)")
  try:
    config = FLAGS.config
  except Exception as e:  # noqa: BLE001 -- a config file that fails to load (syntax, import)
    raise UsageError(f"cannot load --config: {_one_line(e)}") from None
  return config


def _user_error_types():
  from deediff_jax.config import ConfigError
  from deediff_jax.train.checkpoint import CheckpointError
  from deediff_jax.data.sources import DataError
  return (UsageError, ConfigError, CheckpointError, DataError)


def _is_user_error(e: BaseException, known) -> bool:
  # Our own ValueError subclasses (data, sampler, eval, ...) are bad input by contract.
  t = type(e)
  return isinstance(e, known) or (issubclass(t, ValueError) and t is not ValueError
                                  and t.__module__.startswith("deediff_jax."))


def run(argv: list[str]) -> int:
  config = _parse(argv)
  from deediff_jax.config import validate
  config = validate(config)
  workdir, mode = FLAGS.workdir, FLAGS.mode
  if "://" not in workdir:  # orbax needs absolute local paths; --workdir runs/x is what users type
    workdir = os.path.abspath(os.path.expanduser(workdir))
  from deediff_jax.train.checkpoint import check_workdir_writable
  check_workdir_writable(workdir)  # every mode writes there; one line before any work (e.g. /proc/x)
  if mode == "train":
    import jax
    from deediff_jax.train import sharding
    from deediff_jax.train.trainer import finished, train
    if config.train.mode == "router":  # Learning-to-Cache: only a router learns (docs/caching.md)
      from deediff_jax.train.router import train_router
      train_router(config, str(workdir))
      return 0
    state = train(config, workdir)
    if finished(config, state) and config.train.sample_at_end:
      # Training ends by sampling; the trainer itself knows nothing of sampling (data flows one way).
      ema = sharding.gather_to_host(state.ema_params)  # a collective: every process takes part
      if jax.process_index() == 0:  # one writer of samples.png / sample_stats.json
        from deediff_jax import sample
        sample.run(config, str(workdir), params=ema)
  elif mode == "sample":
    from deediff_jax import sample
    sample.run(config, workdir)
  else:
    import importlib
    importlib.import_module(_MODE_MODULES[mode]).run(config, workdir)
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    known = _user_error_types()
    return run(argv)
  except KeyboardInterrupt:
    print("error: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 -- sorted below: user errors are one line, bugs keep their traceback
    from deediff_jax.train.preemption import Preempted
    from deediff_jax.train.trainer import TrainingDivergedError
    if isinstance(e, Preempted):  # SIGTERM/SIGINT: checkpoint saved; 128 + the signal's number
      print(f"error: {_one_line(e)}", file=sys.stderr)
      return e.exit_code
    if isinstance(e, TrainingDivergedError):
      print(f"error: {_one_line(e)}", file=sys.stderr)
      return 1
    if _is_user_error(e, known):
      print(f"error: {_one_line(e)}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
