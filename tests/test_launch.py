"""launch/tpu_vm.py: the exact gcloud commands (--dry-run), their order, quoting, input errors,
and a real (non-dry) run against a fake `gcloud` on PATH that logs its argv."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_vm.py"

TPU = "gcloud compute tpus tpu-vm"
WHERE = "--zone us-central2-b"
POD = ["--name", "dd-pod", "--zone", "us-central2-b"]
CONFIG = ["--config", "configs/cifar10_uvit_small.py", "--workdir", "gs://my-bucket/c10"]
INSTALL = ('curl -LsSf https://astral.sh/uv/install.sh | env UV_UNMANAGED_INSTALL="$HOME/deediff/bin" sh'
           " && deediff/bin/uv venv --python 3.11 deediff/venv && cd deediff/src"
           " && ../bin/uv pip install --python ../venv/bin/python -r requirements.txt -e ."
           ' "jax[tpu]==0.10.2" "etils[epath-gcs]"')
PROGRAM = ("cd deediff/src && ../venv/bin/python -m deediff_jax.main --config configs/cifar10_uvit_small.py"
           " --workdir gs://my-bucket/c10 --config.train.distributed=True")


def launch(*args, env=None, cwd=None):
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=60, env=env, cwd=cwd)


def dry(*args):
  r = launch(*args, "--dry-run")
  assert r.returncode == 0, r.stderr
  assert r.stderr == ""
  return r.stdout.splitlines()


def ssh(remote, where=WHERE, name="dd-pod"):
  return f"{TPU} ssh {name} {where} --worker=all --command {shlex.quote(remote)}"


def copy_setup(name="dd-pod", where=WHERE):
  return [ssh("rm -rf deediff && mkdir -p deediff", where, name),
          f"{TPU} scp --recurse {shlex.quote(str(ROOT))} {name}:deediff/src {where} --worker=all",
          ssh(INSTALL, where, name)]


# ----------------------------------------------------------------------------- dry run


def test_create_exact_command_and_flags():
  assert dry("create", *POD, "--accelerator-type", "v4-32") == [
      f"{TPU} create dd-pod {WHERE} --accelerator-type v4-32 --version tpu-ubuntu2204-base"]
  assert dry("create", *POD, "--accelerator-type", "v4-8", "--project", "my-proj", "--spot") == [
      f"{TPU} create dd-pod {WHERE} --accelerator-type v4-8 --version tpu-ubuntu2204-base "
      "--project my-proj --spot"]
  assert dry("create", *POD, "--accelerator-type", "v6e-8", "--version", "v2-alpha-custom",
             "--preemptible") == [
      f"{TPU} create dd-pod {WHERE} --accelerator-type v6e-8 --version v2-alpha-custom --preemptible"]


@pytest.mark.parametrize("accel,runtime", [
    ("v2-8", "tpu-ubuntu2204-base"), ("v3-32", "tpu-ubuntu2204-base"), ("v5p-16", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_create_default_runtime_per_family(accel, runtime):
  assert dry("create", *POD, "--accelerator-type", accel) == [
      f"{TPU} create dd-pod {WHERE} --accelerator-type {accel} --version {runtime}"]


def test_setup_copies_the_local_tree_then_installs():
  assert dry("setup", *POD) == copy_setup()


def test_setup_from_git_with_ref_and_project():
  lines = dry("setup", *POD, "--project", "my-proj", "--repo", "https://github.com/me/deediff_jax.git",
              "--ref", "v0.1 rc")
  remote = ("rm -rf deediff && mkdir -p deediff && git clone https://github.com/me/deediff_jax.git "
            "deediff/src && git -C deediff/src checkout --quiet 'v0.1 rc' && " + INSTALL)
  assert lines == [ssh(remote, f"{WHERE} --project my-proj")]
  # The remote shell sees the ref with a space as one argument.
  words = shlex.split(shlex.split(lines[0])[-1])
  assert words[words.index("checkout"):][:3] == ["checkout", "--quiet", "v0.1 rc"]


def test_train_exact_command_and_quoting_of_extra_config_args():
  extra = ["--config.exit.schedule=8, 6, 4", "--config.train.num_steps=20",
           "--config.sample.sampler=it's"]
  lines = dry("train", *POD, "--accelerator-type", "v4-32", *CONFIG, *extra)
  remote = (PROGRAM + " '--config.exit.schedule=8, 6, 4' --config.train.num_steps=20 "
            "'--config.sample.sampler=it'\"'\"'s'")
  assert lines == [ssh(remote)]
  argv = shlex.split(lines[0])
  assert argv[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dd-pod", "--zone", "us-central2-b",
                       "--worker=all", "--command"]
  # What the worker's shell runs: every --config.x=y arrives as exactly one argument, unchanged.
  assert shlex.split(argv[10])[3:] == [
      "../venv/bin/python", "-m", "deediff_jax.main", "--config", "configs/cifar10_uvit_small.py",
      "--workdir", "gs://my-bucket/c10", "--config.train.distributed=True", *extra]


def test_train_single_host_accepts_an_absolute_local_workdir():
  lines = dry("train", *POD, "--accelerator-type", "v5litepod-8", "--config", "configs/digits.py",
              "--workdir", "/tmp/run")
  assert lines == [ssh("cd deediff/src && ../venv/bin/python -m deediff_jax.main --config "
                       "configs/digits.py --workdir /tmp/run --config.train.distributed=True")]


def test_delete_exact_command():
  assert dry("delete", *POD) == [f"{TPU} delete dd-pod {WHERE} --quiet"]
  assert dry("delete", *POD, "--project", "p-1") == [f"{TPU} delete dd-pod {WHERE} --project p-1 --quiet"]


def test_run_is_create_setup_train_delete_in_order():
  lines = dry("run", *POD, "--accelerator-type", "v4-32", "--spot", *CONFIG,
              "--config.train.num_steps=20")
  assert lines == [
      f"{TPU} create dd-pod {WHERE} --accelerator-type v4-32 --version tpu-ubuntu2204-base --spot",
      *copy_setup(),
      ssh(PROGRAM + " --config.train.num_steps=20"),
      f"{TPU} delete dd-pod {WHERE} --quiet"]
  kept = dry("run", *POD, "--accelerator-type", "v4-32", "--spot", *CONFIG, "--keep")
  assert kept == lines[:4] + [ssh(PROGRAM)]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,message", [
    (["create", "--name", "dd-pod", "--accelerator-type", "v4-8"],
     "error: missing --zone: give the TPU zone, e.g. --zone us-central2-b"),
    (["delete", "--zone", "us-central2-b"], "error: missing --name: name the TPU VM, e.g. --name deediff-v4"),
    (["delete", "--name", "DD_pod", "--zone", "us-central2-b"],
     "error: bad --name 'DD_pod': use lowercase letters, digits and hyphens, starting with a letter "
     "(at most 63 characters)"),
    (["delete", "--name", "dd", "--zone", "uscentral"], "error: bad --zone 'uscentral': a zone looks like "
     "us-central2-b"),
    (["create", *POD], "error: missing --accelerator-type (e.g. v4-8 or v5litepod-16), needed to create "
     "the VM"),
    (["create", *POD, "--accelerator-type", "v5e-8"],
     "error: unknown accelerator type 'v5e-8'; use VERSION-SIZE such as v4-8, v5p-16, v5litepod-16 or "
     "v6e-8 (v2, v3, v4, v5p, v5litepod, v6e)"),
    (["create", *POD, "--accelerator-type", "v4-12"],
     "error: accelerator type 'v4-12' has an impossible size: v4 sizes count TensorCores in multiples "
     "of 8 (v4-8, v4-16, v4-32, ...)"),
    (["create", *POD, "--accelerator-type", "v6e-12"],
     "error: accelerator type 'v6e-12' has an impossible size: v6e sizes are 1, 4, 8, 16, 32, 64, 128, "
     "256 chips"),
    (["create", *POD, "--accelerator-type", "v4-8", "--spot", "--preemptible"],
     "error: argument --preemptible: not allowed with argument --spot; see python launch/tpu_vm.py "
     "create --help"),
    (["train", *POD, "--accelerator-type", "v4-32", "--config", "configs/cifar10_uvit_small.py",
      "--workdir", "/tmp/c10"],
     "error: --workdir /tmp/c10 is local but v4-32 has 4 workers that cannot share it; use --workdir "
     "gs://BUCKET/PATH"),
    (["train", *POD, "--accelerator-type", "v5litepod-16", "--config", "configs/digits.py",
      "--workdir", "/tmp/c10"],
     "error: --workdir /tmp/c10 is local but v5litepod-16 has 4 workers that cannot share it; use "
     "--workdir gs://BUCKET/PATH"),
    (["train", *POD, "--accelerator-type", "v4-8", "--config", "configs/digits.py", "--workdir", "runs/a"],
     "error: --workdir runs/a is relative; use gs://BUCKET/PATH or an absolute path on the VM"),
    (["train", *POD, "--accelerator-type", "v4-8", "--config", "configs/digits.py", "--workdir", "gs://B/x"],
     "error: bad --workdir gs://B/x: use gs://BUCKET/PATH (a bucket name has 3 to 63 lowercase letters, "
     "digits, '-', '_' or '.')"),
    (["run", *POD, "--accelerator-type", "v4-8", "--config", "configs/digits.py", "--workdir", "/tmp/a"],
     "error: --workdir /tmp/a is on the VM, which run deletes at the end; use --workdir gs://BUCKET/PATH "
     "(or --keep)"),
    (["train", *POD, "--accelerator-type", "v4-8", "--workdir", "gs://my-bucket/x"],
     "error: missing --config: e.g. --config configs/cifar10_uvit_small.py"),
    (["train", *POD, "--accelerator-type", "v4-8", "--config", "/home/me/c.py", "--workdir",
      "gs://my-bucket/x"],
     "error: --config /home/me/c.py must be a .py path relative to the repository root (it is read on "
     "the TPU VM), e.g. configs/cifar10_uvit_small.py"),
    (["train", *POD, "--accelerator-type", "v4-8", *CONFIG, "--config.train.num_steps", "20"],
     "error: unexpected argument '--config.train.num_steps'; extra arguments must be --config.KEY=VALUE "
     "(one argument, with '=')"),
    (["delete", *POD, "--config.train.num_steps=20"],
     "error: unexpected argument '--config.train.num_steps=20'; only train and run take "
     "--config.KEY=VALUE"),
    (["delete", *POD, "--keep"],
     "error: unexpected argument '--keep'; options go after the subcommand, see python "
     "launch/tpu_vm.py delete --help"),
    (["setup", *POD, "--ref", "main"],
     "error: --ref needs --repo URL (without --repo the local tree is copied as it is)"),
    ([], "error: missing SUBCOMMAND: one of create, setup, train, delete, run"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
  r = launch(*args, "--dry-run") if args else launch()
  assert r.returncode == 2
  assert r.stdout == ""
  assert r.stderr == message + "\n"


def test_setup_rejects_a_src_that_is_not_the_repository(tmp_path):
  r = launch("setup", *POD, "--src", str(tmp_path), "--dry-run")
  assert (r.returncode, r.stderr) == (2, f"error: --src {tmp_path} is not the deediff_jax repository "
                                          "(no pyproject.toml)\n")


def test_launcher_imports_neither_jax_nor_the_package(tmp_path):
  # Packages that explode on import shadow the real ones: the launcher must not need them.
  for pkg in ("jax", "deediff_jax"):
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("raise ImportError('imported by the launcher')\n")
  env = {**os.environ, "PYTHONPATH": str(tmp_path)}
  r = launch("run", *POD, "--accelerator-type", "v4-32", *CONFIG, "--dry-run", env=env)
  assert r.returncode == 0, r.stderr
  assert len(r.stdout.splitlines()) == 6


# ----------------------------------------------------------------------------- fake gcloud


@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` that logs its argv as JSON lines and prints a line. It exits 1 when its joined argv
  contains one of the '|'-separated strings in $FAKE_GCLOUD_FAIL_ON, and sleeps for a minute when
  it contains $FAKE_GCLOUD_HANG_ON."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.jsonl"
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys, time
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      print("fake gcloud:", sys.argv[1:5], flush=True)
      joined = " ".join(sys.argv)
      if os.environ.get("FAKE_GCLOUD_HANG_ON", "@") in joined:
        time.sleep(60)
      fail_on = [s for s in os.environ.get("FAKE_GCLOUD_FAIL_ON", "").split("|") if s]
      sys.exit(1 if any(s in joined for s in fail_on) else 0)
      """))
  gcloud.chmod(0o755)

  def env(**extra):
    e = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_GCLOUD_")}
    return {**e, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}

  def calls():
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  def run(*args, fail_on=None):
    r = launch(*args, env=env(**({"FAKE_GCLOUD_FAIL_ON": fail_on} if fail_on else {})))
    made = calls()
    log.unlink(missing_ok=True)
    return r, made

  run.env, run.calls = env, calls
  return run


def _argvs(lines):
  return [shlex.split(l)[1:] for l in lines]  # without the leading "gcloud"


RUN = ["run", *POD, "--accelerator-type", "v4-32", *CONFIG, "--config.exit.schedule=8, 6, 4"]


def test_real_run_executes_exactly_the_dry_run_commands(fake_gcloud, tmp_path):
  planned = _argvs(dry(*RUN))
  log = tmp_path / "logs" / "c10.log"
  r, calls = fake_gcloud(*RUN, "--log", str(log))
  assert r.returncode == 0, r.stderr
  assert calls == planned and len(calls) == 6
  # Output is streamed to stdout and teed into the log file, one fake line per command.
  assert r.stdout.count("fake gcloud:") == 6
  text = log.read_text()
  assert text.count("fake gcloud:") == 6
  assert f"+ {dry(*RUN)[4]}\n" in text  # the train command line precedes its output
  for sub in (["create", *POD, "--accelerator-type", "v4-8"], ["setup", *POD], ["delete", *POD],
              ["train", *POD, "--accelerator-type", "v4-32", *CONFIG, "--config.x=a b"]):
    r, calls = fake_gcloud(*sub)
    assert r.returncode == 0, r.stderr
    assert calls == _argvs(dry(*sub))


def test_run_deletes_the_vm_after_a_failing_train_step(fake_gcloud):
  planned = _argvs(dry(*RUN))
  r, calls = fake_gcloud(*RUN, fail_on="deediff_jax.main")
  assert r.returncode == 1
  assert calls == planned  # create, setup x3, train (fails), delete
  assert calls[-1][:4] == ["compute", "tpus", "tpu-vm", "delete"]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: command failed with exit code 1: {dry(*RUN)[4]}"]
  assert "deleting TPU VM dd-pod after the failure" in r.stderr


def test_run_keep_leaves_the_vm_after_a_failure(fake_gcloud):
  r, calls = fake_gcloud(*RUN, "--keep", fail_on="deediff_jax.main")
  assert r.returncode == 1
  assert calls == _argvs(dry(*RUN, "--keep"))
  assert not any("delete" in c for c in calls)


def test_failed_create_stops_without_deleting(fake_gcloud):
  r, calls = fake_gcloud(*RUN, fail_on="tpu-vm create")
  assert r.returncode == 1
  assert calls == _argvs(dry(*RUN))[:1]
  assert r.stderr.splitlines()[-1] == f"error: command failed with exit code 1: {dry(*RUN)[0]}"


def test_setup_stops_on_the_first_failure(fake_gcloud):
  r, calls = fake_gcloud("setup", *POD, fail_on="tpu-vm scp")
  assert r.returncode == 1
  assert calls == _argvs(dry("setup", *POD))[:2]  # rm on all workers, then the failing scp
  assert r.stderr.splitlines()[-1] == f"error: command failed with exit code 1: {dry('setup', *POD)[1]}"


def test_failed_delete_after_a_failure_says_how_to_delete_by_hand(fake_gcloud):
  r, calls = fake_gcloud(*RUN, fail_on="tpu-vm ssh|tpu-vm delete")
  assert r.returncode == 1
  assert [c[3] for c in calls] == ["create", "ssh", "delete"]
  assert r.stderr.splitlines()[-1] == ("error: could not delete TPU VM dd-pod; it is billed until you run: "
                                       f"{TPU} delete dd-pod {WHERE} --quiet")


def test_missing_gcloud_is_an_input_error(tmp_path):
  env = {**os.environ, "PATH": str(tmp_path)}
  r = launch("delete", *POD, env=env)
  assert (r.returncode, r.stdout) == (2, "")
  assert r.stderr == ("error: gcloud not found on PATH; install the Google Cloud CLI "
                      "(https://cloud.google.com/sdk/docs/install) or use --dry-run\n")


def test_readme_dry_run_example_matches_the_launcher():
  text = (ROOT / "launch" / "README.md").read_text()
  block = text.split("prints (the copied path is your checkout):\n\n```\n", 1)[1].split("```", 1)[0]
  expected = block.replace("/home/me/deediff_jax", shlex.quote(str(ROOT))).splitlines()
  assert expected == dry("run", "--name", "deediff-c10", "--zone", "us-central2-b", "--accelerator-type",
                         "v4-32", "--spot", "--config", "configs/cifar10_uvit_small.py", "--workdir",
                         "gs://my-deediff-runs/cifar10")


def test_run_deletes_the_vm_after_ctrl_c_during_training(fake_gcloud):
  # A shell's background job (`cmd &`, e.g. CI started with nohup) inherits SIGINT ignored, and
  # Python then never raises KeyboardInterrupt; give the script the default disposition back.
  proc = subprocess.Popen([sys.executable, str(SCRIPT), *RUN], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=fake_gcloud.env(FAKE_GCLOUD_HANG_ON="deediff_jax.main"),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  # Stay under the fake train step's 60 s hang: SIGINT must arrive while it still runs.
  deadline = time.time() + 30
  while len(fake_gcloud.calls()) < 5 and time.time() < deadline:  # wait for the train step
    time.sleep(0.05)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)  # a loaded machine needed more than 30 s to clean up
  assert proc.returncode == 130
  assert fake_gcloud.calls() == _argvs(dry(*RUN))
  assert "error: interrupted\ndeleting TPU VM dd-pod after the failure\n" in err
