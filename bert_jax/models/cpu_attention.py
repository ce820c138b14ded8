"""Fused attention on XLA:CPU (`attention_impl='cpu_fused'`): a C++ kernel called through XLA's FFI.

Owns: `cpu_attention.cc` (built on first use by `cpu_build`), registering it with XLA, and its custom
VJP. The kernel computes what `attention.py`'s einsum attention does, dropout mask included (the mask
is drawn by the model and passed in), in float32. On a 2-core Xeon one MiniLM-size layer's attention
took 12 ms forward against XLA's 45, and 36-39 ms forward and backward with dropout against 88-113
(docs/performance.md).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import cpu_build

_FORWARD, _BACKWARD = "bert_jax_attention_forward", "bert_jax_attention_backward"
KERNEL = cpu_build.Kernel(source=pathlib.Path(__file__).with_name("cpu_attention.cc"), name="cpu_fused attention",
                          setting="attention_impl", fallback="einsum",
                          targets=((_FORWARD, "BertJaxAttentionForward"), (_BACKWARD, "BertJaxAttentionBackward")))


def build(compiler: str | None = None) -> pathlib.Path:
  """The compiled kernel library (built now unless a cached build of this source exists)."""
  return cpu_build.build(KERNEL, compiler)


@functools.cache
def _register() -> None:
  cpu_build.register(KERNEL)


@functools.cache
def available() -> bool:
  """Whether the kernel builds (or is cached) and loads here; if not, logs why, once per process."""
  return cpu_build.available(KERNEL, _register)


def _attributes(query, keep_prob) -> dict[str, np.float32]:
  """The kernels' attributes: sqrt(head_dim), which the scores are divided by, and the keep probability."""
  return dict(root=np.float32(np.sqrt(np.float32(query.shape[-1]))), keep_prob=np.float32(keep_prob))


def _forward(query, key, value, key_valid, keep, keep_prob):
  batch, seq, heads, _ = query.shape
  outputs = (jax.ShapeDtypeStruct(query.shape, jnp.float32), jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, outputs)(query, key, value, key_valid, keep, **_attributes(query, keep_prob))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(query, key, value, key_valid, keep, keep_prob):
  return _forward(query, key, value, key_valid, keep, keep_prob)[0]


def _attention_fwd(query, key, value, key_valid, keep, keep_prob):
  context, lse = _forward(query, key, value, key_valid, keep, keep_prob)
  return context, (query, key, value, key_valid, keep, lse)


def _attention_bwd(keep_prob, residuals, d_context):
  query, key, value, key_valid, keep, lse = residuals
  grads = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(query.shape, jnp.float32),) * 3)(
      query, key, value, key_valid, keep, lse, d_context, **_attributes(query, keep_prob))
  return (*grads, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, key_valid: jax.Array,
              keep: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
  """Softmax attention of `query`, `key`, `value` `[batch, seq, heads, head_dim]` (float32) over the keys
  where `key_valid` `[batch, seq]` is True; with `keep` (bool `[batch, heads, seq, seq]`), inverted
  dropout at `rate` on the probabilities. Returns the context `[batch, seq, heads, head_dim]`."""
  if query.dtype != jnp.float32:
    raise ValueError(f"The cpu_fused attention kernel computes in float32; got {query.dtype}.")
  if query.ndim != 4 or key.shape != query.shape or value.shape != query.shape:
    raise ValueError(f"cpu_fused attention takes query, key and value of one shape [batch, seq, heads, head_dim]; "
                     f"got {query.shape}, {key.shape}, {value.shape}.")
  batch, seq, heads, _ = query.shape
  if key_valid.shape != (batch, seq):
    raise ValueError(f"key_valid must be [batch, seq] = {(batch, seq)}; got {key_valid.shape}.")
  if keep is not None and (keep.shape != (batch, heads, seq, seq) or not 0.0 < rate < 1.0):
    raise ValueError(f"keep must be [batch, heads, seq, seq] = {(batch, heads, seq, seq)} with a dropout rate in "
                     f"(0, 1); got {keep.shape} and rate={rate}.")
  _register()
  if keep is None:
    keep, keep_prob = jnp.zeros((1,), jnp.uint8), 1.0
  else:
    keep, keep_prob = keep.astype(jnp.uint8), 1.0 - rate
  return _attention(query, key, value, key_valid.astype(jnp.uint8), keep, keep_prob)
