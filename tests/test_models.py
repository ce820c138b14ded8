"""Specification of the Flax BERT models (shapes, masking, dropout, init, axis names, input checks)."""

import contextlib
import functools
import io
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint

from bert_jax import hf
from bert_jax import models
from bert_jax.models import attention, bert
from bert_jax.models import dropout
from bert_jax.models import projection

import program_parts
from program_parts import all_eqns


def _inputs(batch=2, seq=8, vocab=99):
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
  attention_mask = np.ones((batch, seq), np.int32)
  attention_mask[1, seq // 2:] = 0
  input_ids[1, seq // 2:] = 0
  token_type_ids = np.zeros((batch, seq), np.int32)
  token_type_ids[:, seq // 2:] = 1
  return input_ids, attention_mask, token_type_ids


@pytest.mark.parametrize("model_cls", list(models.MODEL_CLASSES.values()))
def test_apply_under_jit_for_every_class(tiny_config, model_cls):
  module = model_cls(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  apply = jax.jit(lambda p, ids, mask, types: module.apply(
      {"params": p}, ids, attention_mask=mask, token_type_ids=types, deterministic=True))
  out = apply(params, input_ids, attention_mask, token_type_ids)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, out)
  expected = {
      "BertModel": models.BertOutput((2, 8, 32), (2, 32)),
      "BertForPreTraining": models.PreTrainingOutput((2, 8, 99), (2, 2)),
      "BertForSequenceClassification": (2, 2),
  }[model_cls.__name__]
  assert shapes == expected


def test_masked_lm_scores_only_gathered_positions(tiny_config):
  module = models.BertForPreTraining(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  positions = np.array([[1, 3], [0, 2]], np.int32)
  every = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  gathered = module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                          masked_lm_positions=positions)
  assert gathered.mlm_logits.shape == (2, 2, 99)
  np.testing.assert_allclose(gathered.mlm_logits, np.take_along_axis(
      np.asarray(every.mlm_logits), positions[:, :, None], axis=1), atol=1e-5)


def test_padding_does_not_change_real_positions(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  other_pad = input_ids.copy()
  other_pad[1, 4:] = 7  # different content in the padded part
  a = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  b = module.apply({"params": params}, other_pad, attention_mask, token_type_ids)
  np.testing.assert_allclose(a.sequence_output[1, :4], b.sequence_output[1, :4], atol=1e-5)
  np.testing.assert_allclose(a.pooled_output, b.pooled_output, atol=1e-5)


def test_dropout_only_when_not_deterministic(tiny_config):
  module = models.BertForSequenceClassification(tiny_config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()

  def run(deterministic, seed):
    return module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                        deterministic=deterministic, rngs={"dropout": jax.random.key(seed)})

  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  assert not np.allclose(run(False, 0), run(False, 1))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])  # jax's default PRNG, and one through jax.random.bits
@pytest.mark.parametrize("shape", [(64, 256), (4, 3, 33)])  # even and odd last axis
def test_dropout_drops_at_the_rate_and_keeps_the_mean(shape, impl):
  x = jnp.ones(shape)
  y = dropout.Dropout(0.1).apply({}, x, False, rngs={"dropout": jax.random.key(0, impl=impl)})
  assert y.shape == shape and y.dtype == x.dtype
  kept = np.asarray(y != 0)
  # Binomial: 3 standard deviations of the kept fraction, sqrt(0.09 / n).
  assert abs(kept.mean() - 0.9) <= 3 * np.sqrt(0.09 / kept.size)
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  assert not np.array_equal(kept, np.asarray(dropout.Dropout(0.1).apply(
      {}, x, False, rngs={"dropout": jax.random.key(1, impl=impl)}) != 0))
  np.testing.assert_array_equal(dropout.Dropout(0.1).apply({}, x, True), x)


def test_dropout_refuses_a_rate_outside_0_1():
  with pytest.raises(ValueError, match=r"Dropout rate 1.5 is not in \[0, 1\]"):
    dropout.Dropout(1.5).apply({}, jnp.ones(4), False, rngs={"dropout": jax.random.key(0)})


def test_initialisation_is_berts(tiny_config):
  config = tiny_config.replace(hidden_size=256, intermediate_size=512, num_attention_heads=4)
  params = hf.init_params(models.BertModel(config))
  kernel = np.asarray(params["encoder"]["layer_0"]["intermediate"]["kernel"])
  assert abs(kernel.std() - 0.02 * 0.88) < 0.002  # truncation at 2 std shrinks the std by ~12%
  assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6
  np.testing.assert_array_equal(params["encoder"]["layer_0"]["intermediate"]["bias"], 0)
  np.testing.assert_array_equal(params["embeddings"]["LayerNorm"]["scale"], 1)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("model_cls", list(models.MODEL_CLASSES.values()))
def test_every_parameter_has_logical_axis_names(tiny_config, model_cls, scan_layers):
  module = model_cls(tiny_config.replace(scan_layers=scan_layers))
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  flat = flax.traverse_util.flatten_dict(variables["params"])
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, path
    assert len(set(leaf.names)) == len(leaf.names), path  # sharding needs distinct names
    assert set(leaf.names) <= {"vocab", "embed", "embed_out", "mlp", "heads", "kv", "position", "token_type", "classes",
                               "layers"}
    assert ("layers" in leaf.names) == (scan_layers and "encoder" in path), path  # stacked: leading axis
    assert "layers" not in leaf.names or leaf.names[0] == "layers"


def test_attention_kernels_name_heads_and_kv(tiny_config):
  variables = jax.eval_shape(models.BertModel(tiny_config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  layer = variables["params"]["encoder"]["layer_0"]
  assert layer["attention"]["query"]["kernel"].names == ("embed", "heads", "kv")
  assert layer["attention"]["output"]["kernel"].names == ("heads", "kv", "embed")
  assert layer["intermediate"]["kernel"].names == ("embed", "mlp")


def test_input_longer_than_positions_is_refused(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
    module.apply({"params": params}, jnp.ones((1, 65), jnp.int32))


def test_token_ids_outside_vocab_are_refused(tiny_config):
  module = models.BertModel(tiny_config)
  params = hf.init_params(module)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    module.apply({"params": params}, jnp.full((1, 4), 99, jnp.int32))


@pytest.mark.parametrize("overrides, match", [
    ({"hidden_size": 30}, "not divisible by num_attention_heads"),
    ({"hidden_act": "mish"}, "hidden_act"),
    ({"hidden_dropout_prob": 1.5}, r"\[0, 1\)"),
    ({"num_hidden_layers": 0}, "positive integer"),
    ({"dtype": "float33"}, "dtype name"),
    ({"no_such_field": 1}, "Unknown BertConfig field"),
])
def test_bad_config_values_are_named(tiny_config, overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config.replace(**overrides)


def test_bfloat16_compute_keeps_float32_params(tiny_config):
  config = tiny_config.replace(dtype="bfloat16")
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  input_ids, attention_mask, token_type_ids = _inputs()
  logits_bf16 = module.apply({"params": params}, input_ids, attention_mask, token_type_ids)
  logits_f32 = models.BertForSequenceClassification(tiny_config).apply(
      {"params": params}, input_ids, attention_mask, token_type_ids)
  assert logits_bf16.dtype == jnp.bfloat16
  # bf16 has 8 mantissa bits: agreement to a few 1e-2 on O(1) logits is what it can give.
  np.testing.assert_allclose(np.asarray(logits_bf16, np.float32), logits_f32, atol=5e-2)


# ---------------------------------------------------------------------------------------------
# Speed switches: each must compute what the plain float32 path computes.

# float32 agreement of two orderings of the same float32 arithmetic on O(1) values: measured <= 5e-8
# on this tiny model (outputs, loss and every gradient); the bound leaves room for other CPUs' kernels.
F32_ATOL = 2e-5


def _speed_config(tiny_config, **overrides):
  """The tiny model with 2 layers of width 32 and no dropout unless asked (outputs compare exactly)."""
  return tiny_config.replace(**{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides})


def _loss_and_grads(module, params, deterministic=True, seed=0):
  """Summed classification cross-entropy of `_inputs()` and its gradients."""
  input_ids, attention_mask, token_type_ids = _inputs()
  labels = jnp.array([0, 1])

  def loss(p):
    logits = module.apply({"params": p}, input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                          rngs={"dropout": jax.random.key(seed)})
    logits = logits.astype(jnp.float32)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(actual, expected, atol):
  assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_dot_product_attention_matches_einsum_with_padding(tiny_config):
  config = _speed_config(tiny_config)
  params = hf.init_params(models.BertModel(config))
  input_ids, attention_mask, token_type_ids = _inputs()  # row 1 is half padding
  einsum = models.BertModel(config).apply({"params": params}, input_ids, attention_mask, token_type_ids)
  fused = models.BertModel(config.replace(attention_impl="dot_product")).apply(
      {"params": params}, input_ids, attention_mask, token_type_ids)
  np.testing.assert_allclose(fused.sequence_output, einsum.sequence_output, atol=F32_ATOL, rtol=0)
  np.testing.assert_allclose(fused.pooled_output, einsum.pooled_output, atol=F32_ATOL, rtol=0)


# 'pallas' runs our Pallas flash attention in Pallas's interpreter here (tests/test_pallas_attention.py).
@pytest.mark.parametrize("impl", ["dot_product", "pallas"])
def test_fused_attention_gradients_match_einsum(tiny_config, impl):
  config = _speed_config(tiny_config, hidden_dropout_prob=0.1)  # hidden dropout on: training mode
  params = hf.init_params(models.BertForSequenceClassification(config))
  loss, grads = _loss_and_grads(models.BertForSequenceClassification(config), params, deterministic=False)
  fused_loss, fused_grads = _loss_and_grads(
      models.BertForSequenceClassification(config.replace(attention_impl=impl)), params,
      deterministic=False)
  np.testing.assert_allclose(fused_loss, loss, atol=F32_ATOL, rtol=0)
  _assert_trees_close(fused_grads, grads, atol=F32_ATOL)


def test_dot_product_attention_refuses_attention_dropout_in_training(tiny_config):
  config = tiny_config.replace(attention_impl="dot_product", attention_probs_dropout_prob=0.1)
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)  # inference (deterministic) is fine: no dropout to drop
  with pytest.raises(ValueError, match=r"attention_probs_dropout_prob=0.*attention_impl=einsum \(or pallas on a GPU"):
    _loss_and_grads(module, params, deterministic=False)


def test_only_the_kernels_without_attention_dropout_refuse_to_train_with_it(tiny_config):
  for impl in ("einsum", "pallas", "cpu_fused", "auto"):
    tiny_config.replace(attention_impl=impl, attention_probs_dropout_prob=0.1).check_trainable()
  with pytest.raises(ValueError, match="attention_impl='cudnn' has no attention-probability dropout"):
    tiny_config.replace(attention_impl="cudnn", dtype="bfloat16", attention_probs_dropout_prob=0.1).check_trainable()


def test_cudnn_attention_is_refused_off_gpu_and_in_float32(tiny_config):
  with pytest.raises(ValueError, match="needs dtype 'bfloat16'"):
    tiny_config.replace(attention_impl="cudnn")
  if jax.default_backend() != "gpu":
    module = models.BertModel(tiny_config.replace(attention_impl="cudnn", dtype="bfloat16"))
    with pytest.raises(ValueError, match="needs a GPU"):
      hf.init_params(module)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_outputs_and_gradients(tiny_config, policy):
  config = _speed_config(tiny_config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  params = hf.init_params(models.BertForSequenceClassification(config))
  # Dropout on: the recomputed forward pass must draw the same masks as the first.
  loss, grads = _loss_and_grads(models.BertForSequenceClassification(config), params, deterministic=False)
  remat_loss, remat_grads = _loss_and_grads(
      models.BertForSequenceClassification(config.replace(remat_policy=policy)), params, deterministic=False)
  np.testing.assert_allclose(remat_loss, loss, atol=F32_ATOL, rtol=0)
  _assert_trees_close(remat_grads, grads, atol=F32_ATOL)


@pytest.mark.parametrize("remat_policy", ["none", "dots"])
def test_scanned_layers_match_unrolled(tiny_config, remat_policy):
  config = _speed_config(tiny_config)
  scanned = models.BertForSequenceClassification(config.replace(scan_layers=True, remat_policy=remat_policy))
  params = hf.init_params(models.BertForSequenceClassification(config))
  stacked = hf.stack_layers(params)
  assert stacked["bert"]["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (2, 32, 4, 8)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(hf.init_params(scanned))
  loss, grads = _loss_and_grads(models.BertForSequenceClassification(config), params)
  scan_loss, scan_grads = _loss_and_grads(scanned, stacked)
  np.testing.assert_allclose(scan_loss, loss, atol=F32_ATOL, rtol=0)
  _assert_trees_close(hf.unstack_layers(scan_grads), grads, atol=F32_ATOL)


def test_remat_in_scanned_layers_shrinks_the_compiled_steps_temporary_memory(tiny_config):
  # The supported way to trade compute for memory (README; on XLA:CPU unrolled layers keep the
  # same buffers with or without remat: docs/performance.md, "sixth").
  def temp_bytes(remat_policy):
    module = models.BertForSequenceClassification(tiny_config.replace(scan_layers=True, remat_policy=remat_policy))
    inputs = _inputs(batch=8, seq=64)

    def loss(params):
      return jnp.sum(module.apply({"params": params}, *inputs, deterministic=True))

    return jax.jit(jax.grad(loss)).lower(hf.init_params(module)).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("full") < 0.6 * temp_bytes("none")


def test_bfloat16_computes_in_bfloat16_with_float32_statistics(tiny_config):
  config = _speed_config(tiny_config, dtype="bfloat16")
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, input_ids, attention_mask, token_type_ids))(params)
  flat = list(all_eqns(jaxpr.jaxpr))
  dots = [e for e in flat if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), "a matmul ran in float32"
  exps = [e for e in flat if e.primitive.name == "exp"]
  assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)  # the softmax
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_bfloat16_loss_and_gradients_track_float32(tiny_config):
  config = _speed_config(tiny_config)
  params = hf.init_params(models.BertForSequenceClassification(config))
  loss, grads = _loss_and_grads(models.BertForSequenceClassification(config), params)
  bf16_loss, bf16_grads = _loss_and_grads(
      models.BertForSequenceClassification(config.replace(dtype="bfloat16")), params)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(bf16_grads))
  # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per op). Measured here: loss within
  # 1e-5 relative, gradient within 0.8% (relative L2); bounds: 2% and 5%.
  np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
  flat, bf16_flat = program_parts.flat(grads), program_parts.flat(bf16_grads)
  assert np.linalg.norm(bf16_flat - flat) <= 0.05 * np.linalg.norm(flat)


def test_bfloat16_embedding_gradients_add_up_in_float32(tiny_config):
  # A lookup's gradient is a scatter-add into its table. In bfloat16 on an H200 the scatters took
  # 78% of a BERT-base train step (95.8 ms -> 20.2 ms once fixed): the tables are read in float32,
  # and the two token-type rows, which every token adds into, are a one-hot matmul instead.
  config = _speed_config(tiny_config, dtype="bfloat16")
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  input_ids, attention_mask, token_type_ids = _inputs()
  loss = lambda p: module.apply({"params": p}, input_ids, attention_mask, token_type_ids).astype(jnp.float32).sum()  # noqa: E731
  scatters = [e for e in all_eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
              if e.primitive.name.startswith("scatter")]
  tables = {(config.vocab_size, config.hidden_size), (config.max_position_embeddings, config.hidden_size)}
  assert {e.outvars[0].aval.shape for e in scatters} == tables  # words and positions, not token types
  assert all(e.outvars[0].aval.dtype == jnp.float32 for e in scatters)


def test_speed_switches_stay_out_of_hf_config(tiny_config):
  config = tiny_config.replace(attention_impl="dot_product", remat_policy="dots", scan_layers=True,
                               dtype="bfloat16", layer_norm_impl="pallas", prune_last_layer=True)
  hf_dict = config.to_hf_dict()
  assert not {"attention_impl", "layer_norm_impl", "remat_policy", "scan_layers", "dtype", "param_dtype",
              "prune_last_layer"} & set(hf_dict)
  # A config.json that happens to carry such keys does not switch them on.
  loaded = models.BertConfig.from_hf_dict(dict(hf_dict, scan_layers=True, attention_impl="cudnn",
                                               layer_norm_impl="pallas", prune_last_layer=True))
  assert (loaded.scan_layers, loaded.attention_impl, loaded.remat_policy, loaded.layer_norm_impl,
          loaded.prune_last_layer) == (False, "einsum", "none", "xla", False)
  assert models.BertConfig.from_hf_dict(hf_dict, scan_layers=True).scan_layers


@pytest.mark.parametrize("overrides, match", [
    ({"attention_impl": "flash"}, "attention_impl='flash' is not supported"),
    ({"remat_policy": "some"}, "remat_policy='some' is not supported"),
    ({"scan_layers": "yes"}, "scan_layers='yes' must be True or False"),
    ({"prune_last_layer": 1}, "prune_last_layer=1 must be True or False"),
])
def test_bad_speed_switches_are_named(tiny_config, overrides, match):
  with pytest.raises(ValueError, match=match):
    tiny_config.replace(**overrides)


def test_erf_gelu_matches_jax_exact_gelu_and_its_gradient():
  # The model's GELU (bert.gelu) is the erf form under a checkpoint; jax's exact one goes through erfc.
  x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
  exact = lambda v: nn.gelu(v, approximate=False)  # noqa: E731
  np.testing.assert_allclose(bert.gelu(x), exact(x), rtol=0, atol=1e-6)
  erf_grad, exact_grad = (jax.vmap(jax.grad(f))(x) for f in (bert.gelu, exact))
  np.testing.assert_allclose(erf_grad, exact_grad, rtol=0, atol=1e-6)


def test_tanh_gelu_matches_pytorchs_and_keeps_only_its_input_for_the_backward_pass():
  # HF's "gelu_new" / "gelu_pytorch_tanh" is PyTorch's gelu(approximate="tanh"): values and gradient.
  import torch
  x = np.linspace(-8.0, 8.0, 4001, dtype=np.float32)
  reference = torch.tensor(x, requires_grad=True)
  values = torch.nn.functional.gelu(reference, approximate="tanh")
  values.sum().backward()
  np.testing.assert_allclose(bert.gelu_tanh(jnp.asarray(x)), values.detach().numpy(), rtol=0, atol=1e-6)
  # Autodiff's chain rule against PyTorch's closed-form derivative: float32 rounding apart (measured 3.8e-6).
  np.testing.assert_allclose(jax.vmap(jax.grad(bert.gelu_tanh))(jnp.asarray(x)), reference.grad.numpy(),
                             rtol=0, atol=1e-5)
  # Under jax.checkpoint the backward pass keeps x alone, where plain autodiff keeps tanh's intermediates.
  def saved_arrays(f):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      ad_checkpoint.print_saved_residuals(f, jnp.asarray(x))
    return [line for line in printed.getvalue().splitlines() if line.startswith("f32[4001]")]

  assert len(saved_arrays(bert.gelu_tanh)) == 1 and "argument" in saved_arrays(bert.gelu_tanh)[0]
  assert len(saved_arrays(functools.partial(nn.gelu, approximate=True))) > 1
  assert bert.activation("gelu_new") is bert.activation("gelu_pytorch_tanh") is bert.gelu_tanh


def test_fast_forms_compute_what_the_plain_forms_compute(tiny_config, monkeypatch):
  # The model's GELU and the accelerators' stacked Q/K/V matmul, run here on the CPU, against jax's
  # exact GELU and three separate projections.
  config = _speed_config(tiny_config)
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  monkeypatch.setitem(bert._ACTIVATIONS, "gelu", functools.partial(nn.gelu, approximate=False))
  # Both runs with the plain matmul forms (the CPU's have a test of their own).
  monkeypatch.setattr(projection, "contract", projection._contract_general)
  monkeypatch.setattr(projection, "add_bias", jnp.add)
  monkeypatch.setattr(bert, "add_bias", jnp.add)  # the add & norm's bias
  monkeypatch.setattr(attention, "project_qkv", lambda *args, bias_in_slices: projection._project_each(*args))
  plain_loss, plain_grads = _loss_and_grads(module, params)
  monkeypatch.setitem(bert._ACTIVATIONS, "gelu", bert.gelu)
  # The GPUs' form with the barrier (the TPUs' lacks only the barrier, which computes nothing).
  monkeypatch.setattr(attention, "project_qkv",
                      lambda *args, bias_in_slices: projection._project_stacked(*args, bias_in_slices=True))
  loss, grads = _loss_and_grads(module, params)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
  flat, plain_flat = program_parts.flat(grads), program_parts.flat(plain_grads)
  assert np.linalg.norm(flat - plain_flat) <= 1e-5 * np.linalg.norm(plain_flat)
  # The patched program has no per-backend choice left: only the fast forms ran.
  eqns = list(all_eqns(jax.make_jaxpr(lambda p: module.apply({"params": p}, *_inputs()))(params).jaxpr))
  assert not [e for e in eqns if e.primitive.name == "platform_index"]
  assert {e.primitive.name for e in eqns} & {"erf", "erfc"} == {"erf"}


@pytest.mark.parametrize("platform, attention_impl, stacked, barrier",
                         [("cpu", "dot_product", False, False), ("cuda", "dot_product", True, True),
                          ("rocm", "dot_product", True, True), ("tpu", "dot_product", True, False),
                          ("cuda", "einsum", True, False)])
def test_each_backend_lowers_its_own_forms(tiny_config, platform, attention_impl, stacked, barrier):
  # Lowered (not compiled) for each platform on this CPU: the erf GELU everywhere (no erfc), whether
  # the Q/K/V projections are one matmul with a [3, heads, head_dim] output, and whether a barrier
  # keeps their bias out of that matmul (GPUs, unless the einsum attention transposes the output:
  # docs/performance.md, "fourteenth").
  config = _speed_config(tiny_config, attention_impl=attention_impl)
  module = models.BertForSequenceClassification(config)
  params = hf.init_params(module)
  traced = jax.jit(lambda p: module.apply({"params": p}, *_inputs())).trace(params)
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  ops = set(re.findall(r"(?:stablehlo|chlo)\.(erfc?)\b", text))
  assert ops == {"erf"}
  stacked_shape = f"x3x{config.num_attention_heads}x{config.head_dim}x"
  assert (stacked_shape in text) == stacked
  assert ("stablehlo.optimization_barrier" in text) == barrier
