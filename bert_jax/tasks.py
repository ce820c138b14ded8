"""What differs between the two training tasks: classification (IMDB) and pretraining (MLM + NSP).

Owns: per task (`config.task`), the model class, the loss, the metric that picks the best checkpoint,
the data a run trains and evaluates on, and the data settings a resumed run must share. The loop
in `train` is the same for both; steps, data reading and masking live in their own modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from bert_jax import batching
from bert_jax import input_pipeline
from bert_jax import masking
from bert_jax import models
from bert_jax import pretraining_data
from bert_jax import steps
from bert_jax import tokenization

Batches = Callable[[int, int], Iterator[dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The arrays of one run.

  `batches(epoch, start_batch)` yields that epoch's shuffled train batches from `start_batch` on
  (masked, for pretraining); it depends only on the config, so a resumed run sees the same batches.
  `final` is scored with the best checkpoint at the end, its metrics named `{final_prefix}loss`...
  """
  num_train_examples: int
  batches: Batches
  validation: dict[str, np.ndarray]
  final: dict[str, np.ndarray]
  final_prefix: str
  info: dict[str, Any]  # more entries for results.json
  length_buckets: tuple[int, ...] = ()  # evaluation batches are cut to these lengths too (input_pipeline)


@dataclasses.dataclass(frozen=True)
class Task:
  model_cls: type
  loss_fn: Callable
  best_metric: str  # the validation metric whose maximum picks the best checkpoint
  build_data: Callable[[ml_collections.ConfigDict, tokenization.Tokenizer, str], TaskData]
  data_settings: tuple[str, ...]  # config.data keys that change the training data


def _classification_data(config: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer,
                         cache_dir: str) -> TaskData:
  data = input_pipeline.build_imdb(config.data, tokenizer, max_seq_length=config.data.max_seq_length,
                                   seed=config.seed, cache_dir=cache_dir)

  length_buckets = tuple(config.data.get("length_buckets", ()))

  def batches(epoch: int, start_batch: int):
    return batching.train_batches(data.train, batch_size=config.train.batch_size, seed=config.seed,
                                        epoch=epoch, start_batch=start_batch, length_buckets=length_buckets)

  return TaskData(num_train_examples=len(data.train["labels"]), batches=batches, validation=data.validation,
                  final=data.test, final_prefix="test_", info={"skipped_reviews": data.num_skipped},
                  length_buckets=length_buckets)


def _pretraining_data(config: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer,
                      cache_dir: str) -> TaskData:
  data = pretraining_data.build_pretraining(config.data, tokenizer, max_seq_length=config.data.max_seq_length,
                                            seed=config.seed, cache_dir=cache_dir)
  mask = masking.mask_fn(config.data, tokenizer)

  def batches(epoch: int, start_batch: int):
    return pretraining_data.pretraining_batches(data.train, batch_size=config.train.batch_size, seed=config.seed,
                                                epoch=epoch, start_batch=start_batch, mask=mask)

  info = {"num_documents": data.num_documents, "num_validation_documents": data.num_validation_documents,
          "num_validation_examples": len(data.validation["input_ids"]),
          "mlm_unigram_accuracy": unigram_accuracy(data.train, data.validation, tokenizer.hf_tokenizer.all_special_ids)}
  return TaskData(num_train_examples=len(data.train["input_ids"]), batches=batches, validation=data.validation,
                  final=data.validation, final_prefix="", info=info)


def unigram_accuracy(train: dict[str, np.ndarray], held_out: dict[str, np.ndarray],
                     special_ids: list[int]) -> float:
  """The MLM baseline without context: accuracy of always predicting the most frequent train token."""
  counts = np.bincount(train["input_ids"][train["attention_mask"] > 0])
  counts[[i for i in special_ids if i < len(counts)]] = 0
  weights = held_out["masked_lm_weights"]
  hits = (held_out["masked_lm_ids"] == np.argmax(counts)) * weights
  return float(hits.sum() / max(weights.sum(), 1.0))


TASKS = {
    "classify": Task(models.BertForSequenceClassification, steps.classification_loss, "validation_accuracy",
                     _classification_data, ("validation_fraction", "max_train_examples", "length_buckets")),
    "pretrain": Task(models.BertForPreTraining, steps.pretraining_loss, "validation_mlm_accuracy",
                     _pretraining_data,
                     ("data_dir", "tfds_name", "tfds_split", "max_documents", "validation_fraction",
                      "short_seq_prob", "masked_lm_prob", "max_predictions_per_seq", "whole_word_masking",
                      "dupe_factor")),
}


def get(config: ml_collections.ConfigDict) -> Task:
  return TASKS[config.get("task", "classify")]
