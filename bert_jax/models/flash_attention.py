"""Flash attention with BERT's attention dropout inside the kernel: Pallas (Triton) for GPUs.

Owns: `flash_attention_qkv` (and `flash_attention`), `softmax(q k^T / sqrt(head_dim)) v` over the real
keys with inverted dropout on the probabilities, and its forward and backward kernels.

Why: XLA's attention with dropout writes the `[batch, heads, seq, seq]` probabilities and their mask
and reads them back in the backward pass; at 16 x 512 (BERT-base, bf16, an H100's compiled program)
that is 31 GB more per train step than cuDNN's fused attention without dropout, whose API has none.
Here, as in FlashAttention-2, no `[seq, seq]` array reaches memory: each kernel draws the dropout
bits of its tile from the counter-based hash of the position that every dropout mask of the model
uses (`dropout.keep`), the forward and both backward loops alike. The kernels follow jax's own Pallas flash attention (`jax.experimental.pallas.ops.gpu.attention`,
Apache 2.0), with key padding for its segment ids (a padded query attends to the real keys, as the
einsum path's does) and the dropout added.

The dropout bits: each (sequence, head) gets two random words from the model's dropout rng
(`Dropout.words`), which key the hash of each element's position `q * seq + k`: the mask is
`dropout.keep_mask(words, [batch, heads, seq, seq], rate)`, the einsum path's mask from the same rng.

The kernels read the query, key and value where the Q/K/V projection's one matmul left them,
stacked `[batch, seq, 3, heads, head_dim]`, and add their biases themselves (the key's changes nothing:
skipped, below); the backward kernel writes
their gradients stacked, with the biases' gradient summed over its tile. XLA otherwise copies q, k and
v out of the matmul's output (adding the biases) and stacks their gradients back (summing the biases'):
each pass reads and writes the `[batch, seq, 3, hidden]` array, 0.3 GB, so 0.6 GB a BERT-base layer at
256 x 128 for the two (docs/performance.md, "nineteenth").

Off a GPU, Pallas's interpreter runs the kernels in float32: correct, slow, for tests.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bert_jax.models import dropout
from bert_jax.models import fused_norm

# A padded key's score: finite, so a row with no real key gets a uniform softmax (the einsum path's
# float32-min gives the same, over the real length; here over the length padded to a block, whose
# padded values are the value's bias), and far below any real score. Only rows of all-padding
# sequences have no real key, and no loss reads them.
_MASKED_SCORE = -0.7 * float(np.finfo(np.float32).max)
_LOG2_E = math.log2(math.e)  # the kernels use exp2: e^x = 2^(x log2 e)


class AttentionTiling(NamedTuple):
  """The kernels' tiling: query rows per forward program, the query/key block of the backward pass,
  and Triton's warps (None: 4, or 8 for heads over 64 or 128 x 128 backward blocks) and the forward's
  pipeline stages. The forward's key block is the whole sequence up to 128 (BERT's usual length).
  Of 20 tilings of jax's kernel, from which these kernels come, timed at 256 x 128 x 12 heads x 64 in
  bfloat16 on an H200, the fastest forward + backward were within 4% of each other; this is one of
  them (docs/performance.md)."""
  block_q: int = 128
  backward_block: int = 64
  num_warps: int | None = None
  num_stages: int = 2


class _Settings(NamedTuple):
  """What the kernels are compiled for (static): the true length `seq` keys the dropout hash."""
  seq: int
  head_dim: int
  drop_threshold: int | None  # None: no dropout; else keep where the hash's top bits >= this
  block_q: int
  block_k: int
  backward_block: int
  num_warps: int | None
  num_stages: int
  interpret: bool

  @property
  def sm_scale(self) -> float:
    return float(1 / np.sqrt(self.head_dim))

  @property
  def keep_scale(self) -> float:
    """The inverted dropout's 1 / (1 - rate), of the rate the threshold resolves to."""
    bits = dropout.DROPOUT_BITS
    return 1.0 if self.drop_threshold is None else float(2**bits / (2**bits - self.drop_threshold))


# ---------------------------------------------------------------------------------------------------
# The kernels. Refs hold one (sequence, head): queries/keys/values `[seq, head_dim]` without their bias,
# `bias` `[3, head_dim]` (the query's, key's and value's), `key_valid` `[seq]` int32, `words` `[2]` int32,
# `lse` (log2-sum-exp2 of each query's scaled scores) and `delta` (rowsum(out * d_out)) `[seq]` float32.
# `seq` here is padded to a multiple of the blocks.
#
# The key's bias is not added: it adds `q . b_k` to all of a query's scores, which the softmax ignores,
# so the output does not depend on it and its gradient is zero (the einsums get both to rounding).

_QUERY, _KEY, _VALUE = range(3)  # their index on the stacked axis


def _load(ref, bias_ref, part: int, rows=slice(None)):
  """`[rows, head_dim]` of the query, key or value (`part`): the projection's rows plus their bias,
  summed in float32 and rounded once, as XLA's add of the two rounds."""
  x = ref[rows, :]
  return (x.astype(jnp.float32) + bias_ref[part, :].astype(jnp.float32)[None, :]).astype(x.dtype)


def _scores(q, k, valid, settings: _Settings):
  """The scaled scores `[queries, keys]` of one tile in base 2 (`exp2` of them is `exp`), padded keys masked."""
  scores = plgpu.dot(q, k.T) * (settings.sm_scale * _LOG2_E)
  return jnp.where(valid[None, :], scores, _MASKED_SCORE)


def _kept(words_ref, query_positions, key_positions, settings: _Settings):
  """bool `[queries, keys]`: the tile's dropout mask (`dropout.keep`)."""
  return dropout.keep(words_ref[0], words_ref[1], query_positions, key_positions, settings.seq,
                      settings.drop_threshold)


def _probabilities(q, k, valid, lse, settings: _Settings):
  """The softmax `[queries, keys]` of one tile, recomputed from the forward pass's `lse`."""
  return jnp.exp2(_scores(q, k, valid, settings) - lse[:, None])


def _dropout_scale(words_ref, query_positions, key_positions, settings: _Settings):
  """float32 `[queries, keys]`: 1 / (1 - rate) where kept, 0 where dropped; None without dropout."""
  if settings.drop_threshold is None:
    return None
  return jnp.where(_kept(words_ref, query_positions, key_positions, settings), settings.keep_scale, 0.0)


def _forward_kernel(q_ref, k_ref, v_ref, bias_ref, valid_ref, words_ref, out_ref, lse_ref, *, settings: _Settings):
  block_q, block_k = q_ref.shape[0], settings.block_k
  query_positions = pl.program_id(0) * block_q + jnp.arange(block_q)
  q = _load(q_ref, bias_ref, _QUERY)

  def over_key_blocks(i, carry):
    out, running_max, running_sum = carry
    keys = pl.ds(i * block_k, block_k)
    k, v = k_ref[keys, :], _load(v_ref, bias_ref, _VALUE, keys)
    scores = _scores(q, k, valid_ref[keys] != 0, settings)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    correction = jnp.exp2(running_max - new_max)
    unnormalized = jnp.exp2(scores - new_max[:, None])
    running_sum = running_sum * correction + unnormalized.sum(axis=-1)
    # The normalizer sums every probability; only the output sees the dropped ones zeroed.
    if settings.drop_threshold is not None:
      keep = _kept(words_ref, query_positions, i * block_k + jnp.arange(block_k), settings)
      unnormalized = jnp.where(keep, unnormalized, 0.0)
    out = out * correction[:, None] + plgpu.dot(unnormalized.astype(v.dtype), v)
    return out, new_max, running_sum

  start = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  out, running_max, running_sum = lax.fori_loop(0, k_ref.shape[0] // block_k, over_key_blocks, start)
  out_ref[...] = (out * (settings.keep_scale / running_sum)[:, None]).astype(out_ref.dtype)
  lse_ref[...] = running_max + jnp.log2(running_sum)


def _backward_kernel(q_ref, k_ref, v_ref, bias_ref, valid_ref, words_ref, d_out_ref, lse_ref, delta_ref,
                     d_qkv_ref, d_bias_ref, *, settings: _Settings):
  """Program j: dK and dV of key block j (a loop over the query blocks), then dQ of query block j
  (a loop over the key blocks). With dropout D (kept: 1/(1-rate), else 0), P the softmax and
  out = (P * D) V: dV = (P * D)^T dO, dS = P * ((dO V^T) * D - delta) * scale, dK = dS^T Q, dQ = dS K;
  delta = rowsum(dO * out) = rowsum(P * (dO V^T) * D) (FlashAttention-2).

  `d_qkv_ref` `[block, 3, head_dim]` takes the three gradients of the block's rows, `d_bias_ref`
  `[3, head_dim]` float32 their sums over those rows (the biases' gradients, summed over the blocks
  after the call)."""
  block, n_blocks = settings.backward_block, q_ref.shape[0] // settings.backward_block
  j = pl.program_id(2)
  own = pl.ds(j * block, block)
  own_positions = j * block + jnp.arange(block)

  def score_gradient(p, d_out, v, delta, scale):
    d_p = plgpu.dot(d_out, v.T)
    if scale is not None:
      d_p = d_p * scale
    return p * (d_p - delta[:, None]) * settings.sm_scale

  k, v, valid = k_ref[own, :], _load(v_ref, bias_ref, _VALUE, own), valid_ref[own] != 0

  def dk_dv_over_query_blocks(i, carry):
    dk, dv = carry
    queries = pl.ds(i * block, block)
    q, d_out = _load(q_ref, bias_ref, _QUERY, queries), d_out_ref[queries, :]
    p = _probabilities(q, k, valid, lse_ref[queries], settings)
    scale = _dropout_scale(words_ref, i * block + jnp.arange(block), own_positions, settings)
    dropped = p if scale is None else p * scale
    dv = dv + plgpu.dot(dropped.astype(d_out.dtype).T, d_out)
    d_scores = score_gradient(p, d_out, v, delta_ref[queries], scale)
    return dk + plgpu.dot(d_scores.astype(q.dtype).T, q), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, n_blocks, dk_dv_over_query_blocks, (zeros, zeros))
  _store_gradient(d_qkv_ref, d_bias_ref, _KEY, dk, bias_gradient=False)
  _store_gradient(d_qkv_ref, d_bias_ref, _VALUE, dv)

  q, d_out, lse, delta = _load(q_ref, bias_ref, _QUERY, own), d_out_ref[own, :], lse_ref[own], delta_ref[own]

  def dq_over_key_blocks(i, dq):
    keys = pl.ds(i * block, block)
    k, v = k_ref[keys, :], _load(v_ref, bias_ref, _VALUE, keys)
    p = _probabilities(q, k, valid_ref[keys] != 0, lse, settings)
    scale = _dropout_scale(words_ref, own_positions, i * block + jnp.arange(block), settings)
    return dq + plgpu.dot(score_gradient(p, d_out, v, delta, scale).astype(k.dtype), k)

  dq = lax.fori_loop(0, n_blocks, dq_over_key_blocks, jnp.zeros(q.shape, jnp.float32))
  _store_gradient(d_qkv_ref, d_bias_ref, _QUERY, dq)


def _store_gradient(d_qkv_ref, d_bias_ref, part: int, gradient, bias_gradient: bool = True):
  """The block's gradient of the query, key or value (`part`) `[block, head_dim]` float32, and of its bias
  (the column sums; zero for the key's, whose bias the kernels do not add)."""
  d_qkv_ref[:, part, :] = gradient.astype(d_qkv_ref.dtype)
  d_bias_ref[part, :] = gradient.sum(axis=0) if bias_gradient else jnp.zeros(gradient.shape[1:], jnp.float32)


# ---------------------------------------------------------------------------------------------------
# The calls: `qkv` `[batch, seq, 3, heads, head_dim]`, `bias` `[3, heads, head_dim]`, `out` and its
# gradient `[batch, seq, heads, head_dim]`, `key_valid` `[batch, seq]`, `words` `[batch, heads, 2]`.

def _part(rows: int, head_dim: int, part: int, index):
  """Blocks of `rows` of one head of the query, key or value (`part`) in `qkv`; `index(*program ids)`
  gives (sequence, row block, head)."""
  def index_map(*ids):
    b, i, h = index(*ids)
    return b, i, part, h, 0
  return pl.BlockSpec((None, rows, None, None, head_dim), index_map)


def _per_head(rows: int, head_dim: int, index):
  return pl.BlockSpec((None, rows, None, head_dim), index)


def _forward(qkv, bias, key_valid, words, settings: _Settings):
  batch, seq, _, heads, head_dim = qkv.shape
  block_q = settings.block_q
  whole = lambda i, b, h: (b, 0, h)  # noqa: E731
  in_specs = [_part(block_q, head_dim, _QUERY, lambda i, b, h: (b, i, h)), _part(seq, head_dim, _KEY, whole),
              _part(seq, head_dim, _VALUE, whole), pl.BlockSpec((3, None, head_dim), lambda i, b, h: (0, h, 0)),
              pl.BlockSpec((None, seq), lambda i, b, h: (b, 0)),
              pl.BlockSpec((None, None, 2), lambda i, b, h: (b, h, 0))]
  num_warps = settings.num_warps or (4 if head_dim <= 64 else 8)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, settings=settings),
      grid=(seq // block_q, batch, heads),
      in_specs=in_specs,
      out_specs=[_per_head(block_q, head_dim, lambda i, b, h: (b, i, h, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct((batch, seq, heads, head_dim), qkv.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=settings.num_stages),
      interpret=settings.interpret, name="bert_flash_attention_forward",
  )(qkv, qkv, qkv, bias, key_valid, words)
  return out, lse


def _backward(qkv, bias, key_valid, words, out, lse, d_out, settings: _Settings):
  """(d_qkv like `qkv`, the biases' gradient summed per sequence and row block float32
  `[batch, seq / block, 3, heads, head_dim]`)."""
  batch, seq, _, heads, head_dim = qkv.shape
  block = settings.backward_block
  # One XLA pass: rowsum(dO * out) [batch, heads, seq].
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
  whole = lambda b, h, j: (b, 0, h)  # noqa: E731
  per_row = pl.BlockSpec((None, None, seq), lambda b, h, j: (b, h, 0))
  num_warps = settings.num_warps or (4 if block * block < 128 * 128 else 8)
  return pl.pallas_call(
      functools.partial(_backward_kernel, settings=settings),
      grid=(batch, heads, seq // block),
      in_specs=[*(_part(seq, head_dim, part, whole) for part in (_QUERY, _KEY, _VALUE)),
                pl.BlockSpec((3, None, head_dim), lambda b, h, j: (0, h, 0)),
                pl.BlockSpec((None, seq), lambda b, h, j: (b, 0)),
                pl.BlockSpec((None, None, 2), lambda b, h, j: (b, h, 0)),
                _per_head(seq, head_dim, lambda b, h, j: (b, 0, h, 0)), per_row, per_row],
      out_specs=[pl.BlockSpec((None, block, 3, None, head_dim), lambda b, h, j: (b, j, 0, h, 0)),
                 pl.BlockSpec((None, None, 3, None, head_dim), lambda b, h, j: (b, j, 0, h, 0))],
      out_shape=[jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                 jax.ShapeDtypeStruct((batch, seq // block, 3, heads, head_dim), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
      interpret=settings.interpret, name="bert_flash_attention_backward",
  )(qkv, qkv, qkv, bias, key_valid, words, d_out, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(qkv, bias, key_valid, words, settings: _Settings):
  return _forward(qkv, bias, key_valid, words, settings)[0]


def _attention_forward(qkv, bias, key_valid, words, settings: _Settings):
  out, lse = _forward(qkv, bias, key_valid, words, settings)
  return out, (qkv, bias, key_valid, words, out, lse)


def _attention_backward(settings: _Settings, residuals, d_out):
  qkv, bias, key_valid, words, out, lse = residuals
  d_qkv, d_bias = _backward(qkv, bias, key_valid, words, out, lse, d_out, settings)
  return d_qkv, d_bias.sum(axis=(0, 1)).astype(bias.dtype), None, None


_attention.defvjp(_attention_forward, _attention_backward)


def flash_attention_qkv(qkv, key_valid, words=None, *, bias=None, dropout_rate: float = 0.0,
                        tiling: AttentionTiling = AttentionTiling(), interpret: bool | None = None):
  """`dropout(softmax(q k^T / sqrt(head_dim))) v` over the real keys, by the Pallas kernels above.

  `qkv` `[batch, seq, 3, heads, head_dim]`: the query, key and value stacked, as the Q/K/V projection's
  one matmul gives them (`projection.project_qkv_stacked`); `bias` `[3, heads, head_dim]` their biases
  (None: none), which the kernels add (the key's changes no output and gets a zero gradient);
  `key_valid` bool `[batch, seq]`; `words` int32 `[batch, heads, 2]` (`Dropout.words`; needed when
  `dropout_rate` > 0). Returns
  `[batch, seq, heads, head_dim]`. Every row attends to the real keys, padded queries too. The mask
  is `dropout.keep_mask(words, [batch, heads, seq, seq], dropout_rate)`, whatever the tiling. A
  sequence is padded to a multiple of the block (16 to 128: lengths that are multiples of 128 pad
  nothing), a head to a power of 2 of 16 or more (Triton's dots) with zeros, which add nothing to q k^T.
  On a GPU, float32 inputs multiply in TF32 (Triton's dots); off a GPU, Pallas's interpreter runs the
  kernels in float32.
  """
  batch, seq, stacked, heads, head_dim = qkv.shape
  bias = jnp.zeros((3, heads, head_dim), qkv.dtype) if bias is None else bias.astype(qkv.dtype)
  if stacked != 3 or bias.shape != (3, heads, head_dim):
    raise ValueError(f"flash_attention_qkv takes the query, key and value stacked [batch, seq, 3, heads, head_dim] "
                     f"and their biases [3, heads, head_dim]; got {qkv.shape} and {bias.shape}.")
  threshold = dropout.drop_threshold(dropout_rate) or None
  if threshold is not None and (words is None or words.shape != (batch, heads, 2)):
    raise ValueError(f"flash_attention with dropout_rate={dropout_rate} needs words int32 [batch, heads, 2] = "
                     f"{(batch, heads, 2)} (Dropout.words); got {None if words is None else words.shape}.")
  if seq >= 2**15:
    raise ValueError(f"flash_attention takes sequences under 32,768 tokens (its dropout hash's positions); got {seq}.")
  block = max(16, min(128, pl.next_power_of_2(seq)))
  padded, padded_head = -(-seq // block) * block, max(16, pl.next_power_of_2(head_dim))
  if (padded, padded_head) != (seq, head_dim):
    qkv = jnp.pad(qkv, ((0, 0), (0, padded - seq), (0, 0), (0, 0), (0, padded_head - head_dim)))
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, padded_head - head_dim)))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, padded - seq)))
  words = jnp.zeros((batch, heads, 2), jnp.int32) if threshold is None else words.astype(jnp.int32)
  settings = _Settings(seq=seq, head_dim=head_dim, drop_threshold=threshold, block_q=min(tiling.block_q, block),
                       block_k=block, backward_block=min(tiling.backward_block, block), num_warps=tiling.num_warps,
                       num_stages=tiling.num_stages, interpret=fused_norm.interprets(interpret))
  out = _attention(qkv, bias, key_valid.astype(jnp.int32), words, settings)
  return out[:, :seq, :, :head_dim]


def flash_attention(query, key, value, key_valid, words=None, **options):
  """`flash_attention_qkv` of `query`, `key`, `value` `[batch, seq, heads, head_dim]`, stacked here (a copy
  of each, and of their gradients back: the model stacks nothing, its projection gives `qkv`)."""
  return flash_attention_qkv(jnp.stack((query, key, value), axis=2), key_valid, words, **options)
