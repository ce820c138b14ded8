"""Checks of the run config, made before any data is read or anything compiled.

Each error names the key, the value, what is allowed and how to fix it.
"""

from __future__ import annotations

import os

import ml_collections

from bert_jax import input_pipeline
from bert_jax import models
from bert_jax import optim
from bert_jax import tokenization

MODES = ("train", "evaluate", "predict")
TASKS = ("classify", "pretrain")
PARALLELISMS = ("jit", "pmap")


def _require(ok: bool, key: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f"config.{key}={value!r} is out of range: {allowed}. Set --config.{key}=... accordingly.")


def check(config: ml_collections.ConfigDict) -> None:
  """Value ranges that need nothing but the config."""
  task = config.get("task", "classify")
  _require(task in TASKS, "task", task, f"one of {TASKS}")
  _require(config.mode in MODES if task == "classify" else config.mode == "train", "mode", config.mode,
           f"one of {MODES}" if task == "classify" else
           "'train' for pretraining (fine-tune the result with configs/imdb.py to evaluate or predict)")
  _require(config.learning_rate > 0, "learning_rate", config.learning_rate, "a positive number, e.g. 2e-5")
  _require(config.train.batch_size > 0, "train.batch_size", config.train.batch_size, "a positive integer")
  _require(config.train.eval_batch_size > 0, "train.eval_batch_size", config.train.eval_batch_size,
           "a positive integer")
  _require(config.train.grad_accum_steps > 0 and config.train.batch_size % config.train.grad_accum_steps == 0,
           "train.grad_accum_steps", config.train.grad_accum_steps,
           f"a positive divisor of train.batch_size={config.train.batch_size}")
  _require(config.train.num_epochs > 0, "train.num_epochs", config.train.num_epochs, "a positive number")
  _require(config.train.get("num_train_steps", 0) >= 0, "train.num_train_steps", config.train.get("num_train_steps"),
           ">= 0 (0 = from train.num_epochs)")
  _require(config.train.eval_every_steps > 0, "train.eval_every_steps", config.train.eval_every_steps,
           "positive")
  _require(config.train.on_nonfinite in ("stop", "skip"), "train.on_nonfinite", config.train.on_nonfinite,
           "'stop' or 'skip'")
  _require(config.train.log_every_steps > 0, "train.log_every_steps", config.train.log_every_steps, "positive")
  _require(config.data.max_seq_length >= 8, "data.max_seq_length", config.data.max_seq_length,
           "at least 8 and at most the model's max_position_embeddings")
  _require(0 <= config.data.validation_fraction < 1, "data.validation_fraction",
           config.data.validation_fraction, "in [0, 1)")
  _require(config.optimizer.name in optim.OPTIMIZERS, "optimizer.name", config.optimizer.name,
           f"one of {optim.OPTIMIZERS}")
  _require(0 <= config.optimizer.warmup_fraction < 1, "optimizer.warmup_fraction",
           config.optimizer.warmup_fraction, "in [0, 1)")
  _require(config.optimizer.weight_decay >= 0, "optimizer.weight_decay", config.optimizer.weight_decay, ">= 0")
  _require(config.optimizer.max_grad_norm > 0, "optimizer.max_grad_norm", config.optimizer.max_grad_norm, "> 0")
  _require(config.checkpoint.every_steps > 0, "checkpoint.every_steps", config.checkpoint.every_steps, "positive")
  _require(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, "at least 1")
  _check_parallelism(config)
  if task == "classify":
    _require(config.evaluate.checkpoint in ("best", "latest"), "evaluate.checkpoint",
             config.evaluate.checkpoint, "'best' or 'latest'")
    _require(config.predict.batch_size > 0, "predict.batch_size", config.predict.batch_size, "a positive integer")
    num_labels = config.model.get("num_labels")
    _require(num_labels is None or num_labels >= len(input_pipeline.CLASSES), "model.num_labels", num_labels,
             f"at least {len(input_pipeline.CLASSES)}: IMDB has the classes {input_pipeline.CLASSES}, and labels "
             "would fall outside the classifier")
    buckets = tuple(config.data.get("length_buckets", ()))
    # Evaluate and predict score at the checkpoint's max_seq_length, not the config's; there a bucket
    # at or beyond the texts' length cuts nothing.
    longest = config.data.max_seq_length if config.mode == "train" else float("inf")
    _require(all(isinstance(b, int) and 0 < b <= longest for b in buckets)
             and list(buckets) == sorted(set(buckets)), "data.length_buckets", buckets,
             "increasing whole numbers of tokens" + (
                 f" up to data.max_seq_length={config.data.max_seq_length}" if config.mode == "train" else "")
             + ", e.g. (128, 256, 384), or () for none")
  else:
    _check_pretraining_data(config.data)
  _check_paths(config)
  try:
    flagged_model = models.BertConfig().replace(**model_overrides(config))
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from e
  _check_optimizer_fits_layout(config, flagged_model)  # again in check_model_fits, with the init checkpoint's


def _check_parallelism(config: ml_collections.ConfigDict) -> None:
  parallelism = config.get("parallelism", "jit")
  _require(parallelism in PARALLELISMS, "parallelism", parallelism,
           "'jit' (the mesh of config.mesh_shape) or 'pmap' (data parallel over every device)")
  shape = tuple(config.mesh_shape)
  if parallelism == "pmap" and (len(shape) != 3 or shape[1:] != (1, 1)):
    raise ValueError(f"config.parallelism='pmap' is data parallel over every device, but config.mesh_shape="
                     f"{shape} asks for fsdp or tensor parallelism; set --config.mesh_shape='(-1,1,1)', or use "
                     "--config.parallelism=jit for that mesh.")


def _check_pretraining_data(data: ml_collections.ConfigDict) -> None:
  _require(0 < data.masked_lm_prob < 1, "data.masked_lm_prob", data.masked_lm_prob, "in (0, 1), BERT uses 0.15")
  _require(0 < data.max_predictions_per_seq < data.max_seq_length, "data.max_predictions_per_seq",
           data.max_predictions_per_seq, f"in [1, data.max_seq_length={data.max_seq_length})")
  _require(0 <= data.short_seq_prob <= 1, "data.short_seq_prob", data.short_seq_prob, "in [0, 1]")
  _require(data.dupe_factor >= 1, "data.dupe_factor", data.dupe_factor, "a positive integer")
  _require(data.max_documents >= 0, "data.max_documents", data.max_documents, ">= 0 (0 = all)")
  _require(bool(data.data_dir or data.tfds_name), "data.data_dir", data.data_dir,
           "a text file or folder, or an aclImdb archive; or set data.tfds_name")


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The `config.model` fields that are set (None keeps the checkpoint's value)."""
  return {name: value for name, value in config.model.items() if value is not None}


def _looks_local(path: str) -> bool:
  return path.startswith((os.sep, ".", "~")) or os.path.splitext(path)[1] in (".gz", ".tgz", ".tar")


def _check_paths(config: ml_collections.ConfigDict) -> None:
  """Local files the run needs must exist: found now, not after minutes of setup."""
  paths = {"data.data_dir": config.data.data_dir, "init_checkpoint": config.init_checkpoint,
           "tokenizer": config.tokenizer}
  if config.mode == "predict" and "predict" in config:
    paths["predict.input_file"] = config.predict.input_file
  for key, path in paths.items():
    if not path or path.startswith("pip:") or path in ("tfds", "imdb_reviews"):
      continue  # tfds, a PyPI package or a hub id: resolved when used
    local = _looks_local(path) or key.startswith(("data.", "predict."))
    if local and not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(f"config.{key}={path!r} does not exist; fix the path (relative paths start "
                              f"from {os.getcwd()}).")


def check_batch_layout(config: ml_collections.ConfigDict, data_parallel_size: int,
                       parallelism: str = "jit") -> None:
  """Every (micro-)batch must split evenly over the data-parallel devices: the mesh's data x fsdp
  under jit, every device under pmap."""
  devices = (f"{data_parallel_size} data-parallel devices"
             + (" (pmap: every device)" if parallelism == "pmap" else " (mesh data x fsdp)"))
  micro_batch = config.train.batch_size // config.train.grad_accum_steps
  _require(micro_batch % data_parallel_size == 0, "train.batch_size", config.train.batch_size,
           f"divisible by grad_accum_steps ({config.train.grad_accum_steps}) x the {devices}")
  _require(config.train.eval_batch_size % data_parallel_size == 0, "train.eval_batch_size",
           config.train.eval_batch_size, f"divisible by the {devices}")


def check_model_fits(config: ml_collections.ConfigDict, model_config: models.BertConfig,
                     mesh_shape: dict[str, int]) -> None:
  """The sequence fits the positions, the sharded axes divide evenly over the mesh, and the optimizer
  suits the parameters' layout (which an init checkpoint's model may have set)."""
  _check_optimizer_fits_layout(config, model_config)
  _require(config.data.max_seq_length <= model_config.max_position_embeddings, "data.max_seq_length",
           config.data.max_seq_length,
           f"at most the model's max_position_embeddings={model_config.max_position_embeddings} (lower it, "
           "or load a model with longer positions)")
  # Mirrors partitioning.RULES: heads, mlp and vocab on `tensor`, embed on `fsdp`.
  sharded = {"tensor": ("num_attention_heads", "intermediate_size", "vocab_size"), "fsdp": ("hidden_size",)}
  for axis, fields in sharded.items():
    for field in fields:
      value = getattr(model_config, field)
      if value % mesh_shape[axis]:
        raise ValueError(f"The model's {field}={value} does not divide over the mesh's {axis} axis of size "
                         f"{mesh_shape[axis]} (config.mesh_shape={tuple(config.mesh_shape)}); choose a "
                         f"{axis} size that divides it.")


def _check_optimizer_fits_layout(config: ml_collections.ConfigDict, model_config: models.BertConfig) -> None:
  # LAMB's trust ratio is per parameter: over a stacked [layers, ...] parameter it would mix layers.
  _require(not (config.optimizer.name == "lamb" and model_config.stacked_layers), "optimizer.name",
           config.optimizer.name, f"'adamw' for a model whose layers are stored stacked (scan_layers="
           f"{model_config.scan_layers}, stack_layers={model_config.stack_layers}, from the config or the init "
           "checkpoint): LAMB needs them per layer")


def check_tokenizer_fits(tokenizer: tokenization.Tokenizer, model_config: models.BertConfig, *,
                         exact: bool = False) -> None:
  """The tokenizer's ids fit the embedding table (`exact`: and fill it, as pretraining needs, where an
  unused row would be a sign of the wrong vocab)."""
  size, model_size = tokenizer.vocab_size, model_config.vocab_size
  if size > model_size or (exact and size != model_size):
    raise ValueError(f"The tokenizer's vocab has {size} tokens but the model's vocab_size is {model_size}: "
                     f"{'its ids would fall outside the embedding table' if size > model_size else 'they must match'}"
                     ". Use the model's own vocab (config.tokenizer), or set --config.model.vocab_size="
                     f"{size} when training from scratch.")
