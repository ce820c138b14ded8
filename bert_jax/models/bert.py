"""The BERT encoder (Devlin et al. 2019) in Flax Linen: embeddings, post-LN layers, pooler.

Owns: the encoder's computation and the choice of its add & norm. Does not own: the attention
sublayer and its kernels (see `attention`), task heads (see `heads`), the logical axis names (see
`axes`), nor their mapping to a device mesh (see `bert_jax.partitioning`).
Submodule names follow Hugging Face's so parameter paths read like the checkpoints they map to.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import partitioning
from bert_jax.models import attention, axes
from bert_jax.models import config as config_lib
from bert_jax.models import cpu_add_norm
from bert_jax.models import dropout as dropout_lib
from bert_jax.models import feed_forward
from bert_jax.models import fused_norm
from bert_jax.models import layer_stack
from bert_jax.models.projection import add_bias, contract, dense, kernel_init, zeros_init


def gelu_erf(x: jax.Array) -> jax.Array:
  """HF's "gelu" as PyTorch computes it, `x * (1 + erf(x / sqrt(2))) / 2`, in float32."""
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(np.sqrt(0.5))))).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  """HF's exact "gelu", `x * Phi(x)`, as PyTorch computes it (`gelu_erf`), recomputed in the backward pass.

  jax's `nn.gelu(approximate=False)` (within 1e-6 of this) goes through erfc, which XLA expands into
  a long series with divisions, and autodiff keeps three `[batch, seq, intermediate]` tensors for its
  derivative (the largest of a layer): on an H100 its forward and backward took 13% of a BERT-base
  pretraining step. The erf form is one cheap op, and under `jax.checkpoint` only `x` is kept. With
  XLA:CPU's matmuls on Eigen (`config.xla_flags`) it is a few percent faster on the CPU too
  (docs/performance.md).
  """
  return jax.checkpoint(gelu_erf)(x)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU's tanh approximation (original BERT's; HF "gelu_new", "gelu_pytorch_tanh", "gelu_fast"),
  recomputed in the backward pass.

  Under `jax.checkpoint` only `x` is kept, as for `gelu`. XLA:GPU then computes the forward in the
  matmul's cuBLASLt epilogue (bias, GELU, and `x` as a second output) and the backward in one pass
  with the bias gradient: a BERT-base pretraining step compiled for an H100 moves 2.2 GB less than
  with the erf form, and 6.8 GB less than this function without the checkpoint (docs/performance.md,
  "fifteenth").
  """
  return jax.checkpoint(functools.partial(nn.gelu, approximate=True))(x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,  # HF "gelu" is the exact erf form.
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return _ACTIVATIONS[name]


def layer_norm(config: config_lib.BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.compute_dtype, param_dtype=config.parameter_dtype,
                      scale_init=_norm_scale_init(), bias_init=zeros_init(axes.EMBED), name=name)


def _norm_scale_init():
  return nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.EMBED,))


class BertOutput(NamedTuple):
  sequence_output: jax.Array  # [batch, seq, hidden], or [batch, n, hidden] with `output_positions`
  pooled_output: jax.Array | None  # [batch, hidden]


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  config: config_lib.BertConfig

  def setup(self):
    c = self.config
    # Looked up in the parameter dtype, then cast: the gradient of a lookup is a scatter-add into
    # the table, and in bfloat16 on a GPU that scatter took 78% of a BERT-base train step.
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.parameter_dtype,
                              param_dtype=c.parameter_dtype)
    self.word_embeddings = embed(c.vocab_size, embedding_init=kernel_init(c, axes.VOCAB, axes.EMBED))
    self.position_embeddings = embed(c.max_position_embeddings,
                                     embedding_init=kernel_init(c, axes.POSITION, axes.EMBED))
    self.token_type_embeddings = embed(c.type_vocab_size, embedding_init=kernel_init(c, axes.TOKEN_TYPE, axes.EMBED))
    self.LayerNorm = layer_norm(c, "LayerNorm")
    self.dropout = dropout_lib.Dropout(c.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, *, deterministic: bool):
    c = self.config
    # Token types (2 rows) as a one-hot matmul: every token of the batch adds into one of two rows,
    # so the scatter-add of a lookup's gradient would serialise on them. The product picks exact
    # values (one term per output; HIGHEST keeps float32 off TF32).
    token_types = jnp.dot(jax.nn.one_hot(token_type_ids, c.type_vocab_size, dtype=c.compute_dtype),
                          self.token_type_embeddings.embedding.astype(c.compute_dtype),
                          precision=jax.lax.Precision.HIGHEST)
    x = (self.word_embeddings(input_ids).astype(c.compute_dtype)
         + self.position_embeddings(position_ids).astype(c.compute_dtype) + token_types)  # [batch, seq, hidden]
    x = self.LayerNorm(x)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x: jax.Array) -> jax.Array:
    """Scores `x` `[..., hidden]` against every word embedding: `[..., vocab]` (the tied MLM decoder)."""
    x, table = nn.dtypes.promote_dtype(x, self.word_embeddings.embedding, dtype=self.config.compute_dtype)
    # As the dense layers: on XLA:CPU in float32 the table's gradient takes no transposing copy; in bf16
    # `table.T` is copied row by row, for YNNPACK's bf16 matmul.
    return contract(x, table.T, 1)


def resolve_layer_norm_impl(config: config_lib.BertConfig) -> str:
  """The add & norm `config.layer_norm_impl` names; 'auto' is decided here, where the model is traced:
  the Pallas kernel when JAX's default backend is a GPU (a BERT-base pretraining step 4-5% faster
  on an H200, docs/performance.md), our C++ kernel on a CPU in float32 (MiniLM's train and eval
  steps about 4% faster on a 2-core Xeon, "twentieth") unless it cannot be built or loaded
  (logged), else XLA's passes. A kernel this backend cannot run is refused: 'pallas' on a TPU (its
  kernel is written for Triton, and Pallas's interpreter would run it at a fraction of XLA's speed),
  'cpu_fused' off a CPU."""
  backend = jax.default_backend()
  if config.layer_norm_impl == "auto":
    if backend == "gpu":
      return "pallas"
    if backend == "cpu" and config.dtype == "float32" and cpu_add_norm.available():
      return "cpu_fused"
    return "xla"
  if config.layer_norm_impl == "pallas" and backend not in ("gpu", "cpu"):
    raise ValueError(f"BertConfig.layer_norm_impl='pallas' is a Triton kernel for GPUs; this is {backend!r}. "
                     "Use --config.model.layer_norm_impl=xla (or auto).")
  if config.layer_norm_impl == "cpu_fused" and backend != "cpu":
    raise ValueError(f"BertConfig.layer_norm_impl='cpu_fused' is a kernel for XLA:CPU; this is {backend!r}. "
                     "Use --config.model.layer_norm_impl=auto (or xla).")
  return config.layer_norm_impl


def describe_kernels(config: config_lib.BertConfig) -> str:
  """What the speed switches resolve to here, for logs: "attention cpu_fused (attention_impl='auto'), ..."."""
  impls = attention.resolve_attention_impl(config), resolve_layer_norm_impl(config)
  interpreted = ("pallas" in impls and fused_norm.interprets()) or (
      config.feed_forward_impl != "xla" and feed_forward.interprets())
  last_layer = (f"the positions the heads read, its attention by {attention.pruned_layer_attention_impl(config)}"
                if config.prunes_last_layer else "every position")
  return (f"attention {impls[0]} (attention_impl={config.attention_impl!r}), "
          f"add & norm {impls[1]} (layer_norm_impl={config.layer_norm_impl!r}), "
          f"feed-forward {config.feed_forward_impl}, "
          f"last layer computes {last_layer} (prune_last_layer={config.prune_last_layer!r}"
          + (", scan_layers=True" if config.prune_last_layer and config.scan_layers else "") + ")"
          + ("; the Pallas kernels run in an interpreter off a GPU: slow, meant for tests" if interpreted else ""))


def take_rows(x: jax.Array, output_positions: jax.Array) -> jax.Array:
  """[CLS] (the pooler's row) and the rows at `output_positions` `[batch, n]` of `x` `[batch, seq, hidden]`:
  `[batch, 1 + n, hidden]`. [CLS] is a slice, whose gradient is a pad, not a scatter-add."""
  cls = x[:, :1]
  if not output_positions.shape[1]:
    return cls
  return jnp.concatenate([cls, jnp.take_along_axis(x, output_positions[:, :, None], axis=1)], axis=1)


class BertLayer(nn.Module):
  """One post-LN transformer layer: attention, add & norm, feed-forward, add & norm."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic: bool, output_positions=None):
    """`x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`; with `output_positions` `[batch, n]`, only
    [CLS] and those rows are computed, `[batch, 1 + n, hidden]` (every row of `x` is still a key and a value)."""
    # `deterministic` is positional (argnum 3, counting self) so `nn.remat` can hold it static.
    c = self.config
    dropout = dropout_lib.Dropout(c.hidden_dropout_prob)
    query_rows = None if output_positions is None else take_rows(x, output_positions)
    attended = attention.BertSelfAttention(c, name="attention")(x, attention_mask, deterministic=deterministic,
                                                                query_rows=query_rows)
    x = add_norm(c, dropout, x if query_rows is None else query_rows, *attended, "attention_output_LayerNorm",
                 deterministic)
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    intermediate = dense(c, c.intermediate_size, (axes.EMBED,), (axes.MLP,), "intermediate")
    output = dense(c, c.hidden_size, (axes.MLP,), (axes.EMBED,), "output")
    if c.feed_forward_impl != "xla":
      y = mosaic_feed_forward(x, intermediate.weights(x.shape[-1:]), output.weights((c.intermediate_size,)),
                              c.feed_forward_impl)
    else:
      h = intermediate(x)  # [batch, seq, intermediate]
      h = nn.with_logical_constraint(activation(c.hidden_act)(h), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
      y = output.unbiased(h)
    x = add_norm(c, dropout, x, *y, "output_LayerNorm", deterministic)
    return nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


def mosaic_feed_forward(x, intermediate_weights, output_weights, impl: str) -> tuple[jax.Array, jax.Array]:
  """(`gelu(x @ W_in + b_in) @ W_out` `[batch, seq, hidden]`, `b_out`) in the Hopper kernels of `feed_forward`,
  for the add & norm to add the bias as it does `Projection.unbiased`'s. Each device runs them on its rows,
  with the weights whole (gathered from a tensor or fsdp axis, as XLA gathers them for its matmuls)."""
  (w_in, b_in), (w_out, b_out) = intermediate_weights, output_weights
  rows = (axes.ACT_BATCH, axes.ACT_LENGTH, None)
  inputs = (x.astype(w_in.dtype), w_in, b_in, w_out)  # the compute dtype, as `Projection.unbiased` casts
  y = partitioning.map_over_shards(functools.partial(feed_forward.feed_forward, impl=impl), inputs,
                                   (rows, None, None, None), rows)
  return y, b_out


def add_norm(config: config_lib.BertConfig, dropout: dropout_lib.Dropout, residual, y, bias, name: str,
             deterministic: bool):
  """BERT's "add & norm", `LayerNorm(residual + dropout(y + bias))` `[batch, seq, hidden]`, by `config.layer_norm_impl`.

  `y` is a projection without its bias (`Projection.unbiased`). Both implementations draw the same
  dropout mask from `dropout` and name their parameters as `nn.LayerNorm` does (`name/scale`, `name/bias`).
  """
  impl = resolve_layer_norm_impl(config)
  if impl == "xla":
    return layer_norm(config, name)(residual + dropout(add_bias(y, bias), deterministic=deterministic))
  rate = 0.0 if deterministic else dropout.rate
  if impl == "cpu_fused":  # the kernel takes the mask `dropout` draws for the XLA path
    mask = dropout.keep_mask(y.shape) if rate else None
  else:  # the Pallas kernels hash the mask from the words that `dropout.keep_mask(y.shape)` would: the same mask
    mask = dropout.words(y.shape[:-2]) if rate else None
  return FusedAddNorm(config, impl, name=name)(y, bias, mask, residual, rate)


class FusedAddNorm(nn.Module):
  """`LayerNorm(residual + dropout(y + bias))` in one kernel forward and one backward, with `nn.LayerNorm`'s
  parameters: Pallas's (`fused_norm`, impl 'pallas') or our C++ kernel for XLA:CPU (`cpu_add_norm`, 'cpu_fused')."""
  config: config_lib.BertConfig
  impl: str

  @nn.compact
  def __call__(self, y, bias, mask, residual, rate: float):
    """`y`, `residual` `[batch, seq, hidden]`, `bias` `[hidden]`; `mask` None without dropout, else for
    'pallas' the dropout's words int32 `[batch, 2]` (`Dropout.words`), for 'cpu_fused' its keep mask
    bool `[batch, seq, hidden]` (`Dropout.keep_mask`)."""
    c = self.config
    scale = self.param("scale", _norm_scale_init(), y.shape[-1:], c.parameter_dtype)
    offset = self.param("bias", zeros_init(axes.EMBED), y.shape[-1:], c.parameter_dtype)
    kernel = fused_norm.add_dropout_layer_norm if self.impl == "pallas" else cpu_add_norm.add_dropout_layer_norm

    def norm(y, residual, bias, scale, offset, mask=None):
      return kernel(y, bias, mask, residual, scale, offset, rate=rate, eps=c.layer_norm_eps)

    rows = (axes.ACT_BATCH, axes.ACT_LENGTH, None)  # whole rows on each device: a layer norm reduces over hidden
    inputs, in_axes = (y, residual, bias, scale, offset), (rows, rows, None, None, None)
    if mask is not None:  # words: one pair per sequence, split with the batch; a keep mask: like y
      inputs, in_axes = inputs + (mask,), in_axes + ((axes.ACT_BATCH, None) if self.impl == "pallas" else rows,)
    return partitioning.map_over_shards(norm, inputs, in_axes, rows)


# `remat_policy` -> what each layer keeps for the backward pass (the rest is recomputed).
# 'dots' keeps the outputs of matmuls without batch dimensions: the Q/K/V, output and feed-forward
# projections (O(seq * hidden) each). It recomputes the attention scores and probabilities (their
# einsums batch over batch and heads, and they are O(seq^2 * heads)), GELU, LayerNorm and dropout:
# most of the memory saved for little recomputation (two small matmuls per layer and elementwise
# work). `checkpoint_dots` would also keep the O(seq^2) attention tensors, the largest at long
# sequences.
# On XLA:CPU remat saves memory only with `scan_layers`: unrolled, the compiled step keeps the same
# temporary buffer with or without it (docs/performance.md, "sixth"). Measured on an H100 with
# `scan_layers` only: 'dots' took the pretraining peak from 13.5 to 9.5 GB.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _scan_body(layer: nn.Module, x, attention_mask, deterministic: bool):
  return layer(x, attention_mask, deterministic), None


class BertEncoder(nn.Module):
  """The stack of `num_hidden_layers` layers `[batch, seq, hidden] -> [batch, seq, hidden]` (or the
  rows of `output_positions`, see `__call__`).

  Unrolled, the layers are named `layer_{i}` as in HF's `encoder.layer.{i}`. With
  `config.scan_layers` they run as one `nn.scan` over `layers`, whose parameters carry a leading
  `[num_hidden_layers]` axis named `axes.LAYERS` (`bert_jax.hf` stacks and unstacks them for HF).
  With `config.stack_layers` the parameters are stored so, and `BertModel` hands the unrolled layers
  their slices (`nn.map_variables`).
  """
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, *, deterministic: bool, output_positions=None):
    """`x` `[batch, seq, hidden]` -> the last layer's output `[batch, seq, hidden]`, or with
    `output_positions` `[batch, n]` its rows at [CLS] and there (`take_rows`) `[batch, 1 + n, hidden]`:
    under `prune_last_layer` (unrolled layers) the last layer computes only those rows, else all,
    then they are taken."""
    c = self.config
    layer_cls = BertLayer
    if c.remat_policy != "none":
      # Inside a scan the loop already keeps XLA from merging recomputation with the forward pass.
      layer_cls = nn.remat(BertLayer, policy=REMAT_POLICIES[c.remat_policy], static_argnums=(3,),
                           prevent_cse=not c.scan_layers)
    pruned = output_positions is not None and c.prunes_last_layer  # never under scan_layers
    if c.scan_layers:
      scan = nn.scan(_scan_body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                     metadata_params={nn.PARTITION_NAME: axes.LAYERS})
      x, _ = scan(layer_cls(c, name="layers"), x, attention_mask, deterministic)
    else:
      for i in range(c.num_hidden_layers):
        # Positional, so that `nn.remat` traces it (its static_argnums hold only `deterministic`).
        last = (output_positions,) if pruned and i == c.num_hidden_layers - 1 else ()
        x = layer_cls(c, name=f"layer_{i}")(x, attention_mask, deterministic, *last)
    return x if output_positions is None or pruned else take_rows(x, output_positions)


class BertPooler(nn.Module):
  """tanh(dense(hidden state of [CLS]))."""
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, sequence_output):
    c = self.config
    return jnp.tanh(dense(c, c.hidden_size, (axes.EMBED,), (axes.EMBED_OUT,), "dense")(sequence_output[:, 0]))


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


def check_output_positions(input_ids, output_positions) -> None:
  """Raises unless `output_positions` is integer `[batch, n]` for `input_ids` `[batch, seq]`."""
  shape, dtype = getattr(output_positions, "shape", None), getattr(output_positions, "dtype", None)
  if shape is None or len(shape) != 2 or shape[0] != input_ids.shape[0] or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"output_positions (e.g. masked_lm_positions) must be an integer array [batch, n] with "
                     f"batch {input_ids.shape[0]}; got {type(output_positions).__name__} of dtype {dtype} and "
                     f"shape {shape}.")


class BertModel(nn.Module):
  """The BERT encoder. Returns `BertOutput(sequence_output [b, s, h], pooled_output [b, h])`.

  With `output_positions` `[batch, n]`, `sequence_output` holds the last layer's rows at those
  positions `[batch, n, hidden]` (what a head reads, e.g. the masked positions; `[batch, 0]` for
  the pooled output alone); under `config.prune_last_layer` the last layer computes only them and [CLS].
  """
  config: config_lib.BertConfig
  add_pooling_layer: bool = True

  def setup(self):
    c = self.config
    self.embeddings = BertEmbeddings(c)
    encoder_cls = BertEncoder
    if c.stack_layers:  # (never with scan_layers: BertConfig refuses both)
      # Stored stacked as under `scan_layers`, run unrolled: each layer reads its slice of the stacked
      # parameters, and the gradient arrives stacked, so the optimizer updates each kind of layer
      # parameter in one pass instead of one per layer (379 fewer kernels in a BERT-base step compiled
      # for an H100, docs/performance.md "fifteenth"; not yet timed on one).
      encoder_cls = nn.map_variables(
          BertEncoder, "params", trans_in_fn=functools.partial(layer_stack.checked_view, num_layers=c.num_hidden_layers),
          trans_out_fn=layer_stack.stored, init=self.is_initializing())
    self.encoder = encoder_cls(c)
    if self.add_pooling_layer:
      self.pooler = BertPooler(c)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               output_positions=None, deterministic: bool = True) -> BertOutput:
    check_inputs(self.config, input_ids)
    if output_positions is not None:
      check_output_positions(input_ids, output_positions)
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic=deterministic)
    x = nn.with_logical_constraint(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    key_mask = attention_mask[:, None, None, :] > 0  # [batch, 1, 1, seq], True for real tokens
    # [batch, seq, hidden], or [CLS] and the rows at output_positions: [batch, 1 + n, hidden]
    x = self.encoder(x, key_mask, deterministic=deterministic, output_positions=output_positions)
    pooled = self.pooler(x) if self.add_pooling_layer else None
    return BertOutput(sequence_output=x if output_positions is None else x[:, 1:], pooled_output=pooled)

  def attend(self, x: jax.Array) -> jax.Array:
    return self.embeddings.attend(x)
