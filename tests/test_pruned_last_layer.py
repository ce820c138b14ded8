"""Specification of `BertConfig.prune_last_layer`: the last layer computes only the rows the heads read,
and the heads get what the plain float32 path gives them (outputs, loss and every gradient)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax import steps

# Float32 rounding of the same sums in another order, on the tiny model (as tests/test_models.py's F32_ATOL).
ATOL = 2e-5
MASKED_LM_POSITIONS = np.array([[1, 3, 0], [2, 0, 0]], np.int32)  # padded with 0, as the pretraining data pads


def _config(tiny_config, **overrides):
  return tiny_config.replace(**{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides})


def _batch(with_predictions: bool):
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, 99, size=(2, 8)).astype(np.int32)
  attention_mask = np.ones((2, 8), np.int32)
  attention_mask[1, 4:] = 0  # row 1 is half padding
  input_ids[1, 4:] = 0
  batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros((2, 8), np.int32),
           "labels": np.array([0, 1], np.int32), "weights": np.ones((2,), np.float32)}
  if with_predictions:
    batch.update(masked_lm_positions=MASKED_LM_POSITIONS, masked_lm_ids=np.array([[5, 6, 0], [7, 0, 0]], np.int32),
                 masked_lm_weights=np.array([[1, 1, 0], [1, 0, 0]], np.float32), next_sentence_label=batch["labels"])
  return batch


def _loss_and_grads(module, params, pretraining: bool):
  loss_fn = steps.pretraining_loss if pretraining else steps.classification_loss
  batch = _batch(pretraining)

  def loss(p):
    return loss_fn(module, p, batch, jax.random.key(0), deterministic=True)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(actual, expected):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


@functools.cache
def _plain_loss_and_grads(config, pretraining: bool):
  model_cls = models.BertForPreTraining if pretraining else models.BertForSequenceClassification
  params = hf.init_params(model_cls(config))
  return params, _loss_and_grads(model_cls(config), params, pretraining)


@pytest.mark.parametrize("task, switches", [
    ("classification", dict(attention_impl="einsum")),
    ("classification", dict(attention_impl="cpu_fused")),
    ("pretraining", dict(attention_impl="einsum")),
    ("pretraining", dict(attention_impl="cpu_fused")),
    ("pretraining", dict(attention_impl="dot_product")),
    ("pretraining", dict(attention_impl="cpu_fused", remat_policy="dots")),
    ("pretraining", dict(layer_norm_impl="pallas")),  # the Pallas add & norm on 1 + n rows (its interpreter here)
])
def test_loss_and_gradients_match_the_plain_path(tiny_config, task, switches):
  pretraining = task == "pretraining"
  model_cls = models.BertForPreTraining if pretraining else models.BertForSequenceClassification
  params, (loss, grads) = _plain_loss_and_grads(_config(tiny_config), pretraining)
  pruned = _config(tiny_config, prune_last_layer=True, **switches)
  pruned_loss, pruned_grads = _loss_and_grads(model_cls(pruned), params, pretraining)
  np.testing.assert_allclose(pruned_loss, loss, atol=ATOL, rtol=0)
  _assert_trees_close(pruned_grads, grads)


@pytest.mark.parametrize("prune_last_layer", [False, True])
def test_output_positions_give_those_rows_of_the_sequence_output(tiny_config, prune_last_layer):
  config = _config(tiny_config)
  params = hf.init_params(models.BertModel(config))
  batch = _batch(False)
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  every = models.BertModel(config).apply({"params": params}, *inputs)
  rows = models.BertModel(config.replace(prune_last_layer=prune_last_layer)).apply(
      {"params": params}, *inputs, output_positions=MASKED_LM_POSITIONS)
  assert rows.sequence_output.shape == (2, 3, 32)
  np.testing.assert_allclose(rows.sequence_output, np.take_along_axis(
      np.asarray(every.sequence_output), MASKED_LM_POSITIONS[:, :, None], axis=1), atol=ATOL, rtol=0)
  np.testing.assert_allclose(rows.pooled_output, every.pooled_output, atol=ATOL, rtol=0)


def _compiled_flops(config, pretraining: bool = False) -> float:
  """XLA's count of the compiled forward pass's FLOPs."""
  module = (models.BertForPreTraining if pretraining else models.BertForSequenceClassification)(config)
  params = hf.init_params(module)
  batch = _batch(pretraining)
  extra = {"masked_lm_positions": batch["masked_lm_positions"]} if pretraining else {}
  apply = jax.jit(lambda p: module.apply({"params": p}, batch["input_ids"], batch["attention_mask"], **extra))
  return apply.lower(params).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("task, rows_read", [("classification", 1), ("pretraining", 1 + 3)])
def test_the_last_layer_computes_only_the_rows_the_heads_read(tiny_config, task, rows_read):
  config = _config(tiny_config, attention_impl="einsum")
  pretraining = task == "pretraining"
  plain = _compiled_flops(config, pretraining)
  pruned = _compiled_flops(config.replace(prune_last_layer=True), pretraining)
  # XLA's own count: the last layer's query, attention output and feed-forward matmuls run on the
  # rows read ([CLS], and the 3 masked positions), so the other rows' worth of them are gone.
  d, inner, batch, seq = config.hidden_size, config.intermediate_size, 2, 8
  assert plain - pruned >= 2 * batch * (seq - rows_read) * (2 * d * d + 2 * d * inner)


def test_under_scan_layers_every_position_is_computed_and_the_log_says_so(tiny_config):
  config = _config(tiny_config, prune_last_layer=True, scan_layers=True)
  assert _compiled_flops(config) == _compiled_flops(config.replace(prune_last_layer=False))
  assert "last layer computes every position (prune_last_layer=True, scan_layers=True)" in models.describe_kernels(
      config)
  assert "last layer computes the positions the heads read" in models.describe_kernels(
      config.replace(scan_layers=False))


def test_attention_dropout_applies_in_the_pruned_layer(tiny_config):
  # One layer, and attention dropout the only dropout: the loss moves with the dropout key only if
  # the pruned layer drops attention probabilities.
  config = _config(tiny_config, num_hidden_layers=1, attention_probs_dropout_prob=0.5, classifier_dropout=0.0,
                   prune_last_layer=True)
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  batch = _batch(False)
  losses = {float(steps.classification_loss(module, params, batch, jax.random.key(seed), deterministic=False)[0])
            for seed in range(3)}
  assert len(losses) == 3


@pytest.mark.parametrize("positions", [np.zeros((2,), np.int32), np.zeros((3, 1), np.int32),
                                       np.zeros((2, 1), np.float32)])
def test_output_positions_not_integer_batch_by_n_are_refused(tiny_config, positions):
  module = models.BertModel(tiny_config)
  batch = _batch(False)
  with pytest.raises(ValueError, match=r"output_positions .* must be an integer array \[batch, n\] with batch 2"):
    module.init(jax.random.key(0), batch["input_ids"], output_positions=positions)
