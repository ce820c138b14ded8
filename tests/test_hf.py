"""Hugging Face interop: parity with transformers' PyTorch BERT, export round trip, bad checkpoints."""

import json
import logging as py_logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bert_jax import hf
from bert_jax import models
from bert_jax import tokenization

# float32 parity bound of the issue; measured differences are ~2e-5 on MiniLM (see README).
ATOL = 1e-4

SENTENCES = [
    "A wonderful film.",
    "I expected more from the director, but the second half drags and the ending is predictable.",
    "Not bad at all!",
]


def _torch_inputs(arrays):
  return {k: torch.tensor(v, dtype=torch.long) for k, v in arrays.items()}


def _our_inputs(arrays):
  return dict(attention_mask=arrays["attention_mask"], token_type_ids=arrays["token_type_ids"])


@pytest.fixture(scope="module")
def minilm_inputs(minilm_dir):
  tokenizer = tokenization.Tokenizer.from_pretrained(str(minilm_dir))
  return tokenizer.encode(SENTENCES, max_seq_length=32)  # the short ones are padded


@pytest.mark.parametrize("switches", [{}, {"attention_impl": "dot_product", "scan_layers": True}])
def test_minilm_parity_with_transformers(minilm_dir, minilm_inputs, switches):
  module, params = hf.load_pretrained(str(minilm_dir), models.BertModel, **switches)
  ours = jax.jit(lambda p, ids, kw: module.apply({"params": p}, ids, **kw))(
      params, minilm_inputs["input_ids"], _our_inputs(minilm_inputs))
  reference = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    theirs = reference(**_torch_inputs(minilm_inputs))
  np.testing.assert_allclose(ours.sequence_output, theirs.last_hidden_state.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(ours.pooled_output, theirs.pooler_output.numpy(), atol=ATOL, rtol=0)


def _tiny_hf_config(**kwargs):
  return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64, **kwargs)


def _tiny_inputs():
  rng = np.random.default_rng(1)
  input_ids = rng.integers(1, 99, size=(3, 10)).astype(np.int32)
  attention_mask = np.ones_like(input_ids)
  attention_mask[2, 6:] = 0
  token_type_ids = np.zeros_like(input_ids)
  token_type_ids[:, 5:] = 1
  return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def _torch_logits(model, arrays):
  model.eval()
  with torch.no_grad():
    out = model(**_torch_inputs(arrays))
  if isinstance(model, transformers.BertForPreTraining):
    return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()
  return (out.logits.numpy(),)


def _our_logits(module, params, arrays):
  out = module.apply({"params": params}, arrays["input_ids"], **_our_inputs(arrays))
  if isinstance(out, models.PreTrainingOutput):
    return np.asarray(out.mlm_logits), np.asarray(out.nsp_logits)
  return (np.asarray(out),)


@pytest.mark.parametrize("hf_cls, our_cls", [
    (transformers.BertForPreTraining, models.BertForPreTraining),
    (transformers.BertForSequenceClassification, models.BertForSequenceClassification),
])
def test_heads_load_with_parity_and_round_trip(tmp_path, hf_cls, our_cls):
  torch.manual_seed(0)
  reference = hf_cls(_tiny_hf_config(num_labels=3))
  reference.save_pretrained(tmp_path / "hf")
  arrays = _tiny_inputs()
  expected = _torch_logits(reference, arrays)

  module, params = hf.load_pretrained(str(tmp_path / "hf"), our_cls)
  for ours, theirs in zip(_our_logits(module, params, arrays), expected):
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)

  hf.save_pretrained(module, params, str(tmp_path / "ours"))
  reloaded, info = hf_cls.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  for ours, theirs in zip(_torch_logits(reloaded, arrays), expected):
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attention_impl", ["cpu_fused", "einsum"])
def test_classifier_gradients_match_transformers(tmp_path, attention_impl):
  # The backward pass against PyTorch's autograd: every parameter's gradient of a summed cross-entropy
  # (dropout off), with the CPU forms of the dense layers' gradients.
  torch.manual_seed(0)
  reference = transformers.BertForSequenceClassification(_tiny_hf_config(num_labels=3)).eval()
  reference.save_pretrained(tmp_path / "hf")
  arrays, labels = _tiny_inputs(), np.array([0, 2, 1])
  torch.nn.functional.cross_entropy(reference(**_torch_inputs(arrays)).logits, torch.tensor(labels),
                                    reduction="sum").backward()
  module, params = hf.load_pretrained(str(tmp_path / "hf"), models.BertForSequenceClassification,
                                      attention_impl=attention_impl)

  def loss(p):
    logits = module.apply({"params": p}, arrays["input_ids"], **_our_inputs(arrays))
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

  ours = hf.to_state_dict(jax.jit(jax.grad(loss))(params))
  theirs = {name: p.grad.numpy() for name, p in reference.named_parameters() if p.grad is not None}
  assert set(ours) >= set(theirs) and len(theirs) > 30
  for name, grad in theirs.items():
    # Measured: within 6e-8 of the largest gradient (tiny model, float32 on both sides).
    np.testing.assert_allclose(ours[name], grad, atol=1e-6 * max(1.0, np.abs(grad).max()), rtol=0, err_msg=name)


@pytest.mark.parametrize("layout", ["scan_layers", "stack_layers"])
def test_stacked_model_loads_and_exports_like_the_unrolled_one(tmp_path, layout):
  torch.manual_seed(0)
  reference = transformers.BertForSequenceClassification(_tiny_hf_config(num_labels=3))
  reference.save_pretrained(tmp_path / "hf")
  arrays = _tiny_inputs()
  (expected,) = _torch_logits(reference, arrays)

  module, params = hf.load_pretrained(str(tmp_path / "hf"), models.BertForSequenceClassification,
                                      **{layout: True})
  assert params["bert"]["encoder"]["layers"]["intermediate"]["kernel"].shape == (2, 32, 37)
  (ours,) = _our_logits(module, params, arrays)
  np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)
  _, unrolled = hf.load_pretrained(str(tmp_path / "hf"), models.BertForSequenceClassification)
  scanned_state, unrolled_state = hf.to_state_dict(params), hf.to_state_dict(unrolled)
  assert scanned_state.keys() == unrolled_state.keys()
  for name, tensor in unrolled_state.items():
    np.testing.assert_array_equal(scanned_state[name], tensor, err_msg=name)  # the same tensors, exactly

  hf.save_pretrained(module, params, str(tmp_path / "ours"))
  config_json = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert not {"scan_layers", "stack_layers", "attention_impl", "layer_norm_impl"} & set(config_json)
  reloaded, info = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / "ours"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  np.testing.assert_allclose(_torch_logits(reloaded, arrays)[0], expected, atol=ATOL, rtol=0)
  again, again_params = hf.load_pretrained(str(tmp_path / "ours"), models.BertForSequenceClassification,
                                           **{layout: True})
  jax.tree_util.tree_map(np.testing.assert_array_equal, again_params, params)


def test_exported_encoder_loads_in_transformers_bert_model(tmp_path):
  module = models.BertModel(models.BertConfig.from_hf_dict(_tiny_hf_config().to_dict()))
  params = hf.init_params(module, seed=3)
  hf.save_pretrained(module, params, str(tmp_path))
  reloaded, info = transformers.BertModel.from_pretrained(str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  arrays = _tiny_inputs()
  with torch.no_grad():
    theirs = reloaded.eval()(**_torch_inputs(arrays)).last_hidden_state.numpy()
  ours = module.apply({"params": params}, arrays["input_ids"], **_our_inputs(arrays)).sequence_output
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_pytorch_bin_checkpoints_load(tmp_path):
  torch.manual_seed(0)
  reference = transformers.BertModel(_tiny_hf_config())
  reference.save_pretrained(tmp_path, safe_serialization=False) if _can_save_bin() else _save_bin(reference, tmp_path)
  assert (tmp_path / hf.PYTORCH_NAME).exists()
  module, params = hf.load_pretrained(str(tmp_path), models.BertModel)
  arrays = _tiny_inputs()
  with torch.no_grad():
    theirs = reference.eval()(**_torch_inputs(arrays)).last_hidden_state.numpy()
  ours = module.apply({"params": params}, arrays["input_ids"], **_our_inputs(arrays)).sequence_output
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def _can_save_bin():
  return False  # transformers 5 writes only safetensors; write the legacy format by hand.


def _save_bin(model, directory):
  model.config.save_pretrained(directory)
  torch.save(model.state_dict(), directory / hf.PYTORCH_NAME)


def test_missing_heads_and_unused_tensors_are_logged(minilm_dir, caplog):
  caplog.set_level(py_logging.INFO)
  hf.load_pretrained(str(minilm_dir), models.BertForPreTraining)
  fresh = [r.getMessage() for r in caplog.records if "Initialised fresh" in r.getMessage()]
  assert len(fresh) == 1
  assert "cls.seq_relationship.weight" in fresh[0] and "cls.predictions.bias" in fresh[0]
  assert "encoder.layer" not in fresh[0]


def test_config_overrides_apply(minilm_dir):
  module, _ = hf.load_pretrained(str(minilm_dir), models.BertForSequenceClassification, num_labels=5,
                                 hidden_dropout_prob=0.0)
  assert module.config.num_labels == 5 and module.config.hidden_dropout_prob == 0.0


def _copy_checkpoint(minilm_dir, tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(minilm_dir / name, target / name)
  return target


def test_non_bert_model_type_is_refused(minilm_dir, tmp_path):
  target = _copy_checkpoint(minilm_dir, tmp_path)
  config = json.loads((target / "config.json").read_text())
  config["model_type"] = "roberta"
  (target / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="model_type='roberta'"):
    hf.load_pretrained(str(target), models.BertModel)


def test_shape_mismatch_names_tensor_and_shapes(minilm_dir, tmp_path):
  target = _copy_checkpoint(minilm_dir, tmp_path)
  with pytest.raises(ValueError, match=r"'embeddings.word_embeddings.weight' has shape \(30522, 384\).*\(30000, 384\)"):
    hf.load_pretrained(str(target), models.BertModel, vocab_size=30000)


def test_directory_without_weights_lists_files_looked_for(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_tiny_hf_config().to_dict()))
  with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
    hf.load_pretrained(str(tmp_path), models.BertModel)


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load_pretrained(str(tmp_path / "nope"), models.BertModel)


def test_unused_checkpoint_tensors_are_logged(tmp_path, caplog):
  torch.manual_seed(0)
  transformers.BertForPreTraining(_tiny_hf_config()).save_pretrained(tmp_path)
  caplog.set_level(py_logging.INFO)
  hf.load_pretrained(str(tmp_path), models.BertModel)
  unused = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
  assert len(unused) == 1 and "cls.seq_relationship.weight" in unused[0] and "cls.predictions.bias" in unused[0]
