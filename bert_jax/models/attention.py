"""BERT's self-attention sublayer, and the choice of the kernel that computes its core.

Owns: `BertSelfAttention` (Q/K/V projections, the attention core, the output projection) and
`config.attention_impl`: 'einsum' (ours: float32 softmax, attention dropout), 'dot_product'
(`jax.nn.dot_product_attention`: XLA), 'cudnn' (the same, forced onto cuDNN's fused kernel),
'pallas' (jax's Pallas flash attention for GPUs, `flash_attention`), 'cpu_fused' (the einsum path's
function in one C++ kernel for XLA:CPU, `cpu_attention`) or 'auto' (`resolve_attention_impl`).
Only 'einsum' and 'cpu_fused' apply attention dropout; the others refuse to train with it.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from bert_jax import partitioning
from bert_jax.models import axes
from bert_jax.models import config as config_lib
from bert_jax.models import cpu_attention
from bert_jax.models import dropout as dropout_lib
from bert_jax.models import fused_norm
from bert_jax.models.projection import dense, project_qkv


# The kernels that run on some backends only, and the fix their refusal names.
_BACKENDS = {
    "cudnn": (("gpu",), "needs a GPU", "dot_product (or einsum)"),
    # On a CPU in Pallas's interpreter (slow: for tests); a TPU cannot run Triton.
    "pallas": (("gpu", "cpu"), "needs a GPU", "dot_product (or einsum)"),
    "cpu_fused": (("cpu",), "is a kernel for XLA:CPU", "einsum (or cudnn on a GPU)"),
}


def resolve_attention_impl(config: config_lib.BertConfig) -> str:
  """The attention kernel `config.attention_impl` names; 'auto' is decided here, where the model is traced:
  our fused kernel when JAX's default backend is the CPU (float32 train steps 10-15% faster there,
  docs/performance.md; a bf16 model's query, key and value are widened for it), unless it cannot be
  built or loaded (logged), else the einsums.
  Both apply attention dropout and agree to rounding. Each process decides for itself: on a
  multi-host CPU cluster whose hosts differ in having a compiler, name the kernel explicitly.
  A kernel this backend cannot run is refused, with the setting to use instead."""
  backend = jax.default_backend()
  impl = config.attention_impl
  if impl == "auto":
    impl = "cpu_fused" if backend == "cpu" and cpu_attention.available() else "einsum"
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


class AttentionTiling(NamedTuple):
  """The Pallas flash attention's tiling: query rows per forward program, the query/key block of the
  backward pass, and Triton's warps (None: the library's choice by block size) and pipeline stages.
  The forward's key block is the whole sequence up to 128 (BERT's usual length). Of 20 tilings timed
  at 256 x 128 x 12 heads x 64 in bfloat16 on an H200, the fastest forward + backward were within
  4% of each other; this is one of them (docs/performance.md)."""
  block_q: int = 128
  backward_block: int = 64
  num_warps: int | None = None
  num_stages: int = 2


def flash_attention(query, key, value, key_valid, *, tiling: AttentionTiling = AttentionTiling(),
                    interpret: bool | None = None):
  """`softmax(q k^T / sqrt(head_dim)) v` over the real keys, by jax's Pallas (Triton) flash attention.

  `query`, `key`, `value` `[batch, seq, heads, head_dim]`, `key_valid` bool `[batch, seq]`. The
  kernel masks by segment ids, and padding is segment 0: a padded query attends to the padded keys,
  where the einsum path lets it see the real keys. No real token and no loss reads a padded row,
  so losses and gradients agree; the padded rows of the output do not. A sequence is padded to a
  multiple of the block (16 to 128: lengths that are multiples of 128 pad nothing, 129 pads to 256).
  On a GPU, float32 inputs multiply in TF32 (Triton's dots); off a GPU, Pallas's interpreter runs
  the kernel in full float32 (for tests).
  """
  seq, head_dim = query.shape[1], query.shape[-1]
  # Triton's dots want power-of-2 tiles of 16 or more: the sequence is padded to a multiple of the
  # block, and a head narrower than 16 with zeros (they add nothing to q k^T, and give zero columns).
  block = max(16, min(128, pl.next_power_of_2(seq)))
  padded, padded_head = -(-seq // block) * block, max(head_dim, 16)
  if (padded, padded_head) != (seq, head_dim):
    widths = ((0, 0), (0, padded - seq), (0, 0), (0, padded_head - head_dim))
    query, key, value = (jnp.pad(t, widths) for t in (query, key, value))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, padded - seq)))
  backward = min(tiling.backward_block, block)
  blocks = pallas_attention.BlockSizes(block_q=min(tiling.block_q, block), block_k=block, block_q_dkv=backward,
                                       block_kv_dkv=backward, block_q_dq=backward, block_kv_dq=backward)
  out = pallas_attention.mha(query, key, value, key_valid.astype(jnp.int32), sm_scale=float(1 / np.sqrt(head_dim)),
                             block_sizes=blocks, num_warps=tiling.num_warps, num_stages=tiling.num_stages,
                             interpret=fused_norm.interprets(interpret))
  return out[:, :seq, :, :head_dim]


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
      if impl == "pallas":
        context = self._on_shards(flash_attention, query, key, value, attention_mask)
      elif impl == "cudnn":
        # cuDNN takes padding as per-row key lengths (it has no broadcast [batch, 1, 1, seq] mask):
        # BERT's inputs are right-padded, real tokens first. Padded queries still see every real key.
        context = jax.nn.dot_product_attention(
            query, key, value, key_value_seq_lengths=jnp.sum(attention_mask[:, 0, 0, :], axis=-1, dtype=jnp.int32),
            implementation="cudnn")  # [batch, seq, heads, head_dim]
      else:
        context = jax.nn.dot_product_attention(query, key, value, mask=attention_mask)
    return dense(c, c.hidden_size, (axes.HEADS, axes.KV), (axes.EMBED,), "output").unbiased(context)

  @staticmethod
  def _on_shards(kernel, query, key, value, attention_mask, keep=None):
    """`kernel(q, k, v, key_valid[, keep])` on each device's rows (heads) of a mesh: XLA cannot split a custom call."""
    qkv = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.HEADS, axes.KV)
    inputs = (query, key, value, attention_mask[:, 0, 0, :])
    in_axes = (qkv, qkv, qkv, (axes.ACT_BATCH, axes.ACT_LENGTH))
    if keep is not None:
      inputs, in_axes = inputs + (keep,), in_axes + ((axes.ACT_BATCH, axes.HEADS, axes.ACT_LENGTH, None),)
    return partitioning.map_over_shards(kernel, inputs, in_axes, qkv)

  def _cpu_fused_attention(self, query, key, value, attention_mask, deterministic: bool):
    c = self.config
    batch, seq, heads, _ = query.shape
    rate = 0.0 if deterministic else c.attention_probs_dropout_prob
    # The einsum path's mask, bit for bit: the same submodule name and shape draw the same bits.
    keep = dropout_lib.Dropout(rate).keep_mask((batch, heads, seq, seq)) if rate else None
    attend = lambda q, k, v, key_valid, keep=None: cpu_attention.attention(q, k, v, key_valid, keep, rate)  # noqa: E731
    # The kernel computes in float32; bf16 query, key and value are widened, and its context rounded back.
    query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
    return self._on_shards(attend, query, key, value, attention_mask, keep).astype(c.compute_dtype)

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
