#!/usr/bin/env python3
"""Train deediff_jax on a Cloud TPU VM or pod slice with gcloud.

  python launch/tpu_vm.py create --name NAME --zone ZONE --accelerator-type v4-32 [--spot]
  python launch/tpu_vm.py setup  --name NAME --zone ZONE [--repo URL [--ref REF]]
  python launch/tpu_vm.py train  --name NAME --zone ZONE --accelerator-type v4-32 \
      --config configs/cifar10_uvit_small.py --workdir gs://BUCKET/cifar10 [--config.KEY=VALUE ...]
  python launch/tpu_vm.py delete --name NAME --zone ZONE
  python launch/tpu_vm.py run    ...all of the above: create -> setup -> train -> delete

Every subcommand takes --dry-run: print the exact gcloud commands, one per line, and run nothing.
Standard library only (no jax): it runs on the laptop that drives the pod. See launch/README.md.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# jax 0.10.2's `tpu` extra pins libtpu==0.0.42.*, which is published on PyPI: no -f/--find-links.
JAX_SPEC = "jax[tpu]==0.10.2"
# Without TensorFlow, etils.epath (orbax's path layer) reads and writes gs:// through gcsfs.
GCS_SPEC = "etils[epath-gcs]"
# jax 0.10 needs Python >= 3.11 and the TPU images ship Ubuntu 22.04's 3.10, so setup builds a
# uv-managed 3.11 venv instead of touching the system Python.
PYTHON_VERSION = "3.11"
UV_INSTALLER = "https://astral.sh/uv/install.sh"
# Remote layout, relative to $HOME on every worker (ssh and scp start there).
REMOTE_ROOT = "deediff"
REMOTE_SRC = f"{REMOTE_ROOT}/src"
REMOTE_VENV = f"{REMOTE_ROOT}/venv"
REMOTE_UV = f"{REMOTE_ROOT}/bin/uv"

GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]

# Accelerator families: how the size in the name maps to worker VMs, and the runtime (--version)
# recommended for JAX. v2/v3/v4/v5p count TensorCores with 8 per VM; v5e/v6e count chips, with up
# to 8 chips on one VM and 4 chips per VM in multi-host slices.
_CORE_FAMILIES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                  "v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5"}
_CHIP_FAMILIES = {"v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
_CHIP_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
_ACCEL_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_GCS_RE = re.compile(r"^gs://[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9](/.*)?$")
_EXTRA_RE = re.compile(r"^--config\.[A-Za-z_][A-Za-z0-9_.]*=")


class LaunchError(ValueError):
  """Bad input; main() prints it as one line and exits with code 2."""


class StepFailed(RuntimeError):
  """A gcloud command exited non-zero."""

  def __init__(self, cmd: list[str], code: int):
    super().__init__(f"command failed with exit code {code}: {shlex.join(cmd)}")
    self.code = code


def accelerator_workers(accel: str) -> int:
  """'v4-32' -> 4: the number of TPU VM workers (hosts) of that slice."""
  m = _ACCEL_RE.match(accel or "")
  if not m:
    raise LaunchError(f"unknown accelerator type {accel!r}; use VERSION-SIZE such as v4-8, v5p-16, "
                      "v5litepod-16 or v6e-8 (v2, v3, v4, v5p, v5litepod, v6e)")
  family, size = m.group(1), int(m.group(2))
  if family in _CORE_FAMILIES:
    if size < 8 or size % 8:
      raise LaunchError(f"accelerator type {accel!r} has an impossible size: {family} sizes count "
                        f"TensorCores in multiples of 8 ({family}-8, {family}-16, {family}-32, ...)")
    return size // 8
  if size not in _CHIP_SIZES:
    raise LaunchError(f"accelerator type {accel!r} has an impossible size: {family} sizes are "
                      f"{', '.join(str(s) for s in _CHIP_SIZES)} chips")
  return 1 if size <= 8 else size // 4


def default_runtime(accel: str) -> str:
  family = accel.rsplit("-", 1)[0]
  return {**_CORE_FAMILIES, **_CHIP_FAMILIES}[family]


def _where(args) -> list[str]:
  """The flags that locate the VM, shared by every gcloud command."""
  return ["--zone", args.zone] + (["--project", args.project] if args.project else [])


def _ssh_all(args, remote: str) -> list[str]:
  return GCLOUD_TPU + ["ssh", args.name] + _where(args) + ["--worker=all", "--command", remote]


def create_commands(args) -> list[list[str]]:
  cmd = GCLOUD_TPU + ["create", args.name, "--zone", args.zone,
                      "--accelerator-type", args.accelerator_type,
                      "--version", args.version or default_runtime(args.accelerator_type)]
  cmd += ["--project", args.project] if args.project else []
  cmd += ["--spot"] if args.spot else []
  cmd += ["--preemptible"] if args.preemptible else []
  return [cmd]


def setup_commands(args) -> list[list[str]]:
  """Source on every worker, then a Python 3.11 venv with the package, jax[tpu] and gcsfs."""
  fresh = f"rm -rf {REMOTE_ROOT} && mkdir -p {REMOTE_ROOT}"
  install = " && ".join([
      f'curl -LsSf {UV_INSTALLER} | env UV_UNMANAGED_INSTALL="$HOME/{REMOTE_ROOT}/bin" sh',
      f"{REMOTE_UV} venv --python {PYTHON_VERSION} {REMOTE_VENV}",
      f"cd {REMOTE_SRC}",
      f'../bin/uv pip install --python ../venv/bin/python -r requirements.txt -e . "{JAX_SPEC}" '
      f'"{GCS_SPEC}"',
  ])
  if args.repo:
    fetch = [shlex.join(["git", "clone", args.repo, REMOTE_SRC])]
    if args.ref:
      fetch.append(shlex.join(["git", "-C", REMOTE_SRC, "checkout", "--quiet", args.ref]))
    return [_ssh_all(args, " && ".join([fresh, *fetch, install]))]
  scp = GCLOUD_TPU + ["scp", "--recurse", str(args.src), f"{args.name}:{REMOTE_SRC}"]
  scp += _where(args) + ["--worker=all"]
  return [_ssh_all(args, fresh), scp, _ssh_all(args, install)]


def train_commands(args, extra: list[str]) -> list[list[str]]:
  program = ["../venv/bin/python", "-m", "deediff_jax.main", "--config", args.config,
             "--workdir", args.workdir, "--config.train.distributed=True", *extra]
  return [_ssh_all(args, f"cd {REMOTE_SRC} && {shlex.join(program)}")]


def delete_commands(args) -> list[list[str]]:
  return [GCLOUD_TPU + ["delete", args.name] + _where(args) + ["--quiet"]]


# ----------------------------------------------------------------------------- validation


def _validate(args, extra: list[str]) -> None:
  cmd = args.command
  if not args.name:
    raise LaunchError("missing --name: name the TPU VM, e.g. --name deediff-v4")
  if not _NAME_RE.match(args.name):
    raise LaunchError(f"bad --name {args.name!r}: use lowercase letters, digits and hyphens, starting "
                      "with a letter (at most 63 characters)")
  if not args.zone:
    raise LaunchError("missing --zone: give the TPU zone, e.g. --zone us-central2-b")
  if not _ZONE_RE.match(args.zone):
    raise LaunchError(f"bad --zone {args.zone!r}: a zone looks like us-central2-b")
  if cmd in ("create", "train", "run"):
    if not args.accelerator_type:
      why = "to create the VM" if cmd == "create" else "to know whether the workdir must be on gs://"
      raise LaunchError(f"missing --accelerator-type (e.g. v4-8 or v5litepod-16), needed {why}")
    workers = accelerator_workers(args.accelerator_type)
  if cmd in ("setup", "run"):
    if args.ref and not args.repo:
      raise LaunchError("--ref needs --repo URL (without --repo the local tree is copied as it is)")
    if not args.repo and not (Path(args.src) / "pyproject.toml").is_file():
      raise LaunchError(f"--src {args.src} is not the deediff_jax repository (no pyproject.toml)")
  if cmd in ("train", "run"):
    if not args.config:
      raise LaunchError("missing --config: e.g. --config configs/cifar10_uvit_small.py")
    path = args.config.split(":", 1)[0]
    if Path(path).is_absolute() or not path.endswith(".py"):
      raise LaunchError(f"--config {args.config} must be a .py path relative to the repository root "
                        "(it is read on the TPU VM), e.g. configs/cifar10_uvit_small.py")
    if not args.workdir:
      raise LaunchError("missing --workdir: e.g. --workdir gs://BUCKET/cifar10")
    on_gcs = args.workdir.startswith("gs://")
    if on_gcs and not _GCS_RE.match(args.workdir):
      raise LaunchError(f"bad --workdir {args.workdir}: use gs://BUCKET/PATH (a bucket name has 3 to "
                        "63 lowercase letters, digits, '-', '_' or '.')")
    if not on_gcs and workers > 1:
      raise LaunchError(f"--workdir {args.workdir} is local but {args.accelerator_type} has {workers} "
                        "workers that cannot share it; use --workdir gs://BUCKET/PATH")
    if not on_gcs and cmd == "run" and not args.keep:
      raise LaunchError(f"--workdir {args.workdir} is on the VM, which run deletes at the end; use "
                        "--workdir gs://BUCKET/PATH (or --keep)")
    if not on_gcs and not args.workdir.startswith("/"):
      raise LaunchError(f"--workdir {args.workdir} is relative; use gs://BUCKET/PATH or an absolute "
                        "path on the VM")
  for a in extra:
    takes_extra = cmd in ("train", "run")
    if takes_extra and _EXTRA_RE.match(a):
      continue
    if a.startswith("--config.") and takes_extra:
      raise LaunchError(f"unexpected argument {a!r}; extra arguments must be --config.KEY=VALUE (one "
                        "argument, with '=')")
    if a.startswith("--config."):
      raise LaunchError(f"unexpected argument {a!r}; only train and run take --config.KEY=VALUE")
    raise LaunchError(f"unexpected argument {a!r}; options go after the subcommand, see "
                      f"python launch/tpu_vm.py {cmd} --help")


# ----------------------------------------------------------------------------- execution


def _execute(cmd: list[str], log) -> None:
  """Run one command, streaming its output (and copying it into `log`)."""
  print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
  if log is None:
    code = subprocess.run(cmd).returncode
  else:
    log.write(f"+ {shlex.join(cmd)}\n")
    log.flush()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
      for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()
    code = proc.returncode
  if code != 0:
    raise StepFailed(cmd, code)


def _plan(args, extra):
  """(steps that must succeed first, main steps, cleanup steps) for the subcommand."""
  cmd = args.command
  if cmd == "create":
    return [], create_commands(args), []
  if cmd == "setup":
    return [], setup_commands(args), []
  if cmd == "train":
    return [], train_commands(args, extra), []
  if cmd == "delete":
    return [], delete_commands(args), []
  cleanup = [] if args.keep else delete_commands(args)
  return create_commands(args), setup_commands(args) + train_commands(args, extra), cleanup


def _run(args, extra) -> int:
  first, main_steps, cleanup = _plan(args, extra)
  if args.dry_run:
    for cmd in first + main_steps + cleanup:
      print(shlex.join(cmd))
    return 0
  if shutil.which("gcloud") is None:
    raise LaunchError("gcloud not found on PATH; install the Google Cloud CLI "
                      "(https://cloud.google.com/sdk/docs/install) or use --dry-run")
  log = None
  if getattr(args, "log", None):
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log, "w")
  try:
    try:
      for cmd in first:  # if create fails, nothing of ours exists: stop without deleting
        _execute(cmd, log)
    except KeyboardInterrupt:
      print(f"error: interrupted while creating {args.name}; the VM may exist anyway, check "
            f"gcloud compute tpus tpu-vm list --zone {args.zone}", file=sys.stderr)
      return 130
    failure, code = None, 0
    try:
      for cmd in main_steps:
        _execute(cmd, log)
    except StepFailed as e:
      failure, code = str(e), 1
    except KeyboardInterrupt:
      failure, code = "interrupted", 130
    if failure:
      print(f"error: {failure}", file=sys.stderr, flush=True)
    # The VM is billed while it exists, so run deletes it after a failure or Ctrl-C as well.
    for cmd in cleanup:
      if failure:
        print(f"deleting TPU VM {args.name} after the failure", file=sys.stderr, flush=True)
      try:
        _execute(cmd, log)
      except StepFailed:
        print(f"error: could not delete TPU VM {args.name}; it is billed until you run: "
              f"{shlex.join(cmd)}", file=sys.stderr)
        return 1
    return code
  except StepFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:
    if log is not None:
      log.close()


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse would print the usage too)
    command = " ".join(["python launch/tpu_vm.py", *self.prog.split()[1:], "--help"])
    self.exit(2, f"error: {message}; see {command}\n")


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  common.add_argument("--name", help="TPU VM name, e.g. deediff-v4")
  common.add_argument("--zone", help="TPU zone, e.g. us-central2-b")
  common.add_argument("--project", help="GCP project (default: gcloud's core/project)")
  common.add_argument("--dry-run", action="store_true",
                      help="print the gcloud commands, one per line, and run nothing")
  accel = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  accel.add_argument("--accelerator-type", help="v4-8, v4-32, v5p-16, v5litepod-16, v6e-8, ...")
  vm = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  vm.add_argument("--version", help="TPU runtime (default: the recommended one for the family)")
  kind = vm.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="spot VM (cheap, can be preempted)")
  kind.add_argument("--preemptible", action="store_true", help="preemptible VM (at most 24 h)")
  src = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  src.add_argument("--repo", help="git URL to clone on every worker (default: copy --src)")
  src.add_argument("--ref", help="branch, tag or commit to check out (with --repo)")
  src.add_argument("--src", default=str(REPO_ROOT),
                   help="local tree to copy when --repo is not given (default: this repository)")
  job = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  job.add_argument("--config", help="config file relative to the repo, e.g. configs/cifar10_uvit_small.py")
  job.add_argument("--workdir", help="gs://BUCKET/PATH (an absolute path on the VM only for single-host slices)")
  job.add_argument("--log", help="also write the streamed output to this local file")

  p = _Parser(prog="tpu_vm.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
  sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND")
  sub.add_parser("create", parents=[common, accel, vm], allow_abbrev=False,
                 help="create the TPU VM or pod slice")
  sub.add_parser("setup", parents=[common, src], allow_abbrev=False,
                 help="install the package and jax[tpu] on every worker")
  sub.add_parser("train", parents=[common, accel, job], allow_abbrev=False,
                 help="run training on all workers at once; extra --config.KEY=VALUE are passed on")
  sub.add_parser("delete", parents=[common], allow_abbrev=False, help="delete the TPU VM")
  run = sub.add_parser("run", parents=[common, accel, vm, src, job], allow_abbrev=False,
                       help="create -> setup -> train -> delete (also after a failure)")
  run.add_argument("--keep", action="store_true", help="do not delete the VM at the end")
  return p


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.command is None:
    print("error: missing SUBCOMMAND: one of create, setup, train, delete, run", file=sys.stderr)
    return 2
  try:
    _validate(args, extra)
    return _run(args, extra)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
