"""Step-time benchmark: `python -m bert_jax.benchmark --config=configs/benchmark.py:minilm_cpu`.

Times compiled train and eval steps after warm-up and prints one JSON line per case, with model
FLOP/s and MFU against the device's peak; optionally times transformers' PyTorch BERT on the same
work in the same process (`--config.compare_torch=True`), their samples taken in turns, and prints the
ratio of the medians and the quartiles of the ratios of paired samples.

FLOPs use one stated formula (matmuls only; layer norms, softmax and the optimizer are left out):
  forward per sequence = 2*T*L*(4*d^2 + 2*d*I)   (projections and feed-forward, T tokens)
                       + 4*L*T^2*d               (attention scores and weighted values)
                       + 2*P*(d^2 + d*V)         (MLM head on P predicted positions; pretraining)
  train = 3 x forward (backward is twice the forward); eval = forward.
With `prune_last_layer` (unrolled layers) the FLOPs counted are those computed: the last layer's
projections of keys and values cover all T tokens, its queries, attention output projection and
feed-forward only the R rows the heads read (R = 1 + P: [CLS] and the predicted positions), so
its 2*T*(4*d^2 + 2*d*I) + 4*T^2*d become 4*T*d^2 + 2*R*(2*d^2 + 2*d*I) + 4*R*T*d. MFU is then the
hardware's use on the work done; examples/s shows what pruning saves.

The model's speed switches come from `config.model` like every other BertConfig field
(`--config.model.attention_impl=dot_product`, `layer_norm_impl`, `feed_forward_impl`, `remat_policy`, `scan_layers`,
`stack_layers`, `prune_last_layer`; `--config.dtype`).
The case `compile_depth` times tracing and compiling the train step (no step is run) at each depth
of `config.compile_depths`, with the layers unrolled and scanned: one JSON line per model.
The case `length_buckets` prices one fine-tuning epoch over real IMDB review lengths, every batch
padded to `seq_len` vs cut to `config.length_buckets`: the train step is timed at each batch width
the epoch uses (on real batches), and the epoch costs the sum over its batches (compile time, once
per width, is reported beside it).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from bert_jax import hf
from bert_jax import batching
from bert_jax import device_peaks
from bert_jax import host_memory
from bert_jax import input_pipeline
from bert_jax import models
from bert_jax import optim
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import steps
from bert_jax import train

config_flags.DEFINE_config_file("config", None, "Benchmark config, e.g. configs/benchmark.py:minilm_cpu.",
                                lock_config=True)
flags.mark_flags_as_required(["config"])

CASES = ("train", "eval", "pretrain_train", "compile_depth", "length_buckets")


def forward_flops(config: models.BertConfig, seq_len: int, num_predictions: int = 0) -> float:
  """Matmul FLOPs of one sequence's forward pass (see the module docstring)."""
  d, L, I, V, T = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size,
                   seq_len)
  head = 2 * num_predictions * (d * d + d * V)
  if not config.prunes_last_layer:
    return 2 * T * L * (4 * d * d + 2 * d * I) + 4 * L * T * T * d + head
  R = 1 + num_predictions
  last = 4 * T * d * d + 2 * R * (2 * d * d + 2 * d * I) + 4 * R * T * d
  return 2 * T * (L - 1) * (4 * d * d + 2 * d * I) + 4 * (L - 1) * T * T * d + last + head


def _interleaved_step_seconds(runners: Sequence[tuple[Callable[[], Any], Callable[[Any], Any]]], num_steps: int,
                              num_warmup: int, steps_per_sample: int = 1) -> list[tuple[float, list[float]]]:
  """Per `(step, wait)` runner: (compile + first step seconds, seconds per step of each of `num_steps` samples).

  `step()` dispatches one step and returns what `wait` blocks on. A sample dispatches `steps_per_sample`
  steps back to back and waits once, as the training loop does (it syncs only to log): the host's
  dispatch of a step then overlaps the device's work on the one before, as in training (except on a
  CPU with `config.cpu_reuse_buffers`, where a one-device step runs on the calling thread). After each
  runner's warm-up, the runners take turns sample by sample, in alternating order (A B, B A, ...): a
  drift in the machine's speed (other tenants, clocks) then falls on all of them alike, and the i-th
  samples of two runners make a pair.
  """
  def per_step(step, wait, count: int) -> float:
    start = time.perf_counter()
    wait([step() for _ in range(count)])  # all of them: eval steps do not depend on each other
    return (time.perf_counter() - start) / count

  firsts = []
  for step, wait in runners:
    firsts.append(per_step(step, wait, 1))
    for _ in range(max(num_warmup - 1, 0)):
      wait(step())
  samples = [[] for _ in runners]
  for index in range(num_steps):
    order = range(len(runners)) if index % 2 == 0 else reversed(range(len(runners)))
    for i in order:
      samples[i].append(per_step(*runners[i], steps_per_sample))
  return list(zip(firsts, samples))


def _median_step_seconds(step: Callable[[], Any], wait: Callable[[Any], Any], num_steps: int, num_warmup: int,
                         steps_per_sample: int = 1) -> tuple[float, float]:
  """(compile + first step seconds, median seconds per step over `num_steps` samples after warm-up)."""
  ((first, samples),) = _interleaved_step_seconds([(step, wait)], num_steps, num_warmup, steps_per_sample)
  return first, statistics.median(samples)


def _batch(config: models.BertConfig, batch_size: int, seq_len: int, num_predictions: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  # Word ids past BERT's [PAD]/[unused]/special block (the first 1000 of its vocab); a small test vocab from 1.
  first_word = 1000 if config.vocab_size > 2000 else 1
  input_ids = rng.integers(first_word, config.vocab_size, size=(batch_size, seq_len), dtype=np.int32)
  batch = {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids),
           "attention_mask": np.ones_like(input_ids), "labels": rng.integers(0, 2, batch_size, dtype=np.int32),
           "weights": np.ones(batch_size, np.float32)}
  if num_predictions:
    batch.update(
        masked_lm_positions=np.sort(rng.choice(seq_len, (batch_size, num_predictions)), axis=1).astype(np.int32),
        masked_lm_ids=rng.integers(first_word, config.vocab_size, (batch_size, num_predictions), dtype=np.int32),
        masked_lm_weights=np.ones((batch_size, num_predictions), np.float32),
        next_sentence_label=rng.integers(0, 2, batch_size, dtype=np.int32))
  return batch


def _peak_memory_bytes(device: jax.Device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("peak_bytes_in_use")


def timed_optimizer(bench: ml_collections.ConfigDict):
  """(tx, schedule) of every timed train step: `bench.optimizer` at learning rate 1e-4 over 1,000 updates
  (neither changes a step's time)."""
  return optim.make_optimizer(bench.optimizer, 1e-4, num_train_steps=1000)


def abstract_train_step(module: nn.Module, bench: ml_collections.ConfigDict, mesh,
                        loss_fn=steps.classification_loss):
  """(the train step as `train.compile_steps` jits it, outside its mesh wrapper, and its state's abstract
  shapes), to compile ahead of time: lower it with the mesh and `partitioning.RULES` in scope."""
  tx, schedule = timed_optimizer(bench)
  abstract, shardings = state_lib.state_template(module, tx, 0, mesh)
  train_step, _ = train.compile_steps(module, tx, schedule, shardings, mesh, grad_accum_steps=1, loss_fn=loss_fn)
  return train_step.__wrapped__, abstract


def abstract_batch(model_config: models.BertConfig, bench: ml_collections.ConfigDict, mesh,
                   num_predictions: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of a `_batch` split over `mesh` as real batches are, to compile ahead of time."""
  batch_sharding = partitioning.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in _batch(model_config, bench.batch_size, bench.seq_len, num_predictions).items()}


def train_step_runner(module: nn.Module, bench: ml_collections.ConfigDict, mesh,
                      loss_fn=steps.classification_loss) -> Callable[[dict[str, jax.Array]], Any]:
  """A function that dispatches one train step (AdamW, state donated) of `module` on a placed batch and
  returns its metrics without waiting (`jax.block_until_ready` them); the first call on each batch
  shape compiles."""
  tx, schedule = timed_optimizer(bench)
  _, shardings = state_lib.state_template(module, tx, 0, mesh)
  holder = [jax.device_put(steps.create_state(hf.init_params(module), tx, 0), shardings)]
  train_step, _ = train.compile_steps(module, tx, schedule, shardings, mesh, grad_accum_steps=1, loss_fn=loss_fn)

  def run_step(batch):
    holder[0], metrics = train_step(holder[0], batch)
    return metrics

  return run_step


def case_model(case: str, model_config: models.BertConfig):
  """The module and loss of a `train`, `eval` or `pretrain_train` case."""
  if case == "pretrain_train":
    return models.BertForPreTraining(model_config), steps.pretraining_loss
  return models.BertForSequenceClassification(model_config), steps.classification_loss


def case_inputs(case: str, bench: ml_collections.ConfigDict, model_config: models.BertConfig, mesh):
  """The module, loss and placed random batch of a `train`, `eval` or `pretrain_train` case."""
  num_predictions = bench.num_predictions if case == "pretrain_train" else 0
  batch = _batch(model_config, bench.batch_size, bench.seq_len, num_predictions)
  batch = {k: jax.device_put(v, partitioning.batch_sharding(mesh)) for k, v in batch.items()}
  return (*case_model(case, model_config), batch)


def sample_reviews(reviews: input_pipeline.ImdbSplit, num_reviews: int) -> np.ndarray:
  """Indices of the length_buckets case's reviews: a seeded sample, in the split's order."""
  count = min(num_reviews, len(reviews.texts))
  return np.sort(np.random.default_rng(0).choice(len(reviews.texts), count, replace=False))


def jax_case_step(case: str, bench: ml_collections.ConfigDict, model_config: models.BertConfig,
                  mesh) -> tuple[Callable[[], Any], float]:
  """One case's (`train`, `eval` or `pretrain_train`) step of bert_jax, which dispatches without
  waiting, and its model FLOPs per sequence."""
  module, loss_fn, batch = case_inputs(case, bench, model_config, mesh)
  num_predictions = bench.num_predictions if case == "pretrain_train" else 0
  if case == "eval":
    eval_step, _ = train.compile_inference_steps(module, mesh)
    params = hf.init_params(module)
    step = lambda: eval_step(params, batch)  # noqa: E731
  else:
    run_step = train_step_runner(module, bench, mesh, loss_fn)
    step = lambda: run_step(batch)  # noqa: E731
  return step, forward_flops(model_config, bench.seq_len, num_predictions) * (1 if case == "eval" else 3)


def time_case(case: str, bench: ml_collections.ConfigDict, model_config: models.BertConfig,
              mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """(bert_jax's figures, PyTorch's) for one case; PyTorch's only with `bench.compare_torch` on a
  classification case (else {}). Both are timed in turns (`_interleaved_step_seconds`)."""
  step, flops = jax_case_step(case, bench, model_config, mesh)
  runners = [(step, jax.block_until_ready)]
  compare = bench.compare_torch and case in ("train", "eval")
  if compare:
    torch_step, torch_wait, torch_info = torch_case_step(case, bench, model_config)
    runners.append((torch_step, torch_wait))
  timings = _interleaved_step_seconds(runners, bench.num_steps, bench.num_warmup_steps, bench.steps_per_sample)
  (compile_seconds, ours) = timings[0]
  figures = _figures(case, bench, statistics.median(ours), flops, compile_seconds)
  if not compare:
    return figures, {}
  theirs = timings[1][1]
  torch_seconds = statistics.median(theirs)
  torch_rate = bench.batch_size / torch_seconds
  torch_figures = {"torch_step_seconds": torch_seconds, "torch_examples_per_second": torch_rate, **torch_info,
                   "ratio": figures["examples_per_second"] / torch_rate,
                   "paired_ratio_quartiles": paired_ratio_quartiles(ours, theirs)}
  return figures, torch_figures


def paired_ratio_quartiles(ours: Sequence[float], theirs: Sequence[float]) -> list[float] | None:
  """Quartiles of `theirs[i] / ours[i]` (seconds of samples taken next to each other: our speed over
  theirs, pair by pair), or None under 4 pairs: how far the ratio moves with the machine."""
  if len(ours) < 4:
    return None
  return statistics.quantiles([their / our for our, their in zip(ours, theirs)], n=4, method="inclusive")


def _figures(case, bench, step_seconds: float, flops_per_sequence: float, compile_seconds: float):
  device = jax.devices()[0]
  tflops = flops_per_sequence * bench.batch_size / step_seconds / 1e12
  peak = device_peaks.peak_tflops(device, bench.dtype)
  return {
      "case": case, "step_seconds": step_seconds, "examples_per_second": bench.batch_size / step_seconds,
      "tokens_per_second": bench.batch_size * bench.seq_len / step_seconds, "model_tflops_per_second": tflops,
      "peak_tflops": peak, "mfu": tflops / (peak * jax.device_count()) if peak else None,
      "compile_seconds": compile_seconds, "peak_memory_bytes": _peak_memory_bytes(device),
      "batch_size": bench.batch_size, "seq_len": bench.seq_len, "dtype": bench.dtype,
      "steps_per_sample": bench.steps_per_sample, "device": f"{jax.device_count()} x {device.device_kind}",
  }


def model_fields(config: models.BertConfig) -> dict:
  """The model's size and speed switches for a JSON row, with the kernels that ran ('auto' decided)."""
  fields = {name: getattr(config, name) for name in (
      "hidden_size", "num_hidden_layers", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
      "feed_forward_impl", "remat_policy", "scan_layers", "stack_layers", "prune_last_layer")}
  return fields | {"attention_impl": models.resolve_attention_impl(config),
                   "layer_norm_impl": models.resolve_layer_norm_impl(config)}


def time_compile_depth(bench: ml_collections.ConfigDict, model_config: models.BertConfig, mesh) -> list[dict]:
  """Seconds to trace and to compile the classification train step, per depth, unrolled and scanned."""
  rows = []
  batch = abstract_batch(model_config, bench, mesh)
  for depth in bench.compile_depths:
    for scan_layers in (False, True):
      config = model_config.replace(num_hidden_layers=depth, scan_layers=scan_layers,
                                    stack_layers=model_config.stack_layers and not scan_layers)
      train_step, abstract = abstract_train_step(models.BertForSequenceClassification(config), bench, mesh)
      with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
        start = time.perf_counter()
        lowered = train_step.lower(abstract, batch)
        traced = time.perf_counter()
        lowered.compile()
        compiled = time.perf_counter()
      rows.append({
          "case": "compile_depth", **model_fields(config), "trace_seconds": traced - start,
          "compile_seconds": compiled - traced,
          "batch_size": bench.batch_size, "seq_len": bench.seq_len, "dtype": bench.dtype,
          "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      })
  return rows


def time_length_buckets(bench: ml_collections.ConfigDict, model_config: models.BertConfig, mesh) -> dict:
  """One epoch of `bench.num_reviews` IMDB train reviews (a seeded sample, batch `bench.batch_size`):
  seconds with every batch padded to `seq_len` vs cut to `bench.length_buckets` (see module docstring)."""
  reviews = input_pipeline.load_imdb_split(bench.data_dir or None, "train")
  sample = sample_reviews(reviews, bench.num_reviews)
  arrays = state_lib.make_tokenizer(bench).encode([reviews.texts[i] for i in sample], max_seq_length=bench.seq_len)
  arrays["labels"] = reviews.labels[sample]
  plans = {name: list(batching.train_batches(arrays, batch_size=bench.batch_size, seed=0, epoch=0,
                                                   length_buckets=buckets))
           for name, buckets in (("padded", ()), ("bucketed", tuple(bench.length_buckets)))}
  run_step = train_step_runner(models.BertForSequenceClassification(model_config), bench, mesh)
  step_seconds, compile_seconds = {}, {}
  for batch in plans["padded"][:1] + plans["bucketed"]:  # a real batch of each width
    width = batch["input_ids"].shape[1]
    if width in step_seconds:
      continue
    placed = batching.shard_batch(batch, partitioning.batch_sharding(mesh))
    compile_seconds[width], step_seconds[width] = _median_step_seconds(
        lambda: run_step(placed), jax.block_until_ready, bench.num_steps, bench.num_warmup_steps,  # noqa: B023
        bench.steps_per_sample)  # (run at once)
  row = {"case": "length_buckets", "length_buckets": list(bench.length_buckets), "num_reviews": len(sample),
         "num_batches": len(plans["padded"])}
  for name, batches in plans.items():
    widths = [b["input_ids"].shape[1] for b in batches]
    seconds = sum(step_seconds[w] for w in widths)
    row[f"{name}_epoch_seconds"] = seconds
    # Compiling is once per width and run; a short run pays it in full.
    row[f"{name}_compile_seconds"] = sum(compile_seconds[w] for w in set(widths))
    row[f"{name}_examples_per_second"] = len(batches) * bench.batch_size / seconds
    row[f"{name}_real_token_fraction"] = (sum(int(b["attention_mask"].sum()) for b in batches)
                                          / sum(b["input_ids"].size for b in batches))
    row[f"{name}_batches_by_length"] = {str(w): widths.count(w) for w in sorted(set(widths))}
  row.update(speedup=row["padded_epoch_seconds"] / row["bucketed_epoch_seconds"],
             step_seconds_by_length={str(w): s for w, s in sorted(step_seconds.items())},
             batch_size=bench.batch_size, seq_len=bench.seq_len, dtype=bench.dtype,
             device=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  return row


def torch_case_step(case: str, bench: ml_collections.ConfigDict,
                    model_config: models.BertConfig) -> tuple[Callable[[], Any], Callable[[Any], Any], dict]:
  """transformers' PyTorch `BertForSequenceClassification` on the same work (AdamW train step, or eval):
  (step, wait, what it ran on).

  On the device JAX runs on when that is a GPU (else the CPU), under bf16 autocast when `bench.dtype`
  is bfloat16 (float32 parameters and optimizer state, as ours)."""
  import torch
  import transformers
  torch.manual_seed(0)
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bench.dtype == "bfloat16")  # noqa: E731
  hf_config = transformers.BertConfig(**model_config.to_hf_dict())
  model = transformers.BertForSequenceClassification(hf_config).to(device)
  batch = _batch(model_config, bench.batch_size, bench.seq_len, 0)
  inputs = {k: torch.from_numpy(batch[k]).long().to(device)
            for k in ("input_ids", "token_type_ids", "attention_mask")}
  labels = torch.from_numpy(batch["labels"]).long().to(device)
  if case == "eval":
    model.eval()

    def step():
      with torch.no_grad(), autocast():
        model(**inputs)
  else:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
      with autocast():
        loss = model(**inputs, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)

  return step, lambda _: synchronize(), {"torch_threads": torch.get_num_threads(), "torch_device": device,
                                         "torch_attention": model.config._attn_implementation}


def run(config: ml_collections.ConfigDict, emit: Callable[[str], None] = print,
        cpu_buffers_reused: bool = False) -> list[dict]:
  """Times `config.cases`, emitting one JSON line per case; `cpu_buffers_reused`: whether `main` kept
  XLA:CPU's step buffers in the heap (`host_memory`), reported with each line."""
  unknown = sorted(set(config.cases) - set(CASES))
  if unknown:
    raise ValueError(f"config.cases has unknown case(s) {unknown}; use any of {CASES}.")
  if config.steps_per_sample < 1:
    raise ValueError(f"config.steps_per_sample={config.steps_per_sample}: give 1 (wait after every step) or more.")
  model_config = state_lib.model_config(config)  # config.model.dtype refers to config.dtype
  if set(config.cases) - {"eval"}:
    model_config.check_trainable()  # before any compile: e.g. dot_product attention with attention dropout
  mesh = partitioning.make_mesh(config.mesh_shape)
  # What else sets the step's speed from outside the config: the PRNG behind dropout, XLA's flags, the
  # host allocator's setting, the processor (a cloud VM's can change between runs). Read once.
  environment = dict(prng_impl=jax.config.jax_default_prng_impl, xla_flags=os.environ.get("XLA_FLAGS", ""),
                     cpu_buffers_reused=cpu_buffers_reused, host_cpu=device_peaks.host_cpu())
  rows = []
  for case in config.cases:
    if case == "compile_depth":
      for row in time_compile_depth(config, model_config, mesh):
        emit(json.dumps(row))
        rows.append(row)
      continue
    if case == "length_buckets":
      rows.append(time_length_buckets(config, model_config, mesh))
      emit(json.dumps(rows[-1]))
      continue
    row, torch_row = time_case(case, config, model_config, mesh)
    row.update(model_fields(model_config))
    row.update(environment)
    row.update(torch_row)
    emit(json.dumps(row))
    rows.append(row)
  return rows


def main(argv):
  del argv
  config = flags.FLAGS.config
  partitioning.add_xla_flags(config.get("xla_flags", ""))  # before JAX starts a backend
  dispatched = host_memory.dispatch_on_caller(config.get("cpu_reuse_buffers", False))  # likewise
  run(config, cpu_buffers_reused=host_memory.keep_heap(dispatched))


if __name__ == "__main__":
  app.run(main)
