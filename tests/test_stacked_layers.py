"""`stack_layers`: the layers' parameters stored stacked as under `scan_layers`, the layers unrolled.

A layout switch only: the same parameters (scan's tree), the same function and dropout masks as the
per-layer model, bit for bit, with `prune_last_layer` still in force; checkpoints of either stacked
layout resume under the other, and a per-layer one is refused.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import config_checks
from bert_jax import hf
from bert_jax import models
from bert_jax import optim
from bert_jax import state as state_lib
from bert_jax import steps
from configs import pretrain as pretrain_configs

BATCH, SEQ = 2, 12


def _batch():
  rng = np.random.default_rng(0)
  return {"input_ids": jnp.asarray(rng.integers(1, 99, (BATCH, SEQ)), jnp.int32),
          "attention_mask": jnp.asarray(np.arange(SEQ)[None, :] < np.array([[SEQ], [8]]), jnp.int32),
          "token_type_ids": jnp.zeros((BATCH, SEQ), jnp.int32),
          "masked_lm_positions": jnp.asarray([[1, 4, 0], [2, 3, 7]], jnp.int32),
          "masked_lm_ids": jnp.asarray([[5, 6, 0], [7, 8, 9]], jnp.int32),
          "masked_lm_weights": jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32),
          "next_sentence_label": jnp.asarray([0, 1], jnp.int32), "weights": jnp.ones((BATCH,), jnp.float32)}


def _axis_names(params):
  return jax.tree.map(lambda box: (box.unbox().shape, box.names), params,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def test_parameters_are_stored_as_scan_layers_stores_them(tiny_config):
  ids = jnp.ones((1, 4), jnp.int32)
  stacked = models.BertForPreTraining(tiny_config.replace(stack_layers=True)).init(jax.random.key(0), ids)
  scanned = models.BertForPreTraining(tiny_config.replace(scan_layers=True)).init(jax.random.key(0), ids)
  assert list(stacked["params"]["bert"]["encoder"]) == ["layers"]
  # The same tree, shapes and logical axis names (the stacked axis `layers` first).
  assert _axis_names(stacked["params"]) == _axis_names(scanned["params"])


@pytest.mark.parametrize("remat_policy", ["none", "dots"])
def test_the_model_computes_what_per_layer_parameters_compute_bit_for_bit(tiny_config, remat_policy):
  # Pretraining with hidden and attention dropout on and the last layer pruned: loss and gradients.
  config = tiny_config.replace(prune_last_layer=True, remat_policy=remat_policy)
  per_layer, stacked = models.BertForPreTraining(config), models.BertForPreTraining(config.replace(stack_layers=True))
  params = hf.init_params(per_layer, seed=1)
  grad = jax.jit(jax.value_and_grad(steps.pretraining_loss, argnums=1, has_aux=True), static_argnums=(0, 4))
  (loss, _), grads = grad(per_layer, params, _batch(), jax.random.key(2), False)
  (stacked_loss, _), stacked_grads = grad(stacked, hf.stack_layers(params), _batch(), jax.random.key(2), False)
  assert float(stacked_loss) == float(loss)
  jax.tree.map(np.testing.assert_array_equal, hf.unstack_layers(stacked_grads), grads)


def test_a_train_step_makes_the_same_update(tiny_config):
  config = tiny_config.replace(prune_last_layer=True)
  per_layer, stacked = models.BertForPreTraining(config), models.BertForPreTraining(config.replace(stack_layers=True))
  tx, _ = optim.make_optimizer(pretrain_configs.get_config("tiny").optimizer, 1e-3, 10)
  params = hf.init_params(per_layer, seed=1)

  def step(module, params):
    state = steps.create_state(params, tx, seed=0)
    return jax.jit(lambda s, b: steps.train_step(s, b, model=module, tx=tx, loss_fn=steps.pretraining_loss))(
        state, _batch())

  state, metrics = step(per_layer, params)
  stacked_state, stacked_metrics = step(stacked, hf.stack_layers(params))
  assert float(stacked_metrics["loss_sum"]) == float(metrics["loss_sum"])
  # The global gradient norm sums the same squares in another order: float32 rounding apart, equal.
  np.testing.assert_allclose(stacked_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               hf.unstack_layers(stacked_state.params), state.params)
  assert jax.tree.structure(stacked_state.opt_state) == jax.tree.structure(
      tx.init(hf.stack_layers(params)))
  assert len(jax.tree.leaves(stacked_state.params)) < len(jax.tree.leaves(state.params))


def _meta(config: models.BertConfig) -> dict:
  return state_lib.checkpoint_meta(models.BertForPreTraining(config))


def test_a_scanned_checkpoint_resumes_with_stacked_layers_and_back(tiny_config):
  stacked = models.BertForPreTraining(tiny_config.replace(stack_layers=True))
  state_lib.check_resumable(_meta(tiny_config.replace(scan_layers=True)), stacked, "ckpt")
  scanned = models.BertForPreTraining(tiny_config.replace(scan_layers=True))
  state_lib.check_resumable(_meta(tiny_config.replace(stack_layers=True)), scanned, "ckpt")


@pytest.mark.parametrize("saved,configured,fix", [({}, {"stack_layers": True}, "stack_layers=False"),
                                                   ({"stack_layers": True}, {}, "stack_layers=True")])
def test_a_checkpoint_in_the_other_layout_is_refused(tiny_config, saved, configured, fix):
  module = models.BertForPreTraining(tiny_config.replace(**configured))
  with pytest.raises(ValueError, match=f"stores its layers (per layer|stacked).*{fix}.*left untouched"):
    state_lib.check_resumable(_meta(tiny_config.replace(**saved)), module, "ckpt")


def test_the_encoder_of_an_init_run_is_put_in_this_configs_layout(tiny_config):
  per_layer = hf.init_params(models.BertModel(tiny_config), seed=1)
  stacked = state_lib.encoder_in_layout(per_layer, stacked=True)
  assert list(stacked["encoder"]) == ["layers"]
  assert state_lib.encoder_in_layout(stacked, stacked=True) is stacked  # already so: no copy
  jax.tree.map(np.testing.assert_array_equal, state_lib.encoder_in_layout(stacked, stacked=False), per_layer)


def test_per_layer_or_wrongly_deep_parameters_are_refused_with_the_fix(tiny_config):
  module = models.BertModel(tiny_config.replace(stack_layers=True))
  per_layer = hf.init_params(models.BertModel(tiny_config))
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"stored per layer.*hf.stack_layers\(params\), or set stack_layers=False"):
    module.apply({"params": per_layer}, ids)
  deeper = hf.init_params(models.BertModel(tiny_config.replace(stack_layers=True, num_hidden_layers=3)))
  with pytest.raises(ValueError, match="hold 3 layers; BertConfig.num_hidden_layers is 2"):
    module.apply({"params": deeper}, ids)


def test_scan_layers_and_stack_layers_together_are_refused(tiny_config):
  with pytest.raises(ValueError, match="scan_layers=True and stack_layers=True.*scan_layers=False"):
    tiny_config.replace(scan_layers=True, stack_layers=True)


def test_lamb_is_refused_with_stacked_layers():
  config = pretrain_configs.get_config("tiny")
  config.optimizer.name = "lamb"
  config.model.stack_layers = True
  with pytest.raises(ValueError, match="optimizer.name.*stack_layers=True"):
    config_checks.check(config)
  # A layout that comes with the init checkpoint's model rather than the flags: refused once resolved.
  config.model.stack_layers = None
  with pytest.raises(ValueError, match="optimizer.name.*stored stacked"):
    config_checks.check_model_fits(config, models.BertConfig(scan_layers=True), {"tensor": 1, "fsdp": 1})


def test_optimizer_state_covers_each_stacked_parameter_once(tiny_config):
  # What the layout is for: one optimizer leaf per kind of layer parameter, not one per layer.
  params = hf.init_params(models.BertForPreTraining(tiny_config.replace(stack_layers=True)))
  mu = optax.tree_utils.tree_get(optim.make_optimizer(pretrain_configs.get_config("tiny").optimizer, 1.0, 10)[0]
                                 .init(params), "mu")
  assert mu["bert"]["encoder"]["layers"]["intermediate"]["kernel"].shape == (
      tiny_config.num_hidden_layers, tiny_config.hidden_size, tiny_config.intermediate_size)
