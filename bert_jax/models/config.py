"""`BertConfig`: the fields of a Hugging Face BERT `config.json`, under the same names.

Owns: validation of model hyper-parameters and conversion to and from the HF dict. Does not own:
reading or writing files (see `bert_jax.hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

# HF `hidden_act` values we implement, so that checkpoints trained with them load with parity.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")
# How attention is computed: our einsums (with attention dropout), `jax.nn.dot_product_attention`
# with `implementation=None` (XLA in jax 0.10), the same forced onto cuDNN's fused kernel (GPU,
# bfloat16/float16 only), our Pallas (Triton) flash attention with the dropout in the kernel (GPU;
# Pallas's interpreter on a CPU, for tests; `flash_attention`), or our fused C++ kernel for XLA:CPU
# (computes in float32, with attention dropout; `cpu_attention`). 'dot_product' and 'cudnn' have no
# attention-probability dropout.
# 'auto' picks one of those with dropout where the model is traced (`attention.resolve_attention_impl`):
# 'cpu_fused' on XLA:CPU when its kernel builds, 'pallas' on a GPU in bfloat16, else 'einsum'.
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn", "pallas", "cpu_fused", "auto")
# The implementations that apply attention-probability dropout.
ATTENTION_DROPOUT_IMPLS = ("einsum", "pallas", "cpu_fused", "auto")
# Rematerialisation of each encoder layer in the backward pass: none, all of it, or all but the
# outputs of the weight matmuls (see `bert.REMAT_POLICIES`).
REMAT_POLICIES = ("none", "full", "dots")
# How each layer's "add & norm" (`LayerNorm(residual + dropout(h + bias))`) is computed: XLA's
# passes, one Pallas (Triton) kernel forward and one backward (`fused_norm`: GPUs; on a CPU
# Pallas's interpreter runs it, slowly, for tests), or our C++ kernels for XLA:CPU (`cpu_add_norm`,
# computing in float32). 'auto': 'pallas' on a GPU, 'cpu_fused' on a CPU in float32 when its kernel
# builds, else 'xla' (`bert.resolve_layer_norm_impl`).
LAYER_NORM_IMPLS = ("xla", "pallas", "cpu_fused", "auto")
# How the feed-forward, `gelu(x @ W_in + b_in) @ W_out`, is computed: XLA's matmuls and passes, or with the
# GELU forward and backward inside Mosaic GPU matmul kernels of ours (`feed_forward`: Hopper GPUs, H100 and
# H200; on a CPU Mosaic GPU's interpreter runs them, slowly, for tests), jax's cooperative schedule
# ('mosaic') or our ping-pong one ('mosaic_pingpong'; `feed_forward.KERNELS`). Both need the exact GELU
# (hidden_act='gelu'), dtype bfloat16, and sizes the kernels' blocks divide (`feed_forward.size_multiples`).
# Under a `remat_policy` the whole forward kernel runs again in the backward pass (its outputs are a custom
# VJP's residuals, which no policy names), where XLA's 'dots' keeps the matmul's output.
FEED_FORWARD_IMPLS = ("xla", "mosaic", "mosaic_pingpong")
# Fields that say only how to compute: the same parameters give the same model under any of their
# values, to rounding. evaluate/predict take them from the config, not the checkpoint (`state`), and
# training resumes with the config's (with another prune_last_layer, the last layer draws its dropout
# masks for other rows).
COMPUTE_FIELDS = ("dtype", "attention_impl", "layer_norm_impl", "feed_forward_impl", "remat_policy",
                  "prune_last_layer")
# Fields that are not the model's in HF's sense: never read from or written to config.json. Beside
# how to compute, how the parameters are stored: their dtype, and the layers stacked (scan_layers,
# stack_layers).
NON_HF_FIELDS = COMPUTE_FIELDS + ("param_dtype", "scan_layers", "stack_layers")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder. Defaults are bert-base-uncased."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0
  # Sequence classification: HF stores these too (num_labels through id2label).
  num_labels: int = 2
  classifier_dropout: float | None = None
  # Not HF fields (NON_HF_FIELDS): the dtype of activations/matmuls and of the stored parameters,
  # and the speed switches. None changes the function the model computes beyond rounding.
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "einsum"  # one of ATTENTION_IMPLS
  layer_norm_impl: str = "xla"  # one of LAYER_NORM_IMPLS
  feed_forward_impl: str = "xla"  # one of FEED_FORWARD_IMPLS
  remat_policy: str = "none"  # one of REMAT_POLICIES
  # One `nn.scan` over the layers: parameters stacked as `encoder/layers/...` with a leading
  # `layers` axis (compile time independent of depth), instead of `encoder/layer_{i}/...`.
  scan_layers: bool = False
  # The layers' parameters stored stacked as under `scan_layers` (`encoder/layers/...`), the layers
  # unrolled: the optimizer then updates each kind of layer parameter in one pass, not one per layer
  # (379 fewer kernels in a BERT-base step compiled for an H100; 2% slower on this project's CPU).
  # The function of per-layer parameters, dropout masks included; the checkpoints of `scan_layers`.
  stack_layers: bool = False
  # The last layer computes only the positions the heads read: [CLS] for classification, [CLS] and
  # the masked positions for pretraining (every position still serves as a key and value). The
  # outputs the heads read are the same up to float32 rounding; with dropout on, the last layer
  # draws its masks for those rows only. Unrolled layers only: under `scan_layers` every layer is
  # one loop body, and every position is computed (`bert.describe_kernels` says which applies).
  prune_last_layer: bool = False

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"BertConfig.{name}={value!r} must be a positive integer.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; choose a head count that divides it.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; use one of {ACTIVATIONS}.")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"BertConfig.{name}={value!r} must be in [0, 1).")
    if not 0 <= self.pad_token_id < self.vocab_size:
      raise ValueError(f"BertConfig.pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size}).")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"BertConfig.{name}={getattr(self, name)!r} is not a dtype name "
                         "(use 'float32' or 'bfloat16').") from e
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"BertConfig.attention_impl={self.attention_impl!r} is not supported; use one of "
                       f"{ATTENTION_IMPLS}.")
    if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"BertConfig.attention_impl='cudnn' needs dtype 'bfloat16' or 'float16' (cuDNN's fused "
                       f"attention has no float32 kernel); got dtype={self.dtype!r}. Set "
                       "--config.model.dtype=bfloat16 or use attention_impl='dot_product'.")
    if self.layer_norm_impl not in LAYER_NORM_IMPLS:
      raise ValueError(f"BertConfig.layer_norm_impl={self.layer_norm_impl!r} is not supported; use one of "
                       f"{LAYER_NORM_IMPLS}.")
    if self.feed_forward_impl not in FEED_FORWARD_IMPLS:
      raise ValueError(f"BertConfig.feed_forward_impl={self.feed_forward_impl!r} is not supported; use one of "
                       f"{FEED_FORWARD_IMPLS}.")
    if self.feed_forward_impl != "xla":
      self._check_mosaic_feed_forward()
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"BertConfig.remat_policy={self.remat_policy!r} is not supported; use one of "
                       f"{REMAT_POLICIES}.")
    for name in ("scan_layers", "stack_layers", "prune_last_layer"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"BertConfig.{name}={getattr(self, name)!r} must be True or False.")
    if self.scan_layers and self.stack_layers:
      raise ValueError("BertConfig.scan_layers=True and stack_layers=True: both store the layers stacked, one "
                       "runs them as a loop, the other unrolled. Set --config.model.scan_layers=False to run "
                       "them unrolled (the same checkpoints), or stack_layers=False for the loop.")

  def _check_mosaic_feed_forward(self) -> None:
    from bert_jax.models import feed_forward  # pylint: disable=g-import-not-at-top  # its kernels import lazily
    fix = " or use --config.model.feed_forward_impl=xla"
    if self.hidden_act != "gelu":
      raise ValueError(f"BertConfig.feed_forward_impl={self.feed_forward_impl!r} computes the exact GELU "
                       f"(hidden_act='gelu'); got hidden_act={self.hidden_act!r}. Set "
                       f"--config.model.hidden_act=gelu{fix}.")
    if self.dtype != "bfloat16":
      raise ValueError(f"BertConfig.feed_forward_impl={self.feed_forward_impl!r} runs bfloat16 matmul kernels; got "
                       f"dtype={self.dtype!r}. Set --config.model.dtype=bfloat16{fix}.")
    _, hidden, intermediate = feed_forward.size_multiples()
    if self.hidden_size % hidden or self.intermediate_size % intermediate:
      raise ValueError(f"BertConfig.feed_forward_impl={self.feed_forward_impl!r} needs hidden_size a multiple of "
                       f"{hidden} and intermediate_size a multiple of {intermediate} (its kernels' blocks); got "
                       f"{self.hidden_size} and {self.intermediate_size}. Use --config.model.feed_forward_impl=xla.")

  def check_trainable(self) -> None:
    """Raises if training (dropout on) cannot run with this config; call before compiling a train step."""
    if self.attention_impl not in ATTENTION_DROPOUT_IMPLS and self.attention_probs_dropout_prob > 0:
      raise ValueError(
          f"BertConfig.attention_impl={self.attention_impl!r} has no attention-probability dropout, but "
          f"attention_probs_dropout_prob={self.attention_probs_dropout_prob} and the model is training. Set "
          "--config.model.attention_probs_dropout_prob=0 (hidden dropout still applies), or use "
          "--config.model.attention_impl=einsum (or pallas on a GPU, cpu_fused on a CPU).")

  @property
  def prunes_last_layer(self) -> bool:
    """Whether the last layer computes only the rows the heads read: the switch, with unrolled layers."""
    return self.prune_last_layer and not self.scan_layers

  @property
  def stacked_layers(self) -> bool:
    """Whether the layers' parameters are stored stacked, `encoder/layers/...` `[num_hidden_layers, ...]`."""
    return self.scan_layers or self.stack_layers

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **overrides: Any) -> "BertConfig":
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"Unknown BertConfig field(s) {unknown}; valid fields: "
                       f"{[f.name for f in dataclasses.fields(self)]}.")
    return dataclasses.replace(self, **overrides)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "BertConfig":
    """Builds from a parsed HF `config.json`; keys that are not BERT hyper-parameters are ignored."""
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"config.json has model_type={model_type!r}; bert_jax loads only BERT "
                       "checkpoints (model_type 'bert').")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"config.json has position_embedding_type={position_type!r}; only 'absolute' "
                       "(the original BERT) is implemented.")
    fields = {f.name for f in dataclasses.fields(cls)}
    # HF's own `dtype`/`torch_dtype` say how the weights were stored, not how to compute: not ours.
    # Nor are the speed switches, should a config.json carry keys of those names.
    values = {k: v for k, v in hf.items() if k in fields - set(NON_HF_FIELDS)}
    if "id2label" in hf and "num_labels" not in hf:
      values["num_labels"] = len(hf["id2label"])
    values.update(overrides)
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"Unknown BertConfig field(s) {unknown}; valid fields: {sorted(fields)}.")
    return cls(**values)

  def to_hf_dict(self) -> dict[str, Any]:
    hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
          if f.name not in NON_HF_FIELDS + ("num_labels",)}
    hf.update(model_type="bert", position_embedding_type="absolute",
              id2label={str(i): f"LABEL_{i}" for i in range(self.num_labels)},
              label2id={f"LABEL_{i}": i for i in range(self.num_labels)})
    return hf
