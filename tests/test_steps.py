"""The pure steps: losses against a direct computation, and a train step that lowers the loss."""

import functools

import jax
import numpy as np
import optax
import pytest

from bert_jax import batching
from bert_jax import hf
from bert_jax import models
from bert_jax import steps
import program_parts


def _pretraining_batch(vocab=99, batch=3, seq=10, preds=4):
  rng = np.random.default_rng(0)
  input_ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
  weights = np.ones((batch, preds), np.float32)
  weights[2, 2:] = 0  # a sequence with only two real predictions
  return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids),
          "attention_mask": np.ones_like(input_ids),
          "masked_lm_positions": np.tile(np.arange(1, 1 + preds, dtype=np.int32), (batch, 1)),
          "masked_lm_ids": rng.integers(5, vocab, (batch, preds)).astype(np.int32),
          "masked_lm_weights": weights, "next_sentence_label": np.array([0, 1, 1], np.int32),
          "weights": np.ones(batch, np.float32)}


def test_cross_entropy_equals_optax_and_so_does_its_gradient():
  rng = np.random.default_rng(0)
  logits = jax.numpy.asarray(rng.normal(size=(3, 4, 50)) * 4, jax.numpy.float32)
  labels = jax.numpy.asarray(rng.integers(0, 50, (3, 4)), jax.numpy.int32)
  reference = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(steps.cross_entropy(logits, labels), reference, rtol=1e-6)
  cotangent = jax.numpy.asarray(rng.normal(size=(3, 4)), jax.numpy.float32)
  grad = lambda f: jax.grad(lambda x: (f(x, labels) * cotangent).sum())(logits)  # noqa: E731
  np.testing.assert_allclose(grad(steps.cross_entropy), grad(optax.softmax_cross_entropy_with_integer_labels),
                             rtol=1e-6, atol=1e-7)


def test_cross_entropy_gradient_has_no_scatter():
  # optax's gather differentiates into a scatter-add over a zeroed copy of the logits; ours into a select.
  logits, labels = jax.numpy.zeros((8, 30)), jax.numpy.arange(8)

  def primitives(loss):
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: loss(x, labels).sum()))(logits)
    return {e.primitive.name for e in program_parts.all_eqns(jaxpr.jaxpr)}

  assert {"gather", "scatter-add"} <= primitives(optax.softmax_cross_entropy_with_integer_labels)
  ours = primitives(steps.cross_entropy)
  assert not {p for p in ours if "scatter" in p or "gather" in p}
  assert "select_n" in ours


def test_cross_entropy_of_a_label_outside_the_classes_is_nan():
  logits = jax.numpy.zeros((4, 5))
  losses = steps.cross_entropy(logits, jax.numpy.array([0, 4, 5, -1]))
  np.testing.assert_allclose(losses[:2], np.log(5.0), rtol=1e-6)
  assert np.isnan(losses[2:]).all()
  # uint8 labels over 300 classes: the class index is not counted in the labels' dtype (10 would match 266).
  wide = jax.numpy.asarray(np.random.default_rng(0).normal(size=(2, 300)), jax.numpy.float32)
  labels = jax.numpy.array([10, 200], jax.numpy.uint8)
  np.testing.assert_allclose(steps.cross_entropy(wide, labels),
                             optax.softmax_cross_entropy_with_integer_labels(wide, labels.astype(np.int32)),
                             rtol=1e-6)


def test_pretraining_loss_is_mlm_mean_plus_nsp_mean(tiny_config):
  module = models.BertForPreTraining(tiny_config)
  params = hf.init_params(module)
  batch = _pretraining_batch()
  loss_sum, metrics = steps.pretraining_loss(module, params, batch, None, True)
  out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     masked_lm_positions=batch["masked_lm_positions"])
  mlm = optax.softmax_cross_entropy_with_integer_labels(out.mlm_logits, batch["masked_lm_ids"])
  mlm_mean = float((mlm * batch["masked_lm_weights"]).sum() / batch["masked_lm_weights"].sum())
  nsp_mean = float(optax.softmax_cross_entropy_with_integer_labels(out.nsp_logits,
                                                                   batch["next_sentence_label"]).mean())
  assert float(loss_sum / metrics["count"]) == pytest.approx(mlm_mean + nsp_mean, rel=1e-5)
  assert float(metrics["mlm_count"]) == 10


def test_pretraining_loss_ignores_rows_of_weight_zero(tiny_config):
  module = models.BertForPreTraining(tiny_config)
  params = hf.init_params(module)
  batch = _pretraining_batch()
  padded = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in batch.items()}  # a 4th, empty row
  _, expected = steps.pretraining_loss(module, params, batch, None, True)
  _, got = steps.pretraining_loss(module, params, padded, None, True)
  for name in expected:
    assert float(got[name]) == pytest.approx(float(expected[name]), rel=1e-5), name


@pytest.mark.parametrize("model_cls, loss_fn, batch_fn", [
    (models.BertForPreTraining, steps.pretraining_loss, _pretraining_batch),
    (models.BertForSequenceClassification, steps.classification_loss,
     lambda: {**{k: v for k, v in _pretraining_batch().items() if k in steps.MODEL_INPUTS},
              "labels": np.array([0, 1, 1], np.int32), "weights": np.ones(3, np.float32)}),
])
def test_repeated_train_steps_lower_the_loss(tiny_config, model_cls, loss_fn, batch_fn):
  module = model_cls(tiny_config)
  tx = optax.adam(1e-3)
  state = steps.create_state(hf.init_params(module), tx, seed=0)
  train_step = jax.jit(functools.partial(steps.train_step, model=module, tx=tx, loss_fn=loss_fn))
  batch = batch_fn()
  losses = []
  for _ in range(5):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["count"]))
  assert losses[-1] < losses[0]
  assert int(state.step) == 5


def test_batches_cut_to_length_buckets_give_the_float32_loss_and_gradient_of_full_padding(tiny_config):
  """Length bucketing (batching) drops all-padding columns: the classification loss and the
  gradient must be those of the batch padded to full length (float32, dropout off; tolerance 1e-6)."""
  module = models.BertForSequenceClassification(tiny_config)
  params = hf.init_params(module)
  rng = np.random.default_rng(0)
  lengths = np.array([3, 9, 5, 12])
  mask = (np.arange(24)[None, :] < lengths[:, None]).astype(np.int32)
  full = {"input_ids": rng.integers(5, 99, mask.shape).astype(np.int32) * mask, "token_type_ids": np.zeros_like(mask),
          "attention_mask": mask, "labels": np.array([0, 1, 1, 0], np.int32), "weights": np.ones(4, np.float32)}
  cut = next(batching.eval_batches(full, batch_size=4, length_buckets=(8, 16)))
  assert cut["input_ids"].shape == (4, 16)

  def loss(params, batch):
    loss_sum, metrics = steps.classification_loss(module, params, batch, None, True)
    return loss_sum / metrics["count"]
  full_loss, full_grad = jax.value_and_grad(loss)(params, full)
  cut_loss, cut_grad = jax.value_and_grad(loss)(params, cut)
  assert float(cut_loss) == pytest.approx(float(full_loss), abs=1e-6)
  for got, expected in zip(jax.tree_util.tree_leaves(cut_grad), jax.tree_util.tree_leaves(full_grad)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
