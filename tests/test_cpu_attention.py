"""The fused XLA:CPU attention kernel (`attention_impl='cpu_fused'`) against the einsum path, in float32;
a bf16 model's attention through it against the float32 einsum path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax.models import cpu_attention

import program_parts
from attention_reference import einsum_attention

# float32; the kernel sums in another order than XLA's matmuls and softmax, and uses its own exp
# (within 2 ulp): outputs of unit scale agree to a few 1e-6.
ATOL = 2e-5


def _inputs(batch=4, seq=37, heads=3, head_dim=32, lengths=(37, 1, 20, 0)):
  """q, k, v `[batch, seq, heads, head_dim]`, a weight for a scalar loss, the key mask (one row all
  padding) and a dropout keep mask. seq 37 is not a multiple of the kernel's 12-row or 32-key tiles."""
  rng = np.random.default_rng(0)
  q, k, v, weight = (jnp.asarray(2 * rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32)
                     for _ in range(4))
  key_valid = jnp.asarray(np.arange(seq)[None, :] < np.asarray(lengths)[:, None])
  keep = jnp.asarray(rng.random((batch, heads, seq, seq)) >= 0.1)
  return q, k, v, weight, key_valid, keep


@pytest.mark.parametrize("head_dim", [32, 20])  # 20: the kernel's path for a head_dim not a multiple of 32
def test_forward_matches_einsum_with_padding(head_dim):
  q, k, v, _, key_valid, _ = _inputs(head_dim=head_dim)
  np.testing.assert_allclose(jax.jit(cpu_attention.attention)(q, k, v, key_valid),
                             einsum_attention(q, k, v, key_valid), atol=ATOL, rtol=0)


def test_a_sequence_of_padding_attends_evenly_as_hf_does():
  q, k, v, _, key_valid, _ = _inputs()
  context = cpu_attention.attention(q, k, v, key_valid)
  np.testing.assert_allclose(context[3], jnp.broadcast_to(v[3].mean(axis=0), v[3].shape), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_einsum(dropout):
  q, k, v, weight, key_valid, keep = _inputs()
  keep, rate = (keep, 0.1) if dropout else (None, 0.0)

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v, key_valid, keep, rate) * weight)

  fused = jax.jit(jax.value_and_grad(loss(cpu_attention.attention), argnums=(0, 1, 2)))(q, k, v)
  reference = jax.value_and_grad(loss(einsum_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(fused[0], reference[0], rtol=1e-5)
  for got, want in zip(fused[1], reference[1]):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # gradients up to ~20 here
  assert not np.any(fused[1][0][3]) and not np.any(fused[1][1][3])  # all-padding row: constant scores


def _loss_and_grads(config, params, input_ids, attention_mask):
  module = models.BertForSequenceClassification(config)

  def loss(p):
    logits = module.apply({"params": p}, input_ids, attention_mask, deterministic=False,
                          rngs={"dropout": jax.random.key(3)})
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("layers", [{}, {"scan_layers": True, "remat_policy": "dots"}])
def test_training_step_of_the_model_matches_einsum_dropout_masks_included(tiny_config, layers):
  config = tiny_config.replace(hidden_size=64, num_attention_heads=2, attention_probs_dropout_prob=0.2, **layers)
  params = hf.init_params(models.BertForSequenceClassification(config))
  input_ids = np.random.default_rng(0).integers(1, 99, (3, 21)).astype(np.int32)
  attention_mask = (np.arange(21)[None, :] < np.array([[21], [5], [13]])).astype(np.int32)
  loss, grads = _loss_and_grads(config, params, input_ids, attention_mask)
  fused_loss, fused_grads = _loss_and_grads(config.replace(attention_impl="cpu_fused"), params, input_ids,
                                            attention_mask)
  np.testing.assert_allclose(fused_loss, loss, rtol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(fused_grads), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_the_kernel_itself_takes_float32_only_and_allows_attention_dropout(tiny_config):
  q, k, v, _, key_valid, _ = _inputs()
  with pytest.raises(ValueError, match="computes in float32; got bfloat16"):
    cpu_attention.attention(q.astype(jnp.bfloat16), k, v, key_valid)
  tiny_config.replace(attention_impl="cpu_fused", attention_probs_dropout_prob=0.1).check_trainable()


@pytest.mark.parametrize("attention_dropout", [0.0, 0.2])
def test_a_bfloat16_model_attends_in_float32_through_the_kernel(tiny_config, attention_dropout):
  # The model widens bf16 query, key and value for the kernel and rounds its context back to bf16.
  # Reference: the float32 einsum path. With dropout on, the bf16 model runs the kernel's dropout; at
  # bf16's bounds another mask would pass too (the masks are checked in float32, in the test above).
  config = tiny_config.replace(hidden_size=64, num_attention_heads=2, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=attention_dropout)
  params = hf.init_params(models.BertForSequenceClassification(config))
  input_ids = np.random.default_rng(0).integers(1, 99, (3, 21)).astype(np.int32)
  attention_mask = (np.arange(21)[None, :] < np.array([[21], [5], [13]])).astype(np.int32)
  loss, grads = _loss_and_grads(config.replace(attention_impl="einsum"), params, input_ids, attention_mask)
  bf16 = config.replace(attention_impl="cpu_fused", dtype="bfloat16")
  bf16_loss, bf16_grads = _loss_and_grads(bf16, params, input_ids, attention_mask)
  # The bounds of tests/test_models.py's bf16 test: bf16 keeps 8 significant bits (0.4% per rounding).
  np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
  flat, bf16_flat = program_parts.flat(grads), program_parts.flat(bf16_grads)
  assert np.linalg.norm(bf16_flat - flat) <= 0.05 * np.linalg.norm(flat)


def test_auto_takes_the_kernel_on_a_cpu_in_float32_and_bfloat16(tiny_config):
  auto = tiny_config.replace(attention_impl="auto", attention_probs_dropout_prob=0.1)
  auto.check_trainable()  # both candidates apply attention dropout
  assert models.resolve_attention_impl(auto) == "cpu_fused"
  assert models.resolve_attention_impl(auto.replace(dtype="bfloat16")) == "cpu_fused"
  assert models.resolve_attention_impl(auto.replace(attention_impl="dot_product")) == "dot_product"


def test_auto_falls_back_to_the_einsums_when_the_kernel_cannot_be_built(tiny_config, tmp_path, monkeypatch,
                                                                          caplog):
  # A real failed build (no compiler, empty cache), not the cached registration of this process.
  monkeypatch.setenv("BERT_JAX_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "/no/such/c++")
  monkeypatch.setattr(cpu_attention, "_register", cpu_attention.build)
  cpu_attention.available.cache_clear()
  try:
    assert models.resolve_attention_impl(tiny_config.replace(attention_impl="auto")) == "einsum"
  finally:
    cpu_attention.available.cache_clear()
  assert "attention_impl='auto' uses einsum" in caplog.text and "/no/such/c++" in caplog.text


def test_auto_falls_back_to_the_einsums_when_the_kernel_will_not_load(tiny_config, monkeypatch, caplog):
  def unloadable():  # what ctypes raises for a library on a noexec mount, or a damaged one
    raise OSError("cpu_attention-0123.so: failed to map segment from shared object")
  monkeypatch.setattr(cpu_attention, "_register", unloadable)
  cpu_attention.available.cache_clear()
  try:
    assert models.resolve_attention_impl(tiny_config.replace(attention_impl="auto")) == "einsum"
  finally:
    cpu_attention.available.cache_clear()
  assert "failed to map segment" in caplog.text


def test_a_model_with_auto_attention_computes_what_the_einsums_do(tiny_config):
  config = tiny_config.replace(attention_impl="auto")
  params = hf.init_params(models.BertModel(config))
  input_ids = np.random.default_rng(1).integers(1, 99, (2, 9)).astype(np.int32)
  attention_mask = (np.arange(9)[None, :] < np.array([[9], [4]])).astype(np.int32)
  outputs = {impl: models.BertModel(config.replace(attention_impl=impl)).apply(
      {"params": params}, input_ids, attention_mask=attention_mask).sequence_output
      for impl in ("auto", "einsum")}
  np.testing.assert_allclose(outputs["auto"], outputs["einsum"], atol=ATOL, rtol=0)


def test_a_missing_compiler_is_named_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv("BERT_JAX_KERNEL_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match=r"'/no/such/c\+\+' could not be run.*\$CXX.*attention_impl=einsum"):
    cpu_attention.build(compiler="/no/such/c++")
  assert not list(tmp_path.iterdir())  # no partial library left behind


def test_the_build_is_cached_by_source_and_compiler(tmp_path, monkeypatch):
  monkeypatch.setenv("BERT_JAX_KERNEL_CACHE", str(tmp_path))
  library = cpu_attention.build()
  assert library.parent == tmp_path and library.stat().st_size > 0
  modified = library.stat().st_mtime_ns
  assert cpu_attention.build() == library and library.stat().st_mtime_ns == modified  # not rebuilt


def test_inputs_of_other_shapes_are_refused_before_the_kernel_reads_them():
  q, k, v, _, key_valid, keep = _inputs()
  with pytest.raises(ValueError, match="one shape"):
    cpu_attention.attention(q, k[:, :-1], v, key_valid)
  with pytest.raises(ValueError, match=r"key_valid must be \[batch, seq\]"):
    cpu_attention.attention(q, k, v, key_valid[:, :-1])
  with pytest.raises(ValueError, match=r"keep must be \[batch, heads, seq, seq\]"):
    cpu_attention.attention(q, k, v, key_valid, keep[:, :1], 0.1)
  with pytest.raises(ValueError, match="rate in"):
    cpu_attention.attention(q, k, v, key_valid, keep, 0.0)


def test_a_shared_cache_directory_writable_by_others_is_not_used(tmp_path, monkeypatch):
  tmp_path.chmod(0o777)  # code loaded from here could be anyone's
  monkeypatch.setenv("BERT_JAX_KERNEL_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match="writable by others"):
    cpu_attention.build()
