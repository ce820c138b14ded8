"""Tests for bert_jax.input_pipeline: reading aclImdb/TFDS, validation split, token cache, batching."""

import logging
import tarfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

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


def toy_arrays(num_examples: int, length: int = 4) -> dict[str, np.ndarray]:
  ids = np.arange(num_examples * length, dtype=np.int32).reshape(num_examples, length)
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids),
          "labels": np.arange(num_examples, dtype=np.int32) % 2}


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
  for name in input_pipeline.FEATURES:
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
  for name in input_pipeline.FEATURES:
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
# Batching.


def batch_order(**kwargs) -> list[int]:
  batches = input_pipeline.train_batches(toy_arrays(10), batch_size=3, **kwargs)
  return [int(row[0]) // 4 for batch in batches for row in batch["input_ids"]]


def test_train_batches_same_seed_and_epoch_same_order():
  assert batch_order(seed=1, epoch=2) == batch_order(seed=1, epoch=2)


def test_train_batches_order_changes_with_epoch():
  assert batch_order(seed=1, epoch=0) != batch_order(seed=1, epoch=1)


def test_train_batches_start_batch_resumes_the_epoch_tail():
  assert batch_order(seed=5, epoch=3, start_batch=2) == batch_order(seed=5, epoch=3)[6:]


def test_train_batches_are_full_with_unit_weights():
  batches = list(input_pipeline.train_batches(toy_arrays(10), batch_size=3, seed=0, epoch=0))
  assert len(batches) == input_pipeline.num_train_batches(10, 3) == 3  # 10th example dropped.
  for batch in batches:
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].shape == (3,)
    np.testing.assert_array_equal(batch["weights"], np.ones(3, np.float32))
  rows = [int(r[0]) // 4 for b in batches for r in b["input_ids"]]
  assert len(set(rows)) == 9  # No example twice within an epoch.


def test_train_batches_rejects_batch_larger_than_data():
  with pytest.raises(ValueError, match="batch_size=11 exceeds the 10"):
    next(input_pipeline.train_batches(toy_arrays(10), batch_size=11, seed=0, epoch=0))


def test_eval_batches_cover_every_example_once_with_padding():
  arrays = toy_arrays(7)
  batches = list(input_pipeline.eval_batches(arrays, batch_size=3))
  assert len(batches) == 3
  assert all(b["input_ids"].shape == (3, 4) and b["weights"].dtype == np.float32 for b in batches)
  weights = np.concatenate([b["weights"] for b in batches])
  assert weights.sum() == 7 and weights.tolist() == [1] * 7 + [0] * 2
  real = np.concatenate([b["input_ids"] for b in batches])[weights > 0]
  np.testing.assert_array_equal(real, arrays["input_ids"])
  assert not batches[-1]["input_ids"][1:].any()  # Padding rows are zeros.


def varied_lengths(num_examples: int, max_length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
  """Rows of 2..max_length real tokens (id = 1000 * example + position), right-padded with zeros."""
  lengths = np.random.default_rng(seed).integers(2, max_length + 1, num_examples)
  mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = (1000 * np.arange(num_examples)[:, None] + np.arange(max_length)[None, :] + 1) * mask
  return {"input_ids": ids.astype(np.int32), "token_type_ids": np.zeros_like(mask), "attention_mask": mask,
          "labels": np.arange(num_examples, dtype=np.int32) % 2}


def _example_ids(batch) -> list[int]:
  return [int(row[0]) // 1000 for row in batch["input_ids"]]


def test_length_buckets_cut_each_batch_to_the_first_bucket_holding_its_longest_example():
  arrays = varied_lengths(200)
  for batch in input_pipeline.train_batches(arrays, batch_size=8, seed=0, epoch=0, length_buckets=(8, 16, 24)):
    examples = _example_ids(batch)
    longest = arrays["attention_mask"][examples].sum(1).max()
    width = batch["input_ids"].shape[1]
    assert width == input_pipeline.bucket_length(longest, (8, 16, 24), 32) and width >= longest
    assert width in (8, 16, 24, 32) and batch["labels"].shape == batch["weights"].shape == (8,)
    # Only padding was cut: every kept row is its example's first `width` columns, nothing more.
    for name in input_pipeline.FEATURES:
      np.testing.assert_array_equal(batch[name], arrays[name][examples, :width])
    assert batch["attention_mask"].sum() == arrays["attention_mask"][examples].sum()


def test_length_buckets_keep_the_epoch_s_examples_and_cut_most_padding():
  arrays = varied_lengths(1003)  # 3 left over: both drop the same ones
  plain = list(input_pipeline.train_batches(arrays, batch_size=8, seed=3, epoch=1))
  bucketed = list(input_pipeline.train_batches(arrays, batch_size=8, seed=3, epoch=1, length_buckets=(8, 16, 24)))
  assert len(bucketed) == len(plain) == 125
  assert sorted(e for b in bucketed for e in _example_ids(b)) == sorted(e for b in plain for e in _example_ids(b))
  tokens = lambda batches: sum(b["input_ids"].size for b in batches)  # noqa: E731
  # Lengths uniform on 2..32: about 17 of 32 columns are real; grouped by length, batches come close.
  assert tokens(bucketed) < 0.7 * tokens(plain)


def test_length_buckets_are_deterministic_and_resume_at_any_batch():
  def order(**kwargs):
    batches = input_pipeline.train_batches(varied_lengths(300), batch_size=4, length_buckets=(8, 16), **kwargs)
    return [_example_ids(b) for b in batches]
  assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
  assert order(seed=1, epoch=2) != order(seed=1, epoch=3)
  assert order(seed=1, epoch=2, start_batch=30) == order(seed=1, epoch=2)[30:]


def test_eval_batches_with_length_buckets_count_every_example_once():
  arrays = varied_lengths(50)
  batches = list(input_pipeline.eval_batches(arrays, batch_size=8, length_buckets=(8, 16)))
  assert sum(b["weights"].sum() for b in batches) == 50 and len(batches) == 7
  seen = [e for b in batches for e, w in zip(_example_ids(b), b["weights"]) if w > 0]
  assert sorted(seen) == list(range(50))
  assert [b["input_ids"].shape[1] for b in batches][0] == 8  # shortest first
  for batch in batches:
    real = batch["weights"] > 0
    examples = np.array(_example_ids(batch))[real]
    width = batch["input_ids"].shape[1]
    np.testing.assert_array_equal(batch["input_ids"][real], arrays["input_ids"][examples, :width])
    assert arrays["attention_mask"][examples, width:].sum() == 0


def test_shard_batch_returns_global_jax_arrays():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = next(input_pipeline.eval_batches(toy_arrays(2), batch_size=2))
  sharded = input_pipeline.shard_batch(batch, sharding)
  assert set(sharded) == set(batch)
  for name, array in sharded.items():
    assert isinstance(array, jax.Array) and array.shape == batch[name].shape
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), batch[name])


# ----------------------------------------------------------------------------------------------------
# What the trainer calls.


def test_build_imdb_carves_validation_and_encodes_all_splits(imdb_tar, tokenizer, tmp_path):
  config = data_config(imdb_tar, validation_fraction=0.5, max_train_examples=4)
  data = input_pipeline.build_imdb(config, tokenizer, max_seq_length=8, seed=0,
                                   cache_dir=str(tmp_path / "cache"))
  assert len(data.train["labels"]) == 2 and len(data.validation["labels"]) == 2
  assert data.test["input_ids"].shape == (2 * REVIEWS_PER_CLASS, 8)
  assert data.num_skipped == {"train": 0, "test": 0}
  assert set(data.train) == set(input_pipeline.FEATURES) | {"labels"}


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
