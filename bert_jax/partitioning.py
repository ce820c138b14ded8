"""Device mesh and sharding: mesh axes, the logical-to-mesh rules table, shardings for state and batch.

Owns: every decision about where arrays live. The model only names logical axes (see
`bert_jax.models.bert`); this module maps them to the mesh axes `data`, `fsdp` and `tensor`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

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
