"""attention_impl='pallas': our Pallas flash attention computes what the float32 einsums compute, with
the attention dropout drawn inside its kernels.

On the CPU the kernels run in Pallas's interpreter: the same kernel code, float32 arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf, models
from bert_jax.models import flash_attention as flash

from attention_reference import einsum_attention

# Two float32 orderings of the same softmax(q k^T) v: measured <= 1.5e-6 here.
F32_ATOL = 2e-5
TILINGS = [
    (24, 16, flash.AttentionTiling()),  # padded to one 32-wide block
    (64, 16, flash.AttentionTiling(block_q=32, backward_block=16)),  # several query and backward blocks
    (200, 16, flash.AttentionTiling()),  # padded to 256: two 128-wide key blocks in the forward pass
    (24, 8, flash.AttentionTiling()),  # a head narrower than Triton's 16, padded with zeros
]


def _inputs(seq, head_dim, batch=2, heads=2):
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v, d_out = (jax.random.normal(key, (batch, seq, heads, head_dim)) for key in keys[:4])
  key_valid = jnp.arange(seq)[None, :] < jnp.array([[seq], [seq // 3]])  # row 1 mostly padding
  words = jax.random.randint(keys[4], (batch, heads, 2), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max)
  return (q, k, v), key_valid, words, d_out


def _assert_matches(fn, reference, qkv, d_out):
  out, grads = jax.vjp(fn, *qkv)
  want, want_grads = jax.vjp(reference, *qkv)
  # Every row, the padded queries' too: they attend to the real keys, as the einsums' do.
  np.testing.assert_allclose(out, want, atol=F32_ATOL, rtol=0)
  for name, got, expected in zip("qkv", grads(d_out), want_grads(d_out)):
    np.testing.assert_allclose(got, expected, atol=F32_ATOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("seq, head_dim, tiling", TILINGS)
def test_flash_attention_matches_the_einsums(seq, head_dim, tiling):
  qkv, key_valid, _, d_out = _inputs(seq, head_dim)
  _assert_matches(lambda *qkv: flash.flash_attention(*qkv, key_valid, tiling=tiling),
                  lambda *qkv: einsum_attention(*qkv, key_valid), qkv, d_out)


@pytest.mark.parametrize("seq, head_dim, tiling", TILINGS)
def test_flash_attention_dropout_is_the_einsums_with_its_keep_mask(seq, head_dim, tiling):
  # The forward kernel and both backward loops draw the same bits, tile by tile, whatever the tiling:
  # values and the three gradients equal the einsums' with the mask `keep_mask` gives.
  qkv, key_valid, words, d_out = _inputs(seq, head_dim)
  keep = flash.keep_mask(words, seq, 0.3)
  _assert_matches(lambda *qkv: flash.flash_attention(*qkv, key_valid, words, dropout_rate=0.3, tiling=tiling),
                  lambda *qkv: einsum_attention(*qkv, key_valid, keep, 0.3), qkv, d_out)


def test_keep_mask_keeps_one_minus_the_rate_independently_per_head_and_position():
  words = jax.random.randint(jax.random.key(1), (4, 4, 2), jnp.iinfo(jnp.int32).min, jnp.iinfo(jnp.int32).max)
  keep = np.asarray(flash.keep_mask(words, 128, 0.1))  # [4, 4, 128, 128]: 262,144 draws
  sigma = np.sqrt(0.1 * 0.9 / keep.size)
  assert abs(keep.mean() - 0.9) < 5 * sigma
  # Independent draws agree with probability 0.9^2 + 0.1^2: across heads, sequences and neighbours.
  for a, b in [(keep[0, 0], keep[0, 1]), (keep[0, 0], keep[1, 0]), (keep[..., :-1], keep[..., 1:]),
               (keep[..., :-1, :], keep[..., 1:, :])]:
    assert abs(np.mean(a == b) - 0.82) < 5 * np.sqrt(0.82 * 0.18 / a.size)
  # Words one bit apart (either word) draw unrelated masks.
  for flip in ([1, 0], [2**16, 0], [2**30, 0], [0, 1], [0, 2**16], [0, 2**30]):
    other = np.asarray(flash.keep_mask(words ^ jnp.array(flip, jnp.int32), 128, 0.1))
    assert abs(np.mean(keep == other) - 0.82) < 5 * np.sqrt(0.82 * 0.18 / keep.size), flip


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_the_rate(rate):
  keep = flash.keep_mask(jnp.array([[[7, 11]]], jnp.int32), 512, rate)
  assert abs(float(keep.mean()) - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / keep.size) + 1e-12


def test_rates_resolve_to_24_bits():
  assert flash.drop_threshold(0.1) == 1677722 and flash.drop_threshold(1 - 2**-24) == 2**24 - 1


def test_flash_attention_refuses_dropout_without_words_and_rates_outside_0_1():
  qkv, key_valid, _, _ = _inputs(16, 16)
  with pytest.raises(ValueError, match=r"needs words int32 \[batch, heads, 2\] = \(2, 2, 2\).*Dropout.random_words"):
    flash.flash_attention(*qkv, key_valid, dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"rate 1.0 is not in \[0, 1\)"):
    flash.flash_attention(*qkv, key_valid, jnp.zeros((2, 2, 2), jnp.int32), dropout_rate=1.0)


def test_the_model_runs_the_kernel_only_under_its_switch(tiny_config):
  # Its loss and gradients against the einsums: tests/test_models.py, test_fused_attention_*.
  einsum = models.BertModel(tiny_config)
  pallas = models.BertModel(tiny_config.replace(attention_impl="pallas"))
  params = hf.init_params(einsum)
  input_ids = jnp.ones((2, 11), jnp.int32)

  def count(module):
    return str(jax.make_jaxpr(lambda p: module.apply({"params": p}, input_ids))(params)).count("bert_flash_attention")
  assert count(pallas) >= 2 and count(einsum) == 0  # each layer


def test_pallas_attention_on_a_tpu_is_refused_and_dot_product_is_not(tiny_config, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="attention_impl='pallas' needs a GPU.*attention_impl=dot_product"):
    hf.init_params(models.BertModel(tiny_config.replace(attention_impl="pallas")))
  assert hf.init_params(models.BertModel(tiny_config.replace(attention_impl="dot_product")))


def test_the_log_says_when_pallas_kernels_are_interpreted(tiny_config):
  assert "interpreter" in models.describe_kernels(tiny_config.replace(attention_impl="pallas"))  # this CPU
  assert "interpreter" not in models.describe_kernels(tiny_config)


def test_the_model_trains_with_pallas_attention_dropout(tiny_config):
  # The dropout is applied (another loss than without it), drawn from the dropout rng (one seed, one
  # loss; another seed, another), and check_trainable lets it train.
  config = tiny_config.replace(attention_impl="pallas", attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.0)
  config.check_trainable()
  module = models.BertModel(config)
  params = hf.init_params(module)
  input_ids = jnp.arange(22, dtype=jnp.int32).reshape(2, 11) % 50 + 3

  def encode(module, seed):
    return module.apply({"params": params}, input_ids, deterministic=False,
                        rngs={"dropout": jax.random.key(seed)}).sequence_output
  without = models.BertModel(config.replace(attention_probs_dropout_prob=0.0))
  first, again, other = encode(module, 0), encode(module, 0), encode(module, 1)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3  # float32 rounding: 1e-6
  assert np.abs(first - encode(without, 0)).max() > 1e-3
