"""Dropout whose random bits XLA fuses into the mask: `jax.random.bits`, bit for bit, written out.

Owns: `Dropout` (the model's only source of randomness) and the bits behind it. The hash is the
Threefry-2x32 of `jax.random` (20 rounds; Salmon et al. 2011).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key_words: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash of the counters `(x0, x1)` (uint32, one shape) under `key_words` (uint32 `[2]`).

  Written out in integer ops, all 20 rounds, so that XLA fuses the hash into the ops that use its
  bits. jax's own lowering on the CPU loops over the five 4-round blocks, each block a pass over
  memory.
  """
  k0, k1 = key_words[0], key_words[1]
  keys = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + keys[0], x1 + keys[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = jax.lax.shift_left(x1, np.uint32(rotation)) | jax.lax.shift_right_logical(x1, np.uint32(32 - rotation))
      x1 = x0 ^ x1
    x0 = x0 + keys[(block + 1) % 3]
    x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bits(key, shape, jnp.uint32)`, bit for bit (`tests/test_models.py`), with the hash fused.

  For a threefry key under jax's default partitionable threefry, an element's bits are the XOR of the
  two words of the hash of its flat index (so they do not depend on how the array is sharded). Here
  that hash is `threefry2x32`, plain integer ops that XLA fuses with the mask and the multiply: one
  pass over memory for the whole dropout. Other keys, settings and sizes go through `jax.random.bits`.
  """
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw key data, as jax.random.PRNGKey gives
    key = jax.random.wrap_key_data(key)
  if key.shape:
    raise ValueError(f"random_bits takes one key; got a batch of keys of shape {key.shape} (vmap over them).")
  if (str(jax.random.key_impl(key)) != "threefry2x32" or not jax.config.jax_threefry_partitionable
      or not 0 < math.prod(shape) < 2**32):
    return jax.random.bits(key, shape, jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  first, second = threefry2x32(jax.random.key_data(key), jnp.zeros(shape, jnp.uint32), index)
  return first ^ second


class Dropout(nn.Module):
  """Inverted dropout, the distribution of `nn.Dropout` (the rate to 2**-32), its bits from `random_bits`.

  `nn.Dropout` draws through `jax.random`, whose threefry on XLA:CPU loops over the hash's rounds in
  passes over memory: a MiniLM train step with these same bits drawn by `jax.random.bits` took 1/0.88
  as long on this project's CPU (docs/performance.md).
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if not 0.0 < self.rate <= 1.0:
      raise ValueError(f"Dropout rate {self.rate} is not in [0, 1].")
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    return jnp.where(self.keep_mask(x.shape), x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))

  def random_words(self, shape: tuple[int, ...]) -> jax.Array:
    """int32 `[*shape]` random words from this module's dropout rng: the keys of a kernel that draws its
    own dropout bits (`flash_attention`)."""
    return jax.lax.bitcast_convert_type(random_bits(self.make_rng("dropout"), shape), jnp.int32)

  def keep_mask(self, shape: tuple[int, ...]) -> jax.Array:
    """The bool mask `[*shape]` of the elements `__call__` keeps (True) on an input of that shape."""
    drop_below = np.uint32(min(round(self.rate * 2**32), 2**32 - 1))  # keep where the 32 bits are >= this
    return random_bits(self.make_rng("dropout"), shape) >= drop_below
