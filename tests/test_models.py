"""Specification of the Flax BERT models (shapes, masking, dropout, init, axis names, input checks)."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models


def _inputs(batch=2, seq=8, vocab=99):
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
  attention_mask = np.ones((batch, seq), np.int32)
  attention_mask[1, seq // 2:] = 0
  input_ids[1, seq // 2:] = 0
  token_type_ids = np.zeros((batch, seq), np.int32)
  token_type_ids[:, seq // 2:] = 1
  return input_ids, attention_mask, token_type_ids


@pytest.mark.parametrize("model_cls", list(models.MODEL_CLASSES.values()))
def test_apply_under_jit_for_every_class(tiny_config, model_cls):
  module = model_cls(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  apply = jax.jit(lambda p, ids, mask, types: module.apply(
      {"params": p}, ids, attention_mask=mask, token_type_ids=types, deterministic=True))
  out = apply(params, input_ids, attention_mask, token_type_ids)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, out)
  expected = {
      "BertModel": models.BertOutput((2, 8, 32), (2, 32)),
      "BertForPreTraining": models.PreTrainingOutput((2, 8, 99), (2, 2)),
      "BertForSequenceClassification": (2, 2),
  }[model_cls.__name__]
  assert shapes == expected


def test_masked_lm_scores_only_gathered_positions(tiny_config):
  module = models.BertForPreTraining(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  positions = np.array([[1, 3], [0, 2]], np.int32)
  every = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  gathered = module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                          masked_lm_positions=positions)
  assert gathered.mlm_logits.shape == (2, 2, 99)
  np.testing.assert_allclose(gathered.mlm_logits, np.take_along_axis(
      np.asarray(every.mlm_logits), positions[:, :, None], axis=1), atol=1e-5)


def test_padding_does_not_change_real_positions(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  other_pad = input_ids.copy()
  other_pad[1, 4:] = 7  # different content in the padded part
  a = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  b = module.apply({"params": params}, other_pad, attention_mask, token_type_ids)
  np.testing.assert_allclose(a.sequence_output[1, :4], b.sequence_output[1, :4], atol=1e-5)
  np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-5)


def test_dropout_only_when_not_deterministic(tiny_config):
  module = models.BertForSequenceClassification(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()

  def run(deterministic, seed):
    return module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                        deterministic=deterministic, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_initialisation_is_berts(tiny_config):
  config = tiny_config.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4)
  params = hf.init_params(models.BertModel(config))
  kernel = np.asarray(params["encoder"]["layer_0"]["intermediate"]["kernel"])
  assert abs(kernel.std() - 0.02 * 0.88) < 0.002  # truncation at 2 std shrinks the std by ~12%
  assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["intermediate"]["bias"], 0)
  np.testing.assert_array_equal(params["embeddings"]["LayerNorm"]["scale"], 1)


@pytest.mark.parametrize("model_cls", list(models.MODEL_CLASSES.values()))
def test_every_parameter_has_logical_axis_names(tiny_config, model_cls):
  module = model_cls(tiny_config)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  flat = flax.traverse_util.flatten_dict(variables["params"])
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
    assert len(set(leaf.names)) == len(leaf.names), path  # sharding needs distinct names
    assert set(leaf.names) <= {"vocab", "embed", "embed_out", "mlp", "heads", "kv", "position", "token_type", "classes"}


def test_attention_kernels_name_heads_and_kv(tiny_config):
  variables = jax.eval_shape(models.BertModel(tiny_config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  layer = variables["params"]["encoder"]["layer_0"]
  assert layer["attention"]["query"]["kernel"].names == ("embed", "heads", "kv")
  assert layer["attention"]["output"]["kernel"].names == ("heads", "kv", "embed")
  assert layer["intermediate"]["kernel"].names == ("embed", "mlp")


def test_input_longer_than_positions_is_refused(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
    module.apply({"params": params}, jnp.ones((1, 65), jnp.int32))


def test_token_ids_outside_vocab_are_refused(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    module.apply({"params": params}, jnp.full((1, 4), 99, jnp.int32))


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_size": 30}, "not divisible by num_attention_heads"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"hidden_dropout_prob": 1.5}, r"\[0, 1\)"),
    ({"num_hidden_layers": 0}, "positive integer"),
    ({"dtype": "float33"}, "dtype name"),
    ({"no_such_field": 1}, "Unknown BertConfig field"),
])
def test_bad_config_values_are_named(tiny_config, overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config.replace(**overrides)


def test_bfloat16_compute_keeps_float32_params(tiny_config):
  config = tiny_config.replace(dtype="bfloat16")
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  input_ids, attention_mask, token_type_ids = _inputs()
  logits_bf16 = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  logits_f32 = models.BertForSequenceClassification(tiny_config).apply(
      {"params": params}, input_ids, attention_mask, token_type_ids)
  assert logits_bf16.dtype == jnp.bfloat16
  # bf16 has 8 mantissa bits: agreement to a few 1e-2 on O(1) logits is what it can give.
  np.testing.assert_allclose(np.asarray(logits_bf16, np.float32), logits_f32, atol=5e-2)
