"""The fine-tuning loop: `train_and_evaluate(config, workdir)`.

Owns: compiling the steps over the mesh, the loop with its periodic logging, validation and
checkpoints, the final test evaluation and `results.json`. Steps, data, state and checkpoints
live in their own modules.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from bert_jax import checkpointing
from bert_jax import config_checks
from bert_jax import hf
from bert_jax import input_pipeline
from bert_jax import metrics as metrics_lib
from bert_jax import models
from bert_jax import optim
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import steps


def _in_mesh(jitted: Callable, mesh) -> Callable:
  """Calls `jitted` with the mesh and the logical rules in scope: tracing (on the first call) then
  applies the model's activation sharding constraints; later calls reuse the compiled step."""
  @functools.wraps(jitted)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
      return jitted(*args, **kwargs)
  return call


def compile_steps(module, tx, schedule, shardings, mesh, grad_accum_steps: int,
                  loss_fn=steps.classification_loss):
  """The jitted train step (state donated) and eval step, laid out over `mesh`."""
  batch_sharding = partitioning.batch_sharding(mesh)
  train_step = jax.jit(
      functools.partial(steps.train_step, model=module, tx=tx, grad_accum_steps=grad_accum_steps,
                        schedule=schedule, loss_fn=loss_fn),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)
  eval_step, _ = compile_inference_steps(module, mesh)
  return _in_mesh(train_step, mesh), eval_step


def compile_inference_steps(module, mesh):
  """The jitted eval step (sums of loss and correct) and predict step (probabilities)."""
  eval_step = jax.jit(functools.partial(steps.eval_step, model=module))
  predict_step = jax.jit(functools.partial(steps.predict_step, model=module))
  return _in_mesh(eval_step, mesh), _in_mesh(predict_step, mesh)


def evaluate_arrays(eval_step, params, arrays: dict[str, np.ndarray], batch_size: int, mesh,
                    prefix: str) -> dict[str, float]:
  """Loss and accuracy over every example of `arrays` (the last batch padded with weight 0)."""
  sums = None
  sharding = partitioning.batch_sharding(mesh)
  for batch in input_pipeline.eval_batches(arrays, batch_size=batch_size):
    sums = metrics_lib.add(sums, eval_step(params, input_pipeline.shard_batch(batch, sharding)))
  summary = metrics_lib.summarize(sums, prefix)
  summary[f"num_{prefix}examples"] = int(round(float(sums["count"])))
  return summary


def resume_settings(config: ml_collections.ConfigDict, num_train_examples: int) -> dict[str, Any]:
  """Settings a resumed run must share with the run that wrote the checkpoint (data order, schedule)."""
  return {"num_train_examples": num_train_examples, "batch_size": config.train.batch_size, "seed": config.seed,
          "max_seq_length": config.data.max_seq_length, "num_epochs": config.train.num_epochs,
          "learning_rate": config.learning_rate, "warmup_fraction": config.optimizer.warmup_fraction,
          "optimizer": config.optimizer.name, "validation_fraction": config.data.validation_fraction,
          "max_train_examples": config.data.max_train_examples}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes, resuming from the workdir's latest checkpoint if there is one; returns the results."""
  mesh = partitioning.make_mesh(config.mesh_shape)
  config_checks.check_batch_layout(config, partitioning.data_parallel_size(mesh))
  module_config = state_lib.model_config(config)
  config_checks.check_model_fits(config, module_config, dict(mesh.shape))
  module = models.BertForSequenceClassification(module_config)
  ckpt = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
  latest = ckpt.latest_step()
  saved_meta = ckpt.read_meta(latest) if latest is not None else {}
  if saved_meta:  # Refuse a workdir of another model before spending time on data.
    state_lib.check_resumable(saved_meta, module_config, ckpt.directory)
  metrics_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  tokenizer = state_lib.make_tokenizer(config)
  config_checks.check_tokenizer_fits(tokenizer, module_config)
  tokenizer.hf_tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))  # evaluate/predict read it

  data = input_pipeline.build_imdb(config.data, tokenizer, max_seq_length=config.data.max_seq_length,
                                   seed=config.seed, cache_dir=config.data.cache_dir or os.path.join(workdir, "cache"))
  num_train = len(data.train["labels"])
  steps_per_epoch = input_pipeline.num_train_batches(num_train, config.train.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"{num_train} training examples make no batch of config.train.batch_size="
                     f"{config.train.batch_size}; lower the batch size or use more data.")
  num_train_steps = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
  tx, schedule = optim.make_optimizer(config.optimizer, config.learning_rate, num_train_steps)
  abstract, shardings = state_lib.state_template(module, tx, config.seed, mesh)

  settings = resume_settings(config, num_train)
  if saved_meta:
    state_lib.check_resumable(saved_meta, module_config, ckpt.directory, **settings)
    state = ckpt.restore(latest, abstract)
    logging.info("Resuming from the checkpoint at step %d of %s.", latest, ckpt.directory)
  else:
    state = state_lib.initial_state(config, module, tx, shardings)
  meta = state_lib.checkpoint_meta(module_config, **settings)

  train_step, eval_step = compile_steps(module, tx, schedule, shardings, mesh, config.train.grad_accum_steps)
  writer = metrics_lib.Writer(os.path.join(workdir, "tensorboard"))
  progress = metrics_lib.Progress(num_train_steps, config.train.batch_size, int(state.step),
                                  **saved_meta.get("progress", {}))
  try:
    state = _train_loop(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh, progress,
                        steps_per_epoch)
    step = int(state.step)
    best = ckpt.best_step()
    params = state.params if best == step else ckpt.restore(best, abstract).params
    results = evaluate_arrays(eval_step, params, data.test, config.train.eval_batch_size, mesh, "test_")
    writer.scalars(step, results)
  finally:  # Also on errors: let an in-flight checkpoint finish rather than abandon it.
    ckpt.close()
    writer.close()
  results.update(
      steps=step, test_checkpoint_step=best, num_train_examples=num_train, skipped_reviews=data.num_skipped,
      **progress.results())
  if config.checkpoint.export_hf and jax.process_index() == 0:
    hf.save_pretrained(module, jax.device_get(params), os.path.join(workdir, "hf_model"))
    tokenizer.hf_tokenizer.save_pretrained(os.path.join(workdir, "hf_model"))
  metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Test (checkpoint of step %d): %s", best, _format(results))
  return results


def _train_loop(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh,
                progress: metrics_lib.Progress, steps_per_epoch: int):
  """Steps from `state.step` to the end, logging every window and checkpointing (with validation)."""
  step, num_train_steps = int(state.step), progress.num_train_steps
  logging.info("Training %d steps (%d per epoch, %d examples, batch %d) from step %d on mesh %s.",
               num_train_steps, steps_per_epoch, len(data.train["labels"]), config.train.batch_size, step,
               dict(mesh.shape))
  window = None
  batch_sharding = partitioning.batch_sharding(mesh)
  for batch in _batches_from(data.train, config, steps_per_epoch, step, num_train_steps):
    state, step_metrics = train_step(state, input_pipeline.shard_batch(batch, batch_sharding))
    step += 1
    window = metrics_lib.add(window, step_metrics)
    if step % config.train.log_every_steps == 0 or step == num_train_steps:
      writer.scalars(step, progress.window(step, window, step_metrics))
      window = None
    validate = step % config.train.eval_every_steps == 0 or step == num_train_steps
    if validate or step % config.checkpoint.every_steps == 0:
      pause_start = time.perf_counter()
      validation = {}
      if validate and len(data.validation["labels"]):
        validation = evaluate_arrays(eval_step, state.params, data.validation, config.train.eval_batch_size,
                                     mesh, "validation_")
        writer.scalars(step, validation)
      progress.exclude(time.perf_counter() - pause_start)
      ckpt.save(step, state, dict(meta, progress=progress.state_dict(step)), metrics=validation or None)
      logging.info("step %d: checkpoint saved. %s", step, _format(validation))
  ckpt.wait()
  return state


def _batches_from(train: dict[str, np.ndarray], config, steps_per_epoch: int, step: int,
                  num_train_steps: int) -> Iterable[dict[str, np.ndarray]]:
  """Train batches from `step` on: the resumed run sees exactly the batches the first run would have."""
  while step < num_train_steps:
    epoch, start = divmod(step, steps_per_epoch)
    for batch in input_pipeline.train_batches(train, batch_size=config.train.batch_size, seed=config.seed,
                                               epoch=epoch, start_batch=start):
      yield batch
      step += 1
      if step == num_train_steps:
        return


def _format(values: dict[str, Any]) -> str:
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
