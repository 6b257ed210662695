"""The ("data", "fsdp") device mesh, parameter sharding rules and per-host batch feeding.

- The batch is split over *both* axes: every device sees a different slice of the batch.
- A parameter is sharded over "fsdp" along its largest axis that the fsdp size divides;
  small parameters (and those with no such axis) are replicated. The same rule, applied by
  shape, shards the EMA and the optimizer moments exactly like the parameters they follow.
- Multi-host: every process builds the same global arrays from only its own rows
  (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from deediff_jax.config import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
# Below this many elements an all-gather costs more latency than the replicated copy costs memory.
MIN_SHARD_ELEMENTS = 1024


def maybe_initialize_distributed(train_config) -> None:
  """`jax.distributed.initialize()` when train.distributed (env-driven on TPU pods / SLURM).

  A caller that already initialized (e.g. with an explicit coordinator address) is left alone.
  """
  if not train_config.distributed:
    return
  if jax.distributed.is_initialized():
    return
  # jax reads JAX_COORDINATOR_ADDRESS itself but finds the process count and id only through
  # cluster detection (TPU, SLURM, Open MPI, Kubernetes); plain multi-node GPU launches pass them
  # as JAX_NUM_PROCESSES / JAX_PROCESS_ID (launch/multi_gpu.md).
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"train.distributed=True but jax.distributed.initialize() failed "
                      f"({' '.join(str(e).split())[:160]}); on TPU VMs and SLURM it is automatic, "
                      "elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  fsdp = int(mesh_config.fsdp)
  data = int(mesh_config.data)
  if data > 0 and fsdp > 0 and data * fsdp > num_devices:
    raise ConfigError(f"mesh.data x mesh.fsdp = {data} x {fsdp} does not fit the {num_devices} "
                      "available devices; set mesh.data=-1 to use all remaining devices")
  if fsdp <= 0 or num_devices % fsdp:
    raise ConfigError(f"config key 'mesh.fsdp' is {fsdp}; it must be a positive divisor of the "
                      f"{num_devices} available devices")
  if data == -1:
    data = num_devices // fsdp
  if data <= 0 or data * fsdp > num_devices:
    raise ConfigError(f"mesh.data x mesh.fsdp = {data} x {fsdp} does not fit the {num_devices} "
                      "available devices; set mesh.data=-1 to use all remaining devices")
  return data, fsdp


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  data, fsdp = mesh_shape(mesh_config, len(devices))
  # Auto axes: XLA propagates the shardings of intermediates from those of the inputs. (The
  # default, Explicit, would make every op in the model spell out its output sharding.)
  return jax.make_mesh((data, fsdp), AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * fsdp])


def param_spec(shape, fsdp_size: int) -> P:
  """The rule: shard the largest axis divisible by fsdp_size over 'fsdp', else replicate."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_ELEMENTS:
    return P()
  # Largest axis first; among equals the later one (the output features of a kernel).
  order = sorted(range(len(shape)), key=lambda a: (shape[a], a), reverse=True)
  for axis in order:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(mesh, abstract_tree):
  """NamedSharding for every leaf of a tree of arrays / ShapeDtypeStructs, by the rule."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_tree)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def check_batch_size(train_config, mesh) -> None:
  n = mesh.size
  micro = train_config.batch_size // train_config.grad_accum
  if micro % n:
    fix = n * train_config.grad_accum * max(1, round(train_config.batch_size / (n * train_config.grad_accum)))
    raise ConfigError(f"train.batch_size {train_config.batch_size} / train.grad_accum "
                      f"{train_config.grad_accum} = {micro} must be divisible by the {n} devices of the "
                      f"mesh (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}); use "
                      f"train.batch_size={fix}")
  if train_config.batch_size % jax.process_count():
    raise ConfigError(f"train.batch_size {train_config.batch_size} must be divisible by the "
                      f"{jax.process_count()} processes")


def global_batch(local_batch: dict, sharding: NamedSharding, global_batch_size: int) -> dict:
  """This process's rows (numpy) -> global jax Arrays sharded over the batch axis."""
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
  return out


def put_tree(tree, shardings):
  """Host (numpy) tree -> jax Arrays with the given shardings; works on many hosts too."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree_util.tree_map(put, tree, shardings)


def gather_to_host(tree):
  """A (possibly sharded, multi-host) tree -> full numpy arrays on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)
