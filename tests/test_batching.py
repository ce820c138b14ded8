"""Tests for bert_jax.batching: epoch order, resume, eval padding, length buckets, placement."""

import jax
import numpy as np
import pytest

from bert_jax import batching


def toy_arrays(num_examples: int, length: int = 4) -> dict[str, np.ndarray]:
  ids = np.arange(num_examples * length, dtype=np.int32).reshape(num_examples, length)
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids),
          "labels": np.arange(num_examples, dtype=np.int32) % 2}


def batch_order(**kwargs) -> list[int]:
  batches = batching.train_batches(toy_arrays(10), batch_size=3, **kwargs)
  return [int(row[0]) // 4 for batch in batches for row in batch["input_ids"]]


def test_train_batches_same_seed_and_epoch_same_order():
  assert batch_order(seed=1, epoch=2) == batch_order(seed=1, epoch=2)


def test_train_batches_order_changes_with_epoch():
  assert batch_order(seed=1, epoch=0) != batch_order(seed=1, epoch=1)


def test_train_batches_start_batch_resumes_the_epoch_tail():
  assert batch_order(seed=5, epoch=3, start_batch=2) == batch_order(seed=5, epoch=3)[6:]


def test_train_batches_are_full_with_unit_weights():
  batches = list(batching.train_batches(toy_arrays(10), batch_size=3, seed=0, epoch=0))
  assert len(batches) == batching.num_train_batches(10, 3) == 3  # 10th example dropped.
  for batch in batches:
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].shape == (3,)
    np.testing.assert_array_equal(batch["weights"], np.ones(3, np.float32))
  rows = [int(r[0]) // 4 for b in batches for r in b["input_ids"]]
  assert len(set(rows)) == 9  # No example twice within an epoch.


def test_train_batches_rejects_batch_larger_than_data():
  with pytest.raises(ValueError, match="batch_size=11 exceeds the 10"):
    next(batching.train_batches(toy_arrays(10), batch_size=11, seed=0, epoch=0))


def test_eval_batches_cover_every_example_once_with_padding():
  arrays = toy_arrays(7)
  batches = list(batching.eval_batches(arrays, batch_size=3))
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
  for batch in batching.train_batches(arrays, batch_size=8, seed=0, epoch=0, length_buckets=(8, 16, 24)):
    examples = _example_ids(batch)
    longest = arrays["attention_mask"][examples].sum(1).max()
    width = batch["input_ids"].shape[1]
    assert width == batching.bucket_length(longest, (8, 16, 24), 32) and width >= longest
    assert width in (8, 16, 24, 32) and batch["labels"].shape == batch["weights"].shape == (8,)
    # Only padding was cut: every kept row is its example's first `width` columns, nothing more.
    for name in batching.FEATURES:
      np.testing.assert_array_equal(batch[name], arrays[name][examples, :width])
    assert batch["attention_mask"].sum() == arrays["attention_mask"][examples].sum()


def test_length_buckets_keep_the_epoch_s_examples_and_cut_most_padding():
  arrays = varied_lengths(1003)  # 3 left over: both drop the same ones
  plain = list(batching.train_batches(arrays, batch_size=8, seed=3, epoch=1))
  bucketed = list(batching.train_batches(arrays, batch_size=8, seed=3, epoch=1, length_buckets=(8, 16, 24)))
  assert len(bucketed) == len(plain) == 125
  assert sorted(e for b in bucketed for e in _example_ids(b)) == sorted(e for b in plain for e in _example_ids(b))
  tokens = lambda batches: sum(b["input_ids"].size for b in batches)  # noqa: E731
  # Lengths uniform on 2..32: about 17 of 32 columns are real; grouped by length, batches come close.
  assert tokens(bucketed) < 0.7 * tokens(plain)


def test_length_buckets_are_deterministic_and_resume_at_any_batch():
  def order(**kwargs):
    batches = batching.train_batches(varied_lengths(300), batch_size=4, length_buckets=(8, 16), **kwargs)
    return [_example_ids(b) for b in batches]
  assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
  assert order(seed=1, epoch=2) != order(seed=1, epoch=3)
  assert order(seed=1, epoch=2, start_batch=30) == order(seed=1, epoch=2)[30:]


def test_eval_batches_with_length_buckets_count_every_example_once():
  arrays = varied_lengths(50)
  batches = list(batching.eval_batches(arrays, batch_size=8, length_buckets=(8, 16)))
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
  batch = next(batching.eval_batches(toy_arrays(2), batch_size=2))
  sharded = batching.shard_batch(batch, sharding)
  assert set(sharded) == set(batch)
  for name, array in sharded.items():
    assert isinstance(array, jax.Array) and array.shape == batch[name].shape
    assert array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), batch[name])
