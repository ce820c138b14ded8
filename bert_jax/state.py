"""The model and its train state from a config: sized, initialised (fresh or from HF), sharded, restored.

The trainer follows one restore order: a checkpoint in the workdir (`restore_params`, or
`Checkpoints.restore` with `state_template`), else `config.init_checkpoint` (a Hugging Face BERT
directory or hub id, or another workdir's encoder), else random initialisation (in `initial_state`).
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
from bert_jax import tasks
from bert_jax import tokenization

# BertConfig fields that fix parameter shapes: a checkpoint that differs in one cannot be resumed.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "num_labels")


def is_workdir(path: str) -> bool:
  """Whether `path` is a bert_jax workdir (an `init_checkpoint` may be one: pretraining hands off so)."""
  return bool(path) and os.path.isdir(os.path.join(path, "checkpoints"))


def model_config(config: ml_collections.ConfigDict,
                 tokenizer: tokenization.Tokenizer | None = None) -> models.BertConfig:
  """`config.model` overrides on top of the init checkpoint's model (a HF config.json or a workdir's
  checkpoint), else on BertConfig's defaults with the tokenizer's vocab size."""
  overrides = config_checks.model_overrides(config)
  if is_workdir(config.init_checkpoint):
    directory = os.path.join(config.init_checkpoint, "checkpoints")
    ckpt = _open_finished_run(directory)
    step = ckpt.best_step()
    if step is None:
      raise FileNotFoundError(f"config.init_checkpoint={config.init_checkpoint!r} is a workdir without a "
                              "finished checkpoint; train it first or point to another checkpoint.")
    saved = ckpt.read_meta(step)["model"]
    ckpt.close()
    return models.BertConfig(**saved).replace(**overrides)
  if config.init_checkpoint:
    return hf.read_config(hf.resolve(config.init_checkpoint), **overrides)
  if tokenizer is not None:  # From scratch: one embedding per token of the vocab, unless set.
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
  return models.BertConfig(**overrides)


def make_tokenizer(config: ml_collections.ConfigDict) -> tokenization.Tokenizer:
  source = config.tokenizer or config.init_checkpoint
  if not source:
    raise ValueError("config.tokenizer is empty and there is no config.init_checkpoint to take the vocab "
                     "from; set --config.tokenizer to a directory with vocab.txt or a hub id.")
  if not config.tokenizer and is_workdir(source):
    source = os.path.join(source, "tokenizer")  # saved there by the run that wrote the workdir
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
                  shardings: Any, mesh: jax.sharding.Mesh) -> steps.TrainState:
  """A fresh state, created directly with its shardings: from the init checkpoint (HF or a workdir's
  encoder, with heads it lacks initialised fresh) or random."""
  create_random = jax.jit(lambda: nn.meta.unbox(_boxed_state(module, tx, config.seed)), out_shardings=shardings)
  if not config.init_checkpoint:
    return create_random()
  if is_workdir(config.init_checkpoint):
    _, saved, _, step = restore_params(config, config.init_checkpoint, "best", mesh)
    # Only the parameters are initialised for the heads: no optimizer state is built just to be dropped.
    init_params = jax.jit(lambda: nn.meta.unbox(
        module.init(jax.random.key(config.seed), jnp.zeros((1, 2), jnp.int32))["params"]),
                          out_shardings=shardings.params)
    params = dict(init_params(), bert=encoder_in_layout(saved["bert"], module.config.stacked_layers))
    logging.info("Initialised the encoder from step %d of %s; the %s heads start fresh.", step,
                 config.init_checkpoint, type(module).__name__)
  else:
    _, params = hf.load_pretrained(config.init_checkpoint, type(module), seed=config.seed,
                                   **config_checks.model_overrides(config))
    params = jax.device_put(params, shardings.params)
  create = jax.jit(lambda p: steps.create_state(p, tx, config.seed), out_shardings=shardings)
  return create(params)


def encoder_in_layout(bert_params: dict, stacked: bool) -> dict:
  """A `BertModel`'s parameters with the encoder's layers stored stacked (`encoder/layers`) or per layer,
  whichever way they came (an init run's layout may differ from this config's)."""
  if ("layers" in bert_params["encoder"]) == stacked:
    return bert_params
  return hf.stack_layers(bert_params) if stacked else hf.unstack_layers(bert_params)


def checkpoint_meta(module: nn.Module, **data: Any) -> dict:
  """What a checkpoint records about itself, to refuse resuming it under another model or data."""
  return {"model": dataclasses.asdict(module.config), "model_class": type(module).__name__, **data}


# Data settings added after checkpoints already existed: what a checkpoint without them was trained with.
_SETTINGS_BEFORE_RECORDED = {"length_buckets": []}


def check_resumable(meta: dict, module: nn.Module, directory: str, **data: Any) -> None:
  saved = meta.get("model", {})
  saved_class = meta.get("model_class", "BertForSequenceClassification")
  if saved_class != type(module).__name__:
    raise ValueError(
        f"The checkpoint in {directory} is a {saved_class}, this config trains a {type(module).__name__} "
        "(config.task). Use a new --workdir; to start from that run, give it as --config.init_checkpoint. "
        "The checkpoint was left untouched.")
  for field in SHAPE_FIELDS:
    if saved.get(field) != getattr(module.config, field):
      raise ValueError(
          f"The checkpoint in {directory} is of another model ({field}={saved.get(field)} there, "
          f"{getattr(module.config, field)} configured). Use a new --workdir, or configure the same model; "
          "the checkpoint was left untouched.")
  # The parameters' layout: scan_layers and stack_layers store the layers stacked alike.
  saved_stacked = models.BertConfig(**saved).stacked_layers
  if saved_stacked != module.config.stacked_layers:
    stored = "stacked (scan_layers or stack_layers)" if saved_stacked else "per layer"
    raise ValueError(
        f"The checkpoint in {directory} stores its layers {stored}, this config does not "
        f"(scan_layers={module.config.scan_layers}, stack_layers={module.config.stack_layers}). Use a new "
        "--workdir, or the checkpoint's layout: "
        + ("--config.model.stack_layers=True (or scan_layers=True)" if saved_stacked else
           "--config.model.stack_layers=False --config.model.scan_layers=False")
        + "; the checkpoint was left untouched.")
  for key, value in data.items():
    saved_value = meta.get(key, _SETTINGS_BEFORE_RECORDED.get(key, value))
    if saved_value != value:
      raise ValueError(
          f"The checkpoint in {directory} was trained with {key}={saved_value}, the config now gives {value}: "
          "resuming would not continue the same data order. Use a new --workdir or the same setting; the "
          "checkpoint was left untouched.")


def restore_params(config: ml_collections.ConfigDict, workdir: str, which: str,
                   mesh: jax.sharding.Mesh) -> tuple[nn.Module, Any, dict, int]:
  """Restores `which` ('best' or 'latest') checkpoint of `workdir`: (module, params, meta, step)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoints in {directory}; train first with --config.mode=train "
                            f"--workdir={workdir}.")
  ckpt = _open_finished_run(directory)
  step = ckpt.best_step() if which == "best" else ckpt.latest_step()
  if step is None:
    damaged = ckpt.damaged_steps()
    raise FileNotFoundError(f"No intact checkpoint in {directory}"
                            + (f"; damaged, left untouched: {damaged}" if damaged else "") + ".")
  meta = ckpt.read_meta(step)
  module_cls = models.MODEL_CLASSES[meta.get("model_class", "BertForSequenceClassification")]
  # How to compute (`models.COMPUTE_FIELDS`) may differ from training: e.g. a model trained with
  # attention_impl='cpu_fused' evaluated on a GPU, or 'auto' deciding anew. What the parameters are may not.
  compute = {name: value for name, value in config_checks.model_overrides(config).items()
             if name in models.COMPUTE_FIELDS}
  module = module_cls(models.BertConfig(**meta["model"]).replace(**compute))
  # The checkpoint's optimizer gives the state's tree structure; its schedule plays no part here.
  optimizer_name = meta.get("optimizer", config.optimizer.name)
  optimizer_config = ml_collections.ConfigDict(dict(config.optimizer, name=optimizer_name))
  tx, _ = optim.make_optimizer(optimizer_config, learning_rate=1.0, num_train_steps=1)
  abstract, _ = state_template(module, tx, config.seed, mesh)
  restored = ckpt.restore_best(abstract) if which == "best" else ckpt.restore_latest(abstract)
  ckpt.close()
  logging.info("Restored the %s checkpoint of %s: step %d. Kernels: %s.", which, directory, restored.step,
               models.describe_kernels(module.config))
  return module, restored.state.params, restored.meta, restored.step


def _open_finished_run(directory: str) -> checkpointing.Checkpoints:
  """The run's checkpoints in `directory`, read-only, ranked by the metric its task picks the best by
  (the latest step's meta says the task)."""
  ckpt = checkpointing.Checkpoints(directory, read_only=True)
  latest = ckpt.latest_step()
  meta = ckpt.read_meta(latest) if latest is not None else {}
  ckpt.best_metric = tasks.TASKS[meta.get("task", "classify")].best_metric
  return ckpt
