"""Benchmark settings: `python -m bert_jax.benchmark --config=configs/benchmark.py:PRESET`.

Presets: 'minilm_cpu' (MiniLM-L6 size, batch 32, seq 128, float32: the CPU comparison with PyTorch),
'base_gpu' (BERT-base, batch 64, seq 128, bf16), 'base_gpu_512' (BERT-base, batch 16, seq 512, bf16)
and 'compile_cpu' (compile time of a narrow model at 2 and 24 layers, unrolled vs scanned).

The model's speed switches are `config.model` fields like any other, e.g.
`--config.model.attention_impl=dot_product --config.model.attention_probs_dropout_prob=0`,
`--config.model.remat_policy=dots`, `--config.model.scan_layers=True`, `--config.dtype=bfloat16`.
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
  config.cases = ("train", "eval", "pretrain_train")  # and/or "compile_depth"
  config.compile_depths = (2, 24)  # num_hidden_layers timed by the compile_depth case
  config.num_steps = 10  # timed steps per case; the median is reported
  config.num_warmup_steps = 2
  config.compare_torch = False
  config.mesh_shape = (-1, 1, 1)
  config.optimizer = imdb.get_config().optimizer

  if preset == "minilm_cpu":
    config.init_checkpoint = imdb.MINILM
  elif preset == "compile_cpu":
    config.model.update(hidden_size=128, num_attention_heads=2, intermediate_size=512)
    config.cases = ("compile_depth",)
  elif preset == "base_gpu":
    config.dtype = "bfloat16"
    config.batch_size = 64
  elif preset == "base_gpu_512":
    config.dtype = "bfloat16"
    config.batch_size = 16
    config.seq_len = 512
    config.num_predictions = 76
  else:
    raise ValueError(f"Unknown preset {preset!r}; use 'minilm_cpu', 'compile_cpu', 'base_gpu' or "
                     "'base_gpu_512'.")
  return config
