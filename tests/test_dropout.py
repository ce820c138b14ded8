"""Dropout's bits: a keyed hash of each element's position (`bert_jax.models.dropout`), its rate and
its statistics, against a NumPy reference written from the hash's definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.models import dropout


def _lowbias32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def numpy_keep_mask(words, shape, rate):
  """The definition, in NumPy's wrapping uint32: two keyed lowbias32 rounds of `row * cols + col` per
  leading index, kept where the top 24 bits are >= round(rate * 2**24)."""
  words = np.asarray(words).view(np.uint32)
  rows, cols = ((1, 1) + tuple(shape))[-2:]
  position = (np.arange(rows, dtype=np.uint32)[:, None] * np.uint32(cols) + np.arange(cols, dtype=np.uint32))
  with np.errstate(over="ignore"):
    bits = _lowbias32(_lowbias32(position ^ words[..., 0, None, None]) ^ words[..., 1, None, None])
  return (bits >> np.uint32(8) >= round(rate * 2**24)).reshape(shape)


def _words(key, shape):
  return jax.random.randint(jax.random.key(key), shape, jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max)


@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (2, 3, 9), (2, 3, 16, 16)])
def test_keep_mask_is_its_definition(shape):
  words = _words(0, tuple(shape[:-2]) + (2,))
  np.testing.assert_array_equal(jax.jit(dropout.keep_mask, static_argnums=(1, 2))(words, shape, 0.3),
                                numpy_keep_mask(words, shape, 0.3))


def test_a_mask_is_drawn_from_one_pair_of_words_per_leading_index():
  # The module's mask of [2, 3, 8, 8]: words [2, 3, 2] from its rng, each pair keying its [8, 8] slice.
  module = dropout.Dropout(0.5)
  rngs = {"dropout": jax.random.key(4)}
  words = module.apply({}, (2, 3), rngs=rngs, method=dropout.Dropout.words)
  mask = module.apply({}, (2, 3, 8, 8), rngs=rngs, method=dropout.Dropout.keep_mask)
  np.testing.assert_array_equal(mask, numpy_keep_mask(words, (2, 3, 8, 8), 0.5))


def test_slice_words_are_the_keys_words_the_second_spread_by_the_slice_index():
  key = jax.random.key(5)
  data = np.asarray(jax.random.key_data(key)).view(np.int32)
  words = np.asarray(dropout.slice_words(key, (3, 4)))
  assert words.shape == (3, 4, 2) and (words[..., 0] == data[0]).all()
  with np.errstate(over="ignore"):
    spread = (np.arange(12, dtype=np.uint32) * np.uint32(0x9E3779B9)).view(np.int32).reshape(3, 4)
  np.testing.assert_array_equal(words[..., 1], data[1] ^ spread)
  # Keys of other implementations go through jax.random.bits: still one pair per slice.
  assert dropout.slice_words(jax.random.key(5, impl="rbg"), (3, 4)).shape == (3, 4, 2)


def test_the_slices_of_a_modules_mask_are_independent():
  # One key, 512 slices whose words differ only in the second: neighbouring and distant slices agree
  # on 0.82 of their elements, as independent masks at rate 0.1 do.
  keep = np.asarray(dropout.Dropout(0.1).apply({}, (512, 32, 32), rngs={"dropout": jax.random.key(6)},
                                               method=dropout.Dropout.keep_mask))
  assert abs(keep.mean() - 0.9) < 5 * np.sqrt(0.09 / keep.size)
  for a, b in [(keep[:-1], keep[1:]), (keep[:-256], keep[256:]), (keep[:-2], keep[2:])]:
    assert abs(np.mean(a == b) - 0.82) < 5 * np.sqrt(0.82 * 0.18 / a.size)


def test_keep_mask_keeps_one_minus_the_rate_independently_per_slice_and_position():
  keep = np.asarray(dropout.keep_mask(_words(1, (4, 4, 2)), (4, 4, 128, 128), 0.1))  # 262,144 draws
  sigma = np.sqrt(0.1 * 0.9 / keep.size)
  assert abs(keep.mean() - 0.9) < 5 * sigma
  # Independent draws agree with probability 0.9^2 + 0.1^2: across slices and neighbours.
  for a, b in [(keep[0, 0], keep[0, 1]), (keep[0, 0], keep[1, 0]), (keep[..., :-1], keep[..., 1:]),
               (keep[..., :-1, :], keep[..., 1:, :])]:
    assert abs(np.mean(a == b) - 0.82) < 5 * np.sqrt(0.82 * 0.18 / a.size)
  # Words one bit apart (either word) draw unrelated masks.
  for flip in ([1, 0], [2**16, 0], [2**30, 0], [0, 1], [0, 2**16], [0, 2**30]):
    other = np.asarray(dropout.keep_mask(_words(1, (4, 4, 2)) ^ jnp.array(flip, jnp.int32), keep.shape, 0.1))
    assert abs(np.mean(keep == other) - 0.82) < 5 * np.sqrt(0.82 * 0.18 / keep.size), flip


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_the_rate(rate):
  keep = dropout.keep_mask(jnp.array([7, 11], jnp.int32), (512, 512), rate)
  assert abs(float(keep.mean()) - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / keep.size) + 1e-12


def test_rates_resolve_to_24_bits_and_rates_outside_0_1_are_refused():
  assert dropout.drop_threshold(0.1) == 1677722 and dropout.drop_threshold(1 - 2**-24) == 2**24 - 1
  with pytest.raises(ValueError, match=r"rate 1.0 of a hashed mask is not in \[0, 1\)"):
    dropout.drop_threshold(1.0)


def test_slices_of_2_31_elements_are_refused_with_the_fix():
  with pytest.raises(ValueError, match=r"\[rows, cols\] = \[65536, 32768\].*under 2\*\*31 elements: split"):
    dropout.keep_mask(jnp.zeros((2,), jnp.int32), (65536, 32768), 0.1)
