"""attention_impl='pallas': jax's Pallas flash attention computes what the float32 einsums compute.

On the CPU the kernel runs in Pallas's interpreter: the same kernel code, float32 arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf, models
from bert_jax.models import attention

from attention_reference import einsum_attention

# Two float32 orderings of the same softmax(q k^T) v: measured <= 1e-6 here.
F32_ATOL = 2e-5


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
  want, want_grads = jax.vjp(lambda *qkv: einsum_attention(*qkv, key_valid), q, k, v)
  np.testing.assert_allclose(jnp.where(real_rows, out, 0), jnp.where(real_rows, want, 0), atol=F32_ATOL, rtol=0)
  for name, got, expected in zip("qkv", grads(d_out), want_grads(d_out)):
    np.testing.assert_allclose(got, expected, atol=F32_ATOL, rtol=0, err_msg=f"d{name}")


def test_the_model_runs_the_kernel_only_under_its_switch(tiny_config):
  # Its loss and gradients against the einsums: tests/test_models.py, test_fused_attention_*.
  einsum = models.BertModel(tiny_config)
  pallas = models.BertModel(tiny_config.replace(attention_impl="pallas"))
  params = hf.init_params(einsum)
  input_ids = jnp.ones((2, 11), jnp.int32)

  def count(module):
    return str(jax.make_jaxpr(lambda p: module.apply({"params": p}, input_ids))(params)).count("mha")
  assert count(pallas) >= 2 and count(einsum) == 0  # each layer


def test_pallas_attention_on_a_tpu_is_refused_and_dot_product_is_not(tiny_config, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="attention_impl='pallas' needs a GPU.*attention_impl=dot_product"):
    hf.init_params(models.BertModel(tiny_config.replace(attention_impl="pallas")))
  assert hf.init_params(models.BertModel(tiny_config.replace(attention_impl="dot_product")))


def test_the_log_says_when_pallas_kernels_are_interpreted(tiny_config):
  assert "interpreter" in models.describe_kernels(tiny_config.replace(attention_impl="pallas"))  # this CPU
  assert "interpreter" not in models.describe_kernels(tiny_config)
