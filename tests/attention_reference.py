"""The attention tests' reference: `attention.py`'s einsum attention, written out."""

import jax
import jax.numpy as jnp


def einsum_attention(query, key, value, key_valid, keep=None, rate=0.0):
  """attention.py's einsum attention, written out: the reference."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))
  scores = jnp.einsum("bhqd,bhkd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
  scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if keep is not None:
    probs = jnp.where(keep, probs / jnp.asarray(1.0 - rate, probs.dtype), 0.0)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)
