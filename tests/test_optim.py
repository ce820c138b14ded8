"""The optimizer: BERT's schedule and the weight-decay mask."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax import optim


def test_schedule_warms_up_linearly_then_decays_to_zero():
  schedule = optim.learning_rate_schedule(1.0, num_train_steps=100, warmup_fraction=0.1)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_no_decay_for_biases_and_layer_norm(tiny_config):
  params = hf.init_params(models.BertForPreTraining(tiny_config))
  mask = optim.decay_mask(params)
  assert mask["bert"]["encoder"]["layer_0"]["intermediate"]["kernel"] is True
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"] is True
  assert mask["bert"]["encoder"]["layer_0"]["intermediate"]["bias"] is False
  assert mask["bert"]["encoder"]["layer_0"]["output_LayerNorm"]["scale"] is False
  assert mask["bert"]["embeddings"]["LayerNorm"]["bias"] is False
  assert mask["predictions"]["bias"] is False and mask["predictions"]["transform_LayerNorm"]["scale"] is False


def _optimizer_config(name="adamw", **overrides):
  return ml_collections.ConfigDict(dict(dict(name=name, weight_decay=0.5, warmup_fraction=0.0, max_grad_norm=1.0,
                                             b1=0.9, b2=0.999, eps=1e-6), **overrides))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_weight_decay_touches_weights_not_biases(name):
  tx, _ = optim.make_optimizer(_optimizer_config(name), learning_rate=0.1, num_train_steps=10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zero_grads = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros((2,))}}
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert np.all(np.asarray(updates["dense"]["kernel"]) < 0)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0)


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match="optimizer.name='sgd'"):
    optim.make_optimizer(_optimizer_config("sgd"), 1.0, 10)
