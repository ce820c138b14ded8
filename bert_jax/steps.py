"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`, for classification or pretraining.

Owns: the loss, gradient accumulation and the optimizer update. Does not own compilation or
sharding (see `train`, `partitioning`): every function here is device-count agnostic. Under `jax.pmap`
the same `train_step` runs with `axis_name`, which sums gradients and metrics over the devices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array  # base dropout key; step s uses fold_in(rng, s), so a resumed run draws the same masks


def create_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy `[...]` of float `logits` `[..., classes]` against integer `labels` `[...]`.

  `optax.softmax_cross_entropy_with_integer_labels`'s value, with the label's logit picked by comparing
  the class index with the label rather than by a gather: the gather's gradient is a scatter-add into
  a zeroed copy of the logits, which XLA:GPU runs as passes of their own over `[tokens, vocab]` float32
  (625 MB for BERT-base's MLM at 256 x 128); the compare's is a select inside the softmax gradient's
  pass (docs/performance.md, "fourteenth"). A label outside `[0, classes)` gives NaN, so that a
  data bug (a vocabulary mismatch) trips the train step's non-finite guard rather than training on no
  target; rows of weight 0 (padding) are excluded from the losses' sums by `where`, NaN or not.
  """
  labels = labels.astype(jnp.int32)  # a narrower dtype could not count the classes
  num_classes = logits.shape[-1]
  classes = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  label_logits = jnp.sum(jnp.where(classes == labels[..., None], logits, 0.0), axis=-1)
  losses = jax.nn.logsumexp(logits, axis=-1) - label_logits
  return jnp.where((labels >= 0) & (labels < num_classes), losses, jnp.nan)


def classification_loss(model: nn.Module, params, batch, dropout_rng, deterministic: bool):
  """Summed cross-entropy of `labels` `[batch]` and the sums the metrics need."""
  logits = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), deterministic=deterministic,
                       rngs={"dropout": dropout_rng} if not deterministic else None)
  logits = logits.astype(jnp.float32)  # [batch, num_labels]
  losses = cross_entropy(logits, batch["labels"])
  weights = batch["weights"]
  # where, not multiply: a padded row's loss must not turn a NaN into the sum.
  loss_sum = jnp.sum(jnp.where(weights > 0, losses * weights, 0.0))
  correct = jnp.sum(jnp.where(weights > 0, (jnp.argmax(logits, -1) == batch["labels"]) * weights, 0.0))
  return loss_sum, {"loss_sum": loss_sum, "correct": correct, "count": jnp.sum(weights)}


def pretraining_loss(model: nn.Module, params, batch, dropout_rng, deterministic: bool):
  """Masked-LM cross-entropy over the weighted `masked_lm_positions` + next-sentence cross-entropy.

  Per sequence: (MLM loss summed over its predictions / mean predictions per sequence) + NSP loss,
  so that `loss_sum / count` is BERT's loss (MLM mean over predictions + NSP mean over sequences).
  Rows of weight 0 (padding of the last eval batch) count for nothing.
  """
  outputs = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS),
                        masked_lm_positions=batch["masked_lm_positions"], deterministic=deterministic,
                        rngs={"dropout": dropout_rng} if not deterministic else None)
  weights = batch["weights"]  # [batch]
  mlm_logits = outputs.mlm_logits.astype(jnp.float32)  # [batch, predictions, vocab]
  mlm_weights = batch["masked_lm_weights"] * weights[:, None]  # [batch, predictions]
  mlm_losses = cross_entropy(mlm_logits, batch["masked_lm_ids"])
  nsp_logits = outputs.nsp_logits.astype(jnp.float32)  # [batch, 2]
  nsp_losses = cross_entropy(nsp_logits, batch["next_sentence_label"])
  # where, not multiply: a padded row's loss must not turn a NaN into the sum.
  mlm_sum = jnp.sum(jnp.where(mlm_weights > 0, mlm_losses * mlm_weights, 0.0))
  nsp_sum = jnp.sum(jnp.where(weights > 0, nsp_losses * weights, 0.0))
  count, mlm_count = jnp.sum(weights), jnp.sum(mlm_weights)
  loss_sum = mlm_sum * count / jnp.maximum(mlm_count, 1.0) + nsp_sum
  mlm_hits = jnp.argmax(mlm_logits, -1) == batch["masked_lm_ids"]
  nsp_hits = jnp.argmax(nsp_logits, -1) == batch["next_sentence_label"]
  metrics = {
      "loss_sum": loss_sum, "count": count, "mlm_loss_sum": mlm_sum, "mlm_count": mlm_count,
      "mlm_correct": jnp.sum(mlm_hits * mlm_weights), "nsp_loss_sum": nsp_sum,
      "nsp_correct": jnp.sum(nsp_hits * weights),
  }
  return loss_sum, metrics


LOSSES = {"classify": classification_loss, "pretrain": pretraining_loss}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1,
               schedule: optax.Schedule | None = None, loss_fn=classification_loss,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on `batch` (`[batch_size, seq]` arrays), split in `grad_accum_steps` micro-batches.

  `axis_name` (under `jax.pmap`): `batch` is this device's share of the global batch; its sums of
  gradients and metrics are added up over the devices of that axis (`psum`) before the division by
  the global count, so every device applies the same update. None (under `jax.jit`): `batch` is the
  whole batch. Dropout masks then differ from jit's (each device draws its own).
  """
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:  # each device its own dropout masks, as its rows are its own
    dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

  def micro_grads(params, micro_batch, rng):
    (_, metrics), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
        model, params, micro_batch, rng, False)
    return grads, metrics

  if grad_accum_steps == 1:
    grads, metrics = micro_grads(state.params, batch, dropout_rng)
  else:
    # Strided micro-batches (rows i, i+A, i+2A, ...): each keeps its rows on the devices that hold
    # them, where contiguous slices of a batch-sharded array would be gathered across devices.
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, inputs):
      index, micro_batch = inputs
      grads, metrics = micro_grads(state.params, micro_batch, jax.random.fold_in(dropout_rng, index))
      return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        micro_grads, state.params, jax.tree_util.tree_map(lambda x: x[0], micro), dropout_rng))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))

  if axis_name is not None:  # the all-reduce of data parallelism: sums over every device's rows
    grads, metrics = jax.lax.psum((grads, metrics), axis_name)
  # The loss is a sum over examples: dividing by the count gives the gradient of the batch mean.
  grads = jax.tree_util.tree_map(lambda g: g / metrics["count"], grads)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A step whose loss or gradient is NaN/Inf changes nothing (parameters, optimizer moments): the
  # state stays the last good one, and the loop stops or goes on as config.train.on_nonfinite says.
  finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(grad_norm)
  params, opt_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
  metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32))
  if schedule is not None:
    metrics["learning_rate"] = schedule(state.step)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module,
              loss_fn=classification_loss) -> dict[str, jax.Array]:
  """Sums of the loss and its metrics over the real (weight > 0) examples of `batch`."""
  _, metrics = loss_fn(model, params, batch, None, True)
  return metrics


def predict_step(params: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> jax.Array:
  """Class probabilities `[batch, num_labels]`."""
  logits = model.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), deterministic=True)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
