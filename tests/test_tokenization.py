"""Tokenizer: fixed-length int32 arrays in BERT's [CLS] A [SEP] B [SEP] layout."""

import numpy as np
import pytest

from bert_jax import tokenization


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return tokenization.Tokenizer.from_pretrained(str(minilm_dir))


def test_single_texts_are_cls_text_sep_then_padding(tokenizer):
  out = tokenizer.encode(["hello world", "a much longer text than the first one"], max_seq_length=12)
  assert set(out) == {"input_ids", "token_type_ids", "attention_mask"}
  assert all(v.dtype == np.int32 and v.shape == (2, 12) for v in out.values())
  cls, sep = tokenizer.hf_tokenizer.cls_token_id, tokenizer.hf_tokenizer.sep_token_id
  np.testing.assert_array_equal(out["input_ids"][0, :4], [cls, 7592, 2088, sep])  # bert-base-uncased ids
  np.testing.assert_array_equal(out["input_ids"][0, 4:], 0)
  np.testing.assert_array_equal(out["attention_mask"][0], [1] * 4 + [0] * 8)
  np.testing.assert_array_equal(out["token_type_ids"], 0)


def test_pairs_get_segment_b_token_types(tokenizer):
  out = tokenizer.encode(["hello"], ["world"], max_seq_length=8)
  cls, sep = tokenizer.hf_tokenizer.cls_token_id, tokenizer.hf_tokenizer.sep_token_id
  np.testing.assert_array_equal(out["input_ids"][0], [cls, 7592, sep, 2088, sep, 0, 0, 0])
  np.testing.assert_array_equal(out["token_type_ids"][0], [0, 0, 0, 1, 1, 0, 0, 0])


def test_long_texts_are_truncated_keeping_the_final_sep(tokenizer):
  out = tokenizer.encode(["word " * 100], max_seq_length=16)
  assert out["input_ids"].shape == (1, 16)
  assert out["input_ids"][0, -1] == tokenizer.hf_tokenizer.sep_token_id
  assert out["attention_mask"].sum() == 16


def test_mismatched_pair_counts_are_refused(tokenizer):
  with pytest.raises(ValueError, match="2 texts but 1 text pairs"):
    tokenizer.encode(["a", "b"], ["c"], max_seq_length=8)


def test_directory_without_vocab_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
    tokenization.Tokenizer.from_pretrained(str(tmp_path))


def test_vocab_file_alone_is_enough(minilm_dir):
  tokenizer = tokenization.Tokenizer.from_pretrained(str(minilm_dir / "vocab.txt"))
  assert tokenizer.vocab_size == 30522


def test_vocab_without_special_tokens_is_refused(tmp_path):
  (tmp_path / "vocab.txt").write_text("hello\nworld\n")
  with pytest.raises(ValueError, match="lacks BERT's special tokens"):
    tokenization.Tokenizer.from_pretrained(str(tmp_path / "vocab.txt"))
