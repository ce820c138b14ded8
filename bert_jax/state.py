"""The model and its train state from a config: sized, initialised (fresh or from HF), sharded, restored.

The trainer follows one restore order: a checkpoint in the workdir (`restore_params`, or
`Checkpoints.restore` with `state_template`), else `config.init_checkpoint` (a Hugging Face BERT
directory or hub id), else random initialisation (both in `initial_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from bert_jax import checkpointing
from bert_jax import config_checks
from bert_jax import hf
from bert_jax import models
from bert_jax import optim
from bert_jax import partitioning
from bert_jax import steps
from bert_jax import tokenization

# BertConfig fields that fix parameter shapes: a checkpoint that differs in one cannot be resumed.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "num_labels")


def model_config(config: ml_collections.ConfigDict) -> models.BertConfig:
  """`config.model` overrides on top of the init checkpoint's config.json (or BertConfig's defaults)."""
  overrides = config_checks.model_overrides(config)
  if config.init_checkpoint:
    return hf.read_config(hf.resolve(config.init_checkpoint), **overrides)
  return models.BertConfig(**overrides)


def make_tokenizer(config: ml_collections.ConfigDict) -> tokenization.Tokenizer:
  source = config.tokenizer or config.init_checkpoint
  if not source:
    raise ValueError("config.tokenizer is empty and there is no config.init_checkpoint to take the vocab "
                     "from; set --config.tokenizer to a directory with vocab.txt or a hub id.")
  return tokenization.Tokenizer.from_pretrained(source)


def _boxed_state(module: nn.Module, tx: optax.GradientTransformation, seed: int) -> steps.TrainState:
  variables = module.init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))
  return steps.create_state(variables["params"], tx, seed)


def state_template(module: nn.Module, tx: optax.GradientTransformation, seed: int,
                   mesh: jax.sharding.Mesh) -> tuple[steps.TrainState, Any]:
  """The state's abstract shapes (with shardings attached, for restoring) and its shardings."""
  abstract_boxed = jax.eval_shape(functools.partial(_boxed_state, module, tx, seed))
  shardings = partitioning.state_shardings(abstract_boxed, mesh)
  abstract = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      nn.meta.unbox(abstract_boxed), shardings)
  return abstract, shardings


def initial_state(config: ml_collections.ConfigDict, module: nn.Module, tx: optax.GradientTransformation,
                  shardings: Any) -> steps.TrainState:
  """A fresh state, created directly with its shardings: from the init checkpoint or random."""
  if config.init_checkpoint:
    _, params = hf.load_pretrained(config.init_checkpoint, type(module), seed=config.seed,
                                   **config_checks.model_overrides(config))
    params = jax.device_put(params, shardings.params)
    create = jax.jit(lambda p: steps.create_state(p, tx, config.seed), out_shardings=shardings)
    return create(params)
  create = jax.jit(lambda: nn.meta.unbox(_boxed_state(module, tx, config.seed)), out_shardings=shardings)
  return create()


def checkpoint_meta(module_config: models.BertConfig, **data: Any) -> dict:
  """What a checkpoint records about itself, to refuse resuming it under another model or data."""
  return {"model": dataclasses.asdict(module_config), **data}


def check_resumable(meta: dict, module_config: models.BertConfig, directory: str, **data: Any) -> None:
  saved = meta.get("model", {})
  for field in SHAPE_FIELDS:
    if saved.get(field) != getattr(module_config, field):
      raise ValueError(
          f"The checkpoint in {directory} is of another model ({field}={saved.get(field)} there, "
          f"{getattr(module_config, field)} configured). Use a new --workdir, or configure the same model; "
          "the checkpoint was left untouched.")
  for key, value in data.items():
    if key in meta and meta[key] != value:
      raise ValueError(
          f"The checkpoint in {directory} was trained with {key}={meta[key]}, the config now gives {value}: "
          "resuming would not continue the same data order. Use a new --workdir or the same setting; the "
          "checkpoint was left untouched.")


def restore_params(config: ml_collections.ConfigDict, workdir: str, which: str,
                   mesh: jax.sharding.Mesh) -> tuple[nn.Module, Any, dict, int]:
  """Restores `which` ('best' or 'latest') checkpoint of `workdir`: (module, params, meta, step)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {directory}; train first with --config.mode=train "
                            f"--workdir={workdir}.")
  ckpt = checkpointing.Checkpoints(directory, read_only=True)
  step = ckpt.best_step() if which == "best" else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"No finished checkpoint in {directory}.")
  meta = ckpt.read_meta(step)
  module = models.BertForSequenceClassification(models.BertConfig(**meta["model"]))
  # The checkpoint's optimizer gives the state's tree structure; its schedule plays no part here.
  optimizer_name = meta.get("optimizer", config.optimizer.name)
  optimizer_config = ml_collections.ConfigDict(dict(config.optimizer, name=optimizer_name))
  tx, _ = optim.make_optimizer(optimizer_config, learning_rate=1.0, num_train_steps=1)
  abstract, _ = state_template(module, tx, config.seed, mesh)
  state = ckpt.restore(step, abstract)
  ckpt.close()
  logging.info("Restored the %s checkpoint of %s: step %d.", which, directory, step)
  return module, state.params, meta, step
