"""Benchmark settings: `python -m bert_jax.benchmark --config=configs/benchmark.py:PRESET`.

Presets: 'minilm_cpu' (MiniLM-L6 size, batch 32, seq 128, float32, the fused CPU attention and add &
norm kernels: the CPU comparison with PyTorch), 'minilm_cpu_bf16' (the same in bf16, with YNNPACK's
matmuls and XLA's add & norm, against PyTorch under bf16 autocast: for CPUs with bf16 instructions),
'base_gpu' (BERT-base, batch 64, seq 128, bf16, the Pallas add & norm, BERT's attention dropout 0.1
in our Pallas flash attention: attention_impl 'auto'), 'base_gpu_512' (the same at batch 16, seq 512),
'compile_cpu' (compile time of a narrow model at 2 and 24 layers, unrolled vs scanned) and
'buckets_cpu' (MiniLM-L6 size, batch 8, seq 512, the fused CPU attention kernel: an IMDB epoch padded
vs cut to length buckets).

The model's speed switches are `config.model` fields like any other, e.g.
`--config.model.attention_impl=dot_product --config.model.attention_probs_dropout_prob=0`,
`--config.model.layer_norm_impl=xla` (or `cpu_fused` on a CPU: our C++ add & norm),
`--config.model.remat_policy=dots`, `--config.model.scan_layers=True`,
`--config.model.stack_layers=True` (the layers' parameters stacked, the layers unrolled),
`--config.model.prune_last_layer=False` (on by default: the last layer computes only the rows the heads
read, which PyTorch's `BertForSequenceClassification` does not do; off, both compute every row),
`--config.dtype=bfloat16`.
"""

import ml_collections

from configs import common


PRESETS = ("minilm_cpu", "minilm_cpu_bf16", "compile_cpu", "buckets_cpu", "base_gpu", "base_gpu_512")


def get_config(preset: str = "minilm_cpu") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r}; use {', '.join(map(repr, PRESETS[:-1]))} or {PRESETS[-1]!r}.")
  config = ml_collections.ConfigDict()
  # Only the model's config.json is read: the weights do not change the step time.
  config.init_checkpoint = ""
  config.model = common.model_overrides(num_labels=2, prune_last_layer=common.PRUNE_LAST_LAYER)
  config.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
  config.model.dtype = config.get_ref("dtype")  # one value: --config.dtype and --config.model.dtype set both
  config.batch_size = 32
  config.seq_len = 128
  config.num_predictions = 20  # masked positions per sequence in pretrain_train (15% of 128)
  config.cases = ("train", "eval", "pretrain_train")  # and/or "compile_depth"
  config.compile_depths = (2, 24)  # num_hidden_layers timed by the compile_depth case
  config.num_steps = 10  # timed samples per case; the median step time is reported
  # Steps dispatched back to back per sample, waiting once (as the training loop does: the host's
  # dispatch of a step overlaps the device's work). 1 waits after every step.
  config.steps_per_sample = 1
  config.num_warmup_steps = 2
  config.compare_torch = False
  # The length_buckets case: real IMDB train reviews (a seeded sample), tokenized with the checkpoint's vocab.
  config.tokenizer = ""  # '' = init_checkpoint's
  config.data_dir = common.IMDB  # aclImdb archive or folder; '' = tfds imdb_reviews
  config.num_reviews = 2000
  config.length_buckets = (128, 256, 384)
  config.mesh_shape = common.MESH_SHAPE
  config.xla_flags = common.XLA_FLAGS  # added before JAX starts; your XLA_FLAGS win
  config.cpu_reuse_buffers = common.CPU_REUSE_BUFFERS  # on a CPU with glibc: see configs/common.py
  config.optimizer = common.optimizer(warmup_fraction=0.1)

  if preset in ("minilm_cpu", "minilm_cpu_bf16"):
    config.init_checkpoint = common.MINILM
    # Our fused attention kernel for XLA:CPU (computing in float32, attention dropout included): on this
    # project's 2-core Xeon, float32 MiniLM train steps 10-16% and eval steps 11-20% faster than with
    # the einsums.
    config.model.attention_impl = "cpu_fused"
    # Our C++ add & norm in float32 (train and eval steps about 4% faster there), XLA's in bf16.
    config.model.layer_norm_impl = "auto"
    if preset == "minilm_cpu_bf16":
      config.dtype = "bfloat16"
      config.xla_flags = common.XLA_FLAGS_CPU_BF16
  elif preset == "compile_cpu":
    config.model.update(hidden_size=128, num_attention_heads=2, intermediate_size=512)
    config.cases = ("compile_depth",)
  elif preset == "buckets_cpu":
    config.init_checkpoint = common.MINILM
    config.model.attention_impl = "cpu_fused"
    config.model.layer_norm_impl = "auto"
    config.cases = ("length_buckets",)
    config.batch_size = 8
    config.seq_len = 512
    config.num_steps = 3
    config.num_warmup_steps = 1
  elif preset in ("base_gpu", "base_gpu_512"):
    config.dtype = "bfloat16"
    # The add & norm in one Pallas kernel: BERT-base pretraining at 256 x 128 4-5% faster on an H200.
    config.model.layer_norm_impl = "pallas"
    # On a GPU in bf16, our Pallas flash attention with the recipe's attention dropout in the kernel:
    # pretraining at 256 x 128 18.7% faster than the einsums on an H200 (docs/performance.md).
    config.model.attention_impl = "auto"
    config.steps_per_sample = 5
    config.batch_size = 64
  if preset == "base_gpu_512":
    config.batch_size = 16
    config.seq_len = 512
    config.num_predictions = 76
    config.cases = ("train", "eval", "pretrain_train", "length_buckets")
    config.tokenizer = common.MINILM  # bert-base-uncased's vocab, available offline
  return config
