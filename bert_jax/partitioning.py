"""Processes, device mesh and sharding: mesh axes, the logical-to-mesh rules table, shardings for state
and batch, and the per-device copies of the state that `jax.pmap` takes.

Owns: every decision about where arrays live (kernels inside the model too: `map_over_shards`), and
joining the processes of a multi-host run. The model only names logical axes (see
`bert_jax.models.axes`); this module maps them to the mesh axes `data`, `fsdp` and `tensor`. Batches
are placed by `batching.shard_batch`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
PMAP_AXIS = "batch"  # config.parallelism='pmap': the one axis, data parallel over every device

# Logical axis -> mesh axis. Data parallel shards only the batch; fsdp also shards the embed axis
# of every weight (and so its optimizer state); tensor parallel shards heads, MLP and vocab.
RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("embed_out", None),
    ("position", None),
    ("token_type", None),
    ("classes", None),
    ("layers", None),  # the stacked layer axis of scan_layers=True: every device holds every layer
)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves one `-1` in `requested` (data, fsdp, tensor) to the devices left over."""
  requested = tuple(int(x) for x in requested)
  if len(requested) != len(MESH_AXES):
    raise ValueError(f"config.mesh_shape={requested} must have {len(MESH_AXES)} entries {MESH_AXES}.")
  if requested.count(-1) > 1 or any(x == 0 or x < -1 for x in requested):
    raise ValueError(f"config.mesh_shape={requested}: use positive sizes and at most one -1 (the rest).")
  known = math.prod(x for x in requested if x != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh_shape={requested} does not divide the {num_devices} devices; "
                     f"choose sizes whose product divides {num_devices}.")
  shape = tuple(num_devices // known if x == -1 else x for x in requested)
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh_shape={requested} uses {math.prod(shape)} of the {num_devices} devices; "
                     "its product must equal the device count (or use -1 for one axis).")
  return shape


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(requested, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split on their leading axis over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(abstract_boxed_state: Any, mesh: Mesh) -> Any:
  """Shardings for a state whose parameters are `nn.LogicallyPartitioned` boxes (from `jax.eval_shape`).

  Leaves without logical names (step, rng, optimizer counts) are replicated.
  """
  logical_specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


# ----------------------------------------------------------------------------------------------------
# config.parallelism='pmap': one copy of the state per device. Checkpoints and evaluation see the
# state as global arrays laid out by `state_shardings` on a data-parallel mesh (replicated there), as
# the jit path holds it. Both conversions are one pmapped program each: every device keeps its own copy.

# The train step's axis name: its pmap then takes `replicate`'s output as it is (same sharding, no recompile).
_copy_per_device = jax.pmap(lambda _, tree: tree, PMAP_AXIS, in_axes=(0, None))  # out: stacked [devices, ...]
_one_copy = jax.pmap(lambda tree: tree, PMAP_AXIS, out_axes=None)  # in: stacked; out: the (identical) copies


def replicate(tree: Any) -> Any:
  """One copy of each array per local device, stacked on a new leading axis: what `jax.pmap` maps over.

  The arrays of `tree` must be replicated (`state_shardings` lays out any state so on a mesh whose
  fsdp and tensor axes are 1).
  """
  return _copy_per_device(np.arange(jax.local_device_count()), tree)  # pmap needs a mapped argument


def unreplicate(tree: Any, shardings: Any) -> Any:
  """The inverse of `replicate`: global arrays laid out by `shardings` (replicated ones)."""
  copies = _one_copy(tree)
  if jax.process_count() > 1:  # pmap returns this process's arrays: make them global arrays again
    copies = jax.tree_util.tree_map(
        lambda x, sharding: multihost_utils.host_local_array_to_global_array(x, sharding.mesh, PartitionSpec()),
        copies, shardings)
  return jax.device_put(copies, shardings)


def to_host(tree: Any) -> Any:
  """NumPy copies of the global arrays of `tree` (for an export). With several processes this is a
  collective, which every process must call: arrays sharded over hosts are gathered."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------------------------------
# Several hosts: one process per host, joined by `jax.distributed.initialize` before any JAX call.

DISTRIBUTED_ENV = "BERT_JAX_DISTRIBUTED"  # 1: join with JAX's cluster detection; 0: never join


def distributed_settings(environ: Mapping[str, str]) -> dict[str, Any] | None:
  """The arguments of `jax.distributed.initialize` that the environment asks for; None: one process.

  - `JAX_NUM_PROCESSES` > 1 (launch/slurm.sh, or by hand): `JAX_COORDINATOR_ADDRESS` (host:port of
    process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (0, 1, ...), all three required.
  - several tasks of one `srun` (`SLURM_NTASKS`) or `mpirun` ranks (`OMPI_COMM_WORLD_SIZE`): no
    arguments; JAX reads the cluster from their variables (and gives each process one GPU,
    `SLURM_LOCALID`, unless `JAX_LOCAL_DEVICE_IDS` lists more).
  - `BERT_JAX_DISTRIBUTED=1`: no arguments; JAX detects the cluster itself, e.g. the workers of a
    Cloud TPU VM from its metadata server (launch/tpu_vm.sh sets it). `BERT_JAX_DISTRIBUTED=0`
    keeps one process whatever the rest says.
  """
  forced = environ.get(DISTRIBUTED_ENV, "")
  if forced not in ("", "0", "1"):
    raise ValueError(f"{DISTRIBUTED_ENV}={forced!r}: use 1 (join the processes JAX detects) or 0 (one process).")
  if forced == "0":
    return None
  num_processes = _int_env(environ, "JAX_NUM_PROCESSES")
  if num_processes is not None and num_processes > 1:
    missing = [name for name in ("JAX_COORDINATOR_ADDRESS", "JAX_PROCESS_ID") if not environ.get(name)]
    if missing:
      raise ValueError(f"JAX_NUM_PROCESSES={num_processes} but {' and '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not set: set JAX_COORDINATOR_ADDRESS=HOST:PORT "
                       "(process 0's host) and JAX_PROCESS_ID=0..N-1 on every process (launch/slurm.sh does), "
                       "or unset JAX_NUM_PROCESSES for one process.")
    return {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"], "num_processes": num_processes,
            "process_id": _int_env(environ, "JAX_PROCESS_ID")}
  slurm_step = "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ  # a task of srun, not salloc
  several = ((slurm_step and (_int_env(environ, "SLURM_NTASKS") or 1) > 1)
             or (_int_env(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1)
  return {} if num_processes is None and (forced == "1" or several) else None


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer; fix or unset it.") from None


def backends_started() -> bool:
  """Whether JAX has started its backends (after which XLA's flags and the CPU client's options are fixed)."""
  from jax._src import xla_bridge  # no public API says whether a backend has started
  return xla_bridge.backends_are_initialized()


def add_xla_flags(xla_flags: str, environ: dict[str, str] = os.environ) -> None:
  """Puts `xla_flags` (`config.xla_flags`) before the environment's XLA_FLAGS, whose own flags then win.

  XLA reads its flags when JAX starts a backend, so this must run before any computation or device query.
  """
  xla_flags = xla_flags.strip()
  if not xla_flags:
    return
  if backends_started():
    raise RuntimeError(f"config.xla_flags={xla_flags!r} came after JAX started its backends, so XLA would "
                       "ignore them: apply them at the start of the program, or put them in XLA_FLAGS.")
  environ["XLA_FLAGS"] = " ".join(part for part in (xla_flags, environ.get("XLA_FLAGS", "").strip()) if part)


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> None:
  """Joins the processes of a multi-host run (see `distributed_settings`); with one process, nothing.

  Must run before anything asks JAX for its devices. Afterwards `jax.devices()` lists every host's
  devices, the mesh spans them, and each process feeds and holds only its own devices' shards.
  """
  settings = distributed_settings(environ)
  if settings is None or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**settings)
  logging.info("Process %d of %d joined: %d local of %d devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def map_over_shards(fn: Callable, inputs, in_axes, out_axes):
  """`fn(*inputs)` on each device's shard, the shards given by the logical axes of each input and output.

  XLA cannot split a custom call (our CPU attention kernel, a Pallas kernel), so on a mesh it would
  gather every input onto every device: map the call over the shards instead. `in_axes` has one
  tuple of logical names per input (None: replicated). Without a mesh, or inside `pmap`/`shard_map`
  (every axis manual: each device already holds only its own rows), it is `fn(*inputs)`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or set(mesh.axis_names) <= set(mesh.manual_axes):
    return fn(*inputs)

  def spec(logical):  # the rules' mesh axes for each dimension, those this mesh has
    def on_mesh(axes):
      axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a in mesh.axis_names)
      return axes or None
    if logical is None:
      return PartitionSpec()
    return PartitionSpec(*(on_mesh(a) for a in nn.logical_to_mesh_axes(logical)))

  # check_vma off: a custom call's outputs carry no varying-axes types for a custom VJP to match.
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_axes), out_specs=spec(out_axes),
                       check_vma=False)(*inputs)
