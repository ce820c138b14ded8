"""The C++ add & norm for XLA:CPU (`cpu_add_norm`, `layer_norm_impl='cpu_fused'`) against the plain float32 path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax.models import bert
from bert_jax.models import cpu_add_norm
from bert_jax.models import cpu_build
from bert_jax.models import dropout as dropout_lib

import program_parts
from test_fused_norm import EPS, RATE, _classifier, plain_add_norm

# float32: the kernel sums a row in another order than XLA's reductions; outputs of unit scale agree
# to a few 1e-6, gradients to a few 1e-6 of their largest element.
ATOL, GRAD_RTOL = 1e-5, 1e-5


def _operands(shape, dropout: bool, seed=0):
  """h, bias, words (None without dropout), residual, scale, offset, and a weight for a scalar loss."""
  keys = jax.random.split(jax.random.key(seed), 7)
  h, residual, weight = (jax.random.normal(k, shape) for k in keys[:3])
  bias, scale, offset = (1.0 + 0.5 * jax.random.normal(k, shape[-1:]) for k in keys[3:6])
  words = dropout_lib.slice_words(keys[6], shape[:-2]) if dropout else None
  return h, bias, words, residual, scale, offset, weight


def _kernel(h, bias, words, residual, scale, offset):
  keep = None if words is None else dropout_lib.keep_mask(words, h.shape, RATE)
  return cpu_add_norm.add_dropout_layer_norm(h, bias, keep, residual, scale, offset, rate=RATE if keep is not None
                                             else 0.0, eps=EPS)


# [2, 37, 48]: 74 rows, more than one 64-row block of the kernel's column sums, and 37 not a multiple
# of anything the kernel tiles by; hidden 40 is not a multiple of its 16-float vectors.
@pytest.mark.parametrize("shape", [(2, 37, 48), (3, 5, 40)])
@pytest.mark.parametrize("dropout", [False, True])
def test_values_and_gradients_match_the_xla_path(shape, dropout):
  h, bias, words, residual, scale, offset, weight = _operands(shape, dropout)
  inputs = (h, bias, residual, scale, offset)

  def loss(fn):
    return lambda h, bias, residual, scale, offset: jnp.sum(fn(h, bias, words, residual, scale, offset) * weight)

  np.testing.assert_allclose(jax.jit(_kernel)(h, bias, words, residual, scale, offset),
                             plain_add_norm(h, bias, words, residual, scale, offset), atol=ATOL, rtol=0)
  grads = jax.jit(jax.grad(loss(_kernel), argnums=range(5)))(*inputs)
  plain = jax.grad(loss(plain_add_norm), argnums=range(5))(*inputs)
  for name, got, want in zip(("h", "bias", "residual", "scale", "offset"), grads, plain):
    np.testing.assert_allclose(got, want, atol=GRAD_RTOL * float(jnp.max(jnp.abs(want))), rtol=0, err_msg=name)


def test_dropped_positions_pass_no_gradient_to_h():
  h, bias, words, residual, scale, offset, weight = _operands((2, 9, 32), dropout=True)
  keep = dropout_lib.keep_mask(words, h.shape, RATE)
  d_h = jax.grad(lambda h: jnp.sum(_kernel(h, bias, words, residual, scale, offset) * weight))(h)
  assert int(jnp.sum(~keep)) > 0  # the mask drops some positions at this size
  assert bool(jnp.all(d_h[~keep] == 0)) and bool(jnp.all(d_h[keep] != 0))


def test_a_row_far_from_zero_keeps_its_variance():
  # Two passes over the row in cache: the variance of deviations from the mean, not E[x^2] - E[x]^2,
  # which at a mean of 3e3 and a spread of 1 loses most of float32's digits.
  h, bias, _, residual, scale, offset, _ = _operands((2, 7, 64), dropout=False)
  residual = residual + 3e3
  want = np.asarray(residual + h + bias, np.float64)
  want = (want - want.mean(-1, keepdims=True)) / np.sqrt(want.var(-1, keepdims=True) + EPS) * np.asarray(scale) + offset
  np.testing.assert_allclose(_kernel(h, bias, None, residual, scale, offset), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("deterministic", [True, False])
def test_model_with_the_cpu_add_norm_computes_what_xla_computes(tiny_config, deterministic):
  # Dropout on (deterministic=False): both draw the same keep masks from the layer's Dropout.
  xla = _classifier(tiny_config, layer_norm_impl="xla")
  fused = _classifier(tiny_config, layer_norm_impl="cpu_fused")
  params = hf.init_params(xla)
  assert jax.tree_util.tree_structure(hf.init_params(fused)) == jax.tree_util.tree_structure(params)
  ids = np.ones((2, 5), np.int32)
  hlo = lambda module: jax.jit(lambda p: module.apply({"params": p}, ids)).lower(params).as_text()  # noqa: E731
  assert hlo(fused).count("bert_jax_add_norm_forward") == 2 * tiny_config.num_hidden_layers
  assert "bert_jax_add_norm" not in hlo(xla)
  program_parts.assert_same_loss_and_grads(fused, xla, params, deterministic)


def test_a_bf16_model_runs_the_kernel_in_float32(tiny_config):
  config = tiny_config.replace(dtype="bfloat16")
  ids = np.ones((2, 5), np.int32)
  params = hf.init_params(models.BertModel(config))
  modules = {impl: models.BertModel(config.replace(layer_norm_impl=impl)) for impl in ("cpu_fused", "xla")}
  hlo = jax.jit(lambda p: modules["cpu_fused"].apply({"params": p}, ids)).lower(params).as_text()
  # The kernel's operands and result are float32: the bf16 rows are widened for it and rounded after.
  assert re.search(r"tensor<10x32xf32>.*bert_jax_add_norm_forward", hlo) or re.search(
      r"bert_jax_add_norm_forward.*tensor<10x32xf32>", hlo)
  out = {impl: module.apply({"params": params}, ids).sequence_output for impl, module in modules.items()}
  assert out["cpu_fused"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["cpu_fused"], np.float32), np.asarray(out["xla"], np.float32),
                             atol=0.05, rtol=0)


def test_auto_takes_the_kernel_on_a_cpu_in_float32_and_cpu_fused_is_refused_elsewhere(tiny_config, monkeypatch):
  auto = tiny_config.replace(layer_norm_impl="auto")
  assert bert.resolve_layer_norm_impl(auto) == "cpu_fused"
  assert "add & norm cpu_fused (layer_norm_impl='auto')" in models.describe_kernels(auto)
  assert bert.resolve_layer_norm_impl(auto.replace(dtype="bfloat16")) == "xla"  # the kernel would widen it
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="kernel for XLA:CPU.*layer_norm_impl=auto"):
    bert.resolve_layer_norm_impl(tiny_config.replace(layer_norm_impl="cpu_fused"))


def test_auto_falls_back_to_xla_when_the_kernel_cannot_be_built(tiny_config, tmp_path, monkeypatch, caplog):
  # A real failed build (no compiler, empty cache), not the cached registration of this process.
  monkeypatch.setenv("BERT_JAX_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "/no/such/c++")
  monkeypatch.setattr(cpu_add_norm, "_register", lambda: cpu_build.build(cpu_add_norm.KERNEL))
  cpu_add_norm.available.cache_clear()
  try:
    assert bert.resolve_layer_norm_impl(tiny_config.replace(layer_norm_impl="auto")) == "xla"
  finally:
    cpu_add_norm.available.cache_clear()
  assert "layer_norm_impl='auto' uses xla" in caplog.text and "layer_norm_impl=xla" in caplog.text


def test_inputs_of_other_shapes_are_refused_before_the_kernel_reads_them():
  h, bias, words, residual, scale, offset, _ = _operands((2, 9, 32), dropout=True)
  keep = dropout_lib.keep_mask(words, h.shape, RATE)
  with pytest.raises(ValueError, match="one shape"):
    cpu_add_norm.add_dropout_layer_norm(h, bias, None, residual[:, :-1], scale, offset, eps=EPS)
  with pytest.raises(ValueError, match="one shape"):
    cpu_add_norm.add_dropout_layer_norm(h, bias[:-1], None, residual, scale, offset, eps=EPS)
  with pytest.raises(ValueError, match="keep mask"):
    cpu_add_norm.add_dropout_layer_norm(h, bias, keep[:, :1], residual, scale, offset, rate=RATE, eps=EPS)
  with pytest.raises(ValueError, match="keep mask"):
    cpu_add_norm.add_dropout_layer_norm(h, bias, keep, residual, scale, offset, rate=0.0, eps=EPS)


def test_the_kernel_itself_refuses_buffers_of_other_shapes():
  # Another caller of the FFI target (not add_dropout_layer_norm, which checks first): the handler's own check.
  cpu_add_norm._register()
  y = jnp.ones((4, 8), jnp.float32)
  vector = jnp.ones((8,), jnp.float32)
  call = jax.ffi.ffi_call(cpu_add_norm._FORWARD, (jax.ShapeDtypeStruct((4, 8), jnp.float32),
                                                  jax.ShapeDtypeStruct((3,), jnp.float32),  # mean: not [rows]
                                                  jax.ShapeDtypeStruct((4,), jnp.float32)))
  with pytest.raises(Exception, match="mismatched shapes"):
    jax.block_until_ready(call(y, vector, y, jnp.zeros((1,), jnp.uint8), vector, vector, eps=np.float32(EPS),
                               keep_prob=np.float32(1.0)))
