"""Training a WordPiece vocab: the file layout BERT needs, and a tokenizer that uses it."""

import os
import subprocess
import sys

import pytest

from bert_jax import tokenization
from bert_jax import vocab

SENTENCES = ["The movie was wonderful and the actors were wonderful too.",
             "A terrible film, terribly acted and badly written.",
             "Wonderfully shot; the story was predictable but the acting was good."] * 20


def test_vocab_starts_with_the_special_tokens_and_pad_is_zero(tmp_path):
  path = vocab.train_wordpiece(SENTENCES, str(tmp_path), vocab_size=120, min_frequency=1)
  with open(path, encoding="utf-8") as f:
    tokens = f.read().splitlines()
  assert tokens[:5] == list(vocab.SPECIAL_TOKENS)
  assert 5 < len(tokens) <= 120
  assert any(t.startswith("##") for t in tokens)  # continuation pieces, as WordPiece writes them


def test_trained_vocab_loads_as_the_run_tokenizer(tmp_path):
  vocab.train_wordpiece(SENTENCES, str(tmp_path), vocab_size=120, min_frequency=1)
  tokenizer = tokenization.Tokenizer.from_pretrained(str(tmp_path))
  encoded = tokenizer.encode(["The MOVIE was wonderful."], max_seq_length=12)
  ids = encoded["input_ids"][0]
  unk = tokenizer.hf_tokenizer.unk_token_id
  assert tokenizer.pad_token_id == 0 and ids[0] == tokenizer.hf_tokenizer.cls_token_id
  assert unk not in ids[1:int(encoded["attention_mask"][0].sum()) - 1]  # every word is covered, lowercased


def test_rejects_a_vocab_size_without_room(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=5"):
    vocab.train_wordpiece(SENTENCES, str(tmp_path), vocab_size=5)


def test_command_writes_vocab_from_a_text_corpus(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(SENTENCES[:3]) + "\n\n" + "\n".join(SENTENCES[3:6]) + "\n", encoding="utf-8")
  out = tmp_path / "vocab"
  result = subprocess.run([sys.executable, "-m", "bert_jax.vocab", f"--data_dir={corpus}", f"--output_dir={out}",
                           "--vocab_size=100", "--min_frequency=1"], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert os.path.isfile(out / "vocab.txt") and result.stdout.strip().endswith("vocab.txt")


def test_command_reports_a_missing_corpus(tmp_path):
  result = subprocess.run([sys.executable, "-m", "bert_jax.vocab", f"--data_dir={tmp_path}/none.txt",
                           f"--output_dir={tmp_path}/v"], capture_output=True, text=True, check=False)
  assert result.returncode == 1 and "none.txt" in result.stderr and "Traceback" not in result.stderr
