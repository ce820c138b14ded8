"""Benchmark settings: `python -m bert_jax.benchmark --config=configs/benchmark.py:PRESET`.

Presets: 'minilm_cpu' (MiniLM-L6 size, batch 32, seq 128, float32: the CPU comparison with PyTorch),
'base_gpu' (BERT-base, batch 64, seq 128, bf16) and 'base_gpu_512' (BERT-base, batch 16, seq 512, bf16).
"""

import os

import ml_collections

from configs import imdb


def get_config(preset: str = "minilm_cpu") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Only the model's config.json is read: the weights do not change the step time.
  config.init_checkpoint = ""
  config.model = imdb.model_overrides(num_labels=2)
  config.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
  config.batch_size = 32
  config.seq_len = 128
  config.num_predictions = 20  # masked positions per sequence in pretrain_train (15% of 128)
  config.cases = ("train", "eval", "pretrain_train")
  config.num_steps = 10  # timed steps per case; the median is reported
  config.num_warmup_steps = 2
  config.compare_torch = False
  config.mesh_shape = (-1, 1, 1)
  config.optimizer = imdb.get_config().optimizer

  if preset == "minilm_cpu":
    config.init_checkpoint = imdb.MINILM
  elif preset == "base_gpu":
    config.dtype = "bfloat16"
    config.batch_size = 64
  elif preset == "base_gpu_512":
    config.dtype = "bfloat16"
    config.batch_size = 16
    config.seq_len = 512
    config.num_predictions = 76
  else:
    raise ValueError(f"Unknown preset {preset!r}; use 'minilm_cpu', 'base_gpu' or 'base_gpu_512'.")
  return config
