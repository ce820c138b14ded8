"""BERT's self-attention sublayer, and the choice of the kernel that computes its core.

Owns: `BertSelfAttention` (Q/K/V projections, the attention core, the output projection) and
`config.attention_impl`: 'einsum' (ours: float32 softmax, attention dropout), 'dot_product'
(`jax.nn.dot_product_attention`: XLA), 'cudnn' (the same, forced onto cuDNN's fused kernel),
'pallas' (our Pallas flash attention for GPUs with the dropout in the kernel, `flash_attention`; it
reads the stacked Q/K/V projection in place and adds its biases),
'cpu_fused' (the einsum path's function in one C++ kernel for XLA:CPU, `cpu_attention`) or 'auto'
(`resolve_attention_impl`). 'einsum', 'pallas' and 'cpu_fused' apply attention dropout; the others
refuse to train with it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax import partitioning
from bert_jax.models import axes
from bert_jax.models import config as config_lib
from bert_jax.models import cpu_attention
from bert_jax.models import dropout as dropout_lib
from bert_jax.models import flash_attention
from bert_jax.models.projection import dense, project_qkv, project_qkv_stacked


# The kernels that run on some backends only, and the fix their refusal names.
_BACKENDS = {
    "cudnn": (("gpu",), "needs a GPU", "dot_product (or einsum)"),
    # On a CPU in Pallas's interpreter (slow: for tests); a TPU cannot run Triton.
    "pallas": (("gpu", "cpu"), "needs a GPU", "dot_product (or einsum)"),
    "cpu_fused": (("cpu",), "is a kernel for XLA:CPU", "einsum (or cudnn on a GPU)"),
}

_PER_HEAD = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.HEADS, axes.KV)  # the query, key, value and context


def resolve_attention_impl(config: config_lib.BertConfig) -> str:
  """The attention kernel `config.attention_impl` names; 'auto' is decided here, where the model is traced:
  our fused kernel when JAX's default backend is the CPU (float32 train steps 10-15% faster there,
  docs/performance.md; a bf16 model's query, key and value are widened for it), unless it cannot be
  built or loaded (logged); our Pallas flash attention on a GPU in bfloat16 (BERT-base pretraining at
  256 x 128 with attention dropout 0.1 18.7% faster than the einsums on an H200, as fast as cuDNN's
  kernel without dropout; float16 is unchecked there, and in float32 Triton's dots would take TF32);
  else the einsums.
  All three apply attention dropout and agree to rounding. Each process decides for itself: on a
  multi-host CPU cluster whose hosts differ in having a compiler, name the kernel explicitly.
  A kernel this backend cannot run is refused, with the setting to use instead."""
  backend = jax.default_backend()
  impl = config.attention_impl
  if impl == "auto":
    if backend == "cpu" and cpu_attention.available():
      impl = "cpu_fused"
    elif backend == "gpu" and config.dtype == "bfloat16":
      impl = "pallas"
    else:
      impl = "einsum"
  backends, problem, fix = _BACKENDS.get(impl, ((backend,), "", ""))
  if backend not in backends:
    raise ValueError(f"BertConfig.attention_impl={impl!r} {problem}; this is {backend!r}. "
                     f"Use --config.model.attention_impl={fix}.")
  return impl


def pruned_layer_attention_impl(config: config_lib.BertConfig) -> str:
  """The kernel of the pruned last layer's attention (`prune_last_layer`: a few query rows, every key):
  'dot_product' stays; the rest run the einsums, whose cost is small at 1 or 21 query rows (our CPU
  and Pallas kernels take as many queries as keys; cuDNN would take fewer, untried here)."""
  return "dot_product" if resolve_attention_impl(config) == "dot_product" else "einsum"


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention over the unpadded keys, by `config.attention_impl`.

  Returns the attention output projection without its bias `[batch, seq or n, hidden]` (n: with
  `query_rows`), and that bias `[hidden]`: the layer's add & norm adds it (`bert.add_norm`).
  """
  config: config_lib.BertConfig

  @nn.compact
  def __call__(self, x, attention_mask, *, deterministic: bool, query_rows=None):
    """`x` [batch, seq, hidden], `attention_mask` bool [batch, 1, 1, seq] (True: a real key).

    With `query_rows` `[batch, n, hidden]` (rows of `x`: the pruned last layer), only those rows attend
    (to every key of `x`), and the outputs are `[batch, n, hidden]`.
    """
    c = self.config
    heads = (c.num_attention_heads, c.head_dim)
    kernels, biases = zip(*(dense(c, heads, (axes.EMBED,), (axes.HEADS, axes.KV), name).weights(x.shape[-1:])
                            for name in ("query", "key", "value")))
    query_rows = None if query_rows is None else query_rows.astype(c.compute_dtype)
    impl = pruned_layer_attention_impl(c) if query_rows is not None else resolve_attention_impl(c)
    output = dense(c, c.hidden_size, (axes.HEADS, axes.KV), (axes.EMBED,), "output")
    if impl == "pallas":  # the kernels read the projection's one output and add its biases
      qkv, bias = project_qkv_stacked(x.astype(c.compute_dtype), kernels, biases)
      return output.unbiased(self._flash_attention(qkv, bias, attention_mask, deterministic))
    # [batch, seq or n, heads, head_dim] (the query), [batch, seq, heads, head_dim] (key, value)
    query, key, value = project_qkv(x.astype(c.compute_dtype), kernels, biases, query_rows,
                                    bias_in_slices=impl != "einsum")
    if impl == "einsum":
      context = self._einsum_attention(query, key, value, attention_mask, deterministic)
    elif impl == "cpu_fused":
      context = self._cpu_fused_attention(query, key, value, attention_mask, deterministic)
    else:
      if not deterministic:
        c.check_trainable()  # dropout on: refuse to silently drop the attention dropout
      if impl == "cudnn":
        # cuDNN takes padding as per-row key lengths (it has no broadcast [batch, 1, 1, seq] mask):
        # BERT's inputs are right-padded, real tokens first. Padded queries still see every real key.
        context = jax.nn.dot_product_attention(
            query, key, value, key_value_seq_lengths=jnp.sum(attention_mask[:, 0, 0, :], axis=-1, dtype=jnp.int32),
            implementation="cudnn")  # [batch, seq, heads, head_dim]
      else:
        context = jax.nn.dot_product_attention(query, key, value, mask=attention_mask)
    return output.unbiased(context)

  @staticmethod
  def _on_shards(kernel, projected, projected_axes, attention_mask, extra=None, extra_axes=()):
    """`kernel(*projected, key_valid[, extra])` on each device's rows (heads) of a mesh: XLA cannot split
    a custom call. `projected` (the query, key and value, or their stacked form and biases) is split by
    `projected_axes`, `extra` (a dropout mask or the words of one) by its logical `extra_axes`."""
    inputs = (*projected, attention_mask[:, 0, 0, :])
    in_axes = (*projected_axes, (axes.ACT_BATCH, axes.ACT_LENGTH))
    if extra is not None:
      inputs, in_axes = inputs + (extra,), in_axes + (extra_axes,)
    return partitioning.map_over_shards(kernel, inputs, in_axes, _PER_HEAD)

  def _flash_attention(self, qkv, bias, attention_mask, deterministic: bool):
    """`qkv` `[batch, seq, 3, heads, head_dim]` and `bias` `[3, heads, head_dim]` (`project_qkv_stacked`)."""
    c = self.config
    rate = 0.0 if deterministic else c.attention_probs_dropout_prob
    attend = lambda qkv, bias, key_valid, words=None: flash_attention.flash_attention_qkv(  # noqa: E731
        qkv, key_valid, words, bias=bias, dropout_rate=rate)
    projected_axes = ((axes.ACT_BATCH, axes.ACT_LENGTH, None, axes.HEADS, axes.KV), (None, axes.HEADS, axes.KV))
    if not rate:
      return self._on_shards(attend, (qkv, bias), projected_axes, attention_mask)
    # Each (sequence, head) keys the kernels' dropout hash with two words, the words the einsum path's
    # `Dropout` draws (the same submodule name and shape): the same mask. Split with the heads, the
    # mask does not depend on the mesh either.
    words = dropout_lib.Dropout(rate).words((qkv.shape[0], c.num_attention_heads))
    return self._on_shards(attend, (qkv, bias), projected_axes, attention_mask, words,
                           (axes.ACT_BATCH, axes.HEADS, None))

  def _cpu_fused_attention(self, query, key, value, attention_mask, deterministic: bool):
    c = self.config
    batch, seq, heads, _ = query.shape
    rate = 0.0 if deterministic else c.attention_probs_dropout_prob
    # The einsum path's mask, bit for bit: the same submodule name and shape draw the same bits.
    keep = dropout_lib.Dropout(rate).keep_mask((batch, heads, seq, seq)) if rate else None
    attend = lambda q, k, v, key_valid, keep=None: cpu_attention.attention(q, k, v, key_valid, keep, rate)  # noqa: E731
    # The kernel computes in float32; bf16 query, key and value are widened, and its context rounded back.
    query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
    keep_axes = (axes.ACT_BATCH, axes.HEADS, axes.ACT_LENGTH, None)
    return self._on_shards(attend, (query, key, value), (_PER_HEAD,) * 3, attention_mask, keep,
                           keep_axes).astype(c.compute_dtype)

  def _einsum_attention(self, query, key, value, attention_mask, deterministic: bool):
    c = self.config
    # Heads before positions ([batch, heads, seq, head_dim]): the batched matmuls then run on
    # contiguous [seq, head_dim] blocks, as in HF's PyTorch BERT. On XLA:CPU this is faster than
    # contracting over the projections' [batch, seq, heads, head_dim] layout directly.
    query, key, value = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))
    query = query / jnp.sqrt(c.head_dim).astype(query.dtype)
    # Scores accumulate and stay in float32 (a no-op for float32 compute): with bf16 scores the
    # softmax would see logits rounded to 3 significant digits and lose the small probabilities.
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key,
                        preferred_element_type=jnp.float32)  # [batch, heads, q_seq, k_seq]
    # Padding keys get the most negative float32 (as HF does), so they take exactly zero weight.
    scores = jnp.where(attention_mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.compute_dtype)
    probs = dropout_lib.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bhkd->bhqd", probs, value)  # [batch, heads, seq, head_dim]
    return jnp.swapaxes(context, 1, 2)  # [batch, seq, heads, head_dim]
