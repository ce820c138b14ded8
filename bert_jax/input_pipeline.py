"""IMDB sentiment data: read from the aclImdb archive/folder or TFDS, tokenize once (cached), batch on host.

Owns: reading reviews, train/validation split, the token cache, numpy batches and their sharded global
arrays. Does not own: WordPiece itself (`tokenization`), meshes and shardings (the trainer builds them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
from typing import Iterator, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from bert_jax import archives, tokenization

SPLITS = ("train", "test")
CLASSES = ("neg", "pos")  # Index = label: neg=0, pos=1, as in TFDS imdb_reviews.
TFDS_NAMES = ("", "tfds", "imdb_reviews")  # data_dir values (besides None) that mean "use TFDS".
FEATURES = ("input_ids", "token_type_ids", "attention_mask")
ENCODE_CHUNK = 4096  # Texts per tokenizer call: bounds peak memory of the fast tokenizer's output.

_DATA_DIR_HINT = ("pass --config.data.data_dir=/path/to/aclImdb_v1.tar.gz or the folder it unpacks to "
                  "(aclImdb/ or its parent)")
# An archive member of a labelled review; the aclImdb/ top folder (and a leading ./) are optional.
_MEMBER_RE = re.compile(r"^(?:\./)?(aclImdb/)?(train|test)/(neg|pos)/([^/]+\.txt)$")
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


def _read_archive(path: str, splits: Sequence[str]) -> dict[str, list[_Raw]]:
  """Streams the archive once (no seeking), keeping only the wanted reviews."""
  members, first_members = archives.read_matching(path, _MEMBER_RE, hint=_DATA_DIR_HINT, what="IMDB archive")
  found: dict[str, list[_Raw]] = {split: [] for split in splits}
  prefix = "aclImdb/"
  for match, data in members:
    top, split, cls, _ = match.groups()
    prefix = top or ""  # For messages: name paths the way this archive spells them.
    if split in found:
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
  encoded = {name: np.zeros((len(texts), max_seq_length), np.int32) for name in FEATURES}
  for start in range(0, len(texts), ENCODE_CHUNK):
    chunk = tokenizer.encode(texts[start:start + ENCODE_CHUNK], max_seq_length=max_seq_length)
    for name in FEATURES:
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
      arrays = {name: data[name] for name in FEATURES}
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
# Batching on the host, then global arrays.


def num_train_batches(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch; the last partial batch is dropped."""
  return num_examples // batch_size


def train_batches(arrays: dict[str, np.ndarray], *, batch_size: int, seed: int, epoch: int,
                  start_batch: int = 0, length_buckets: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of shuffled full batches, from batch `start_batch` on (for exact resume).

  `arrays` holds `input_ids`, `token_type_ids`, `attention_mask` [N, L] and `labels` [N]; each batch
  has those at [batch_size, ...] plus float32 `weights` [batch_size] of ones. The order depends only
  on (seed, epoch).

  With `length_buckets` (increasing lengths <= L), each pool of `BUCKET_POOL_BATCHES` shuffled batches
  is regrouped by length and the batches come in shuffled order, each cut to the first bucket that
  holds its longest example (L if none does): [batch_size, bucket] instead of [batch_size, L].
  """
  num_examples = num_rows(arrays)
  num_batches = num_train_batches(num_examples, batch_size)
  if num_batches == 0:
    raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples; lower "
                     "the batch size or use more data.")
  if not 0 <= start_batch <= num_batches:
    raise ValueError(f"start_batch={start_batch} is outside the epoch's {num_batches} batches.")
  rng = np.random.default_rng((seed, epoch))
  permutation = rng.permutation(num_examples)[:num_batches * batch_size]
  batch_indices = permutation.reshape(num_batches, batch_size)
  if length_buckets:
    batch_indices = _group_by_length(batch_indices, arrays["attention_mask"].sum(1), rng)
  for indices in batch_indices[start_batch:]:
    batch = {name: array[indices] for name, array in arrays.items()}
    batch["weights"] = np.ones(batch_size, np.float32)
    yield _cut_to_bucket(batch, length_buckets)


# Batches regrouped by length together: more gives batches of more even length, fewer keeps the
# epoch's order closer to a plain shuffle (fairseq and tensor2tensor use pools of this order).
BUCKET_POOL_BATCHES = 100


def _group_by_length(batch_indices: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """[num_batches, batch_size] example indices -> the same examples, sorted by length within pools of
  BUCKET_POOL_BATCHES batches, the batches then shuffled."""
  num_batches, batch_size = batch_indices.shape
  grouped = []
  for start in range(0, num_batches, BUCKET_POOL_BATCHES):
    pool = batch_indices[start:start + BUCKET_POOL_BATCHES].reshape(-1)
    pool = pool[np.argsort(lengths[pool], kind="stable")]
    grouped.append(pool.reshape(-1, batch_size))
  grouped = np.concatenate(grouped)
  return grouped[rng.permutation(num_batches)]


def bucket_length(longest: int, length_buckets: Sequence[int], max_seq_length: int) -> int:
  """The first of `length_buckets` that holds `longest` tokens; `max_seq_length` if none does."""
  return next((bucket for bucket in length_buckets if bucket >= longest), max_seq_length)


def _cut_to_bucket(batch: dict[str, np.ndarray], length_buckets: Sequence[int]) -> dict[str, np.ndarray]:
  """Drops the all-padding columns beyond the batch's bucket. The model's outputs for the kept tokens
  are the same: padding is masked out of attention and positions count from the start."""
  if not length_buckets:
    return batch
  mask = batch["attention_mask"]
  longest = int(mask.any(axis=0).nonzero()[0].max(initial=0)) + 1
  length = bucket_length(longest, length_buckets, mask.shape[1])
  return {name: x[:, :length] if name in FEATURES else x for name, x in batch.items()}


def eval_batches(arrays: dict[str, np.ndarray], *, batch_size: int,
                 length_buckets: Sequence[int] = ()) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example once, in batches of [batch_size, ...]: in order, or with `length_buckets`
  shortest first, each batch cut to its bucket (see `train_batches`).

  The last batch is padded with all-zero rows; float32 `weights` [batch_size] is 1 for real rows and
  0 for padding, so weighted sums count each example exactly once (and shapes never recompile).
  """
  num_examples = num_rows(arrays)
  order = (np.argsort(arrays["attention_mask"].sum(1), kind="stable") if length_buckets
           else np.arange(num_examples))
  for start in range(0, num_examples, batch_size):
    indices = order[start:start + batch_size]
    batch = {}
    for name, array in arrays.items():
      batch[name] = np.zeros((batch_size,) + array.shape[1:], array.dtype)
      batch[name][:len(indices)] = array[indices]
    batch["weights"] = (np.arange(batch_size) < len(indices)).astype(np.float32)
    yield _cut_to_bucket(batch, length_buckets)


def num_rows(arrays: dict[str, np.ndarray]) -> int:
  """The leading dimension shared by every array of `arrays` (examples, or rows of a batch)."""
  return len(next(iter(arrays.values())))


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
  """The rows of a global batch of `batch_size` that this process's devices hold under `sharding`
  (split on the leading axis), in order: all of them with one process."""
  indices = sharding.addressable_devices_indices_map((batch_size,)).values()
  spans = sorted({index[0].indices(batch_size)[:2] for index in indices})
  return np.concatenate([np.arange(start, stop) for start, stop in spans])


def shard_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global arrays laid out by `sharding` (rows over the mesh's data axes) from the global `batch`.

  Every process holds the whole host batch (the same on all, built from the same seed) and places
  only the rows of its own devices (`process_rows`); with one process, that is every row.
  """
  size = num_rows(batch)
  rows = process_rows(sharding, size)
  return {name: jax.make_array_from_process_local_data(sharding, x if len(rows) == size else x[rows],
                                                       (size,) + x.shape[1:])
          for name, x in batch.items()}


def pmap_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of the global `batch`, split over its devices: `[local devices, rows per
  device, ...]`, what `jax.pmap` maps over. Process p takes the p-th of equal blocks of rows."""
  size = num_rows(batch)
  per_process = size // jax.process_count()
  start = jax.process_index() * per_process
  return {name: x[start:start + per_process].reshape((jax.local_device_count(), -1) + x.shape[1:])
          for name, x in batch.items()}


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
