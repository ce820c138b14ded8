"""attention_impl='pallas': jax's Pallas flash attention computes what the float32 einsums compute.

On the CPU the kernel runs in Pallas's interpreter: the same kernel code, float32 arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf, models
from bert_jax.models import attention

# Two float32 orderings of the same softmax(q k^T) v: measured <= 1e-6 here.
F32_ATOL = 2e-5


def _einsum_attention(q, k, v, key_valid):
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("seq, head_dim, tiling", [
    (24, 16, attention.AttentionTiling()),  # padded to one 32-wide block
    (64, 16, attention.AttentionTiling(block_q=32, backward_block=16)),  # several query and backward blocks
    (200, 16, attention.AttentionTiling()),  # padded to 256: two 128-wide key blocks in the forward pass
    (24, 8, attention.AttentionTiling()),  # a head narrower than Triton's 16, padded with zeros
])
def test_flash_attention_matches_the_einsums_on_real_rows(seq, head_dim, tiling):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, d_out = (jax.random.normal(key, (2, seq, 2, head_dim)) for key in keys)
  key_valid = jnp.arange(seq)[None, :] < jnp.array([[seq], [seq // 3]])  # row 1 mostly padding
  real_rows = key_valid[:, :, None, None]
  d_out = jnp.where(real_rows, d_out, 0)  # the model never reads a padded row
  out, grads = jax.vjp(lambda *qkv: attention.flash_attention(*qkv, key_valid, tiling=tiling), q, k, v)
  want, want_grads = jax.vjp(lambda *qkv: _einsum_attention(*qkv, key_valid), q, k, v)
  np.testing.assert_allclose(jnp.where(real_rows, out, 0), jnp.where(real_rows, want, 0), atol=F32_ATOL, rtol=0)
  for name, got, expected in zip("qkv", grads(d_out), want_grads(d_out)):
    np.testing.assert_allclose(got, expected, atol=F32_ATOL, rtol=0, err_msg=f"d{name}")


def test_model_with_pallas_attention_trains_as_the_einsums_do(tiny_config):
  # Hidden dropout on (training mode; both draw the same masks), attention dropout off: the kernel has none.
  config = tiny_config.replace(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
  einsum = models.BertForSequenceClassification(config)
  pallas = models.BertForSequenceClassification(config.replace(attention_impl="pallas"))
  params = hf.init_params(einsum)
  input_ids = jnp.asarray(np.random.default_rng(0).integers(1, 99, (2, 11)), jnp.int32)
  attention_mask = (jnp.arange(11)[None, :] < jnp.array([[11], [6]])).astype(jnp.int32)
  def count(module):  # the kernel runs (each layer), and only under its switch
    return str(jax.make_jaxpr(lambda p: module.apply({"params": p}, input_ids))(params)).count("mha")
  assert count(pallas) >= 2 and count(einsum) == 0

  def loss_and_grads(module):
    def loss(p):
      logits = module.apply({"params": p}, input_ids, attention_mask, deterministic=False,
                            rngs={"dropout": jax.random.key(3)})
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  (value, grads), (want, want_grads) = loss_and_grads(pallas), loss_and_grads(einsum)
  np.testing.assert_allclose(value, want, atol=F32_ATOL, rtol=0)
  for (path, got), expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, expected, atol=F32_ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_pallas_attention_refuses_attention_dropout_in_training(tiny_config):
  module = models.BertForSequenceClassification(
      tiny_config.replace(attention_impl="pallas", attention_probs_dropout_prob=0.1))
  params = hf.init_params(module)  # inference is fine: no dropout to drop
  with pytest.raises(ValueError, match=r"attention_probs_dropout_prob=0.*attention_impl=einsum"):
    module.apply({"params": params}, jnp.ones((1, 4), jnp.int32), deterministic=False,
                 rngs={"dropout": jax.random.key(0)})


def test_pallas_attention_on_a_tpu_is_refused_and_dot_product_is_not(tiny_config, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="attention_impl='pallas' needs a GPU.*attention_impl=dot_product"):
    hf.init_params(models.BertModel(tiny_config.replace(attention_impl="pallas")))
  assert hf.init_params(models.BertModel(tiny_config.replace(attention_impl="dot_product")))


def test_the_log_says_when_pallas_kernels_are_interpreted(tiny_config):
  assert "interpreter" in models.describe_kernels(tiny_config.replace(attention_impl="pallas"))  # this CPU
  assert "interpreter" not in models.describe_kernels(tiny_config)
