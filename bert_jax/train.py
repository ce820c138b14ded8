"""The training loop of fine-tuning and pretraining alike: `train_and_evaluate(config, workdir)`.

Owns: compiling the steps (over the mesh with `jax.jit`, or over the devices with `jax.pmap`: see
`config.parallelism`), the loop with its periodic logging, validation and checkpoints, how far it
dispatches ahead of the devices (`MAX_STEPS_AHEAD`), the final evaluation and `results.json`. What
differs between tasks is in `tasks`; steps, data, state, shardings and checkpoints live in their own
modules.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import signal
import threading
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
from bert_jax import batching
from bert_jax import metrics as metrics_lib
from bert_jax import models
from bert_jax import optim
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import steps
from bert_jax import tasks


def _in_mesh(jitted: Callable, mesh) -> Callable:
  """Calls `jitted` with the mesh and the logical rules in scope: tracing (on the first call) then
  applies the model's activation sharding constraints; later calls reuse the compiled step."""
  @functools.wraps(jitted)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
      return jitted(*args, **kwargs)
  return call


def compile_steps(module, tx, schedule, shardings, mesh, grad_accum_steps: int,
                  loss_fn=steps.classification_loss, parallelism: str = "jit"):
  """The train step (state donated) and the jitted eval step over `mesh`.

  'jit': the train step is laid out over `mesh` by `shardings` and takes batches of `shard_batch`.
  'pmap': the same `steps.train_step`, mapped over every device with `axis_name`, so gradients and
  metrics are summed across devices; it takes `partitioning.replicate`d states and `pmap_batch`
  batches, and returns the metrics once (every device holds the same sums). See `layout`.
  """
  step = functools.partial(steps.train_step, model=module, tx=tx, grad_accum_steps=grad_accum_steps,
                           schedule=schedule, loss_fn=loss_fn)
  eval_step, _ = compile_inference_steps(module, mesh, loss_fn)
  if parallelism == "pmap":
    axis = partitioning.PMAP_AXIS
    train_step = jax.pmap(functools.partial(step, axis_name=axis), axis_name=axis, out_axes=(0, None),
                          donate_argnums=0)
    return train_step, eval_step
  batch_sharding = partitioning.batch_sharding(mesh)
  train_step = jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                       donate_argnums=0)
  return _in_mesh(train_step, mesh), eval_step


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the train step of a parallelism takes the state and batches.

  Checkpoints and evaluation always see the global state (arrays laid out by the state shardings),
  so a checkpoint written under one parallelism resumes under the other.
  """
  put_batch: Callable[[dict[str, np.ndarray]], Any]  # the global host batch -> this process's share, placed
  to_step: Callable[[Any], Any]  # a global state -> the train step's state
  to_global: Callable[[Any], Any]  # the train step's state -> a global state


def layout(parallelism: str, mesh, shardings) -> Layout:
  """'jit' holds the global state itself; 'pmap' one copy per device (`mesh` is then data parallel)."""
  if parallelism == "pmap":
    return Layout(batching.pmap_batch, partitioning.replicate,
                  functools.partial(partitioning.unreplicate, shardings=shardings))
  same = lambda state: state  # noqa: E731
  return Layout(functools.partial(batching.shard_batch, sharding=partitioning.batch_sharding(mesh)),
                same, same)


def compile_inference_steps(module, mesh, loss_fn=steps.classification_loss):
  """The jitted eval step (sums of the loss and its metrics) and predict step (class probabilities)."""
  eval_step = jax.jit(functools.partial(steps.eval_step, model=module, loss_fn=loss_fn))
  predict_step = jax.jit(functools.partial(steps.predict_step, model=module))
  return _in_mesh(eval_step, mesh), _in_mesh(predict_step, mesh)


def evaluate_arrays(eval_step, params, arrays: dict[str, np.ndarray], batch_size: int, mesh,
                    prefix: str, length_buckets: tuple[int, ...] = ()) -> dict[str, float]:
  """The loss and its metrics over every example of `arrays` (the last batch padded with weight 0),
  in batches cut to `length_buckets` if given."""
  sums = None
  sharding = partitioning.batch_sharding(mesh)
  in_flight = _InFlight(MAX_STEPS_AHEAD)
  for batch in batching.eval_batches(arrays, batch_size=batch_size, length_buckets=length_buckets):
    sums = metrics_lib.add(sums, eval_step(params, batching.shard_batch(batch, sharding)))
    in_flight.dispatched(sums)
  summary = metrics_lib.summarize(sums, prefix)
  summary[f"num_{prefix}examples"] = int(round(float(sums["count"])))
  return summary


# How many steps the host may dispatch ahead of the devices: a device always has the next step queued,
# so a host pause of up to a step costs nothing (not yet timed on an accelerator). On CPUs the bound
# keeps runs on several devices from hanging. XLA:CPU (jax 0.10.2) launches each device's share of a
# multi-device program from a pool of max(cores, local devices) threads, and a launch that finds its
# device's queue full (32 computations) waits for room on one of those threads. With the host far
# enough ahead, such waits took the threads that the running step's other devices needed, and the
# step's collective never ended: two processes of 4 devices, or one of 8 (tests/test_parallelism.py,
# `_run_processes`; docs/performance.md, "seventeenth").
MAX_STEPS_AHEAD = 2


class _InFlight:
  """Bounds the steps dispatched but not finished: after each dispatch, waits for the outputs of the
  step `limit` dispatches back."""

  def __init__(self, limit: int):
    self.limit = limit
    self._outputs = collections.deque()

  def dispatched(self, outputs: Any) -> None:
    self._outputs.append(outputs)
    if len(self._outputs) > self.limit:
      jax.block_until_ready(self._outputs.popleft())


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """`config.train.num_train_steps`, or (when 0) `num_epochs` worth of steps."""
  if config.train.get("num_train_steps", 0):
    return config.train.num_train_steps
  return max(1, int(round(config.train.num_epochs * steps_per_epoch)))


def resume_settings(config: ml_collections.ConfigDict, task: tasks.Task, num_train_examples: int,
                    total_steps: int) -> dict[str, Any]:
  """Settings a resumed run must share with the run that wrote the checkpoint (data order, schedule)."""
  return {"task": config.get("task", "classify"), "num_train_examples": num_train_examples,
          "batch_size": config.train.batch_size, "seed": config.seed,
          "max_seq_length": config.data.max_seq_length, "num_train_steps": total_steps,
          "learning_rate": config.learning_rate, "warmup_fraction": config.optimizer.warmup_fraction,
          "optimizer": config.optimizer.name,
          # JSON has no tuples: lists compare equal to the meta read back from a checkpoint.
          **{key: list(value) if isinstance(value, tuple) else value
             for key, value in ((key, config.data.get(key)) for key in task.data_settings)}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config.task` ('classify' or 'pretrain'), resuming from the workdir's latest checkpoint if
  there is one, then scores the best checkpoint; returns the results (also in WORKDIR/results.json)."""
  task = tasks.get(config)
  parallelism = config.get("parallelism", "jit")
  mesh = partitioning.make_mesh(config.mesh_shape)  # pmap: data parallel (config_checks.check saw to it)
  config_checks.check_batch_layout(config, partitioning.data_parallel_size(mesh), parallelism)
  tokenizer = state_lib.make_tokenizer(config)
  module_config = state_lib.model_config(config, tokenizer)
  module_config.check_trainable()
  config_checks.check_model_fits(config, module_config, dict(mesh.shape))
  config_checks.check_tokenizer_fits(tokenizer, module_config, exact=task.model_cls is models.BertForPreTraining)
  module = task.model_cls(module_config)
  logging.info("Kernels: %s.", models.describe_kernels(module_config))
  ckpt = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                                   best_metric=task.best_metric)
  latest = ckpt.latest_step()
  saved_meta = ckpt.read_meta(latest) if latest is not None else {}
  if saved_meta:  # Refuse a workdir of another model before spending time on data.
    state_lib.check_resumable(saved_meta, module, ckpt.directory)
  metrics_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  if jax.process_index() == 0:  # the primary process writes the workdir's files; Orbax, all of them
    tokenizer.hf_tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))  # evaluate/predict read it

  data = task.build_data(config, tokenizer, config.data.cache_dir or os.path.join(workdir, "cache"))
  steps_per_epoch = batching.num_train_batches(data.num_train_examples, config.train.batch_size)
  if steps_per_epoch == 0:
    raise ValueError(f"{data.num_train_examples} training examples make no batch of config.train.batch_size="
                     f"{config.train.batch_size}; lower the batch size or use more data.")
  total_steps = num_train_steps(config, steps_per_epoch)
  tx, schedule = optim.make_optimizer(config.optimizer, config.learning_rate, total_steps)
  abstract, shardings = state_lib.state_template(module, tx, config.seed, mesh)

  settings = resume_settings(config, task, data.num_train_examples, total_steps)
  if saved_meta:
    state_lib.check_resumable(saved_meta, module, ckpt.directory, **settings)
  restored = ckpt.restore_latest(abstract)  # skips damaged steps (logged); raises if none is intact
  if restored:
    saved_meta = restored.meta  # an older step's, if the latest was damaged
    state_lib.check_resumable(saved_meta, module, ckpt.directory, **settings)
    state = restored.state
    logging.info("Resuming from the checkpoint at step %d of %s.", restored.step, ckpt.directory)
  else:
    saved_meta = {}
    state = state_lib.initial_state(config, module, tx, shardings, mesh)
  meta = state_lib.checkpoint_meta(module, **settings)

  train_step, eval_step = compile_steps(module, tx, schedule, shardings, mesh, config.train.grad_accum_steps,
                                        task.loss_fn, parallelism)
  writer = metrics_lib.Writer(os.path.join(workdir, "tensorboard"))
  progress = metrics_lib.Progress(total_steps, config.train.batch_size, int(state.step),
                                  **saved_meta.get("progress", {}))
  try:
    state = _train_loop(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh, progress,
                        steps_per_epoch, layout(parallelism, mesh, shardings))
    step = int(state.step)
    best, params = ckpt.best_step(), state.params
    if best != step:
      restored_best = ckpt.restore_best(abstract)  # falls back to the next best if damaged
      best, params = restored_best.step, restored_best.state.params
    results = evaluate_arrays(eval_step, params, data.final, config.train.eval_batch_size, mesh,
                              data.final_prefix, data.length_buckets)
    writer.scalars(step, {f"final_{name}": value for name, value in results.items()})
  finally:  # Also on errors: let an in-flight checkpoint finish rather than abandon it.
    ckpt.close()
    writer.close()
  results.update(steps=step, checkpoint_step=best, num_train_examples=data.num_train_examples,
                 **data.info, **progress.results())
  if config.checkpoint.export_hf:
    host_params = partitioning.to_host(params)  # every process: params sharded over hosts are gathered
    if jax.process_index() == 0:
      hf.save_pretrained(module, host_params, os.path.join(workdir, "hf_model"))
      tokenizer.hf_tokenizer.save_pretrained(os.path.join(workdir, "hf_model"))
  metrics_lib.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Final evaluation (checkpoint of step %d): %s", best, _format(results))
  return results


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint of the current step; rerun to resume."""


class Diverged(Exception):
  """A step's loss or gradient was NaN or Inf and config.train.on_nonfinite is 'stop'."""


class _NonFiniteGuard:
  """Collects each step's NaN/Inf flag without a host sync per step; `check` reads them (before logs
  and saves). The step itself already left the state unchanged; here the run stops or goes on."""

  def __init__(self, action: str, progress: metrics_lib.Progress, ckpt: checkpointing.Checkpoints):
    self.action, self.progress, self.ckpt = action, progress, ckpt
    self._pending = []

  def add(self, step: int, flag: jax.Array) -> None:
    self._pending.append((step, flag))

  def check(self) -> None:
    flags = jax.device_get([flag for _, flag in self._pending])
    bad = [step for (step, _), flag in zip(self._pending, flags) if flag]
    self._pending = []
    if not bad:
      return
    if self.action == "stop":
      latest = self.ckpt.latest_step()
      raise Diverged(
          f"The loss or gradient of step {bad[0]} is NaN or Inf{f' (and of steps {bad[1:]})' if bad[1:] else ''}: "
          "training stopped. Those updates were not applied; "
          f"{f'the last checkpoint (step {latest}) is untouched' if latest is not None else 'no checkpoint was written'}. Lower the learning rate or raise optimizer.warmup_fraction, check the data, or set "
          "--config.train.on_nonfinite=skip to skip such steps.")
    self.progress.nonfinite_steps += len(bad)
    logging.warning("Skipped the update of non-finite step(s) %s (config.train.on_nonfinite=skip).", bad)


class _PreemptionNotice:
  """Notes SIGTERM, which TPU VM and cloud preemption send, for the loop to act on between steps.

  The handler only sets a flag: a save inside it could run mid-step, with the state donated.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then stopping.")

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals are only for the main thread
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _train_loop(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh,
                progress: metrics_lib.Progress, steps_per_epoch: int, placement: Layout):
  """Steps from `state.step` to the end, logging every window and checkpointing (with validation).

  Takes and returns a global state; in between, the state is laid out as `placement` says."""
  with _PreemptionNotice() as preemption:
    return _steps(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh, progress,
                  steps_per_epoch, placement, preemption)


def _steps(config, state, data, train_step, eval_step, ckpt, writer, meta, mesh, progress, steps_per_epoch,
           placement: Layout, preemption: _PreemptionNotice):
  step, num_train_steps = int(state.step), progress.num_train_steps
  logging.info("Training %d steps (%d per epoch, %d examples, batch %d) from step %d with %s on mesh %s.",
               num_train_steps, steps_per_epoch, data.num_train_examples, config.train.batch_size, step,
               config.get("parallelism", "jit"), dict(mesh.shape))
  window = None
  state = placement.to_step(state)
  nonfinite = _NonFiniteGuard(config.train.on_nonfinite, progress, ckpt)
  in_flight = _InFlight(MAX_STEPS_AHEAD)
  for batch in _batches_from(data.batches, steps_per_epoch, step, num_train_steps):
    state, step_metrics = train_step(state, placement.put_batch(batch))
    step += 1
    nonfinite.add(step, step_metrics["nonfinite"])
    window = metrics_lib.add(window, step_metrics)
    in_flight.dispatched(window)
    if step % config.train.log_every_steps == 0 or step == num_train_steps:
      nonfinite.check()
      writer.scalars(step, progress.window(step, window, step_metrics))
      window = None
    validate = step % config.train.eval_every_steps == 0 or step == num_train_steps
    if validate or step % config.checkpoint.every_steps == 0 or preemption.requested:
      nonfinite.check()  # a diverged run keeps its last good checkpoint
    if validate or step % config.checkpoint.every_steps == 0:
      pause_start = time.perf_counter()
      snapshot = placement.to_global(state)
      validation = {}
      if validate and batching.num_rows(data.validation):
        validation = evaluate_arrays(eval_step, snapshot.params, data.validation, config.train.eval_batch_size,
                                     mesh, "validation_", data.length_buckets)
        writer.scalars(step, validation)
      progress.exclude(time.perf_counter() - pause_start)
      if ckpt.save(step, snapshot, dict(meta, progress=progress.state_dict(step)), metrics=validation or None):
        logging.info("step %d: checkpoint saved. %s", step, _format(validation))
    if preemption.requested:  # durable before exit
      ckpt.save_now(step, placement.to_global(state), dict(meta, progress=progress.state_dict(step)))
      raise Preempted(f"Stopped on SIGTERM at step {step} of {num_train_steps}; the checkpoint of step {step} "
                      f"is saved in {ckpt.directory}. Rerun the same command to resume.")
  ckpt.wait()
  return placement.to_global(state)


def _batches_from(batches: tasks.Batches, steps_per_epoch: int, step: int,
                  num_train_steps: int) -> Iterable[dict[str, np.ndarray]]:
  """Train batches from `step` on: the resumed run sees exactly the batches the first run would have."""
  while step < num_train_steps:
    epoch, start = divmod(step, steps_per_epoch)
    for batch in batches(epoch, start):
      yield batch
      step += 1
      if step == num_train_steps:
        return


def _format(values: dict[str, Any]) -> str:
  return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
