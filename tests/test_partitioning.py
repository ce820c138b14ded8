"""Mesh construction and the logical-axis rules."""

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
