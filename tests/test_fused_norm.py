"""The Pallas add & norm (`fused_norm`, `layer_norm_impl='pallas'`) against the plain float32 path.

On this CPU Pallas's interpreter runs the kernels' own code (the same tiles, masks and column sums
the GPU compiles); `scripts/check_gpu.py` runs the same comparison compiled on a GPU.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import hf
from bert_jax import models
from bert_jax.models import bert
from bert_jax.models import dropout as dropout_lib
from bert_jax.models import fused_norm

import program_parts

RATE, EPS = 0.1, 1e-12


def plain_add_norm(h, bias, words, residual, scale, offset):
  """`LayerNorm(residual + dropout(h + bias))` as the model's XLA path computes it: the mask from `words`
  by `dropout.keep_mask`, as the model's `Dropout` draws it."""
  dropped = h + bias
  if words is not None:
    keep = dropout_lib.keep_mask(words, h.shape, RATE)
    dropped = jnp.where(keep, dropped / jnp.asarray(1.0 - RATE, h.dtype), jnp.zeros((), h.dtype))
  norm = nn.LayerNorm(epsilon=EPS, dtype=h.dtype)
  return norm.apply({"params": {"scale": scale, "bias": offset}}, residual + dropped)


def _operands(shape, dtype=jnp.float32, dropout=True, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  h, residual = (jax.random.normal(k, shape).astype(dtype) for k in keys[:2])
  bias = (0.5 * jax.random.normal(keys[2], shape[-1:])).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(keys[3], shape[-1:])
  offset = 0.1 * jax.random.normal(keys[4], shape[-1:])
  words = jax.random.randint(keys[5], shape[:-2] + (2,), -2**31, 2**31 - 1, jnp.int32) if dropout else None
  return h, bias, words, residual, scale, offset


def _value_and_grads(fn, operands):
  h, bias, words, residual, scale, offset = operands
  weights = jax.random.normal(jax.random.key(9), h.shape)  # a loss that weighs every output differently

  def loss(h, bias, residual, scale, offset):
    return jnp.sum(fn(h, bias, words, residual, scale, offset).astype(jnp.float32) * weights)

  return jax.value_and_grad(loss, argnums=range(5))(h, bias, residual, scale, offset)


def _fused(tiling=fused_norm.Tiling()):
  def add_norm(h, bias, words, *rest):  # without words, without dropout
    return fused_norm.add_dropout_layer_norm(h, bias, words, *rest, rate=0.0 if words is None else RATE, eps=EPS,
                                             tiling=tiling)
  return add_norm


@pytest.mark.parametrize("dropout", [True, False])
@pytest.mark.parametrize("shape, tiling", [
    ((2, 5, 48), fused_norm.Tiling()),  # hidden as 3 chunks of 16
    ((3, 5, 32), fused_norm.Tiling(block_rows=4, backward_blocks=2)),  # blocks that span two sequences' rows
    ((37, 96), fused_norm.Tiling(block_rows=4, num_warps=4, backward_blocks=3)),  # rows not a multiple of a block
    ((13, 50), fused_norm.Tiling(block_rows=2, num_warps=1, backward_blocks=2)),  # an odd width: one masked block
])
def test_value_and_every_gradient_match_the_plain_path_in_float32(shape, tiling, dropout):
  operands = _operands(shape, dropout=dropout)
  value, grads = _value_and_grads(_fused(tiling), operands)
  plain_value, plain_grads = _value_and_grads(plain_add_norm, operands)
  # float32: only the order of the row sums differs.
  np.testing.assert_allclose(value, plain_value, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(("h", "bias", "residual", "scale", "offset"), grads, plain_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))), err_msg=name)


def test_bfloat16_rounds_as_the_plain_path_does():
  # The kernel rounds where the model's bf16 XLA path rounds (bias add, division by 1 - rate rounded
  # to bf16, residual add), so the outputs agree exactly. Gradients: the kernel sums the bias's
  # columns in float32, XLA in bf16, so they agree to bf16 rounding (8 significant bits).
  operands = _operands((4, 8, 64))
  bf16 = tuple(x.astype(jnp.bfloat16) for x in operands[:2]) + (operands[2], operands[3].astype(jnp.bfloat16)) + operands[4:]
  out = fused_norm.add_dropout_layer_norm(*bf16, rate=RATE, eps=EPS)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(plain_add_norm(*bf16), np.float32))
  _, grads = _value_and_grads(_fused(), bf16)
  _, plain_grads = _value_and_grads(plain_add_norm, bf16)
  for name, got, want in zip(("h", "bias", "residual", "scale", "offset"), grads, plain_grads):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want), name


def test_operands_of_the_wrong_dtype_or_shape_are_refused():
  h, bias, words, residual, scale, offset = _operands((2, 3, 16))
  with pytest.raises(ValueError, match="one dtype"):
    fused_norm.add_dropout_layer_norm(h.astype(jnp.bfloat16), bias.astype(jnp.bfloat16), words, residual, scale,
                                      offset, rate=RATE, eps=EPS)
  with pytest.raises(ValueError, match=r"\[hidden\] = \[16\]"):
    fused_norm.add_dropout_layer_norm(h, bias, words, residual, scale[:8], offset, rate=RATE, eps=EPS)
  with pytest.raises(ValueError, match=r"words are int32 \[\*h.shape\[:-2\], 2\] = \[2, 2\].*got \[2\]"):
    fused_norm.add_dropout_layer_norm(h, bias, words[0], residual, scale, offset, rate=RATE, eps=EPS)
  with pytest.raises(ValueError, match=r"rate=0.1 needs the dropout's words, int32 \[2, 2\].*rate=0 for no dropout"):
    fused_norm.add_dropout_layer_norm(h, bias, None, residual, scale, offset, rate=RATE, eps=EPS)


def test_parameter_gradients_keep_their_dtypes():
  h, bias, words, residual, scale, offset = _operands((3, 16), jnp.bfloat16)
  grads = jax.grad(lambda *a: jnp.sum(fused_norm.add_dropout_layer_norm(*a, rate=RATE, eps=EPS).astype(jnp.float32)),
                   argnums=(0, 1, 3, 4, 5))(h, bias, words, residual, scale, offset)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.float32]


def _classifier(tiny_config, **overrides):
  return models.BertForSequenceClassification(tiny_config.replace(**overrides))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("layers", [dict(), dict(scan_layers=True, remat_policy="dots")])
def test_model_with_pallas_add_norm_computes_what_xla_computes(tiny_config, deterministic, layers):
  # Dropout on (deterministic=False): both draw the same keep masks from the layer's Dropout.
  xla = _classifier(tiny_config, layer_norm_impl="xla", **layers)
  pallas = _classifier(tiny_config, layer_norm_impl="pallas", **layers)
  params = hf.init_params(xla)
  # The same parameters under the same names: checkpoints and HF export do not see the switch.
  assert jax.tree_util.tree_structure(hf.init_params(pallas)) == jax.tree_util.tree_structure(params)
  # The kernel runs (two add & norms per layer), and only under its switch.
  ids = np.ones((2, 5), np.int32)
  count = lambda module: str(jax.make_jaxpr(lambda p: module.apply({"params": p}, ids))(params)).count("pallas_call")  # noqa: E731
  assert count(pallas) >= 2 and count(xla) == 0
  program_parts.assert_same_loss_and_grads(pallas, xla, params, deterministic)


def test_the_model_hands_the_kernels_dropout_words_not_masks(tiny_config):
  # The kernels hash their masks (the XLA path's, as above): no [batch, seq, hidden] mask is computed
  # to be read by them, forward or backward, only a pair of words per sequence.
  module = _classifier(tiny_config, layer_norm_impl="pallas", hidden_dropout_prob=0.1)
  params = hf.init_params(module)
  ids = jnp.ones((2, 5), jnp.int32)
  loss = lambda p: jnp.sum(module.apply({"params": p}, ids, deterministic=False,  # noqa: E731
                                        rngs={"dropout": jax.random.key(0)}))
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)

  calls = [(eqn.params["name"], [v.aval for v in eqn.invars]) for eqn in program_parts.all_eqns(jaxpr.jaxpr)
           if eqn.primitive.name == "pallas_call" and eqn.params["name"].startswith("add_dropout_layer_norm")]
  layers = tiny_config.num_hidden_layers
  assert sorted(name for name, _ in calls) == (["add_dropout_layer_norm"] * 2 * layers
                                               + ["add_dropout_layer_norm_backward"] * 2 * layers)
  for name, avals in calls:
    assert [a.shape for a in avals if a.dtype == jnp.int32] == [(2 * 2,)], name  # [sequences x 2] words, flat
    assert not any(a.dtype in (jnp.bool_, jnp.uint8) for a in avals), name


def test_auto_takes_the_pallas_kernel_on_a_gpu_only(tiny_config, monkeypatch):
  config = tiny_config.replace(layer_norm_impl="auto")
  assert models.resolve_layer_norm_impl(config) == "cpu_fused"  # this CPU: the C++ kernel (test_cpu_add_norm)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert models.resolve_layer_norm_impl(config) == "pallas"
  assert "add & norm pallas (layer_norm_impl='auto')" in models.describe_kernels(config)


def test_pallas_on_a_tpu_is_refused(tiny_config, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="Triton kernel for GPUs.*layer_norm_impl=xla"):
    bert.resolve_layer_norm_impl(tiny_config.replace(layer_norm_impl="pallas"))
  assert bert.resolve_layer_norm_impl(tiny_config.replace(layer_norm_impl="auto")) == "xla"


def test_an_unknown_layer_norm_impl_is_refused(tiny_config):
  with pytest.raises(ValueError, match="layer_norm_impl='apex' is not supported"):
    tiny_config.replace(layer_norm_impl="apex")
