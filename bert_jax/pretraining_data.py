"""BERT pretraining examples (masked LM + next sentence prediction) from raw text, masked dynamically.

Owns: tokenizing documents, sentence pairs as google-research/bert's `create_pretraining_data.py` makes
them, their cache, the held-out split, and batches masked anew every epoch (by `masking`). Does not own:
reading the corpus (`corpus`), WordPiece (`tokenization`), global arrays (`batching.shard_batch`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import time
from typing import Callable, Iterator, Sequence

from absl import logging
import ml_collections
import numpy as np

from bert_jax import corpus
from bert_jax import batching
from bert_jax import input_pipeline
from bert_jax import masking
from bert_jax import tokenization

INSTANCE_FEATURES = ("input_ids", "token_type_ids", "attention_mask", "next_sentence_label")
TOKENIZE_CHUNK = 8192  # Sentences per tokenizer call: bounds the peak memory of its Python lists.
CACHE_VERSION = 1  # Bump when instances change for the same inputs, so old caches are not read.
# Salts keep the random streams apart (the document split uses `seed` itself, as split_validation).
_TRAIN_SALT, _VALIDATION_SALT, _VALIDATION_MASK_SALT = 1, 2, 3
_MASK_SALT = 7  # pretraining_batches masks batch b of an epoch with default_rng((seed, epoch, b, 7)).
_MIN_HELD_OUT = 2  # NSP pairs held-out segments only with held-out documents, so at least two.

read_documents = corpus.read_documents  # Part of this module's API; the readers live in `corpus`.


@dataclasses.dataclass(frozen=True)
class PretrainingData:
  """`train`: unmasked instances (`create_instances`' arrays), masked per batch by `pretraining_batches`.

  `validation`: instances of held-out documents, masked once with a fixed seed (the same every
  evaluation): `create_instances`' arrays plus `masked_lm_positions`, `masked_lm_ids` int32 and
  `masked_lm_weights` float32 [N, max_predictions_per_seq]. Its N is 0 when no documents are held out.
  """
  train: dict[str, np.ndarray]
  validation: dict[str, np.ndarray]
  num_documents: int
  num_validation_documents: int


# ----------------------------------------------------------------------------------------------------
# Documents to sentence pairs.


def tokenize_documents(tokenizer: tokenization.Tokenizer,
                       documents: Sequence[Sequence[str]]) -> list[list[np.ndarray]]:
  """Per document, per sentence: int32 WordPiece ids [num_pieces], without special tokens.

  One batched fast-tokenizer call per TOKENIZE_CHUNK sentences. Sentences that yield no pieces are
  dropped, and so are documents left empty.
  """
  sentences = [sentence for document in documents for sentence in document]
  lengths, flat = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)]
  for start in range(0, len(sentences), TOKENIZE_CHUNK):
    ids = tokenizer.hf_tokenizer(sentences[start:start + TOKENIZE_CHUNK], add_special_tokens=False,
                                 return_attention_mask=False, return_token_type_ids=False,
                                 verbose=False)["input_ids"]  # verbose: long sentences are fine here.
    lengths.append(np.fromiter(map(len, ids), np.int64, len(ids)))
    flat.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths[-1].sum())))
  lengths = np.concatenate(lengths)
  pieces = np.split(np.concatenate(flat), np.cumsum(lengths)[:-1]) if len(lengths) else []
  tokenized, start = [], 0
  for document in documents:
    kept = [p for p in pieces[start:start + len(document)] if len(p)]
    start += len(document)
    if kept:
      tokenized.append(kept)
  return tokenized


def create_instances(documents: list[list[np.ndarray]], *, max_seq_length: int, short_seq_prob: float,
                     seed: int | Sequence[int], cls_id: int, sep_id: int, pad_id: int = 0,
                     dupe_factor: int = 1) -> dict[str, np.ndarray]:
  """Sentence pairs `[CLS] A [SEP] B [SEP]` for NSP, as `create_instances_from_document` in BERT.

  `documents`: per document, per sentence int32 ids (`tokenize_documents`). Returns `input_ids`,
  `token_type_ids` (0 for [CLS] A [SEP], 1 for B [SEP]), `attention_mask`, each int32
  [N, max_seq_length] padded with `pad_id`, and int32 `next_sentence_label` [N]: 0 when B continues
  A in its document, 1 when B is a random segment of another document (Hugging Face's convention).
  Instances come in document order; each of `dupe_factor` passes pairs the documents anew.
  """
  if max_seq_length < 5:
    raise ValueError(f"max_seq_length={max_seq_length} leaves no room for two segments; use >= 5.")
  documents = [doc for doc in ([s for s in document if len(s)] for document in documents) if doc]
  if len(documents) < 2:
    raise ValueError(f"Next sentence prediction needs at least 2 non-empty documents (random next "
                     f"segments come from another document); got {len(documents)}. Use more text.")
  rng = np.random.default_rng(seed)
  pairs = []  # (tokens_a, tokens_b, is_random_next)
  for _ in range(dupe_factor):
    for index in range(len(documents)):
      pairs.extend(_document_pairs(documents, index, max_seq_length - 3, short_seq_prob, rng))
  if not pairs:
    raise ValueError(f"No instances from {len(documents)} documents; use more text.")
  return _pack(pairs, max_seq_length, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id)


def _document_pairs(documents: list[list[np.ndarray]], index: int, max_num_tokens: int,
                    short_seq_prob: float, rng: np.random.Generator) -> list[tuple]:
  """One document's pairs: chunks of sentences up to a target length, split at a random sentence."""
  document = documents[index]
  target_length = max_num_tokens
  if rng.random() < short_seq_prob:  # Short sequences now and then, so fine-tuning lengths are seen.
    target_length = int(rng.integers(2, max_num_tokens + 1))
  pairs, chunk, chunk_length, i = [], [], 0, 0
  while i < len(document):
    chunk.append(document[i])
    chunk_length += len(document[i])
    if i == len(document) - 1 or chunk_length >= target_length:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      tokens_a = np.concatenate(chunk[:a_end])
      is_random_next = len(chunk) == 1 or rng.random() < 0.5
      if is_random_next:
        other = int(rng.integers(len(documents) - 1))
        other = documents[other + (other >= index)]  # Any document but this one.
        b_sentences, b_length = [], 0
        for sentence in other[int(rng.integers(len(other))):]:
          b_sentences.append(sentence)
          b_length += len(sentence)
          if b_length >= target_length - len(tokens_a):
            break
        tokens_b = np.concatenate(b_sentences)
        i -= len(chunk) - a_end  # The chunk's unused sentences start the next chunk.
      else:
        tokens_b = np.concatenate(chunk[a_end:])
      pairs.append(_truncate_pair(tokens_a, tokens_b, max_num_tokens, rng) + (int(is_random_next),))
      chunk, chunk_length = [], 0
    i += 1
  return pairs


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_num_tokens: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """BERT's `truncate_seq_pair` without its per-token loop, with the same distribution.

  BERT drops one token at a time from the longer segment (B on ties), from the front or the back
  with probability 1/2; so the cuts per segment are fixed and the front share is binomial.
  """
  excess = len(a) + len(b) - max_num_tokens
  if excess <= 0:
    return a, b
  first = min(excess, abs(len(a) - len(b)))  # Until both are equally long...
  rest = excess - first  # ... then alternately, B first.
  cut_a = rest // 2 + (first if len(a) > len(b) else 0)
  cut_b = excess - cut_a
  front_a, front_b = int(rng.binomial(cut_a, 0.5)), int(rng.binomial(cut_b, 0.5))
  return a[front_a:len(a) - (cut_a - front_a)], b[front_b:len(b) - (cut_b - front_b)]


def _pack(pairs: list[tuple], max_seq_length: int, *, cls_id: int, sep_id: int,
          pad_id: int) -> dict[str, np.ndarray]:
  """Scatters all pairs into fixed-shape arrays at once (no per-row loop)."""
  length_a = np.array([len(a) for a, _, _ in pairs], np.int64)
  length_b = np.array([len(b) for _, b, _ in pairs], np.int64)
  rows = np.arange(len(pairs))
  input_ids = np.full((len(pairs), max_seq_length), pad_id, np.int32)
  input_ids[:, 0] = cls_id
  input_ids[rows, length_a + 1] = sep_id
  input_ids[rows, length_a + length_b + 2] = sep_id
  for segment, lengths, offset in ((0, length_a, np.ones_like(length_a)), (1, length_b, length_a + 2)):
    row = np.repeat(rows, lengths)
    within = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    input_ids[row, np.repeat(offset, lengths) + within] = np.concatenate([p[segment] for p in pairs])
  return _with_layout(input_ids, length_a + length_b + 3, length_b + 1,
                      np.array([pair[2] for pair in pairs], np.int32))


def _no_instances(max_seq_length: int) -> dict[str, np.ndarray]:
  none = np.zeros(0, np.int32)
  return _with_layout(np.zeros((0, max_seq_length), np.int32), none, none, none)


def _with_layout(input_ids: np.ndarray, num_tokens: np.ndarray, num_type_1: np.ndarray,
                 next_sentence_label: np.ndarray) -> dict[str, np.ndarray]:
  """Adds `attention_mask` (the first `num_tokens`) and `token_type_ids` (the last `num_type_1` of those)."""
  position = np.arange(input_ids.shape[1])
  attention_mask = position < np.asarray(num_tokens)[:, None]
  token_type_ids = attention_mask & (position >= np.asarray(num_tokens - num_type_1)[:, None])
  return {"input_ids": input_ids.astype(np.int32), "token_type_ids": token_type_ids.astype(np.int32),
          "attention_mask": attention_mask.astype(np.int32),
          "next_sentence_label": next_sentence_label.astype(np.int32)}


# ----------------------------------------------------------------------------------------------------
# Batching on the host.


def pretraining_batches(arrays: dict[str, np.ndarray], *, batch_size: int, seed: int, epoch: int,
                        start_batch: int = 0, mask: Callable[[dict, np.random.Generator], dict]
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of shuffled full batches, masked anew, from batch `start_batch` on.

  `batching.train_batches` (order from (seed, epoch), float32 `weights` [batch_size] of ones),
  then `mask(batch, default_rng((seed, epoch, batch_index, 7)))`: masks change every epoch,
  and a run resumed at `start_batch` sees exactly the batches an uninterrupted one would.
  """
  batches = batching.train_batches(arrays, batch_size=batch_size, seed=seed, epoch=epoch,
                                         start_batch=start_batch)
  for b, batch in enumerate(batches, start_batch):
    yield mask(batch, np.random.default_rng((seed, epoch, b, _MASK_SALT)))


# ----------------------------------------------------------------------------------------------------
# What the trainer calls.


def build_pretraining(config_data: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer, *,
                      max_seq_length: int, seed: int, cache_dir: str | None) -> PretrainingData:
  """Reads and tokenizes the corpus, holds out documents, pairs sentences, masks validation once.

  Documents are split by a seeded permutation: round(n * validation_fraction), at least 2 when the
  fraction is > 0, are held out; each side draws its random next segments from its own documents.
  The instances are cached in `cache_dir` ('' or None: no cache), keyed by the vocabulary, the
  source (file paths, sizes and mtimes; for TFDS the texts) and every setting they depend on.
  """
  _check_config(config_data, max_seq_length)
  hf = tokenizer.hf_tokenizer
  source, documents = corpus.fingerprint(config_data.data_dir), None
  if source is None:  # TFDS: no files to stat, so the texts themselves key the cache.
    documents = _read(config_data)
    source = corpus.texts_fingerprint(documents)
  # Not data_dir itself: `source` digests the files it names, so '../x.tar.gz' and '/abs/x.tar.gz' agree.
  settings = {name: config_data[name] for name in (
      "tfds_name", "tfds_split", "tfds_text_key", "max_documents", "validation_fraction",
      "short_seq_prob", "dupe_factor")}
  settings.update(max_seq_length=max_seq_length, seed=seed, source=source)
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, f"pretraining-{_cache_digest(tokenizer, settings)[:24]}.npz")
  arrays = _load_cache(path) if path else None
  if arrays is not None:
    logging.info("Loaded %d + %d pretraining instances from %s.", len(arrays["train"]["input_ids"]),
                 len(arrays["validation"]["input_ids"]), path)
  else:
    started = time.perf_counter()
    documents = tokenize_documents(tokenizer, _read(config_data) if documents is None else documents)
    train_docs, held_out_docs = _split_documents(documents, config_data.validation_fraction, seed)
    pairing = dict(max_seq_length=max_seq_length, short_seq_prob=config_data.short_seq_prob,
                   cls_id=hf.cls_token_id, sep_id=hf.sep_token_id, pad_id=hf.pad_token_id,
                   dupe_factor=config_data.dupe_factor)
    arrays = {
        "train": create_instances(train_docs, seed=(seed, _TRAIN_SALT), **pairing),
        "validation": (create_instances(held_out_docs, seed=(seed, _VALIDATION_SALT), **pairing)
                       if held_out_docs else _no_instances(max_seq_length)),
        "counts": {"num_documents": np.int64(len(documents)),
                   "num_validation_documents": np.int64(len(held_out_docs))}}
    logging.info("Made %d + %d pretraining instances from %d documents in %.1fs.",
                 len(arrays["train"]["input_ids"]), len(arrays["validation"]["input_ids"]),
                 len(documents), time.perf_counter() - started)
    if path:
      input_pipeline._save_cache(path, _to_cache(arrays))  # pylint: disable=protected-access
  mask = masking.mask_fn(config_data, tokenizer)
  masked = mask(arrays["validation"], np.random.default_rng((seed, _VALIDATION_MASK_SALT)))
  return PretrainingData(train=arrays["train"], validation=masked,
                         num_documents=int(arrays["counts"]["num_documents"]),
                         num_validation_documents=int(arrays["counts"]["num_validation_documents"]))


def _read(config_data: ml_collections.ConfigDict) -> list[list[str]]:
  return corpus.read_documents(config_data.data_dir, tfds_name=config_data.tfds_name,
                               tfds_split=config_data.tfds_split,
                               tfds_text_key=config_data.tfds_text_key,
                               max_documents=config_data.max_documents)


def _split_documents(documents: list, validation_fraction: float, seed: int) -> tuple[list, list]:
  """(train, held-out) documents, each in corpus order; raises when either side is too small for NSP."""
  num_held_out = 0
  if validation_fraction > 0:
    num_held_out = max(_MIN_HELD_OUT, int(round(len(documents) * validation_fraction)))
  if len(documents) - num_held_out < 2:
    raise ValueError(
        f"The corpus has {len(documents)} documents; holding out {num_held_out} "
        f"(config.data.validation_fraction={validation_fraction}, at least {_MIN_HELD_OUT} when > 0) "
        f"leaves {len(documents) - num_held_out} for training, but next sentence prediction needs 2 "
        "or more. Raise config.data.max_documents (0 = all), add text, or lower validation_fraction.")
  permutation = np.random.default_rng(seed).permutation(len(documents))
  held_out = set(permutation[:num_held_out].tolist())
  return ([d for i, d in enumerate(documents) if i not in held_out],
          [d for i, d in enumerate(documents) if i in held_out])


def _cache_digest(tokenizer: tokenization.Tokenizer, settings: dict) -> str:
  hf = tokenizer.hf_tokenizer
  # The normalizer's repr carries lowercase/strip_accents, the real switches behind do_lower_case.
  normalizer = getattr(getattr(hf, "backend_tokenizer", None), "normalizer", None)
  header = (CACHE_VERSION, sorted(hf.get_vocab().items()), getattr(hf, "do_lower_case", None),
            repr(normalizer), sorted(settings.items()))
  return hashlib.sha256(repr(header).encode()).hexdigest()


def _to_cache(arrays: dict) -> dict[str, np.ndarray]:
  """Compact form: ids in the narrowest dtype, and per row the lengths that rebuild the layout."""
  flat = {f"counts.{name}": value for name, value in arrays["counts"].items()}
  for part in ("train", "validation"):
    instances = arrays[part]
    ids = instances["input_ids"]
    flat[f"{part}.input_ids"] = ids.astype(np.uint16) if ids.size == 0 or ids.max() < 2**16 else ids
    flat[f"{part}.num_tokens"] = instances["attention_mask"].sum(1).astype(np.int32)
    flat[f"{part}.num_type_1"] = instances["token_type_ids"].sum(1).astype(np.int32)
    flat[f"{part}.next_sentence_label"] = instances["next_sentence_label"]
  return flat


def _load_cache(path: str) -> dict | None:
  """The cached arrays, or None when absent or unusable (a warning; the caller recomputes)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      flat = {name: data[name] for name in data.files}
    arrays = {"counts": {name: flat[f"counts.{name}"]
                         for name in ("num_documents", "num_validation_documents")}}
    for part in ("train", "validation"):
      arrays[part] = _with_layout(*(flat[f"{part}.{name}"] for name in (
          "input_ids", "num_tokens", "num_type_1", "next_sentence_label")))
    return arrays
  except Exception as e:  # pylint: disable=broad-except  # any damage means "recompute".
    logging.warning("Ignoring corrupt pretraining cache %s (%s: %s); rebuilding and overwriting it.",
                    path, type(e).__name__, e)
    return None


def _check_config(config_data: ml_collections.ConfigDict, max_seq_length: int) -> None:
  """Fails on bad `config.data` values before any data is read."""
  checks = (
      ("validation_fraction", 0.0 <= config_data.validation_fraction < 1.0, "in [0, 1); 0 for none"),
      ("max_documents", config_data.max_documents >= 0, ">= 0 (0 means all)"),
      ("short_seq_prob", 0.0 <= config_data.short_seq_prob <= 1.0, "in [0, 1]"),
      ("masked_lm_prob", 0.0 < config_data.masked_lm_prob <= 1.0, "in (0, 1]"),
      ("max_predictions_per_seq", config_data.max_predictions_per_seq >= 1, ">= 1"),
      ("dupe_factor", config_data.dupe_factor >= 1, ">= 1"))
  for name, ok, allowed in checks:
    if not ok:
      raise ValueError(f"config.data.{name}={config_data[name]} must be {allowed}.")
  if max_seq_length < 5:
    raise ValueError(f"config.data.max_seq_length={max_seq_length} leaves no room for [CLS] A [SEP] "
                     "B [SEP]; use >= 5 (BERT used 128, then 512).")
  if not config_data.data_dir and not config_data.tfds_name:
    raise ValueError("config.data.data_dir and config.data.tfds_name are both empty; set one (a text "
                     "file, folder or aclImdb archive; or a TFDS name such as imdb_reviews).")
