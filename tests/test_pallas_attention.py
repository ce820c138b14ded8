"""attention_impl='pallas': our Pallas flash attention computes what the float32 einsums compute, with
the attention dropout drawn inside its kernels.

On the CPU the kernels run in Pallas's interpreter: the same kernel code, float32 arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf, models
from bert_jax.models import dropout
from bert_jax.models import flash_attention as flash

from attention_reference import einsum_attention
import program_parts

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
  # values and the three gradients equal the einsums' with the mask `dropout.keep_mask` gives.
  qkv, key_valid, words, d_out = _inputs(seq, head_dim)
  keep = dropout.keep_mask(words, (2, 2, seq, seq), 0.3)
  _assert_matches(lambda *qkv: flash.flash_attention(*qkv, key_valid, words, dropout_rate=0.3, tiling=tiling),
                  lambda *qkv: einsum_attention(*qkv, key_valid, keep, 0.3), qkv, d_out)


@pytest.mark.parametrize("seq, head_dim, tiling", TILINGS[1:])
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_the_kernels_read_the_stacked_projection_and_add_its_biases(seq, head_dim, tiling, rate):
  # `flash_attention_qkv`, as the model calls it: q, k, v where the one Q/K/V matmul left them, and
  # their biases added in the kernels. Values and the gradients of both inputs are the einsums' of
  # `qkv + bias`; the biases' gradient is summed inside the backward kernel, tile by tile. The key's
  # bias shifts each query's scores by a constant: no effect, and a gradient of exactly zero.
  (q, k, v), key_valid, words, d_out = _inputs(seq, head_dim)
  qkv = jnp.stack((q, k, v), axis=2)  # [batch, seq, 3, heads, head_dim]
  bias = jax.random.normal(jax.random.key(7), (3, 2, head_dim))
  keep = dropout.keep_mask(words, (2, 2, seq, seq), rate) if rate else None
  out, grads = jax.vjp(lambda qkv, bias: flash.flash_attention_qkv(qkv, key_valid, words, bias=bias, dropout_rate=rate,
                                                                   tiling=tiling), qkv, bias)
  reference = lambda qkv, bias: einsum_attention(*jnp.unstack(qkv + bias, axis=2), key_valid, keep, rate)  # noqa: E731
  want, want_grads = jax.vjp(reference, qkv, bias)
  np.testing.assert_allclose(out, want, atol=F32_ATOL, rtol=0)
  (d_qkv, d_bias), (want_d_qkv, want_d_bias) = grads(d_out), want_grads(d_out)
  np.testing.assert_allclose(d_qkv, want_d_qkv, atol=F32_ATOL, rtol=0)
  # A sum over 2 x seq rows of gradients each within F32_ATOL.
  np.testing.assert_allclose(d_bias, want_d_bias, atol=F32_ATOL * 2 * seq, rtol=0)
  assert not np.any(d_bias[1])  # the key's
  for part in (0, 2):  # gradients that a dropped query or value bias would miss
    assert float(jnp.abs(want_d_bias[part]).max()) > 0.1, part


def test_the_model_hands_the_kernel_its_qkv_projection_uncopied(tiny_config):
  # No copy of q, k and v out of the Q/K/V matmul's output `[batch, seq, 3, heads, head_dim]`, nor of
  # their gradients back into one: nothing slices or stacks along its third axis, forward or backward.
  # The forward kernel takes that one array as its query, key and value.
  module = models.BertModel(tiny_config.replace(attention_impl="pallas"))
  params = hf.init_params(module)
  loss = lambda p: jnp.sum(module.apply({"params": p}, jnp.ones((2, 11), jnp.int32)).sequence_output)  # noqa: E731
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)

  stacked = lambda v: v.aval.ndim == 5 and v.aval.shape[2] == 3  # noqa: E731
  eqns = list(program_parts.all_eqns(jaxpr.jaxpr))
  # A copy along the stacked axis makes or unmakes it; the kernels' padding of the sequence and the head
  # (11 tokens to 16, heads of 8 to 16) and its gradient's slice keep it.
  copies = [e.primitive.name for e in eqns if e.primitive.name in ("slice", "concatenate", "split", "gather",
                                                                   "dynamic_slice")
            and any(map(stacked, e.invars)) != any(map(stacked, e.outvars))]
  assert not copies, copies
  calls = [e for e in eqns if e.primitive.name == "pallas_call" and e.params["name"] == "bert_flash_attention_forward"]
  assert len(calls) == tiny_config.num_hidden_layers
  for eqn in calls:
    qkv = eqn.invars[:3]
    assert qkv[0] is qkv[1] is qkv[2] and stacked(qkv[0]), qkv


def test_flash_attention_qkv_names_the_shapes_it_takes():
  with pytest.raises(ValueError, match=r"stacked \[batch, seq, 3, heads, head_dim\].*got \(2, 16, 2, 2, 16\)"):
    flash.flash_attention_qkv(jnp.zeros((2, 16, 2, 2, 16)), jnp.ones((2, 16), bool))
  with pytest.raises(ValueError, match=r"biases \[3, heads, head_dim\].*and \(2, 16\)"):
    flash.flash_attention_qkv(jnp.zeros((2, 16, 3, 2, 16)), jnp.ones((2, 16), bool), bias=jnp.zeros((2, 16)))


def test_flash_attention_refuses_dropout_without_words_and_rates_outside_0_1():
  qkv, key_valid, _, _ = _inputs(16, 16)
  with pytest.raises(ValueError, match=r"needs words int32 \[batch, heads, 2\] = \(2, 2, 2\).*Dropout.words"):
    flash.flash_attention(*qkv, key_valid, dropout_rate=0.1)
  with pytest.raises(ValueError, match=r"rate 1.0 of a hashed mask is not in \[0, 1\)"):
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


@pytest.mark.parametrize("backend, dtype, expected", [
    ("gpu", "bfloat16", "pallas"), ("gpu", "float16", "einsum"), ("gpu", "float32", "einsum"),
    ("tpu", "bfloat16", "einsum")])
def test_auto_takes_the_kernel_on_a_gpu_in_bfloat16_only(tiny_config, monkeypatch, backend, dtype, expected):
  # Checked and timed in bf16 on an H200 (docs/performance.md); in float32 Triton's dots would take TF32.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  auto = tiny_config.replace(attention_impl="auto", attention_probs_dropout_prob=0.1, dtype=dtype)
  auto.check_trainable()
  assert models.resolve_attention_impl(auto) == expected


def test_the_log_says_when_pallas_kernels_are_interpreted(tiny_config):
  assert "interpreter" in models.describe_kernels(tiny_config.replace(attention_impl="pallas"))  # this CPU
  assert "interpreter" not in models.describe_kernels(tiny_config)


@pytest.mark.parametrize("layout", [{}, {"scan_layers": True, "remat_policy": "dots"}], ids=["unrolled", "scan_remat"])
def test_the_model_with_pallas_attention_dropout_trains_as_with_the_einsums(tiny_config, layout):
  # The kernels draw the einsum path's masks (the same module's words): loss and every gradient agree
  # in training mode, attention and hidden dropout on; and the attention dropout did apply. Also with
  # the layers scanned and rematerialised, which 'auto' can pair with this kernel on a GPU.
  config = tiny_config.replace(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1, **layout)
  config.replace(attention_impl="pallas").check_trainable()
  input_ids = jnp.arange(22, dtype=jnp.int32).reshape(2, 11) % 50 + 3
  attention_mask = jnp.arange(11)[None, :] < jnp.array([[11], [6]])
  params = hf.init_params(models.BertModel(config))
  # Non-zero biases (initialised at zero): the kernels add the query's, key's and value's themselves.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  params = jax.tree_util.tree_unflatten(treedef, [
      x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
  weights = jnp.where(attention_mask[..., None], jax.random.normal(jax.random.key(1), (2, 11, 32)), 0)

  def loss_and_grads(config):
    def loss(p):
      out = models.BertModel(config).apply({"params": p}, input_ids, attention_mask, deterministic=False,
                                           rngs={"dropout": jax.random.key(0)})
      return jnp.sum(out.sequence_output * weights) + jnp.sum(out.pooled_output)
    return jax.value_and_grad(loss)(params)

  (einsum_loss, einsum_grads), (pallas_loss, pallas_grads) = (
      loss_and_grads(config.replace(attention_impl=impl)) for impl in ("einsum", "pallas"))
  np.testing.assert_allclose(pallas_loss, einsum_loss, rtol=1e-5)
  for path, got in jax.tree_util.tree_leaves_with_path(pallas_grads):
    want = einsum_grads
    for entry in path:
      want = want[entry.key]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  no_attention_dropout, _ = loss_and_grads(config.replace(attention_impl="pallas", attention_probs_dropout_prob=0.0))
  # Measured 1.1e-2 (near-uniform attention at init), against 1e-5 between the two kernels.
  assert abs(float(pallas_loss - no_attention_dropout)) > 1e-3, (pallas_loss, no_attention_dropout)
