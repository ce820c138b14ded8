"""Dropout whose bits come from a cheap keyed hash of each element's position.

Owns: `Dropout` (the model's only source of randomness), the hash, and the rule that turns its bits
into a keep mask: `keep_mask` for whole arrays (XLA fuses it into the ops that use the mask), `keep`
for one tile of one (the Pallas flash attention's kernels draw their masks tile by tile with it).

The bits of a mask `[*lead, rows, cols]`: a pair of 32-bit words per leading index, derived from the
module's dropout rng (`slice_words`), keys a hash of each element's position `row * cols + col` in
its `[rows, cols]` slice: two rounds of lowbias32 (`_hash`, 18 integer operations). An element is
kept when the hash's top 24 bits are at least `round(rate * 2**24)`.

- **Why not `jax.random.bits` per element:** threefry's 20 rounds take about 110 integer operations
  per 32 bits. Drawn that way (fused, as before 2026-11-28), MiniLM's train step on this project's
  CPU ran 5% slower, and on an H200 the masks' fusion was 5.1% of a BERT-base step at batch 768
  (docs/performance.md, "sixteenth").
- **A mask depends only on the rng, the shape and the position:** not on the mesh (each device
  hashes its own rows), and not on the attention kernel ('einsum', 'cpu_fused' and 'pallas' draw
  the same attention masks).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DROPOUT_BITS = 24  # the hash bits compared with the rate: rates resolve to 2**-24


def drop_threshold(rate: float) -> int:
  """The hash threshold of dropout `rate` in [0, 1): an element is kept where its top bits are >= this."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"The dropout rate {rate} of a hashed mask is not in [0, 1).")
  return round(rate * 2**DROPOUT_BITS)


def _mix32(x: jax.Array) -> jax.Array:
  """lowbias32 (C. Wellons' hash prospector: xorshift, multiply, xorshift, multiply, xorshift): a bijection
  of 32-bit words whose every input bit flips each output bit with probability 0.5 +- 0.002. int32
  arithmetic, wrapping, logical shifts: the same bits in XLA on every backend and in Triton, and no
  unsigned compare for Triton to get wrong."""
  x = x ^ lax.shift_right_logical(x, np.int32(16))
  x = x * np.int32(0x7FEB352D)
  x = x ^ lax.shift_right_logical(x, np.int32(15))
  x = x * np.int32(0x846CA68B - 2**32)
  return x ^ lax.shift_right_logical(x, np.int32(16))


def _hash(position: jax.Array, first_word, second_word) -> jax.Array:
  """Two keyed rounds of `_mix32`. One round keyed at its input gives slices whose masks are
  permutations of one another when their first words agree above the position bits; a second word
  xored after the first multiply of one round gave masks 27 sigma from independent for second words
  one bit apart (their agreement, measured as tests/test_dropout.py does: 0.800 where 0.82 is
  independent)."""
  return _mix32(_mix32(position ^ first_word) ^ second_word)


def keep(first_word, second_word, row_positions, col_positions, cols: int, threshold: int) -> jax.Array:
  """bool `[..., len(row_positions), len(col_positions)]`: which elements of a tile dropout keeps.

  The words: int32, one pair per slice (scalars, or `[..., 1, 1]` to broadcast against the positions);
  `row_positions` and `col_positions` int32, the tile's rows and columns in its `[rows, cols]` slice.
  """
  bits = _hash(row_positions[:, None] * cols + col_positions[None, :], first_word, second_word)
  return lax.shift_right_logical(bits, np.int32(32 - DROPOUT_BITS)) >= threshold


def slice_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """`(rows, cols)` of the slices whose positions the hash numbers, in a mask of `shape` (an array of
  under two axes is one row); refused when a slice holds 2**31 elements or more (int32 positions)."""
  rows, cols = ((1,) * 2 + tuple(shape))[-2:]
  if rows * cols >= 2**31:
    raise ValueError(f"Dropout hashes positions within each [rows, cols] = [{rows}, {cols}] slice of its "
                     f"input {tuple(shape)}, which must hold under 2**31 elements: split the input.")
  return rows, cols


def keep_mask(words: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """bool `[*shape]`: the elements dropout at `rate` keeps, from `words` int32 `[*shape[:-2], 2]`
  (`slice_words`). An array of under two axes is one row."""
  rows, cols = slice_shape(shape)
  words = words[..., None, None, :]
  kept = keep(words[..., 0], words[..., 1], jnp.arange(rows, dtype=jnp.int32), jnp.arange(cols, dtype=jnp.int32),
              cols, drop_threshold(rate))
  return kept.reshape(shape)


def slice_words(key: jax.Array, lead_shape: tuple[int, ...]) -> jax.Array:
  """int32 `[*lead_shape, 2]`: the word pair of each slice under `key`. The first word is the key's; the
  second, the key's other word xored with the slice's flat index times an odd constant: two integer
  operations per slice, which XLA computes inside the fusions that use the mask. The hash's second
  round decorrelates slices whose second words differ in any bit (tests/test_dropout.py)."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw key data, as jax.random.PRNGKey gives
    key = jax.random.wrap_key_data(key)
  if key.shape:
    raise ValueError(f"slice_words takes one key; got a batch of keys of shape {key.shape} (vmap over them).")
  if str(jax.random.key_impl(key)) == "threefry2x32":  # jax's default: the key is two random words
    data = jax.random.key_data(key)
  else:  # other implementations' key data may not be uniformly random words
    data = jax.random.bits(key, (2,), jnp.uint32)
  # The barrier keeps the key's derivation (make_rng's threefry) out of the fusions that use the mask:
  # fused, XLA derives it inside them (a BERT-base step's mask fusion compiled for an H100:
  # 3,839 PTX instructions with it fused, 2,331 without, for 47 small kernels more).
  first, second = lax.optimization_barrier(tuple(lax.bitcast_convert_type(w, jnp.int32) for w in (data[0], data[1])))
  index = jnp.arange(int(np.prod(lead_shape)), dtype=jnp.int32).reshape(lead_shape)
  second = second ^ (index * np.int32(0x9E3779B9 - 2**32))
  return jnp.stack([jnp.broadcast_to(first, lead_shape), second], axis=-1)


class Dropout(nn.Module):
  """Inverted dropout (the distribution of `nn.Dropout`, the rate to 2**-24), its bits hashed (above)."""
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

  def words(self, lead_shape: tuple[int, ...]) -> jax.Array:
    """int32 `[*lead_shape, 2]`: the hash's word pair of each slice of a mask `[*lead_shape, rows, cols]`,
    from this module's dropout rng (`slice_words`)."""
    return slice_words(self.make_rng("dropout"), lead_shape)

  def keep_mask(self, shape: tuple[int, ...]) -> jax.Array:
    """The bool mask `[*shape]` of the elements `__call__` keeps (True) on an input of that shape."""
    return keep_mask(self.words(tuple(shape[:-2])), shape, self.rate)
