"""Batches on the host and their global arrays: shuffled train epochs, padded eval passes, length buckets.

Owns: the order of examples in an epoch (seeded, resumable at any batch), cutting batches to length
buckets, and placing a host batch on the devices (`shard_batch` for jit, `pmap_batch` for pmap).
Works on any dict of equal-length numpy arrays (IMDB or pretraining instances); reading and
tokenizing the data is `input_pipeline`'s and `pretraining_data`'s.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np

FEATURES = ("input_ids", "token_type_ids", "attention_mask")  # [N, seq] token arrays; cut by length buckets

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


