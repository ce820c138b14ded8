"""Tests for bert_jax.pretraining_data (and the corpus readers behind it): documents, NSP pairs, masking."""

import io
import tarfile

import ml_collections
import numpy as np
import pytest

from bert_jax import batching
from bert_jax import corpus
from bert_jax import masking
from bert_jax import pretraining_data
from bert_jax import tokenization

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # bert-base-uncased's special ids.
SPECIALS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_SIZE = 30522


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
  return tokenization.Tokenizer.from_pretrained(str(minilm_dir))


def numbered_documents(num_documents, num_sentences, sentence_length):
  """Token id = 1000 + 1000 * document + position in the document: the id says where it came from."""
  return [[np.arange(s * sentence_length, (s + 1) * sentence_length, dtype=np.int32) + 1000 * (d + 1)
           for s in range(num_sentences)] for d in range(num_documents)]


def random_documents(seed, num_documents=60):
  """Documents of 1..12 sentences of 1..40 non-special ids."""
  rng = np.random.default_rng(seed)
  return [[rng.integers(1000, VOCAB_SIZE, rng.integers(1, 41)).astype(np.int32)
           for _ in range(rng.integers(1, 13))] for _ in range(num_documents)]


def instances(documents, max_seq_length=64, seed=0, short_seq_prob=0.1):
  return pretraining_data.create_instances(documents, max_seq_length=max_seq_length,
                                           short_seq_prob=short_seq_prob, seed=seed, cls_id=CLS,
                                           sep_id=SEP, pad_id=PAD)


def mask(batch, seed=0, max_predictions_per_seq=20, word_continuation=None):
  return masking.mask_tokens(
      batch, rng=np.random.default_rng(seed), masked_lm_prob=0.15,
      max_predictions_per_seq=max_predictions_per_seq, vocab_size=VOCAB_SIZE, mask_id=MASK,
      special_ids=SPECIALS, word_continuation=word_continuation)


@pytest.fixture(scope="module")
def masked_pair():
  """(unmasked, masked) for ~2,500 sequences of varied length (short_seq_prob=0.3 gives padding)."""
  batch = instances(random_documents(0, 1500), max_seq_length=128, short_seq_prob=0.3)
  return batch, mask(batch)


def segments(row_ids, row_types, row_mask):
  """(A, B) of one `[CLS] A [SEP] B [SEP]` row, after checking that layout."""
  n = int(row_mask.sum())
  length_b = int(row_types.sum()) - 1
  length_a = n - length_b - 3
  assert row_ids[0] == CLS and row_ids[length_a + 1] == SEP and row_ids[n - 1] == SEP
  assert length_a >= 1 and length_b >= 1
  np.testing.assert_array_equal(row_types[:n], [0] * (length_a + 2) + [1] * (length_b + 1))
  np.testing.assert_array_equal(row_mask[:n], 1)
  return row_ids[1:length_a + 1], row_ids[length_a + 2:n - 1]


# ----------------------------------------------------------------------------------------------------
# Masking.


def test_each_sequence_predicts_15_percent_of_its_real_tokens_capped_at_max_predictions(masked_pair):
  batch, masked = masked_pair
  num_real = batch["attention_mask"].sum(1)
  expected = np.minimum(20, np.maximum(1, np.rint(num_real * 0.15)))
  np.testing.assert_array_equal(masked["masked_lm_weights"].sum(1), expected)
  assert masked["masked_lm_positions"].shape == (len(num_real), 20)
  assert 0.13 < masked["masked_lm_weights"].sum() / num_real.sum() < 0.16  # The cap trims a little.


def test_predictions_are_80_mask_10_random_10_unchanged(masked_pair):
  batch, masked = masked_pair
  rows, slots = np.nonzero(masked["masked_lm_weights"])
  now = masked["input_ids"][rows, masked["masked_lm_positions"][rows, slots]]
  before = masked["masked_lm_ids"][rows, slots]
  n = len(rows)  # ~45,000: one standard error of a 10% share is ~0.15%.
  assert abs(np.mean(now == MASK) - 0.8) < 0.015
  assert abs(np.mean(now == before) - 0.1) < 0.01  # A random id equal to the original: 1 in 30,000.
  random = (now != MASK) & (now != before)
  assert abs(np.mean(random) - 0.1) < 0.01 and n > 40_000
  assert not np.isin(now[random], SPECIALS).any() and now[random].max() < VOCAB_SIZE


def test_special_and_padding_tokens_are_never_masked(masked_pair):
  batch, masked = masked_pair
  predicted = np.zeros(batch["input_ids"].shape, bool)
  rows, slots = np.nonzero(masked["masked_lm_weights"])
  predicted[rows, masked["masked_lm_positions"][rows, slots]] = True
  special = np.isin(batch["input_ids"], SPECIALS) | (batch["attention_mask"] == 0)
  assert not (predicted & special).any()
  np.testing.assert_array_equal(masked["input_ids"][~predicted], batch["input_ids"][~predicted])
  for name in ("token_type_ids", "attention_mask", "next_sentence_label"):
    np.testing.assert_array_equal(masked[name], batch[name])


def test_targets_are_sorted_positions_with_their_original_ids_and_zero_padding(masked_pair):
  batch, masked = masked_pair
  positions, weights = masked["masked_lm_positions"], masked["masked_lm_weights"]
  assert positions.dtype == masked["masked_lm_ids"].dtype == np.int32 and weights.dtype == np.float32
  for row in range(len(positions)):
    used = positions[row][weights[row] == 1]
    assert np.all(np.diff(used) > 0)  # Ascending, so unique.
    np.testing.assert_array_equal(masked["masked_lm_ids"][row][weights[row] == 1],
                                  batch["input_ids"][row, used])
  np.testing.assert_array_equal(positions[weights == 0], 0)
  np.testing.assert_array_equal(masked["masked_lm_ids"][weights == 0], 0)


def test_max_predictions_larger_than_the_sequence_is_padded():
  batch = instances(random_documents(1), max_seq_length=8)
  masked = mask(batch, max_predictions_per_seq=12)
  assert masked["masked_lm_positions"].shape == (len(batch["input_ids"]), 12)
  np.testing.assert_array_equal(masked["masked_lm_weights"].sum(1), 1)  # round(8 * 0.15) = 1.


def test_word_continuation_table_marks_hash_pieces(tokenizer):
  table = masking.word_continuation_table(tokenizer)
  vocab = tokenizer.hf_tokenizer.get_vocab()
  assert table.shape == (tokenizer.vocab_size,) and table.dtype == bool
  assert table[vocab["##ing"]] and not table[vocab["the"]] and not table[CLS]


def test_whole_word_masking_masks_complete_words_only(tokenizer):
  text = ("Unquestionably the cinematography was breathtaking, notwithstanding overindulgent "
          "screenwriting. Characterisation felt underdeveloped yet mesmerising throughout.")
  documents = pretraining_data.tokenize_documents(tokenizer, [corpus.split_sentences(text)] * 40)
  batch = instances(documents, max_seq_length=32, short_seq_prob=0.0)
  table = masking.word_continuation_table(tokenizer)
  masked = mask(batch, word_continuation=table)
  ids = batch["input_ids"]
  predicted = np.zeros(ids.shape, bool)
  rows, slots = np.nonzero(masked["masked_lm_weights"])
  predicted[rows, masked["masked_lm_positions"][rows, slots]] = True
  continuation = table[ids] & ~np.isin(np.roll(ids, 1, axis=1), SPECIALS)
  # A continuation piece is predicted exactly when the piece before it is.
  np.testing.assert_array_equal(predicted[:, 1:][continuation[:, 1:]],
                                predicted[:, :-1][continuation[:, 1:]])
  num_real = batch["attention_mask"].sum(1)
  assert np.all(predicted.sum(1) <= np.maximum(1, np.rint(num_real * 0.15)))
  assert (predicted & continuation).any()  # The text has many multi-piece words.


def test_masking_is_deterministic_per_rng_seed(masked_pair):
  batch, masked = masked_pair
  again = mask(batch, seed=0)
  for name in masked:
    np.testing.assert_array_equal(again[name], masked[name])
  assert not np.array_equal(mask(batch, seed=1)["masked_lm_positions"], masked["masked_lm_positions"])


# ----------------------------------------------------------------------------------------------------
# Sentence pairs.


def test_pairs_are_cls_a_sep_b_sep_with_token_types_and_padding():
  batch = instances(random_documents(2), max_seq_length=64)
  assert all(batch[name].dtype == np.int32 and batch[name].shape[1:] == (64,)
             for name in ("input_ids", "token_type_ids", "attention_mask"))
  for row in range(len(batch["input_ids"])):
    a, b = segments(batch["input_ids"][row], batch["token_type_ids"][row],
                    batch["attention_mask"][row])
    assert not np.isin(np.concatenate([a, b]), SPECIALS).any()
  padding = batch["attention_mask"] == 0
  assert padding.any()
  np.testing.assert_array_equal(batch["input_ids"][padding], PAD)
  np.testing.assert_array_equal(batch["token_type_ids"][padding], 0)


def test_half_the_pairs_are_random_next_and_come_from_another_document():
  batch = instances(numbered_documents(300, 200, 5), max_seq_length=128, short_seq_prob=0.0)
  labels = batch["next_sentence_label"]
  assert batch["next_sentence_label"].dtype == np.int32 and len(labels) > 3000
  assert abs(labels.mean() - 0.5) < 0.04  # Standard error ~0.009; document ends force a few randoms.
  for row in range(len(labels)):
    a, b = segments(batch["input_ids"][row], batch["token_type_ids"][row],
                    batch["attention_mask"][row])
    assert len(set(a // 1000)) == 1 and len(set(b // 1000)) == 1
    assert np.all(np.diff(a) == 1) and np.all(np.diff(b) == 1)  # Contiguous text, trimmed at the ends.
    if labels[row] == 1:
      assert a[0] // 1000 != b[0] // 1000
    else:  # IsNext: B follows A in the same document (directly, unless truncation trimmed between).
      assert a[0] // 1000 == b[0] // 1000 and b[0] > a[-1]


def test_untruncated_actual_next_segments_continue_exactly():
  batch = instances(numbered_documents(20, 50, 3), max_seq_length=128, short_seq_prob=0.0)
  untruncated = batch["attention_mask"].sum(1) < 128  # Truncation fills all 128 positions.
  for row in np.nonzero((batch["next_sentence_label"] == 0) & untruncated)[0]:
    a, b = segments(batch["input_ids"][row], batch["token_type_ids"][row],
                    batch["attention_mask"][row])
    assert b[0] == a[-1] + 1


def test_truncation_matches_berts_token_by_token_loop():
  rng = np.random.default_rng(0)
  for _ in range(200):
    a, b = np.arange(rng.integers(1, 80)), np.arange(rng.integers(1, 80)) + 100
    max_num_tokens = int(rng.integers(2, 90))
    ref_a, ref_b = list(a), list(b)  # create_pretraining_data.truncate_seq_pair
    while len(ref_a) + len(ref_b) > max_num_tokens:
      longer = ref_a if len(ref_a) > len(ref_b) else ref_b
      longer.pop()
    got_a, got_b = pretraining_data._truncate_pair(a, b, max_num_tokens, rng)
    assert (len(got_a), len(got_b)) == (len(ref_a), len(ref_b))
    assert np.all(np.diff(got_a) == 1) and np.all(np.diff(got_b) == 1)


def test_instances_are_deterministic_per_seed():
  documents = random_documents(3)
  first, again, other = instances(documents, seed=5), instances(documents, seed=5), instances(
      documents, seed=6)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  assert first["input_ids"].shape != other["input_ids"].shape or not np.array_equal(
      first["input_ids"], other["input_ids"])


def test_dupe_factor_pairs_the_documents_again():
  documents = random_documents(4)
  once = instances(documents)
  twice = pretraining_data.create_instances(documents, max_seq_length=64, short_seq_prob=0.1, seed=0,
                                            cls_id=CLS, sep_id=SEP, dupe_factor=2)
  assert len(once["input_ids"]) < len(twice["input_ids"]) <= 3 * len(once["input_ids"])


def test_one_document_is_refused_for_nsp():
  with pytest.raises(ValueError, match="at least 2 non-empty documents"):
    instances(numbered_documents(1, 10, 5))


def test_tokenize_documents_gives_wordpieces_without_special_tokens(tokenizer):
  documents = [["Hello world.", "Unbelievable acting!"], ["   "], ["The end."]]
  tokenized = pretraining_data.tokenize_documents(tokenizer, documents)
  assert len(tokenized) == 2  # The whitespace-only document yields no pieces and is dropped.
  assert all(s.dtype == np.int32 for doc in tokenized for s in doc)
  np.testing.assert_array_equal(tokenized[0][0], [7592, 2088, 1012])  # hello world .
  assert tokenized[1][0].tolist() == tokenizer.hf_tokenizer("The end.", add_special_tokens=False)[
      "input_ids"]


# ----------------------------------------------------------------------------------------------------
# Batches.


@pytest.fixture(scope="module")
def numbered_arrays():
  arrays = instances(random_documents(5, 100))
  return dict(arrays, example=np.arange(len(arrays["input_ids"])))


def batches(arrays, epoch, start_batch=0):
  return list(pretraining_data.pretraining_batches(
      arrays, batch_size=8, seed=3, epoch=epoch, start_batch=start_batch,
      mask=lambda batch, rng: mask(batch, seed=int(rng.integers(2**31)))))


def test_resumed_epoch_gives_the_same_masked_batches(numbered_arrays):
  full, resumed = batches(numbered_arrays, epoch=1), batches(numbered_arrays, epoch=1, start_batch=3)
  assert len(full) == len(numbered_arrays["example"]) // 8 and len(resumed) == len(full) - 3
  for expected, got in zip(full[3:], resumed):
    assert set(got) == set(expected) and got["weights"].dtype == np.float32
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name])


def test_masks_change_from_epoch_to_epoch(numbered_arrays):
  positions = {}
  for epoch in (0, 1):
    for batch in batches(numbered_arrays, epoch):
      for example, row in zip(batch["example"], batch["masked_lm_positions"]):
        positions.setdefault(int(example), []).append(row)
  both = [rows for rows in positions.values() if len(rows) == 2]
  assert len(both) > 100
  assert sum(not np.array_equal(*rows) for rows in both) > 0.9 * len(both)


# ----------------------------------------------------------------------------------------------------
# Reading documents.


def unsup_archive(path, reviews, labelled=True):
  """A .tar.gz in aclImdb's layout: `reviews` as train/unsup/<id>_0.txt (+ a labelled review)."""
  files = {f"aclImdb/train/unsup/{i}_0.txt": text for i, text in reviews.items()}
  if labelled:
    files["aclImdb/train/pos/0_9.txt"] = "A labelled review. It is not pretraining text."
  with tarfile.open(path, "w:gz") as archive:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return path


def test_text_files_have_one_sentence_per_line_and_blank_lines_between_documents(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "2.txt").write_text("Third doc.\n")
  (tmp_path / "1.txt").write_text("First doc, one.\n  First doc, two.  \n\n\nSecond doc.\n")
  (tmp_path / "notes.md").write_text("Not text data.\n")
  assert pretraining_data.read_documents(str(tmp_path)) == [
      ["First doc, one.", "First doc, two."], ["Second doc."], ["Third doc."]]
  assert pretraining_data.read_documents(str(tmp_path / "1.txt"), max_documents=1) == [
      ["First doc, one.", "First doc, two."]]


def test_aclimdb_archive_gives_unsup_reviews_by_id_split_into_sentences(tmp_path):
  reviews = {10: "Tenth review.", 2: "Great film!<br /><br />Mr. Smith was superb. Go see it",
             0: "First one? Yes."}
  path = unsup_archive(tmp_path / "aclImdb_v1.tar.gz", reviews)
  assert pretraining_data.read_documents(str(path)) == [
      ["First one?", "Yes."], ["Great film!", "Mr. Smith was superb.", "Go see it"],
      ["Tenth review."]]
  assert pretraining_data.read_documents(str(path), max_documents=2)[-1][0] == "Great film!"


def test_unpacked_aclimdb_folder_reads_the_same_reviews(tmp_path):
  path = unsup_archive(tmp_path / "a.tar.gz", {0: "One. Two.", 1: "Three."})
  with tarfile.open(path) as archive:
    archive.extractall(tmp_path / "unpacked", filter="data")
  expected = [["One.", "Two."], ["Three."]]
  assert pretraining_data.read_documents(str(tmp_path / "unpacked")) == expected
  assert pretraining_data.read_documents(str(tmp_path / "unpacked" / "aclImdb")) == expected


def test_tfds_records_are_documents():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    documents = pretraining_data.read_documents("", tfds_name="imdb_reviews",
                                                tfds_split="unsupervised", max_documents=4)
    source = tfds.data_source("imdb_reviews", split="unsupervised")
    texts = [source[i]["text"] for i in range(4)]
  texts = [t.decode() if isinstance(t, bytes) else str(t) for t in texts]
  assert documents == [corpus.split_sentences(t) for t in texts]


def test_missing_path_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nothere.*does not exist.*data_dir"):
    pretraining_data.read_documents(str(tmp_path / "nothere"))


def test_archive_without_unsup_reviews_is_refused(tmp_path):
  path = tmp_path / "labelled_only.tar.gz"
  with tarfile.open(path, "w:gz") as archive:
    info = tarfile.TarInfo("aclImdb/test/pos/0_9.txt")
    archive.addfile(info, io.BytesIO(b""))
  with pytest.raises(ValueError, match=r"No \[aclImdb/\]train/unsup/\*\.txt.*labelled_only"):
    pretraining_data.read_documents(str(path))


def test_empty_corpus_is_refused(tmp_path):
  (tmp_path / "empty.txt").write_text("\n  \n\n")
  with pytest.raises(ValueError, match=r"empty\.txt.* has no sentences"):
    pretraining_data.read_documents(str(tmp_path / "empty.txt"))


# ----------------------------------------------------------------------------------------------------
# build_pretraining.


def data_config(data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      data_dir=str(data_dir), tfds_name="", tfds_split="train", tfds_text_key="text", max_documents=0,
      validation_fraction=0.2, max_seq_length=32, short_seq_prob=0.1, masked_lm_prob=0.15,
      max_predictions_per_seq=5, whole_word_masking=False, dupe_factor=1))
  config.update(overrides)
  return config


@pytest.fixture
def text_corpus(tmp_path):
  documents = [f"Document {d} starts here.\nIt has a middle part.\nAnd ends with number {d}.\n"
               for d in range(20)]
  (tmp_path / "corpus.txt").write_text("\n".join(documents))
  return tmp_path / "corpus.txt"


def test_build_holds_out_documents_masks_validation_once_and_caches(tokenizer, text_corpus, tmp_path,
                                                                     monkeypatch):
  config = data_config(text_corpus)
  data = pretraining_data.build_pretraining(config, tokenizer, max_seq_length=32, seed=0,
                                            cache_dir=str(tmp_path / "cache"))
  assert (data.num_documents, data.num_validation_documents) == (20, 4)
  assert set(data.train) == set(pretraining_data.INSTANCE_FEATURES)
  assert data.train["input_ids"].shape[1] == 32 and len(data.train["input_ids"]) >= 16
  assert data.validation["masked_lm_positions"].shape == (len(data.validation["input_ids"]), 5)
  assert data.validation["masked_lm_weights"].sum(1).min() >= 1
  evaluated = list(batching.eval_batches(data.validation, batch_size=4))
  assert sum(batch["weights"].sum() for batch in evaluated) == len(data.validation["input_ids"])

  def no_reading(*args, **kwargs):
    raise AssertionError("the cache should have been used")

  monkeypatch.setattr(pretraining_data.corpus, "read_documents", no_reading)
  again = pretraining_data.build_pretraining(config, tokenizer, max_seq_length=32, seed=0,
                                             cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").iterdir())) == 1
  for part in ("train", "validation"):
    for name, array in getattr(data, part).items():
      np.testing.assert_array_equal(getattr(again, part)[name], array)
      assert getattr(again, part)[name].dtype == array.dtype


def test_build_without_held_out_documents_gives_empty_validation(tokenizer, text_corpus):
  data = pretraining_data.build_pretraining(data_config(text_corpus, validation_fraction=0.0),
                                            tokenizer, max_seq_length=32, seed=0, cache_dir="")
  assert data.num_validation_documents == 0 and data.validation["input_ids"].shape == (0, 32)
  assert data.validation["masked_lm_ids"].shape == (0, 5)


def test_too_few_documents_for_the_held_out_split_names_the_settings(tokenizer, text_corpus):
  config = data_config(text_corpus, max_documents=3)
  with pytest.raises(ValueError, match=r"3 documents.*max_documents.*validation_fraction"):
    pretraining_data.build_pretraining(config, tokenizer, max_seq_length=32, seed=0, cache_dir="")
