"""Task models on the BERT encoder: pretraining (masked LM + next sentence) and sequence classification.

Owns: the heads and their outputs. The encoder itself lives in `bert`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.models import axes, bert
from bert_jax.models import config as config_lib
from bert_jax.models import dropout as dropout_lib
from bert_jax.models.projection import dense, zeros_init


class PreTrainingOutput(NamedTuple):
  mlm_logits: jax.Array  # [batch, num_predictions or seq, vocab]
  nsp_logits: jax.Array  # [batch, 2]


class MaskedLMHead(nn.Module):
  """dense + activation + LayerNorm, then the decoder tied to the word embeddings, plus a bias."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, hidden, decode):
    c = self.config
    h = dense(c, c.hidden_size, (axes.EMBED,), (axes.EMBED_OUT,), "transform_dense")(hidden)
    h = bert.layer_norm(c, "transform_LayerNorm")(bert.activation(c.hidden_act)(h))
    bias = self.param("bias", zeros_init(axes.VOCAB), (c.vocab_size,), c.parameter_dtype)
    return decode(h) + bias.astype(c.compute_dtype)  # [..., vocab]


class BertForPreTraining(nn.Module):
  """BERT with the masked-LM and next-sentence-prediction heads.

  With `masked_lm_positions` `[batch, num_predictions]` the MLM head scores only those positions (as
  pretraining does: ~15% of tokens, so ~7x less decoder work); without, every position.
  """
  config: config_lib.BertConfig

  def setup(self):
    self.bert = bert.BertModel(self.config)
    self.predictions = MaskedLMHead(self.config)
    self.seq_relationship = dense(self.config, 2, (axes.EMBED,), (axes.CLASSES,), "seq_relationship")

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               masked_lm_positions=None, deterministic: bool = True) -> PreTrainingOutput:
    outputs = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_positions=masked_lm_positions,
                        deterministic=deterministic)
    hidden = outputs.sequence_output  # [batch, preds or seq, hidden]
    mlm_logits = self.predictions(hidden, self.bert.attend)
    nsp_logits = self.seq_relationship(outputs.pooled_output)
    return PreTrainingOutput(mlm_logits=mlm_logits, nsp_logits=nsp_logits)


class BertForSequenceClassification(nn.Module):
  """BERT with dropout + dense on the pooled output. Returns logits `[batch, num_labels]`."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True) -> jax.Array:
    c = self.config
    no_positions = jnp.zeros((input_ids.shape[0], 0), jnp.int32)  # the pooled output is all it reads
    outputs = bert.BertModel(c, name="bert")(input_ids, attention_mask, token_type_ids, position_ids,
                                             output_positions=no_positions, deterministic=deterministic)
    rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
    pooled = dropout_lib.Dropout(rate)(outputs.pooled_output, deterministic=deterministic)
    return dense(c, c.num_labels, (axes.EMBED,), (axes.CLASSES,), "classifier")(pooled)
