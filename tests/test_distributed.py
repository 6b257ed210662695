"""Multi-host training: two processes on this machine (jax.distributed on a localhost
coordinator, gloo CPU collectives), each feeding only its half of every batch, train the same
model as one process on one device."""
import json
import os
import socket
import subprocess
import sys

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4


def tiny_config():
  from deediff_jax.config import base_config
  c = base_config()
  c.model.update(image_size=8, in_channels=1, embed_dim=32, depth=2, num_heads=2, patch_size=2,
                 num_classes=10)
  # One checkpoint, at the end (a multi-process save is a collective; one shows it works).
  c.train.update(batch_size=16, num_steps=STEPS, lr=1e-3, warmup_steps=2, log_every=2,
                 checkpoint_every=STEPS, sample_at_end=False)
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker(port: int, process_id: int, workdir: str, out: str):
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  from deediff_jax.train import sharding as shd
  from deediff_jax.train.trainer import default_batch_fn, train
  c = tiny_config()
  c.train.distributed = True  # already initialized above: train() must leave it as is
  c.mesh.fsdp = 2             # 4 devices in all: data 2 (across processes) x fsdp 2
  seen = []
  batch_fn, _ = default_batch_fn(c)

  def recording(step):
    b = batch_fn(step)
    seen.append(int(b["image"].shape[0]))
    return b

  state = train(c, workdir, batch_fn=recording, progress=False)
  params = shd.gather_to_host(state.params)
  if process_id == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(out, **flat)
  print("RESULT " + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                                "global_devices": jax.device_count(), "local_devices": jax.local_device_count(),
                                "local_rows": sorted(set(seen)), "step": int(jax.device_get(state.step))}),
        flush=True)


def test_two_processes_train_like_one(tmp_path):
  import jax
  from deediff_jax.train.trainer import train
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip(), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  out = str(tmp_path / "params.npz")
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(port), str(i),
                             str(tmp_path / "multi"), out], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  # The single-process reference runs meanwhile, on one device.
  ref = jax.device_get(train(tiny_config(), tmp_path / "single", progress=False).params)
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=300)
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, stderr[-3000:]
    results.append(json.loads(lines[-1][len("RESULT "):]))
  assert sorted(r["process_index"] for r in results) == [0, 1]
  for r in results:
    assert r["process_count"] == 2 and r["global_devices"] == 4 and r["local_devices"] == 2
    assert r["local_rows"] == [8]  # each process loaded only its half of the 16-row batch
    assert r["step"] == STEPS
  got = np.load(out)
  flat_ref = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(ref)}
  assert set(got.files) == set(flat_ref)
  worst = max(float(np.max(np.abs(got[k] - flat_ref[k]))) for k in flat_ref)
  assert worst < 1e-5, worst
  # The multi-process run checkpointed like any other.
  assert (tmp_path / "multi" / "checkpoints" / str(STEPS)).is_dir()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
  """No coordinator in the environment: exit 2 and one line that says which variables to set."""
  import os as _os
  import subprocess as _sp
  import sys as _sys
  env = {k: v for k, v in _os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                   "JAX_PROCESS", "SLURM", "OMPI"))}
  proc = _sp.run([_sys.executable, "-m", "deediff_jax.main", "--config", "configs/digits.py",
                  "--workdir", str(tmp_path / "w"), "--config.train.distributed=True"],
                 capture_output=True, text=True, env=env, timeout=300,
                 cwd=_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: train.distributed=True but jax.distributed"), lines
  assert "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID" in lines[0]
  assert not (tmp_path / "w" / "checkpoints").exists()
