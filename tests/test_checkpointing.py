"""Checkpoints: what is kept (latest K + best by validation accuracy), metrics, meta and restore."""

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax import checkpointing


def _state(value):
  return {"params": {"w": jnp.full((3,), value, jnp.float32)}, "step": jnp.asarray(value, jnp.int32)}


def _save_steps(directory, accuracies, keep=2):
  ckpt = checkpointing.Checkpoints(str(directory), keep=keep)
  for step, accuracy in accuracies:
    ckpt.save(step, _state(step), {"model": {"hidden_size": 8}},
              metrics=None if accuracy is None else {"validation_accuracy": accuracy})
  ckpt.wait()
  return ckpt


def test_keeps_the_latest_k_and_the_best(tmp_path):
  ckpt = _save_steps(tmp_path, [(10, 0.9), (20, 0.5), (30, None), (40, 0.6)])
  assert ckpt.all_steps() == [10, 30, 40]
  assert ckpt.best_step() == 10
  ckpt.close()


def test_best_survives_reopening_the_manager(tmp_path):
  _save_steps(tmp_path, [(10, 0.9), (20, 0.5)]).close()
  ckpt = _save_steps(tmp_path, [(30, 0.4), (40, 0.3)])
  assert ckpt.best_step() == 10 and 10 in ckpt.all_steps()
  ckpt.close()


def test_best_is_the_latest_when_nothing_was_validated(tmp_path):
  ckpt = _save_steps(tmp_path, [(1, None), (2, None)])
  assert ckpt.best_step() == 2
  ckpt.close()


def test_restore_gives_back_state_and_meta(tmp_path):
  ckpt = _save_steps(tmp_path, [(7, 0.5)])
  abstract = jax.eval_shape(lambda: _state(0))
  restored = ckpt.restore(7, abstract)
  np.testing.assert_array_equal(restored["params"]["w"], [7, 7, 7])
  assert ckpt.read_meta(7) == {"model": {"hidden_size": 8}}
  ckpt.close()
