"""Mesh construction and the logical-axis rules."""

import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from bert_jax import models
from bert_jax import partitioning


@pytest.mark.parametrize("requested, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((1, 1, 1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_rest(requested, devices, expected):
  assert partitioning.mesh_shape(requested, devices) == expected


@pytest.mark.parametrize("requested, devices, match", [
    ((3, -1, 1), 8, "does not divide the 8 devices"),
    ((2, 2, 1), 8, "uses 4 of the 8 devices"),
    ((-1, -1, 1), 8, "at most one -1"),
    ((8, 1), 8, "must have 3 entries"),
])
def test_bad_mesh_shapes_are_named(requested, devices, match):
  with pytest.raises(ValueError, match=match):
    partitioning.mesh_shape(requested, devices)


def test_rules_shard_heads_on_tensor_and_embed_on_fsdp(tiny_config):
  abstract = jax.eval_shape(models.BertModel(tiny_config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), partitioning.RULES)
  layer = specs["params"]["encoder"]["layer_0"]
  assert layer["attention"]["query"]["kernel"] == PartitionSpec("fsdp", "tensor", None)
  assert layer["intermediate"]["kernel"] == PartitionSpec("fsdp", "tensor")
  assert specs["params"]["embeddings"]["word_embeddings"]["embedding"] == PartitionSpec("tensor", "fsdp")


def test_every_logical_axis_of_the_model_has_a_rule(tiny_config):
  abstract = jax.eval_shape(models.BertForPreTraining(tiny_config).init, jax.random.key(0),
                            jnp.zeros((1, 4), jnp.int32))
  names = {name for leaf in jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
           for name in leaf.names}
  assert names <= {logical for logical, _ in partitioning.RULES}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),  # one process: nothing to join
    ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "gpu007:24242", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
      "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "gpu[007-008]"},  # launch/slurm.sh
     {"coordinator_address": "gpu007:24242", "num_processes": 2, "process_id": 1}),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[001-004]"}, {}),  # srun: JAX reads SLURM
    ({"SLURM_NTASKS": "4"}, None),  # inside salloc, but not a task of srun
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "gpu001"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, {}),
    ({"BERT_JAX_DISTRIBUTED": "1"}, {}),  # launch/tpu_vm.sh: JAX finds the TPU VM's workers itself
    ({"BERT_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "n1"}, None),
])
def test_distributed_settings_follow_the_environment(environ, expected):
  assert partitioning.distributed_settings(environ) == expected


@pytest.mark.parametrize("environ, match", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are not set"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_PROCESS_ID is not set"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"BERT_JAX_DISTRIBUTED": "yes"}, "BERT_JAX_DISTRIBUTED='yes': use 1"),
])
def test_incomplete_distributed_settings_are_named(environ, match):
  with pytest.raises(ValueError, match=match):
    partitioning.distributed_settings(environ)


def test_one_process_joins_nothing():
  partitioning.initialize_distributed({})  # no error, no coordinator
  assert jax.process_count() == 1


def test_config_xla_flags_reach_xla_before_the_environments_own():
  """A fresh process with the configs' flags (CPU and GPU ones): they come first in XLA_FLAGS, XLA:CPU
  accepts the GPU flag, and compiles a matmul without YNNPACK."""
  program = ("import os, jax, jax.numpy as jnp\n"
             "from bert_jax import partitioning\n"
             "from configs import common\n"
             "partitioning.add_xla_flags(common.XLA_FLAGS)\n"
             "print(os.environ['XLA_FLAGS'])\n"
             "print('ynn_fusion' in jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64))).compile().as_text())\n")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env,
                          check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.stdout.splitlines() == [
      "--xla_cpu_experimental_ynn_fusion_type= --xla_gpu_enable_triton_gemm=false "
      "--xla_force_host_platform_device_count=2", "False"]


def test_xla_flags_after_jax_started_are_refused():
  jax.devices()  # this process's backend has started
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  with pytest.raises(RuntimeError, match="after JAX started its backends"):
    partitioning.add_xla_flags("--xla_cpu_experimental_ynn_fusion_type=", environ)
  partitioning.add_xla_flags("", environ)  # nothing to add: no error
  assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
