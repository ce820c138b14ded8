"""Times the attention core of one BERT layer, `softmax(q k^T / sqrt(d)) v` over the real keys: XLA's
einsums, cuDNN's fused kernel and our Pallas (Triton) flash attention (`flash_attention`, as
`attention_impl='pallas'` calls it), forward and forward + backward, with each kernel's distance from
XLA's values and gradients on the real rows. Then with attention dropout 0.1, as BERT trains: the
einsums with the model's `Dropout` (the mask written out and read back) and the Pallas kernels, which
draw the same hashed mask tile by tile; their distance is from float32 einsums given that mask
(`dropout.keep_mask`). One JSON line per variant.

Each variant takes what the model hands the attention: the Q/K/V projection's one output, stacked
`[batch, seq, 3, heads, head_dim]`. XLA's and cuDNN's slice q, k and v out of it and stack their
gradients back, as the model's step does for them; ours reads it in place (`flash_attention_qkv`).
Before the nineteenth stop every variant took q, k and v apart, and ours too.

  python -m scripts.bench_attention [--batch=256] [--seq=128] [--heads=12] [--head-dim=64] [--sweep]

Half the rows are full, the rest hold between half and all of `seq` real tokens. `--sweep` also
times the Pallas kernel at each tiling (forward query block, backward block, warps, stages); the default
`AttentionTiling` came from that sweep. With dropout it adds two tilings: compiled for an H100, the
default's forward with dropout spills 172 bytes a thread since the kernels add the biases (255 registers;
without the biases it fit in 255), 8 warps or 64-row query blocks spill none (docs/performance.md,
"nineteenth"). Meant for a GPU: elsewhere only the einsums run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import dropout as dropout_lib
from bert_jax.models import flash_attention as flash
from scripts.bench_fused_norm import rel_l2, timed

RATE = 0.1  # BERT's attention dropout
WORDS = jax.random.randint(jax.random.key(1), (1, 1, 2), -2**31, 2**31 - 1, jnp.int32)  # broadcast per batch, head


def apart(attention):
  """`attention(q, k, v, key_valid)` as a variant of `qkv` `[batch, seq, 3, heads, head_dim]`: sliced."""
  return lambda qkv, key_valid: attention(*jnp.unstack(qkv, axis=2), key_valid)


@apart
def einsum(q, k, v, key_valid):
  return jax.nn.dot_product_attention(q, k, v, mask=key_valid[:, None, None, :], implementation="xla")


@apart
def cudnn(q, k, v, key_valid):
  lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def pallas(tiling: flash.AttentionTiling):
  return lambda qkv, key_valid: flash.flash_attention_qkv(qkv, key_valid, tiling=tiling)


def _words(qkv):
  return jnp.broadcast_to(WORDS, (qkv.shape[0], qkv.shape[3], 2))


def pallas_dropout(tiling: flash.AttentionTiling):
  return lambda qkv, key_valid: flash.flash_attention_qkv(qkv, key_valid, _words(qkv), dropout_rate=RATE,
                                                          tiling=tiling)


def _probs_shape(qkv):
  """The attention probabilities' shape `[batch, heads, queries, keys]`, the masks' shape."""
  batch, seq, _, heads, _ = qkv.shape
  return (batch, heads, seq, seq)


def masked_einsums(q, k, v, key_valid, keep):
  """attention.py's einsum path with dropout mask `keep` `[batch, heads, q, k]`: scores and softmax in
  float32, the kept probabilities scaled in the inputs' dtype."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min), axis=-1)
  probs = jnp.where(keep, probs.astype(q.dtype) / jnp.asarray(1 - RATE, q.dtype), jnp.zeros((), q.dtype))
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def einsum_dropout(qkv, key_valid):
  """The einsum path as the model runs it: its `Dropout` draws the mask, written out and read back."""
  keep = dropout_lib.Dropout(RATE).apply({}, _probs_shape(qkv), method="keep_mask", rngs={"dropout": jax.random.key(2)})
  return masked_einsums(*jnp.unstack(qkv, axis=2), key_valid, keep)


def einsum_with_pallas_mask(qkv, key_valid):
  """The reference of `pallas_dropout`: float32 einsums with the kernels' mask."""
  keep = dropout_lib.keep_mask(_words(qkv), _probs_shape(qkv), RATE)
  return masked_einsums(*jnp.unstack(qkv.astype(jnp.float32), axis=2), key_valid, keep)


REFERENCES = ("einsum", "einsum_with_pallas_mask")


def reference_for(variant: str) -> str | None:
  """The variant whose values `variant`'s are compared with: the float32 einsums with the kernels' mask
  for our dropout kernel, XLA's einsums for the others without dropout, and none for the references
  themselves and for `einsum_dropout`, whose mask is its own."""
  if variant in REFERENCES or variant == "einsum_dropout":
    return None
  return "einsum_with_pallas_mask" if variant == "pallas_dropout" else "einsum"


def _gradients(fn, d_out, qkv, key_valid):
  """`fn`'s gradient with respect to `qkv` for the cotangent `d_out`, cast to `fn`'s output dtype (the
  float32 reference's output is float32 for inputs of any dtype)."""
  out, vjp = jax.vjp(lambda qkv: fn(qkv, key_valid), qkv)
  return vjp(d_out.astype(out.dtype))[0]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--sweep", action="store_true")
  args = parser.parse_args()
  shape = (args.batch, args.seq, args.heads, args.head_dim)
  keys = jax.random.split(jax.random.key(0), 5)
  qkv = jax.random.normal(keys[0], shape[:2] + (3,) + shape[2:], jnp.float32).astype(args.dtype)
  d_out = jax.random.normal(keys[3], shape, jnp.float32).astype(args.dtype)
  lengths = jax.random.randint(keys[4], (args.batch,), args.seq // 2, args.seq + 1)
  lengths = jnp.where(jnp.arange(args.batch) % 2 == 0, args.seq, lengths)
  key_valid = jnp.arange(args.seq)[None, :] < lengths[:, None]  # [batch, seq]
  real_rows = key_valid[:, :, None, None]
  d_out = jnp.where(real_rows, d_out, 0)  # padded rows are never read: their gradient is zero
  inputs = (qkv, key_valid)
  common = {"shape": list(shape), "dtype": args.dtype, "device": jax.devices()[0].device_kind}

  variants = [("einsum", einsum, None)]
  if jax.default_backend() == "gpu":
    variants.append(("cudnn", cudnn, None))
    tilings = [flash.AttentionTiling()]
    if args.sweep:
      tilings += [flash.AttentionTiling(*t) for t in itertools.product((64, 128), (32, 64, 128), (None, 4, 8), (2,))
                  if flash.AttentionTiling(*t) != tilings[0]]
      tilings += [tilings[0]._replace(num_stages=s) for s in (1, 3)]
    variants += [("pallas", pallas(t), t) for t in tilings]
  variants += [("einsum_dropout", einsum_dropout, None), ("einsum_with_pallas_mask", einsum_with_pallas_mask, None)]
  if jax.default_backend() == "gpu":
    variants.append(("pallas_dropout", pallas_dropout(flash.AttentionTiling()), flash.AttentionTiling()))
    if args.sweep:  # the two tilings whose forward with dropout ptxas compiles without spills (the default's spills)
      variants += [("pallas_dropout", pallas_dropout(t), t)
                   for t in (flash.AttentionTiling(num_warps=8), flash.AttentionTiling(block_q=64))]
  references = {}  # each reference variant's (output, gradients)
  for name, fn, tiling in variants:
    row = dict(common, variant=name, tiling=list(tiling) if tiling else None)
    forward = jax.jit(fn)
    backward = jax.jit(functools.partial(_gradients, fn))  # d_out an argument, not a constant to fold
    try:
      row["forward_ms"] = timed(forward, inputs)
      row["forward_backward_ms"] = timed(backward, (d_out, *inputs))
      out, grads = jnp.where(real_rows, forward(*inputs), 0), backward(d_out, *inputs)
    except Exception as e:  # pylint: disable=broad-except  # a tiling Triton rejects: report, go on
      print(json.dumps(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}")), flush=True)
      continue
    if name in REFERENCES:
      references[name] = out, grads
    reference = references.get(reference_for(name))
    if reference is not None:  # None also when the reference's own row reported an error
      row["output_rel_l2"] = rel_l2(out, reference[0])
      row["grads_rel_l2"] = {g: rel_l2(grads[:, :, i], reference[1][:, :, i]) for i, g in enumerate("qkv")}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
