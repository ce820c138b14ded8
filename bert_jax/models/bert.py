"""The BERT encoder (Devlin et al. 2019) in Flax Linen: embeddings, post-LN layers, pooler.

Owns: the encoder's computation and its parameters' logical axis names. Does not own: task heads
(see `heads`), nor the mapping of logical axes to a device mesh (see `bert_jax.partitioning`).
Submodule names follow Hugging Face's so parameter paths read like the checkpoints they map to.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import config as config_lib

# Logical axis names of parameters; `bert_jax.partitioning` maps them to mesh axes.
EMBED, MLP, HEADS, KV = "embed", "mlp", "heads", "kv"
VOCAB, POSITION, TOKEN_TYPE, CLASSES = "vocab", "position", "token_type", "classes"
# Output axis of the square hidden->hidden projections (pooler, MLM transform): an array cannot
# name one logical axis twice.
EMBED_OUT = "embed_out"
# Activations have names of their own: a weight's `embed` may be sharded (fsdp) where an
# activation's must not be, since its batch axis already uses that mesh axis.
ACT_BATCH, ACT_LENGTH = "activation_batch", "activation_length"
ACT_EMBED, ACT_MLP = "activation_embed", "activation_mlp"

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return _ACTIVATIONS[name]


def kernel_init(config: config_lib.BertConfig, *axes: str):
  """BERT's initialiser (truncated normal, std `initializer_range`) tagged with logical axes."""
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(config.initializer_range), axes)


def zeros_init(*axes: str):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(config: config_lib.BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
      bias_init=zeros_init(EMBED), name=name)


class Projection(nn.Module):
  """`x[..., *in] @ kernel[*in, *out] + bias[*out]`, both parameters tagged with logical axis names.

  Like `nn.DenseGeneral`, but the kernel is created at its full shape: DenseGeneral initialises a
  flattened kernel, which cannot carry one logical name per axis under a rules context.
  """
  config: config_lib.BertConfig
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x):
    c, n_in = self.config, len(self.in_axes)
    kernel = self.param("kernel", kernel_init(c, *self.in_axes, *self.out_axes), x.shape[-n_in:] + self.features,
                        c.parameter_dtype)
    bias = self.param("bias", zeros_init(*self.out_axes), self.features, c.parameter_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=c.compute_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


def dense(config: config_lib.BertConfig, features, in_axes: tuple[str, ...], out_axes: tuple[str, ...],
          name: str) -> Projection:
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Projection(config, features, in_axes, out_axes, name=name)


class BertOutput(NamedTuple):
  sequence_output: jax.Array  # [batch, seq, hidden]
  pooled_output: jax.Array | None  # [batch, hidden]


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  config: config_lib.BertConfig

  def setup(self):
    c = self.config
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.compute_dtype,
                              param_dtype=c.parameter_dtype)
    self.word_embeddings = embed(c.vocab_size, embedding_init=kernel_init(c, VOCAB, EMBED))
    self.position_embeddings = embed(c.max_position_embeddings, embedding_init=kernel_init(c, POSITION, EMBED))
    self.token_type_embeddings = embed(c.type_vocab_size, embedding_init=kernel_init(c, TOKEN_TYPE, EMBED))
    self.LayerNorm = layer_norm(c, "LayerNorm")
    self.dropout = nn.Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, *, deterministic: bool):
    x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))  # [batch, seq, hidden]
    x = self.LayerNorm(x)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x: jax.Array) -> jax.Array:
    """Scores `x` `[..., hidden]` against every word embedding: `[..., vocab]` (the tied MLM decoder)."""
    return self.word_embeddings.attend(x)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention with an additive padding mask."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_bias, *, deterministic: bool):
    c = self.config
    heads = (c.num_attention_heads, c.head_dim)
    query = dense(c, heads, (EMBED,), (HEADS, KV), "query")(x)  # [batch, seq, heads, head_dim]
    key = dense(c, heads, (EMBED,), (HEADS, KV), "key")(x)
    value = dense(c, heads, (EMBED,), (HEADS, KV), "value")(x)
    query = query / jnp.sqrt(c.head_dim).astype(query.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [batch, heads, q_seq, k_seq]
    # Softmax in float32: with bf16 scores the normaliser loses the small probabilities.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1).astype(c.compute_dtype)
    probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)  # [batch, seq, heads, head_dim]
    return dense(c, c.hidden_size, (HEADS, KV), (EMBED,), "output")(context)


class BertLayer(nn.Module):
  """One post-LN transformer layer: attention, add & norm, feed-forward, add & norm."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_bias, *, deterministic: bool):
    c = self.config
    dropout = nn.Dropout(c.hidden_dropout_prob)
    attended = BertSelfAttention(c, name="attention")(x, attention_bias, deterministic=deterministic)
    x = layer_norm(c, "attention_output_LayerNorm")(x + dropout(attended, deterministic=deterministic))
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    h = dense(c, c.intermediate_size, (EMBED,), (MLP,), "intermediate")(x)  # [batch, seq, intermediate]
    h = nn.with_logical_constraint(activation(c.hidden_act)(h), (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    h = dense(c, c.hidden_size, (MLP,), (EMBED,), "output")(h)
    x = layer_norm(c, "output_LayerNorm")(x + dropout(h, deterministic=deterministic))
    return nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


class BertEncoder(nn.Module):
  """The stack of `num_hidden_layers` layers, named `layer_{i}` as in HF's `encoder.layer.{i}`."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_bias, *, deterministic: bool):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, name=f"layer_{i}")(x, attention_bias, deterministic=deterministic)
    return x


class BertPooler(nn.Module):
  """tanh(dense(hidden state of [CLS]))."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, sequence_output):
    c = self.config
    return jnp.tanh(dense(c, c.hidden_size, (EMBED,), (EMBED_OUT,), "dense")(sequence_output[:, 0]))


def check_inputs(config: config_lib.BertConfig, input_ids) -> None:
  """Raises on inputs the model cannot embed: too long, or (when concrete) ids outside the vocab."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq]; got shape {tuple(input_ids.shape)}.")
  if input_ids.shape[1] > config.max_position_embeddings:
    raise ValueError(
        f"Input length {input_ids.shape[1]} exceeds max_position_embeddings="
        f"{config.max_position_embeddings}; truncate to at most that many tokens.")
  # Only concrete, host-readable ids can be checked; under jit they are tracers.
  if (not isinstance(input_ids, jax.core.Tracer) and input_ids.size
      and getattr(input_ids, "is_fully_addressable", True)):
    ids = np.asarray(input_ids)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= config.vocab_size:
      raise ValueError(f"input_ids range [{low}, {high}] falls outside the vocabulary [0, {config.vocab_size}); "
                       "was the text tokenized with another model's vocab?")


class BertModel(nn.Module):
  """The BERT encoder. Returns `BertOutput(sequence_output [b, s, h], pooled_output [b, h])`."""
  config: config_lib.BertConfig
  add_pooling_layer: bool = True

  def setup(self):
    c = self.config
    self.embeddings = BertEmbeddings(c)
    self.encoder = BertEncoder(c)
    if self.add_pooling_layer:
      self.pooler = BertPooler(c)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True) -> BertOutput:
    check_inputs(self.config, input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    # Padding keys get the most negative float32 (as HF does), so they take exactly zero weight.
    attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                               jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [batch, 1, 1, seq]
    x = self.encoder(x, attention_bias, deterministic=deterministic)
    pooled = self.pooler(x) if self.add_pooling_layer else None
    return BertOutput(sequence_output=x, pooled_output=pooled)

  def attend(self, x: jax.Array) -> jax.Array:
    return self.embeddings.attend(x)
