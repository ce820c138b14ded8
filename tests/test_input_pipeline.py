"""Tests for bert_jax.input_pipeline: reading aclImdb/TFDS, validation split, token cache, batching."""

import logging
import tarfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from bert_jax import batching
from bert_jax import input_pipeline
from bert_jax import tokenization

from imdb_testdata import REVIEWS_PER_CLASS, make_archive, write_imdb

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "train", "test", "neg", "pos", "review",
         "good", "bad", "movie"] + [str(i) for i in range(10)]


@pytest.fixture
def imdb_folder(tmp_path) -> Path:
  return write_imdb(tmp_path / "unpacked")


@pytest.fixture
def imdb_tar(tmp_path, imdb_folder) -> Path:
  return make_archive(imdb_folder, tmp_path / "aclImdb_v1.tar.gz")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> tokenization.Tokenizer:
  vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
  vocab.write_text("\n".join(VOCAB) + "\n")
  return tokenization.Tokenizer.from_pretrained(str(vocab))


def data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      dict(data_dir=str(data_dir), validation_fraction=0.0, max_train_examples=0, max_test_examples=0),
      **overrides))


# ----------------------------------------------------------------------------------------------------
# Reading.


def test_archive_and_folder_give_the_same_reviews(imdb_tar, imdb_folder):
  from_archive = input_pipeline.load_imdb_split(str(imdb_tar), "train")
  from_folder = input_pipeline.load_imdb_split(str(imdb_folder), "train")
  assert from_archive.texts == from_folder.texts
  np.testing.assert_array_equal(from_archive.labels, from_folder.labels)


def test_reviews_are_sorted_neg_then_pos_by_file_name(imdb_tar):
  split = input_pipeline.load_imdb_split(str(imdb_tar), "test")
  assert split.texts == ([f"test neg review {i}" for i in range(REVIEWS_PER_CLASS)] +
                         [f"test pos review {i}" for i in range(REVIEWS_PER_CLASS)])
  assert split.labels.dtype == np.int32
  assert split.labels.tolist() == [0] * REVIEWS_PER_CLASS + [1] * REVIEWS_PER_CLASS


def test_folder_may_be_aclimdb_or_its_parent(imdb_folder):
  inner = input_pipeline.load_imdb_split(str(imdb_folder), "test")
  parent = input_pipeline.load_imdb_split(str(imdb_folder.parent), "test")
  assert inner.texts == parent.texts and len(inner.texts) == 2 * REVIEWS_PER_CLASS


def test_archive_without_top_folder_is_detected(tmp_path, imdb_folder):
  archive = tmp_path / "flat.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    for child in imdb_folder.iterdir():  # train/, test/, README at the top.
      tar.add(child, arcname=child.name)
  split = input_pipeline.load_imdb_split(str(archive), "train")
  assert len(split.texts) == 2 * REVIEWS_PER_CLASS and split.texts[0] == "train neg review 0"


def test_archive_with_only_test_reads_the_test_split(tmp_path):
  archive = make_archive(write_imdb(tmp_path / "held_out", splits=("test",)), tmp_path / "test.tgz")
  split = input_pipeline.load_imdb_split(str(archive), "test")
  assert len(split.texts) == 2 * REVIEWS_PER_CLASS


def test_missing_path_raises_file_not_found_with_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*--config.data.data_dir"):
    input_pipeline.load_imdb_split(str(tmp_path / "nowhere.tar.gz"), "train")


def test_archive_without_a_class_names_the_missing_folder(tmp_path):
  folder = write_imdb(tmp_path / "unpacked")
  for review in (folder / "test" / "pos").iterdir():
    review.unlink()
  archive = make_archive(folder, tmp_path / "partial.tar.gz")
  with pytest.raises(ValueError, match=r"No aclImdb/test/pos/\*\.txt in archive"):
    input_pipeline.load_imdb_split(str(archive), "test")


def test_folder_without_the_split_names_the_missing_folder(tmp_path):
  folder = write_imdb(tmp_path / "unpacked", splits=("train",))
  with pytest.raises(ValueError, match=r"No aclImdb/test/neg/\*\.txt"):
    input_pipeline.load_imdb_split(str(folder), "test")


@pytest.mark.parametrize("kept_fraction", [0.2, 0.5])  # A partial download, cut after a few members.
def test_truncated_archive_raises_value_error(tmp_path, imdb_tar, kept_fraction):
  data = imdb_tar.read_bytes()
  truncated = tmp_path / "truncated.tar.gz"
  truncated.write_bytes(data[:int(len(data) * kept_fraction)])
  with pytest.raises(ValueError, match="corrupt, truncated or unreadable"):
    input_pipeline.load_imdb_split(str(truncated), "train")


def test_archive_that_is_not_gzip_raises_value_error(tmp_path):
  archive = tmp_path / "aclImdb_v1.tar.gz"
  archive.write_text("<html>404 Not Found</html>")
  with pytest.raises(ValueError, match="corrupt, truncated or unreadable"):
    input_pipeline.load_imdb_split(str(archive), "test")


def test_unknown_split_raises(imdb_tar):
  with pytest.raises(ValueError, match="split='unsup'"):
    input_pipeline.load_imdb_split(str(imdb_tar), "unsup")


def test_empty_and_non_utf8_reviews_are_skipped_and_counted(tmp_path, caplog):
  reviews = {("test", "neg"): [b"fine", b"   \n", b"\xff\xfe bad bytes"],
             ("test", "pos"): [b"great", b""]}
  archive = make_archive(write_imdb(tmp_path / "u", ("test",), reviews), tmp_path / "a.tar.gz")
  with caplog.at_level(logging.WARNING):
    split = input_pipeline.load_imdb_split(str(archive), "test")
  assert split.texts == ["fine", "great"] and split.labels.tolist() == [0, 1]
  assert split.num_skipped == 3
  assert split.skipped_examples == ("aclImdb/test/neg/1_2.txt", "aclImdb/test/neg/2_2.txt",
                                    "aclImdb/test/pos/1_8.txt")
  assert "skipped 3 empty or non-UTF-8 reviews" in caplog.text


def test_split_left_with_one_label_raises(tmp_path):
  reviews = {("test", "pos"): [b" ", b""]}
  folder = write_imdb(tmp_path / "u", ("test",), reviews)
  with pytest.raises(ValueError, match="no usable pos reviews"):
    input_pipeline.load_imdb_split(str(folder), "test")


def test_tfds_data_source_is_read_without_tensorflow():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    split = input_pipeline.load_imdb_split(None, "train")
  # mock_data yields `text` as str (real records: bytes) and `label` as a 0-d int array.
  assert len(split.texts) + split.num_skipped == 12
  assert all(isinstance(text, str) and text.strip() for text in split.texts)
  assert set(split.labels.tolist()) == {0, 1} and split.labels.dtype == np.int32


def test_tfds_failure_says_how_to_pass_the_archive(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def not_prepared(*args, **kwargs):
    raise ConnectionError("no network")

  monkeypatch.setattr(tfds, "data_source", not_prepared)
  with pytest.raises(FileNotFoundError, match=r"ConnectionError.*--config.data.data_dir=.*tar\.gz"):
    input_pipeline.load_imdb_split("tfds", "test")


@pytest.mark.slow
def test_real_archive_test_split_has_5000_balanced_reviews(imdb_archive):
  split = input_pipeline.load_imdb_split(str(imdb_archive), "test")
  assert len(split.texts) == 5000 and split.num_skipped == 0
  assert np.bincount(split.labels).tolist() == [2500, 2500]


# ----------------------------------------------------------------------------------------------------
# Validation split.


def test_split_validation_is_deterministic():
  first = input_pipeline.split_validation(100, 0.2, seed=3)
  second = input_pipeline.split_validation(100, 0.2, seed=3)
  other_seed = input_pipeline.split_validation(100, 0.2, seed=4)
  np.testing.assert_array_equal(first[1], second[1])
  assert not np.array_equal(first[1], other_seed[1])


def test_split_validation_is_disjoint_sorted_and_sized():
  train, validation = input_pipeline.split_validation(101, 0.1, seed=0)
  assert len(validation) == 10 and len(train) == 91
  np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(101))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)


def test_split_validation_fraction_zero_is_empty():
  train, validation = input_pipeline.split_validation(7, 0.0, seed=0)
  assert validation.size == 0 and train.tolist() == list(range(7))


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_validation_rejects_bad_fraction(fraction):
  with pytest.raises(ValueError, match="must be in \\[0, 1\\)"):
    input_pipeline.split_validation(10, fraction, seed=0)


# ----------------------------------------------------------------------------------------------------
# Token cache.


def test_encode_cached_matches_tokenizer_across_chunks(tokenizer, monkeypatch):
  monkeypatch.setattr(input_pipeline, "ENCODE_CHUNK", 2)
  texts = ["good movie", "bad movie 1", "review", "test pos 9", "train"]
  encoded = input_pipeline.encode_cached(tokenizer, texts, max_seq_length=6, cache_dir=None, key="k")
  expected = tokenizer.encode(texts, max_seq_length=6)
  for name in batching.FEATURES:
    np.testing.assert_array_equal(encoded[name], expected[name])
    assert encoded[name].dtype == np.int32 and encoded[name].shape == (5, 6)


def test_encode_cached_second_call_reads_the_cache(tokenizer, tmp_path, monkeypatch):
  texts = ["good movie", "bad movie"]
  first = input_pipeline.encode_cached(tokenizer, texts, max_seq_length=8, cache_dir=str(tmp_path),
                                       key="imdb-train")
  assert len(list(tmp_path.glob("imdb-train-*.npz"))) == 1

  def fail(*args, **kwargs):
    raise AssertionError("encode called despite a cache hit")

  monkeypatch.setattr(tokenizer, "encode", fail)
  second = input_pipeline.encode_cached(tokenizer, texts, max_seq_length=8, cache_dir=str(tmp_path),
                                        key="imdb-train")
  for name in batching.FEATURES:
    np.testing.assert_array_equal(first[name], second[name])


def test_encode_cached_key_changes_with_texts_and_length(tokenizer, tmp_path):
  for texts, length in [(["good movie"], 8), (["bad movie"], 8), (["good movie"], 9)]:
    input_pipeline.encode_cached(tokenizer, texts, max_seq_length=length, cache_dir=str(tmp_path),
                                 key="imdb-train")
  assert len(list(tmp_path.glob("*.npz"))) == 3


def test_encode_cached_recomputes_a_corrupt_cache(tokenizer, tmp_path, caplog):
  texts = ["good movie", "bad movie"]
  expected = input_pipeline.encode_cached(tokenizer, texts, max_seq_length=8, cache_dir=str(tmp_path),
                                          key="imdb-test")
  (cache_file,) = tmp_path.glob("*.npz")
  cache_file.write_bytes(b"not a zip file")
  with caplog.at_level(logging.WARNING):
    again = input_pipeline.encode_cached(tokenizer, texts, max_seq_length=8, cache_dir=str(tmp_path),
                                         key="imdb-test")
  assert "Ignoring corrupt token cache" in caplog.text
  np.testing.assert_array_equal(again["input_ids"], expected["input_ids"])
  with np.load(cache_file) as data:  # Overwritten with good arrays; no temp files left behind.
    np.testing.assert_array_equal(data["input_ids"], expected["input_ids"])
  assert [p.name for p in tmp_path.iterdir()] == [cache_file.name]


# ----------------------------------------------------------------------------------------------------
# What the trainer calls.


def test_build_imdb_carves_validation_and_encodes_all_splits(imdb_tar, tokenizer, tmp_path):
  config = data_config(imdb_tar, validation_fraction=0.5, max_train_examples=4)
  data = input_pipeline.build_imdb(config, tokenizer, max_seq_length=8, seed=0,
                                   cache_dir=str(tmp_path / "cache"))
  assert len(data.train["labels"]) == 2 and len(data.validation["labels"]) == 2
  assert data.test["input_ids"].shape == (2 * REVIEWS_PER_CLASS, 8)
  assert data.num_skipped == {"train": 0, "test": 0}
  assert set(data.train) == set(batching.FEATURES) | {"labels"}


def test_build_imdb_max_test_examples_keeps_both_classes(imdb_tar, tokenizer):
  config = data_config(imdb_tar, max_test_examples=2)
  data = input_pipeline.build_imdb(config, tokenizer, max_seq_length=8, seed=0, cache_dir=None)
  assert data.test["labels"].tolist() == [0, 1]


def test_build_imdb_test_only_reads_an_archive_with_only_test(tmp_path, tokenizer):
  archive = make_archive(write_imdb(tmp_path / "held_out", splits=("test",)), tmp_path / "t.tar.gz")
  data = input_pipeline.build_imdb_test_only(data_config(archive), tokenizer, max_seq_length=8,
                                             cache_dir=None)
  assert data.train is None and data.validation is None
  assert data.test["labels"].tolist() == [0] * REVIEWS_PER_CLASS + [1] * REVIEWS_PER_CLASS


def test_build_imdb_rejects_bad_config_before_reading(tokenizer, tmp_path):
  config = data_config(tmp_path / "does_not_exist", max_train_examples=-1)
  with pytest.raises(ValueError, match="config.data.max_train_examples=-1"):
    input_pipeline.build_imdb(config, tokenizer, max_seq_length=8, seed=0, cache_dir=None)
