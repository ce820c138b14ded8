"""The dense layers' XLA:CPU forms (a 2-D matmul, a bias spread by a matmul with ones, so that their
gradients are matmuls) against the plain forms, in float32; in bf16, the matmul's float32 accumulation
and its backward's row-major bf16 matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax.models import bert
from bert_jax.models import projection

from program_parts import all_eqns

# float32 sums over 6-32 terms in another order: a few ulp of values of unit scale.
RTOL = 1e-5


def _cpu_forms(x, kernel, bias, n_in):
  return projection._add_bias_spread_by_matmul(projection._contract_as_matrices(x, kernel, n_in), bias)


def _plain_forms(x, kernel, bias, n_in):
  return projection._contract_general(x, kernel, n_in) + bias


@pytest.mark.parametrize("x_shape, kernel_shape, n_in", [
    ((3, 5, 4), (4, 6), 1),  # feed-forward: [batch, seq, in] @ [in, out]
    ((3, 5, 4), (4, 2, 3), 1),  # query/key/value: out is [heads, head_dim]
    ((3, 5, 2, 3), (2, 3, 4), 2),  # attention output: in is [heads, head_dim]
])
def test_cpu_forms_give_autodiff_s_values_and_gradients(x_shape, kernel_shape, n_in):
  rng = np.random.default_rng(0)
  x, kernel, weight = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                       for shape in (x_shape, kernel_shape, x_shape[:len(x_shape) - n_in] + kernel_shape[n_in:]))
  bias = jnp.asarray(rng.standard_normal(kernel_shape[n_in:]), jnp.float32)

  def loss(forms):
    return lambda x, kernel, bias: jnp.sum(weight * forms(x, kernel, bias, n_in))

  np.testing.assert_allclose(_cpu_forms(x, kernel, bias, n_in), _plain_forms(x, kernel, bias, n_in), rtol=RTOL)
  got = jax.grad(loss(_cpu_forms), argnums=(0, 1, 2))(x, kernel, bias)
  want = jax.grad(loss(_plain_forms), argnums=(0, 1, 2))(x, kernel, bias)
  for name, g, w in zip(("x", "kernel", "bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-6, err_msg=name)


def _dots(jaxpr):
  return [e for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]


def test_cpu_matmul_of_bfloat16_accumulates_in_float32_and_returns_bfloat16():
  # YNNPACK's bf16 kernels take only bf16 x bf16 -> float32 dots; XLA sends other bf16 dots to Eigen.
  x, kernel = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda x, kernel: projection._contract_as_matrices(x, kernel, 1))(x, kernel)
  dots = _dots(jaxpr.jaxpr)
  assert len(dots) == 1 and [v.aval.dtype for v in dots[0].invars] == [jnp.bfloat16, jnp.bfloat16]
  assert dots[0].outvars[0].aval.dtype == jnp.float32
  assert jaxpr.out_avals[0].dtype == jnp.bfloat16 and jaxpr.out_avals[0].shape == (2, 3, 5)
  # float32 stays one float32 dot, with no conversion
  jaxpr = jax.make_jaxpr(lambda x, kernel: projection._contract_as_matrices(x, kernel, 1))(
      x.astype(jnp.float32), kernel.astype(jnp.float32))
  assert [e.primitive.name for e in jaxpr.eqns] == ["reshape", "dot_general", "reshape"]
  # A bf16 input with a float32 kernel keeps jnp.dot's float32 result
  assert projection._contract_as_matrices(x, kernel.astype(jnp.float32), 1).dtype == jnp.float32


def test_cpu_bfloat16_dots_are_bf16_row_major_matmuls():
  # The form YNNPACK runs with bf16 instructions: bf16 x bf16 -> float32, each operand's contracted
  # axis where a row-major matmul has it (the left's last, the right's first), the kernel and the
  # backward's transposes stored row by row. Autodiff's own backward widened both its dots to
  # float32; a kernel passed transposed (the tied MLM decoder's `table.T`) widened the forward's.
  x, kernel = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
  loss = lambda x, kernel: jnp.sum(projection._contract_as_matrices(x, kernel, 1).astype(jnp.float32))  # noqa: E731
  eqns = list(all_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel).jaxpr))
  row_major = {e.outvars[0] for e in eqns if e.primitive.name == "layout_constraint"}
  dots = [e for e in eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3 and len(row_major) == 3  # the forward, d_x and d_kernel; kernel, kernel^T, x^T
  for dot, stored_row_major in zip(dots, ("right", "right", "left")):  # forward, d_x, d_kernel
    assert [v.aval.dtype for v in dot.invars] == [jnp.bfloat16, jnp.bfloat16]
    assert dot.outvars[0].aval.dtype == jnp.float32
    (contract_left, contract_right), _ = dot.params["dimension_numbers"]
    assert tuple(contract_left) == (1,) and tuple(contract_right) == (0,)
    assert dot.invars[0 if stored_row_major == "left" else 1] in row_major


def test_cpu_bfloat16_gradients_are_the_float32_sums_of_the_bf16_values_rounded_once():
  # Against numpy's float32 matmuls of the same bf16 values: equal but for the summation order, so
  # within one bf16 rounding (2^-8 to 2^-7 of the value).
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((16, 24)), jnp.bfloat16)
  d_y = jnp.asarray(rng.standard_normal((3, 7, 24)), jnp.bfloat16)
  y, vjp = jax.vjp(lambda x, kernel: projection._contract_as_matrices(x, kernel, 1), x, kernel)
  d_x, d_kernel = vjp(d_y)
  assert (y.dtype, d_x.dtype, d_kernel.dtype) == (jnp.bfloat16,) * 3
  x32, kernel32, d_y32 = (np.asarray(a, np.float32).reshape(-1, a.shape[-1]) for a in (x, kernel, d_y))
  for got, want in [(y, x32 @ kernel32), (d_x, d_y32 @ kernel32.T), (d_kernel, x32.T @ d_y32)]:
    want = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32)  # rounded once, as the dot's sum is
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(want.shape), want, rtol=2**-7, atol=1e-6)


def test_cpu_forms_keep_each_gradient_in_its_input_s_dtype():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.bfloat16)
  kernel, bias = jnp.asarray(rng.standard_normal((4, 5)), jnp.bfloat16), jnp.zeros((5,), jnp.float32)
  loss = lambda x, kernel, bias: jnp.sum(_cpu_forms(x, kernel, bias, 1).astype(jnp.float32))  # noqa: E731
  grads = jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]


def test_float32_cpu_forms_allow_forward_mode():
  # No custom VJP in float32: jax.jvp (forward mode) runs, and agrees with the plain forms. (bf16's
  # matmul has a custom VJP, and like the fused kernels no forward mode.)
  rng = np.random.default_rng(0)
  x, kernel, bias = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((2, 3, 4), (4, 5), (5,)))
  tangents = tuple(jnp.ones_like(a) for a in (x, kernel, bias))
  _, got = jax.jvp(lambda *a: _cpu_forms(*a, 1), (x, kernel, bias), tangents)
  _, want = jax.jvp(lambda *a: _plain_forms(*a, 1), (x, kernel, bias), tangents)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_a_broadcast_bias_takes_the_plain_form():
  y, bias = jnp.ones((2, 3, 4)), jnp.arange(3.0).reshape(3, 1)
  np.testing.assert_array_equal(projection.add_bias(y, bias), y + bias)
  np.testing.assert_array_equal(jax.grad(lambda b: jnp.sum(projection.add_bias(y, b)))(bias), jnp.full((3, 1), 8.0))


def test_a_model_s_gradients_on_the_cpu_match_the_plain_forms(tiny_config, monkeypatch):
  # What a CPU train step uses (the CPU forms, chosen by platform) against autodiff of the plain forms.
  config = tiny_config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  input_ids = np.random.default_rng(1).integers(1, 99, (3, 11)).astype(np.int32)
  attention_mask = (np.arange(11)[None, :] < np.array([[11], [4], [8]])).astype(np.int32)

  def loss(p):
    logits = module.apply({"params": p}, input_ids, attention_mask)
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  cpu_loss, cpu_grads = jax.jit(jax.value_and_grad(loss))(params)
  monkeypatch.setattr(projection, "contract", projection._contract_general)
  monkeypatch.setattr(projection, "add_bias", jnp.add)
  monkeypatch.setattr(bert, "add_bias", jnp.add)  # the add & norm's bias
  plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(cpu_loss, plain_loss, rtol=RTOL)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(cpu_grads), jax.tree_util.tree_leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("platform, cpu_forms", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_only_the_cpu_lowers_the_cpu_forms(tiny_config, platform, cpu_forms):
  # Lowered (not compiled) for each platform here: only the CPU's program spreads the biases (and
  # sums their gradients) by matmuls with a [tokens, 1] column of ones; the others add and reduce.
  module = models.BertForSequenceClassification(tiny_config.replace(hidden_dropout_prob=0.0,
                                                                    attention_probs_dropout_prob=0.0))
  params = hf.init_params(module)
  input_ids = np.ones((2, 7), np.int32)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, input_ids))))
  text = grad.trace(params).lower(lowering_platforms=(platform,)).as_text()
  ones_matmuls = [line for line in text.splitlines()
                  if "stablehlo.dot_general" in line and "tensor<14x1xf32>" in line]
  assert bool(ones_matmuls) == cpu_forms
