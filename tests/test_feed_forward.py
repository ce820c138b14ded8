"""The feed-forward's Hopper kernels (`feed_forward`, `hopper_matmul`; `feed_forward_impl='mosaic'`) against
the plain float32 path.

On this CPU jax's Mosaic GPU interpreter runs the kernels' own code: their TMA copies, barriers, wgmmas
and stores, with a happens-before race detector, and it fails a barrier freed with a phase some waiter
never saw or completed twice unseen. It simulates 2 SMs (`hopper_matmul.INTERPRETED_SMS`), so each CTA
loops over several blocks and reuses its buffers and barriers. It runs wgmmas and stores synchronously,
and a warpgroup as one thread, so a stage handed back before its wgmma has read it, a store buffer
rewritten before its store has read it, or an operand refilled before every thread of the warpgroup has
read it, pass here: those waits rest on reasoning and the GPU runs (`scripts/bench_matmul.py` compares
each kernel with float32 there).
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import config_checks
from bert_jax import hf
from bert_jax import models
from bert_jax.models import feed_forward

import program_parts
from scripts.bench_fused_norm import rel_l2


def _tuning(stages: int):
  """jax's Hopper matmul's tiling at 128 x 128 blocks (per warpgroup), 64-wide k steps and `stages` stages."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  return mgpu.TuningConfig(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=stages)


def _races_found() -> bool:
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  return interpret_pallas_call.get_races().races_found


def _detect_races():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams(detect_races=True)


def test_the_kernels_gelu_is_the_exact_one_without_erf():
  # Mosaic GPU has no layout rule for erf, so the kernel's epilogue builds erf from exp (A&S 7.1.26).
  x = jnp.linspace(-10.0, 10.0, 100_001, dtype=jnp.float32)
  gelu, exact = feed_forward._gelu(x), jax.nn.gelu(x, approximate=False)
  assert float(jnp.max(jnp.abs(gelu - exact))) < 1e-6
  tail = (x > -6.0) & (x < -3.0)  # the negative tail keeps its relative accuracy too
  assert float(jnp.max(jnp.where(tail, jnp.abs(gelu - exact) / jnp.abs(exact), 0.0))) < 5e-2


def test_the_kernels_gelu_derivative_is_the_exact_one_without_erf():
  x = jnp.linspace(-10.0, 10.0, 100_001, dtype=jnp.float32)
  exact = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  assert float(jnp.max(jnp.abs(feed_forward._gelu_grad(x) - exact))) < 1e-6


@pytest.mark.parametrize("schedule,with_preactivation,out_slots,mkn,stages", [
    ("cooperative", False, 2, (256, 128, 512), 2),
    ("cooperative", True, 2, (256, 128, 512), 2),
    ("cooperative", True, 1, (256, 128, 512), 2),
    ("pingpong", True, 2, (384, 192, 256), 2),  # 6 blocks: 3 per SM, so 2 for one consumer and 1 for the other
    ("pingpong", False, 1, (640, 128, 128), 3),  # 5 blocks: 3 and 2 per SM; rings deeper than the k steps
])
def test_the_forward_kernel_computes_gelu_of_the_biased_product_in_mosaic_s_interpreter(
    schedule, with_preactivation, out_slots, mkn, stages):
  m, k, n = mkn  # blocks of 128 x 2*128 (cooperative) or 128 x 128 (pingpong), k steps of 64
  keys = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  b = (jax.random.normal(keys[1], (k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
  bias = jax.random.normal(keys[2], (n,), jnp.float32)
  config = _tuning(stages)
  outputs = feed_forward.matmul_bias_gelu(a, b, bias, config, with_preactivation, out_slots, schedule,
                                          interpret=_detect_races())
  preactivation = jnp.dot(a, b, preferred_element_type=jnp.float32) + bias
  expected = (jax.nn.gelu(preactivation, approximate=False), preactivation)
  for output, reference in zip(outputs if with_preactivation else (outputs,), expected):
    assert output.dtype == jnp.bfloat16
    assert rel_l2(output, reference) < 4e-3  # bf16 rounding of float32 values: about 1.7e-3
  assert not _races_found()


@pytest.mark.parametrize("schedule,out_slots,mkn,stages", [
    ("cooperative", 1, (256, 128, 512), 3),  # 2 blocks of 128 x 2*128 per SM, rings deeper than the k steps
    ("pingpong", 2, (384, 192, 256), 2),  # 6 blocks: 2 for one consumer and 1 for the other on each SM
])
def test_the_backward_kernel_multiplies_the_product_by_gelu_s_derivative_in_mosaic_s_interpreter(
    schedule, out_slots, mkn, stages):
  # The pre-activation block is the operand the epilogue reads tile by tile.
  m, k, n = mkn
  keys = jax.random.split(jax.random.key(1), 3)
  d_y = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
  kernel_t = (jax.random.normal(keys[1], (k, n), jnp.float32) / k**0.5).astype(jnp.bfloat16)
  preactivation = (2 * jax.random.normal(keys[2], (m, n), jnp.float32)).astype(jnp.bfloat16)
  config = _tuning(stages)
  output = feed_forward.matmul_gelu_grad(d_y, kernel_t, preactivation, config, out_slots, schedule,
                                         interpret=_detect_races())
  d_gelu = jnp.dot(d_y, kernel_t, preferred_element_type=jnp.float32)
  reference = jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), preactivation.astype(jnp.float32))[1](d_gelu)[0]
  assert output.dtype == jnp.bfloat16
  assert rel_l2(output, reference) < 4e-3  # bf16 rounding of float32 values: about 1.7e-3
  assert not _races_found()


def test_the_backward_kernel_names_a_pre_activation_it_cannot_read():
  config = _tuning(3)
  d_y, kernel_t = jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"need a pre-activation \[m, n\] = \[128, 256\] in bfloat16"):
    feed_forward.matmul_gelu_grad(d_y, kernel_t, jnp.zeros((128, 128), jnp.bfloat16), config)
  with pytest.raises(ValueError, match="in bfloat16; got"):
    feed_forward.matmul_gelu_grad(d_y, kernel_t, jnp.zeros((128, 256), jnp.float32), config)
  with pytest.raises(ValueError, match=r"need a \[m, k\] and b \[k, n\]"):
    feed_forward.matmul_gelu_grad(d_y, kernel_t[:32], jnp.zeros((128, 256), jnp.bfloat16), config)


def test_the_forward_kernel_names_the_inputs_and_configs_it_cannot_run():
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  config = _tuning(4)
  a, b, bias = jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16), jnp.zeros(256)
  for bad_config in (dataclasses.replace(config, cluster_dimension=mgpu.MatmulDimension.M),
                     dataclasses.replace(config, wg_dimension=mgpu.MatmulDimension.M)):
    with pytest.raises(ValueError, match="use no cluster"):
      feed_forward.matmul_bias_gelu(a, b, bias, bad_config)
  with pytest.raises(ValueError, match="must share a dtype"):
    feed_forward.matmul_bias_gelu(a, b.astype(jnp.float32), bias, config)
  with pytest.raises(ValueError, match=r"need a \[m, k\] and b \[k, n\]"):
    feed_forward.matmul_bias_gelu(a, b[:32], bias, config)  # k differs
  with pytest.raises(ValueError, match=r"need a bias \[n\] = \[256\]"):
    feed_forward.matmul_bias_gelu(a, b, bias[:128], config)
  with pytest.raises(ValueError, match="out_slots must be at least 1"):
    feed_forward.matmul_bias_gelu(a, b, bias, config, out_slots=0)
  with pytest.raises(ValueError, match="schedule must be 'cooperative' or 'pingpong'"):
    feed_forward.matmul_bias_gelu(a, b, bias, config, schedule="ping-pong")
  with pytest.raises(ValueError, match="ping-pong schedule needs max_concurrent_steps >= 2"):  # else it deadlocks
    feed_forward.matmul_bias_gelu(a, b, bias, dataclasses.replace(config, max_concurrent_steps=1),
                                           schedule="pingpong")


def _feed_forward_operands(rows_shape=(3, 50), hidden=64, intermediate=256, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], rows_shape + (hidden,)).astype(jnp.bfloat16)
  w_in = (jax.random.normal(keys[1], (hidden, intermediate)) / hidden**0.5).astype(jnp.bfloat16)
  b_in = jax.random.normal(keys[2], (intermediate,)).astype(jnp.bfloat16)
  w_out = (jax.random.normal(keys[3], (intermediate, hidden)) / intermediate**0.5).astype(jnp.bfloat16)
  return x, w_in, b_in, w_out


def _plain_float32(x, w_in, b_in, w_out):
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  return jax.nn.gelu(f32(x) @ f32(w_in) + f32(b_in), approximate=False) @ f32(w_out)


@pytest.mark.parametrize("impl", ["mosaic", "mosaic_pingpong"])
def test_feed_forward_and_its_gradients_match_the_float32_path_with_padded_rows(impl):
  # 150 rows: padded to 256 for the kernels' 128-row blocks; the padding adds nothing to any gradient.
  operands = _feed_forward_operands()
  weights = jax.random.normal(jax.random.key(7), (3, 50, 64))  # a loss that weighs every output differently

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args).astype(jnp.float32) * weights)

  ff = functools.partial(feed_forward.feed_forward, impl=impl)
  kernels = lambda fn: str(jax.make_jaxpr(fn)(*operands)).count("mpmd_map[")  # noqa: E731  # plgpu.kernel calls
  # Forward: one kernel; with the gradients, the forward's (also writing the pre-activation) and the backward's.
  assert kernels(ff) == 1
  assert kernels(jax.grad(loss(ff), argnums=range(4))) == 2
  output = jax.jit(ff)(*operands)
  assert output.shape == (3, 50, 64) and output.dtype == jnp.bfloat16
  assert rel_l2(output, _plain_float32(*operands)) < 1e-2
  grads = jax.jit(jax.grad(loss(ff), argnums=range(4)))(*operands)
  plain_grads = jax.grad(loss(_plain_float32), argnums=range(4))(*operands)
  for name, got, want in zip(("x", "w_in", "b_in", "w_out"), grads, plain_grads):
    assert got.dtype == jnp.bfloat16, name
    # bf16 operands and outputs against float32 throughout: about 3e-3 here.
    assert rel_l2(got, want) < 1e-2, name


def _classifier(**overrides):
  sizes = dict(vocab_size=99, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
               max_position_embeddings=64)
  config = models.BertConfig(**{**sizes, **overrides})
  return models.BertForSequenceClassification(config)


@pytest.mark.parametrize("impl", ["mosaic", "mosaic_pingpong"])
def test_model_with_mosaic_feed_forward_trains_as_the_float32_xla_path(impl):
  mosaic = _classifier(dtype="bfloat16", feed_forward_impl=impl)
  plain = _classifier()  # float32, XLA's feed-forward: the reference path
  params = hf.init_params(plain)
  # The same parameters under the same names: checkpoints and HF export do not see the switch.
  assert jax.tree_util.tree_structure(hf.init_params(mosaic)) == jax.tree_util.tree_structure(params)
  ids = np.ones((2, 5), np.int32)
  jaxpr = lambda module: str(jax.make_jaxpr(lambda p: module.apply({"params": p}, ids))(params))  # noqa: E731
  assert "wgmma" in jaxpr(mosaic) and "wgmma" not in jaxpr(_classifier(dtype="bfloat16"))  # the kernels, traced
  value, grads = program_parts.classification_loss_and_grads(mosaic, params, False)
  plain_value, plain_grads = program_parts.classification_loss_and_grads(plain, params, False)
  np.testing.assert_allclose(value, plain_value, rtol=2e-2)  # the whole model in bf16 against float32
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(plain_grads)):
    assert got.dtype == want.dtype == jnp.float32, jax.tree_util.keystr(path)  # float32 parameters
    # bf16 activations and gradients against float32: the feed-forward's about as far as the rest's. The
    # absolute floor is for gradients that are zero in exact arithmetic (the key bias's: softmax ignores it).
    assert float(jnp.linalg.norm(got - want)) <= 5e-2 * float(jnp.linalg.norm(want)) + 1e-6, jax.tree_util.keystr(path)


def test_mosaic_feed_forward_matches_xla_s_in_bf16():
  # The same model in bf16 with XLA's feed-forward: the kernels are at least as close to float32 as XLA's
  # bf16 matmuls and passes are (they add the bias and apply the GELU to float32 sums).
  params = hf.init_params(_classifier())
  plain_grads = program_parts.classification_loss_and_grads(_classifier(), params, False)[1]
  errors = {}
  for impl in ("xla", "mosaic"):
    module = _classifier(dtype="bfloat16", feed_forward_impl=impl)
    grads = program_parts.classification_loss_and_grads(module, params, False)[1]
    layer = lambda g: g["bert"]["encoder"]["layer_0"]  # noqa: E731
    errors[impl] = {name: rel_l2(layer(grads)[name]["kernel"], layer(plain_grads)[name]["kernel"])
                    for name in ("intermediate", "output")}
  for name in ("intermediate", "output"):
    assert errors["mosaic"][name] < 2 * errors["xla"][name] + 1e-3, errors


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu_new"), "computes the exact GELU.*hidden_act=gelu"),
    (dict(dtype="float32"), "runs bfloat16 matmul kernels.*dtype=bfloat16"),
    (dict(intermediate_size=200), "intermediate_size a multiple of 256.*got 64 and 200"),
    (dict(hidden_size=96, num_attention_heads=2), "hidden_size a multiple of 64.*got 96 and 256"),
])
def test_a_model_the_kernels_cannot_run_is_refused_with_the_fix(overrides, message):
  base = dict(dtype="bfloat16", feed_forward_impl="mosaic")
  with pytest.raises(ValueError, match=message):
    _classifier(**{**base, **overrides})


def test_an_unknown_feed_forward_impl_is_refused():
  with pytest.raises(ValueError, match="feed_forward_impl='triton' is not supported"):
    _classifier(feed_forward_impl="triton")
  with pytest.raises(ValueError, match="impl='triton' is not one of"):
    feed_forward.feed_forward(*_feed_forward_operands(), impl="triton")


@pytest.mark.parametrize("backend, compute_capability", [("tpu", None), ("gpu", "8.0")])
def test_the_kernels_are_refused_off_hopper(monkeypatch, backend, compute_capability):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  device = types.SimpleNamespace(device_kind="A100" if compute_capability else "TPU v5e",
                                 compute_capability=compute_capability)
  monkeypatch.setattr(jax, "devices", lambda *_: [device])
  with pytest.raises(ValueError, match="Hopper GPU kernels.*feed_forward_impl=xla"):
    feed_forward.feed_forward(*_feed_forward_operands())


def test_the_kernel_log_names_the_feed_forward_and_the_interpreter():
  description = models.describe_kernels(_classifier(dtype="bfloat16", feed_forward_impl="mosaic").config)
  assert "feed-forward mosaic" in description and "interpreter" in description
  assert "interpreter" not in models.describe_kernels(_classifier().config)


def test_the_kernels_tile_what_the_model_s_sizes_must_divide():
  rows, hidden, intermediate = feed_forward.size_multiples()
  assert (rows, hidden, intermediate) == (128, 64, 256)  # 128 x 2*128 blocks, 64-wide k steps
  assert dataclasses.replace(models.BertConfig(dtype="bfloat16"), feed_forward_impl="mosaic")  # BERT-base fits


@pytest.mark.parametrize("preset", ["imdb", "pretrain"])
def test_a_checkpoint_trained_with_the_kernels_is_evaluated_by_xla_under_the_train_presets(preset):
  # evaluate/predict take the compute fields the config sets over the checkpoint's (`state`): the presets set
  # 'xla', so a model trained with 'mosaic' on an H100 evaluates on any machine.
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{preset}").get_config()
  compute = {name: value for name, value in config_checks.model_overrides(config).items()
             if name in models.COMPUTE_FIELDS}
  trained = models.BertConfig(dtype="bfloat16", feed_forward_impl="mosaic")
  assert trained.replace(**compute).feed_forward_impl == "xla"
