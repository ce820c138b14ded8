"""Where a train step's device time goes: GPU kernels of a few traced steps, summed by name.

Run on a GPU machine from the repo root, with the benchmark's config flags:
  python -m scripts.profile_gpu --config=configs/benchmark.py:base_gpu \
      --config.model.attention_impl=cudnn --config.model.attention_probs_dropout_prob=0
Prints the busiest kernels (total ms per step and share of kernel time) for the classification
train step (or the pretraining one with --case=pretrain_train) and the step's wall time; with
--xplane_dir, also copies the raw trace (.xplane.pb) there.
"""

import collections
import glob
import os
import shutil
import tempfile

import jax
from absl import app
from absl import flags

from bert_jax import benchmark
from bert_jax import partitioning
from bert_jax import state as state_lib

# --config is bert_jax.benchmark's flag (a benchmark config file).
flags.DEFINE_enum("case", "train", ["train", "pretrain_train"], "Which train step to trace.")
flags.DEFINE_integer("traced_steps", 5, "Steps inside the trace.")
flags.DEFINE_integer("top", 25, "Kernels to print.")
flags.DEFINE_string("xplane_dir", "", "Where to copy the raw trace; '' keeps none.")


def main(argv):
  del argv
  config, case = flags.FLAGS.config, flags.FLAGS.case
  partitioning.add_xla_flags(config.get("xla_flags", ""))  # as the benchmark does, before JAX starts a backend
  model_config = state_lib.model_config(config)
  mesh = partitioning.make_mesh(config.mesh_shape)
  module, loss_fn, batch = benchmark.case_inputs(case, config, model_config, mesh)
  run_step = benchmark.train_step_runner(module, config, mesh, loss_fn)
  # Median of 5 steps after 3 warm-up steps, each waited for: the host's dispatch gap is in the figure.
  _, wall_seconds = benchmark._median_step_seconds(lambda: run_step(batch), jax.block_until_ready, num_steps=5,
                                                   num_warmup=3)
  trace_dir = tempfile.mkdtemp()
  jax.profiler.start_trace(trace_dir)
  for _ in range(flags.FLAGS.traced_steps):
    metrics = run_step(batch)
  jax.block_until_ready(metrics)
  jax.profiler.stop_trace()
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if flags.FLAGS.xplane_dir:
    os.makedirs(flags.FLAGS.xplane_dir, exist_ok=True)
    shutil.copy(path, os.path.join(flags.FLAGS.xplane_dir, f"{case}_{model_config.attention_impl}_{model_config.layer_norm_impl}.xplane.pb"))
  kernels = collections.Counter()
  counts = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    print(f"{plane.name}: lines {[line.name for line in plane.lines]}")
    for line in plane.lines:
      if "stream" not in line.name.lower():  # kernel timelines, not the XLA op or module summaries
        continue
      for event in line.events:
        kernels[event.name] += event.duration_ns
        counts[event.name] += 1
  steps_traced = flags.FLAGS.traced_steps
  total_ms = sum(kernels.values()) / 1e6 / steps_traced
  print(f"{case} {model_config.attention_impl} add&norm={model_config.layer_norm_impl} {model_config.dtype} batch {config.batch_size} seq "
        f"{config.seq_len}: wall {wall_seconds * 1e3:.2f} ms/step, kernels {total_ms:.2f} ms/step, "
        f"{sum(counts.values()) // steps_traced} launches/step")
  for name, ns in kernels.most_common(flags.FLAGS.top):
    print(f"  {ns / 1e6 / steps_traced:8.3f} ms {ns / sum(kernels.values()):6.1%} x{counts[name] // steps_traced:<4} "
          f"{name[:110]}")


if __name__ == "__main__":
  app.run(main)
