"""Pretraining through the same trainer: results, a falling MLM loss, exact resume, hand-off to
fine-tuning (from the workdir and from the exported HF directory), and errors before any step."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bert_jax import config_checks
from bert_jax import hf
from bert_jax import models
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import train
from bert_jax import vocab
from configs import imdb as imdb_configs
from configs import pretrain as pretrain_configs

from imdb_testdata import make_archive, sentiment_reviews, write_imdb

REPO_ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "his brother", "our neighbour"]
VERBS = ["likes", "watches", "reads", "finds", "draws", "sells"]
OBJECTS = ["old films", "the news", "long books", "red cars", "small boats", "green apples"]


def write_corpus(path: Path, num_documents: int, sentences_per_document: int = 6) -> Path:
  """Documents of templated sentences (one per line, blank line between): learnable in a few steps."""
  rng = np.random.default_rng(0)
  documents = []
  for _ in range(num_documents):
    documents.append("\n".join(
        f"{SUBJECTS[rng.integers(6)]} {VERBS[rng.integers(6)]} {OBJECTS[rng.integers(6)]} ."
        for _ in range(sentences_per_document)))
  path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", num_documents=40)


def tiny_pretrain_config(corpus, minilm_dir, **overrides):
  config = pretrain_configs.get_config("tiny")
  config.tokenizer = str(minilm_dir)
  config.data.data_dir = str(corpus)
  config.data.max_documents = 0
  config.data.validation_fraction = 0.1
  config.data.max_seq_length = 24
  config.data.max_predictions_per_seq = 4
  config.model.update(hidden_size=32, intermediate_size=64, max_position_embeddings=32)
  config.train.update(batch_size=8, eval_batch_size=8, num_train_steps=12, log_every_steps=4,
                      eval_every_steps=6)
  config.checkpoint.every_steps = 6
  config.checkpoint.export_hf = True
  config.update_from_flattened_dict(overrides)  # keys like "train.batch_size"
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, minilm_dir):
  workdir = tmp_path_factory.mktemp("pretrained")
  results = train.train_and_evaluate(tiny_pretrain_config(corpus, minilm_dir), str(workdir))
  return workdir, results


def test_pretraining_writes_held_out_mlm_and_nsp_results(pretrained):
  workdir, results = pretrained
  written = json.loads((workdir / "results.json").read_text())
  assert written == results
  for key in ("mlm_accuracy", "mlm_loss", "nsp_accuracy", "nsp_loss", "steps", "train_seconds",
              "mlm_unigram_accuracy", "num_validation_documents"):
    assert key in written, key
  assert written["steps"] == 12 and written["num_validation_documents"] == 4
  assert 0 <= written["mlm_accuracy"] <= 1 and 0 <= written["nsp_accuracy"] <= 1
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]


def test_pretraining_lowers_the_held_out_masked_lm_loss(tmp_path, corpus, minilm_dir):
  config = tiny_pretrain_config(corpus, minilm_dir, learning_rate=3e-3,
                                **{"train.num_train_steps": 60, "train.eval_every_steps": 60,
                                   "checkpoint.export_hf": False})
  results = train.train_and_evaluate(config, str(tmp_path / "w"))
  # At random init every prediction costs about ln(vocab) = 10.3 (12 steps leave it at 10.1, 40 at
  # 7.1, 80 at 3.9): the corpus uses a few dozen of the 30,522 tokens, and training finds them.
  assert results["mlm_loss"] < math.log(30522) - 3.0


def test_interrupted_pretraining_resumes_to_the_same_result(tmp_path, corpus, minilm_dir, monkeypatch):
  config = tiny_pretrain_config(corpus, minilm_dir, **{"checkpoint.export_hf": False})
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "a"))
  original = train._batches_from

  def crash_after_eight(*args):
    for i, batch in enumerate(original(*args)):
      if i == 8:
        raise KeyboardInterrupt("simulated preemption")
      yield batch

  monkeypatch.setattr(train, "_batches_from", crash_after_eight)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  monkeypatch.setattr(train, "_batches_from", original)
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
  # Same batches, masks, dropout and optimizer state after the restart: bitwise equal on CPU.
  for key in ("mlm_loss", "nsp_loss", "final_train_loss"):
    assert resumed[key] == uninterrupted[key], key


def _imdb_config(minilm_dir, archive, init_checkpoint):
  config = imdb_configs.get_config("tiny")
  config.init_checkpoint = str(init_checkpoint)
  config.tokenizer = ""
  config.data.data_dir = str(archive)
  config.data.max_seq_length = 16
  config.data.max_train_examples = 0
  config.data.max_test_examples = 0
  config.model.update(hidden_size=None, intermediate_size=None, max_position_embeddings=None,
                      num_hidden_layers=None, num_attention_heads=None)
  config.train.update(batch_size=8, eval_batch_size=8, num_epochs=1.0, log_every_steps=2)
  config.checkpoint.export_hf = False
  return config


@pytest.fixture(scope="module")
def imdb_archive_small(tmp_path_factory):
  root = tmp_path_factory.mktemp("imdb")
  reviews = {**sentiment_reviews("train", 16), **sentiment_reviews("test", 4)}
  return make_archive(write_imdb(root / "unpacked", reviews=reviews), root / "aclImdb_v1.tar.gz")


@pytest.mark.parametrize("source", ["workdir", "hf_model", "workdir_into_stacked_layers"])
def test_fine_tuning_starts_from_the_pretrained_encoder(tmp_path, pretrained, minilm_dir, imdb_archive_small,
                                                         source):
  workdir, _ = pretrained
  init = workdir / "hf_model" if source == "hf_model" else workdir
  config = _imdb_config(minilm_dir, imdb_archive_small, init)
  config.model.stack_layers = source == "workdir_into_stacked_layers"  # another layout than the workdir's
  mesh = partitioning.make_mesh(config.mesh_shape)
  _, pretrained_params, _, _ = state_lib.restore_params(config, str(workdir), "best", mesh)
  module = models.BertForSequenceClassification(state_lib.model_config(config))
  assert module.config.hidden_size == 32  # the pretrained model's size, not the imdb preset's
  tx, _ = train.optim.make_optimizer(config.optimizer, config.learning_rate, 10)
  _, shardings = state_lib.state_template(module, tx, config.seed, mesh)
  state = state_lib.initial_state(config, module, tx, shardings, mesh)
  assert ("layers" in state.params["bert"]["encoder"]) == config.model.stack_layers
  for got, expected in zip(jax.tree_util.tree_leaves(hf.unstack_layers(state.params["bert"])),
                           jax.tree_util.tree_leaves(pretrained_params["bert"]), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  results = train.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert results["num_test_examples"] == 8 and np.isfinite(results["test_loss"])


def test_hf_export_loads_in_transformers_with_both_heads(pretrained):
  import torch  # noqa: F401  (transformers' PyTorch BERT is the reference)
  import transformers
  workdir, _ = pretrained
  model = transformers.BertForPreTraining.from_pretrained(str(workdir / "hf_model"))
  assert model.config.hidden_size == 32
  module, params = hf.load_pretrained(str(workdir / "hf_model"), models.BertForPreTraining)
  assert set(params) == {"bert", "predictions", "seq_relationship"}


def test_classification_workdir_refuses_a_pretraining_config(pretrained, corpus, minilm_dir, imdb_archive_small):
  workdir, _ = pretrained
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  config = _imdb_config(minilm_dir, imdb_archive_small, "")
  config.tokenizer = str(minilm_dir)
  config.model.update(hidden_size=32, intermediate_size=64, max_position_embeddings=32, num_hidden_layers=2,
                      num_attention_heads=4)
  with pytest.raises(ValueError, match="is a BertForPreTraining, this config trains a "
                                       "BertForSequenceClassification"):
    train.train_and_evaluate(config, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_empty_corpus_is_refused_before_training(tmp_path, minilm_dir):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n", encoding="utf-8")
  with pytest.raises(ValueError, match="empty"):
    train.train_and_evaluate(tiny_pretrain_config(empty, minilm_dir), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


def test_too_few_documents_for_nsp_are_refused(tmp_path, minilm_dir):
  one = write_corpus(tmp_path / "one.txt", num_documents=3)
  with pytest.raises(ValueError, match="document"):
    train.train_and_evaluate(tiny_pretrain_config(one, minilm_dir), str(tmp_path / "w"))


def test_vocab_that_does_not_match_the_model_is_refused(tmp_path, corpus, minilm_dir):
  lines = [line for line in corpus.read_text().splitlines() if line]
  vocab.train_wordpiece(lines, str(tmp_path / "vocab"), vocab_size=60, min_frequency=1)
  config = tiny_pretrain_config(corpus, minilm_dir, tokenizer=str(tmp_path / "vocab"),
                                **{"model.vocab_size": 30522})
  with pytest.raises(ValueError, match=r"vocab has \d+ tokens but the model's vocab_size is 30522"):
    train.train_and_evaluate(config, str(tmp_path / "w"))


def test_pretraining_from_scratch_sizes_the_embeddings_to_a_trained_vocab(tmp_path, corpus, minilm_dir):
  lines = [line for line in corpus.read_text().splitlines() if line]
  vocab_path = vocab.train_wordpiece(lines, str(tmp_path / "vocab"), vocab_size=60, min_frequency=1)
  with open(vocab_path, encoding="utf-8") as f:
    size = len(f.read().splitlines())
  config = tiny_pretrain_config(corpus, minilm_dir, tokenizer=str(tmp_path / "vocab"),
                                **{"train.num_train_steps": 2, "checkpoint.export_hf": False})
  results = train.train_and_evaluate(config, str(tmp_path / "w"))
  saved = json.loads(next((tmp_path / "w" / "checkpoints").glob("*/meta/metadata")).read_text())
  assert saved["model"]["vocab_size"] == size and results["steps"] == 2


@pytest.mark.parametrize("key, value, message", [
    ("data.masked_lm_prob", 0.0, "config.data.masked_lm_prob=0.0"),
    ("data.max_predictions_per_seq", 24, r"in \[1, data.max_seq_length=24\)"),
    ("mode", "evaluate", "'train' for pretraining"),
])
def test_out_of_range_pretraining_values_are_named(corpus, minilm_dir, key, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.check(tiny_pretrain_config(corpus, minilm_dir, **{key: value}))


@pytest.mark.slow
def test_tiny_preset_pretrains_on_unlabelled_reviews_from_the_command_line(tmp_path, minilm_dir):
  root = tmp_path / "imdb"
  top = write_imdb(root, reviews=sentiment_reviews("train", 4))
  for i in range(30):  # unlabelled reviews of a few sentences each, as in train/unsup
    (top / "train" / "unsup" / f"{i + 1}_0.txt").write_text(
        f"A film number {i}. It was long.<br /><br />The actors were good! I would watch it again.")
  archive = make_archive(top, tmp_path / "aclImdb_v1.tar.gz")
  result = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'w'}",
       f"--config.data.data_dir={archive}", f"--config.tokenizer={minilm_dir}",
       "--config.data.validation_fraction=0.2", "--config.train.num_train_steps=4",
       "--config.train.batch_size=8", "--config.train.eval_batch_size=8"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert results["steps"] == 4 and results["num_documents"] == 31
  assert (tmp_path / "w" / "hf_model" / "model.safetensors").exists()
