"""Scoring and inference with a trained workdir: `--config.mode=evaluate` and `--config.mode=predict`.

Both read the model from `WORKDIR/checkpoints` and the vocab from `WORKDIR/tokenizer`, so the
workdir alone is enough; `config.data.data_dir` names the data to score.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import jax
import ml_collections
import numpy as np
from absl import logging

from bert_jax import batching
from bert_jax import input_pipeline
from bert_jax import metrics as metrics_lib
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import tokenization
from bert_jax import train

LABELS = input_pipeline.CLASSES  # ("neg", "pos")


def _restore(config: ml_collections.ConfigDict, workdir: str):
  mesh = partitioning.make_mesh(config.mesh_shape)
  module, params, meta, step = state_lib.restore_params(config, workdir, config.evaluate.checkpoint, mesh)
  tokenizer = tokenization.Tokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
  # Score texts as the model was trained on them, whatever the config now says.
  max_seq_length = meta.get("max_seq_length", config.data.max_seq_length)
  return mesh, module, params, step, tokenizer, max_seq_length


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Scores the test split of `config.data.data_dir`; writes `WORKDIR/evaluate_results.json`."""
  mesh, module, params, step, tokenizer, max_seq_length = _restore(config, workdir)
  data = input_pipeline.build_imdb_test_only(config.data, tokenizer, max_seq_length=max_seq_length,
                                             cache_dir=config.data.cache_dir or os.path.join(workdir, "cache"))
  eval_step, _ = train.compile_inference_steps(module, mesh)
  results = train.evaluate_arrays(eval_step, params, data.test, config.train.eval_batch_size, mesh, "test_",
                                  tuple(config.data.get("length_buckets", ())))
  results.update(checkpoint_step=step, data_dir=config.data.data_dir or "tfds:imdb_reviews",
                 skipped_reviews=data.num_skipped)
  metrics_lib.write_json(os.path.join(workdir, "evaluate_results.json"), results)
  logging.info("Evaluated the checkpoint of step %d: %s", step, results)
  return results


def predict(config: ml_collections.ConfigDict, workdir: str, out: TextIO = sys.stdout) -> None:
  """Classifies one text per line of `config.predict.input_file` (or stdin): `label<TAB>probability`."""
  mesh, module, params, _, tokenizer, max_seq_length = _restore(config, workdir)
  if config.predict.input_file:
    with open(config.predict.input_file, encoding="utf-8") as f:
      texts = f.read().splitlines()
  else:
    texts = sys.stdin.read().splitlines()
  if not texts:
    raise ValueError("No texts to classify: give one per line in --config.predict.input_file or on stdin.")
  arrays = tokenizer.encode(texts, max_seq_length=max_seq_length)
  arrays["labels"] = np.zeros(len(texts), np.int32)
  _, predict_step = train.compile_inference_steps(module, mesh)
  sharding = partitioning.batch_sharding(mesh)
  probabilities = []
  for batch in batching.eval_batches(arrays, batch_size=config.predict.batch_size):
    # A collective with several processes: each holds only its rows of the batch's predictions.
    probs = np.asarray(partitioning.to_host(predict_step(params, batching.shard_batch(batch, sharding))))
    probabilities.append(probs[batch["weights"] > 0])
  if jax.process_index() != 0:  # every process computed them; one prints
    return
  for probs in np.concatenate(probabilities):
    label = int(np.argmax(probs))
    out.write(f"{LABELS[label]}\t{probs[label]:.4f}\n")
  out.flush()
