"""IMDB sentiment data: read from the aclImdb archive/folder or TFDS, tokenize once (cached), batch on host.

Owns: reading reviews, train/validation split, the token cache. Does not own: WordPiece itself
(`tokenization`), batches and their global arrays (`batching`), meshes and shardings (the trainer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from typing import Sequence

from absl import logging
import ml_collections
import numpy as np

from bert_jax import archives
from bert_jax import batching
from bert_jax import tokenization

SPLITS = ("train", "test")
CLASSES = ("neg", "pos")  # Index = label: neg=0, pos=1, as in TFDS imdb_reviews.
TFDS_NAMES = ("", "tfds", "imdb_reviews")  # data_dir values (besides None) that mean "use TFDS".
ENCODE_CHUNK = 4096  # Texts per tokenizer call: bounds peak memory of the fast tokenizer's output.

_DATA_DIR_HINT = ("pass --config.data.data_dir=/path/to/aclImdb_v1.tar.gz or the folder it unpacks to "
                  "(aclImdb/ or its parent)")
# Keeps the train-subsample stream apart from split_validation's (seed) and train_batches' (seed, epoch).
_SUBSAMPLE_SALT = 1_000_003


@dataclasses.dataclass(frozen=True)
class ImdbSplit:
  """One split's labelled reviews: `texts` (N strings) and int32 `labels` [N] (neg=0, pos=1).

  `num_skipped` reviews were empty or not UTF-8; `skipped_examples` names up to 3 of them.
  """
  texts: list[str]
  labels: np.ndarray
  num_skipped: int = 0
  skipped_examples: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ImdbData:
  """Encoded splits, each a dict of `input_ids`, `token_type_ids`, `attention_mask` int32 [N, L]
  and `labels` int32 [N]. `train` and `validation` are None in test-only (evaluation) mode.
  `num_skipped` maps split name ('train', 'test') to the count of skipped reviews.
  """
  train: dict[str, np.ndarray] | None
  validation: dict[str, np.ndarray] | None
  test: dict[str, np.ndarray]
  num_skipped: dict[str, int]


# ----------------------------------------------------------------------------------------------------
# Reading reviews.


def load_imdb_split(data_dir: str | None, split: str) -> ImdbSplit:
  """Reads one labelled split ('train' or 'test'), sorted neg then pos, each by file name.

  `data_dir`: an `aclImdb_v1.tar.gz` (or .tgz/.tar) read in place, the unpacked `aclImdb/` folder or
  its parent, or None/'tfds'/'imdb_reviews' for `tfds.data_source('imdb_reviews')` (TFDS order).
  """
  return _load_splits(data_dir, (split,))[split]


def _load_splits(data_dir: str | None, splits: Sequence[str]) -> dict[str, ImdbSplit]:
  """Like `load_imdb_split` for several splits, so an archive is decompressed only once."""
  for split in splits:
    if split not in SPLITS:
      raise ValueError(f"split={split!r} is not one of {SPLITS}.")
  if data_dir is None or str(data_dir).strip() in TFDS_NAMES:
    raw, source = _read_tfds(splits), "tfds imdb_reviews"
  else:
    path = os.path.expanduser(str(data_dir))
    if not os.path.exists(path):
      raise FileNotFoundError(f"IMDB data_dir {path!r} does not exist; {_DATA_DIR_HINT}.")
    if os.path.isdir(path):
      raw = _read_folder(path, splits)
    elif path.endswith(archives.SUFFIXES):
      raw = _read_archive(path, splits)
    else:
      raise ValueError(f"IMDB data_dir {path!r} is a file but not a .tar.gz/.tgz/.tar archive; "
                       f"{_DATA_DIR_HINT}.")
    source = path
  return {split: _decode(raw[split], split, source) for split in splits}


# A raw review before decoding: (label, name for messages, bytes or str).
_Raw = tuple[int, str, bytes | str]


def _member_re(splits: Sequence[str]) -> re.Pattern[str]:
  """Archive members that are labelled reviews of `splits` (the others are not kept in memory); the
  aclImdb/ top folder and a leading ./ are optional."""
  return re.compile(r"^(?:\./)?(aclImdb/)?(" + "|".join(map(re.escape, splits)) + r")/(neg|pos)/([^/]+\.txt)$")


def _read_archive(path: str, splits: Sequence[str]) -> dict[str, list[_Raw]]:
  """Streams the archive once (no seeking), keeping only the wanted reviews."""
  members, first_members = archives.read_matching(path, _member_re(splits), hint=_DATA_DIR_HINT,
                                                  what="IMDB archive")
  found: dict[str, list[_Raw]] = {split: [] for split in splits}
  prefix = "aclImdb/"
  for match, data in members:
    top, split, cls, _ = match.groups()
    prefix = top or ""  # For messages: name paths the way this archive spells them.
    found[split].append((CLASSES.index(cls), match.string, data))
  for split in splits:
    labels = {label for label, _, _ in found[split]}
    for label, cls in enumerate(CLASSES):
      if label not in labels:
        raise ValueError(
            f"No {prefix}{split}/{cls}/*.txt in archive {path!r} (its first members: {first_members}); "
            f"expected the layout [aclImdb/]{{train,test}}/{{neg,pos}}/<id>_<rating>.txt; "
            f"{_DATA_DIR_HINT}.")
  # Sorting the member paths makes the order independent of how the archive was packed.
  return {split: sorted(found[split], key=lambda r: (r[0], r[1])) for split in splits}


def _read_folder(path: str, splits: Sequence[str]) -> dict[str, list[_Raw]]:
  """Reads `path/aclImdb/<split>/...` or `path/<split>/...`, file names sorted within each class."""
  root = os.path.join(path, "aclImdb") if os.path.isdir(os.path.join(path, "aclImdb")) else path
  found: dict[str, list[_Raw]] = {}
  for split in splits:
    found[split] = []
    for label, cls in enumerate(CLASSES):
      folder = os.path.join(root, split, cls)
      names = sorted(n for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else []
      if not names:
        raise ValueError(f"No aclImdb/{split}/{cls}/*.txt in {path!r} (looked in {folder!r}); "
                         f"{_DATA_DIR_HINT}.")
      for name in names:
        with open(os.path.join(folder, name), "rb") as f:
          found[split].append((label, os.path.join(split, cls, name), f.read()))
  return found


def _read_tfds(splits: Sequence[str]) -> dict[str, list[_Raw]]:
  """Reads `imdb_reviews` through `tfds.data_source` (ArrayRecord; needs no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; only this path needs it
    sources = {split: tfds.data_source("imdb_reviews", split=split) for split in splits}
  except Exception as e:  # pylint: disable=broad-except  # not downloaded, no network, missing deps...
    raise FileNotFoundError(
        f"Could not load IMDB from TFDS ('imdb_reviews': {type(e).__name__}: {e}). Without a prepared "
        f"TFDS copy (TFDS_DATA_DIR) and network access, {_DATA_DIR_HINT}.") from e
  # Record by record: the batched `__getitems__` is broken under `tfds.testing.mock_data`.
  return {split: [(int(record["label"]), f"imdb_reviews/{split}[{i}]", record["text"])
                  for i, record in enumerate(source)]
          for split, source in sources.items()}


def _decode(raw: list[_Raw], split: str, source: str) -> ImdbSplit:
  """Decodes UTF-8, drops (and counts) empty or undecodable reviews, and checks both labels remain."""
  texts, labels, skipped = [], [], []
  for label, name, data in raw:
    try:
      text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError:
      text = ""
    if not text.strip():
      skipped.append(name)
      continue
    texts.append(text)
    labels.append(label)
  if skipped:
    logging.warning("IMDB %s from %s: skipped %d empty or non-UTF-8 reviews, e.g. %s.",
                    split, source, len(skipped), skipped[:3])
  if not texts:
    raise ValueError(f"IMDB {split} split from {source!r} has zero usable reviews "
                     f"({len(skipped)} empty or non-UTF-8); {_DATA_DIR_HINT}.")
  missing = [CLASSES[label] for label in (0, 1) if label not in labels]
  if missing:
    raise ValueError(f"IMDB {split} split from {source!r} has no usable {missing[0]} reviews; a "
                     f"classifier needs both labels. Check the data or {_DATA_DIR_HINT}.")
  return ImdbSplit(texts, np.asarray(labels, np.int32), len(skipped), tuple(skipped[:3]))


# ----------------------------------------------------------------------------------------------------
# Choosing examples.


def split_validation(num_examples: int, validation_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns sorted (train_indices, validation_indices) partitioning range(num_examples).

  The validation set is `round(num_examples * validation_fraction)` examples of a seeded permutation.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1); use 0 for none.")
  permutation = np.random.default_rng(seed).permutation(num_examples)
  num_validation = int(round(num_examples * validation_fraction))
  return np.sort(permutation[num_validation:]), np.sort(permutation[:num_validation])


def _take(split: ImdbSplit, indices: np.ndarray) -> tuple[list[str], np.ndarray]:
  return [split.texts[i] for i in indices], split.labels[indices]


def _evenly_spaced(num_examples: int, limit: int) -> np.ndarray:
  """`limit` (0 = all) indices spread over range(num_examples); both classes, whatever the order."""
  if limit <= 0 or limit >= num_examples:
    return np.arange(num_examples)
  return np.linspace(0, num_examples, limit, endpoint=False).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Tokenizing, once per run.


def encode_cached(tokenizer: tokenization.Tokenizer, texts: Sequence[str], *, max_seq_length: int,
                  cache_dir: str | None, key: str) -> dict[str, np.ndarray]:
  """`tokenizer.encode(texts)` in chunks, cached as `<cache_dir>/<key>-<hash>.npz`.

  Returns `input_ids`, `token_type_ids`, `attention_mask`, each int32 [len(texts), max_seq_length].
  The hash covers `key`, the vocabulary, lower-casing, `max_seq_length` and every text, so a changed
  input never reads a stale file. `cache_dir=None` disables the cache.
  """
  path = None
  if cache_dir:
    digest = _cache_digest(tokenizer, texts, max_seq_length=max_seq_length, key=key)
    path = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}-{digest[:24]}.npz")
    cached = _load_cache(path, (len(texts), max_seq_length))
    if cached is not None:
      logging.info("Loaded %d encoded texts from %s.", len(texts), path)
      return cached
  encoded = {name: np.zeros((len(texts), max_seq_length), np.int32) for name in batching.FEATURES}
  for start in range(0, len(texts), ENCODE_CHUNK):
    chunk = tokenizer.encode(texts[start:start + ENCODE_CHUNK], max_seq_length=max_seq_length)
    for name in batching.FEATURES:
      encoded[name][start:start + len(chunk[name])] = chunk[name]
  if path:
    _save_cache(path, encoded)
  return encoded


def _cache_digest(tokenizer: tokenization.Tokenizer, texts: Sequence[str], *, max_seq_length: int,
                  key: str) -> str:
  hf = tokenizer.hf_tokenizer
  digest = hashlib.sha256()
  # The normalizer's repr carries lowercase/strip_accents, the real switches behind do_lower_case.
  normalizer = getattr(getattr(hf, "backend_tokenizer", None), "normalizer", None)
  header = (key, sorted(hf.get_vocab().items()), getattr(hf, "do_lower_case", None), repr(normalizer),
            max_seq_length, len(texts))
  digest.update(repr(header).encode())
  for text in texts:
    data = text.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little") + data)  # Length prefix: ["ab", "c"] != ["a", "bc"].
  return digest.hexdigest()


def _load_cache(path: str, shape: tuple[int, int]) -> dict[str, np.ndarray] | None:
  """The cached arrays, or None when absent or unusable (a warning; the caller recomputes)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      arrays = {name: data[name] for name in batching.FEATURES}
    if any(a.shape != shape or a.dtype != np.int32 for a in arrays.values()):
      raise ValueError(f"arrays are not int32 {shape}")
    return arrays
  except Exception as e:  # pylint: disable=broad-except  # any damage means "recompute".
    logging.warning("Ignoring corrupt token cache %s (%s: %s); re-encoding and overwriting it.",
                    path, type(e).__name__, e)
    return None


def _save_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes a temp file next to `path`, then renames: readers (other hosts too) never see half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


# ----------------------------------------------------------------------------------------------------
# What the trainer calls.


def build_imdb(config_data: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer, *,
               max_seq_length: int, seed: int, cache_dir: str | None) -> ImdbData:
  """Reads train and test, carves validation from train, tokenizes (cached) and returns `ImdbData`.

  `config_data.max_train_examples` (0 = all) keeps a seeded sample of train *before* validation is
  carved from it; `max_test_examples` (0 = all) keeps evenly spaced test reviews, the same subset as
  `build_imdb_test_only`.
  """
  _check_config(config_data)
  splits = _load_splits(config_data.data_dir or None, SPLITS)
  train = splits["train"]
  sample = np.arange(len(train.labels))
  if 0 < config_data.max_train_examples < len(sample):
    rng = np.random.default_rng((seed, _SUBSAMPLE_SALT))
    sample = np.sort(rng.choice(len(sample), config_data.max_train_examples, replace=False))
  texts, labels = _take(train, sample)
  encoded = encode_cached(tokenizer, texts, max_seq_length=max_seq_length, cache_dir=cache_dir,
                          key="imdb-train")
  train_idx, validation_idx = split_validation(len(labels), config_data.validation_fraction, seed)
  full = dict(encoded, labels=labels)
  return ImdbData(
      train={name: array[train_idx] for name, array in full.items()},
      validation={name: array[validation_idx] for name, array in full.items()},
      test=_encode_test(splits["test"], config_data, tokenizer, max_seq_length, cache_dir),
      num_skipped={"train": train.num_skipped, "test": splits["test"].num_skipped})


def build_imdb_test_only(config_data: ml_collections.ConfigDict, tokenizer: tokenization.Tokenizer,
                         *, max_seq_length: int, cache_dir: str | None) -> ImdbData:
  """Evaluation mode: reads only the test split (an archive holding just aclImdb/test/ is enough)."""
  _check_config(config_data)
  test = load_imdb_split(config_data.data_dir or None, "test")
  return ImdbData(train=None, validation=None,
                  test=_encode_test(test, config_data, tokenizer, max_seq_length, cache_dir),
                  num_skipped={"test": test.num_skipped})


def _encode_test(test: ImdbSplit, config_data: ml_collections.ConfigDict,
                 tokenizer: tokenization.Tokenizer, max_seq_length: int,
                 cache_dir: str | None) -> dict[str, np.ndarray]:
  texts, labels = _take(test, _evenly_spaced(len(test.labels), config_data.max_test_examples))
  encoded = encode_cached(tokenizer, texts, max_seq_length=max_seq_length, cache_dir=cache_dir,
                          key="imdb-test")
  return dict(encoded, labels=labels)


def _check_config(config_data: ml_collections.ConfigDict) -> None:
  """Fails on bad `config.data` values before any data is read."""
  fraction = config_data.validation_fraction
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"config.data.validation_fraction={fraction} must be in [0, 1); use 0 for none.")
  for name in ("max_train_examples", "max_test_examples"):
    if config_data[name] < 0:
      raise ValueError(f"config.data.{name}={config_data[name]} must be >= 0 (0 means all).")
