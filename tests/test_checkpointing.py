"""Checkpoints: what is kept (latest K + best by a metric), restore, and the faults a run must survive:
damaged steps (skipped, reported, never touched), Orbax's partial writes, failed saves, durable saves."""

import errno
import hashlib
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import async_path

from bert_jax import checkpointing

# A failed read leaves an Orbax coroutine whose exception Python reports when it is collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

META = {"model": {"hidden_size": 8}}


def _state(value):
  # 512 random floats: more than Orbax inlines in its index (1 KiB), so they get a data file of their own.
  return {"params": {"w": jax.random.normal(jax.random.key(value), (512,))},
          "step": jnp.asarray(value, jnp.int32)}


ABSTRACT = jax.eval_shape(lambda: _state(0))


def _save_steps(directory, accuracies, keep=2, **kwargs):
  ckpt = checkpointing.Checkpoints(str(directory), keep=keep, **kwargs)
  for step, accuracy in accuracies:
    ckpt.save(step, _state(step), META, metrics=None if accuracy is None else {"validation_accuracy": accuracy})
  ckpt.wait()
  return ckpt


def _files(directory) -> dict[str, str]:
  """Every file under `directory` with a hash of its bytes: to show that nothing was touched."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_is_step(restored, step):
  assert restored.step == step
  np.testing.assert_array_equal(restored.state["params"]["w"], _state(step)["params"]["w"])
  assert restored.meta == META


# What is kept, best by a metric, restore.

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


def test_best_metric_is_chosen_by_the_caller(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1, best_metric="validation_mlm_accuracy")
  for step, accuracy in [(10, 0.7), (20, 0.4), (30, 0.5)]:
    # A metric other than the best one (validation_accuracy) must neither pick nor crash the policy.
    ckpt.save(step, _state(step), META,
              metrics={"validation_mlm_accuracy": accuracy, "validation_accuracy": 1 - accuracy})
  ckpt.wait()
  assert ckpt.best_step() == 10 and ckpt.all_steps() == [10, 30]
  assert ckpt.restore_best(ABSTRACT).step == 10
  ckpt.close()


def test_restore_gives_back_state_and_meta(tmp_path):
  ckpt = _save_steps(tmp_path, [(7, 0.5)])
  restored = ckpt.restore(7, ABSTRACT)
  np.testing.assert_array_equal(restored["params"]["w"], _state(7)["params"]["w"])
  assert ckpt.read_meta(7) == META
  ckpt.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path / "checkpoints"))
  assert ckpt.restore_latest(ABSTRACT) is None
  ckpt.close()


def test_a_state_of_another_structure_is_a_config_error_not_damage(tmp_path):
  _save_steps(tmp_path, [(10, None)]).close()
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  other = jax.eval_shape(lambda: {"params": {"w": jnp.zeros(4)}, "step": jnp.asarray(0)})
  with pytest.raises(ValueError, match=r"another state than this run builds.*params/w \(4,\)"):
    ckpt.restore_latest(other)
  assert ckpt.damaged_steps() == {} and ckpt.restore_latest(ABSTRACT).step == 10
  ckpt.close()


# Damaged steps: the newest intact one is restored; the damaged one is reported and left as it is.

def _largest_state_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _cut_short(step_dir):
  """Keeps the first half of the step's files, as a copy or a disk that stopped halfway would."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file())
  for path in files[len(files) // 2:]:
    path.unlink()


def _flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


DAMAGE = {  # name: (what to do to the step directory, a word the reason must contain)
    "state_file_truncated": (lambda d: _truncate(_largest_state_file(d)), "Orbax could not read it"),
    "state_file_missing": (lambda d: _largest_state_file(d).unlink(), "Orbax could not read it"),
    "state_file_bit_flip": (lambda d: _flip_a_byte(_largest_state_file(d)), "checksum"),
    "state_metadata_missing": (lambda d: (d / "state" / "_METADATA").unlink(), "state/_METADATA is missing"),
    "meta_truncated": (lambda d: _truncate(d / "meta" / "metadata"), "meta/metadata is not readable JSON"),
    "meta_missing": (lambda d: (d / "meta" / "metadata").unlink(), "meta/metadata is missing"),
    "orbax_step_metadata_truncated": (lambda d: _truncate(d / "_CHECKPOINT_METADATA"), "_CHECKPOINT_METADATA"),
    "metrics_truncated": (lambda d: _truncate(d / "metrics" / "metrics"), "metrics/metrics"),
    "checksums_missing": (lambda d: (d / "checksums" / "metadata").unlink(), "checksums/metadata is missing"),
    "step_dir_cut_short": (_cut_short, "state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_step_is_skipped_and_left_untouched(tmp_path, damage):
  damage_fn, reason_word = DAMAGE[damage]
  _save_steps(tmp_path, [(10, 0.5), (20, 0.6)]).close()
  damage_fn(tmp_path / "20")
  before = _files(tmp_path)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  restored = ckpt.restore_latest(ABSTRACT)
  _assert_is_step(restored, 10)
  [(step, reason)] = restored.skipped
  assert step == 20 and reason_word in reason
  assert ckpt.latest_step() == 10 and ckpt.best_step() == 10
  ckpt.close()
  assert _files(tmp_path) == before


def test_the_skip_repeats_on_the_next_resume_and_later_saves_work(tmp_path):
  _save_steps(tmp_path, [(10, None), (20, None)]).close()
  _flip_a_byte(_largest_state_file(tmp_path / "20"))  # Found only by reading the arrays.
  damaged = _files(tmp_path / "20")
  for _ in range(2):  # Two resumes, no save between them: both pass over step 20.
    ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1)
    restored = ckpt.restore_latest(ABSTRACT)
    assert restored.step == 10 and [s for s, _ in restored.skipped] == [20]
    ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1)
  ckpt.restore_latest(ABSTRACT)
  assert ckpt.save(20, _state(20), META) is False  # The damaged directory is not written over.
  assert ckpt.save(30, _state(30), META) and ckpt.save(40, _state(40), META)
  ckpt.close()
  # keep=1 rotated out 10 and 30, but never the damaged 20 it was told about.
  assert _files(tmp_path / "20") == damaged
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1)
  _assert_is_step(ckpt.restore_latest(ABSTRACT), 40)
  assert ckpt.all_steps() == [20, 40]  # 20 is unknown to be damaged until read; its files are still whole.
  ckpt.close()


def test_a_damaged_best_step_falls_back_to_the_next_best(tmp_path):
  _save_steps(tmp_path, [(10, 0.9), (20, 0.5), (30, 0.7)], keep=1).close()
  _flip_a_byte(_largest_state_file(tmp_path / "10"))
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1)
  restored = ckpt.restore_best(ABSTRACT)
  _assert_is_step(restored, 30)
  assert [s for s, _ in restored.skipped] == [10] and ckpt.best_step() == 30
  ckpt.close()


def test_no_intact_step_raises_naming_each_and_touches_nothing(tmp_path):
  _save_steps(tmp_path, [(10, None), (20, None)]).close()
  _truncate(_largest_state_file(tmp_path / "10"))
  (tmp_path / "20" / "meta" / "metadata").unlink()
  before = _files(tmp_path)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  with pytest.raises(checkpointing.NoIntactCheckpointError,
                     match=r"step 20: meta/metadata is missing; step 10: Orbax could not .*left untouched"):
    ckpt.restore_latest(ABSTRACT)
  ckpt.close()
  assert _files(tmp_path) == before


def test_orbax_partial_writes_of_a_killed_save_are_ignored(tmp_path):
  _save_steps(tmp_path, [(10, None), (20, None)]).close()
  # A save killed mid-write leaves its step under the name Orbax writes it to (the current naming, and the
  # older one with a timestamp), some files in it.
  killed = ocp.path.atomicity.AtomicRenameTemporaryPath.from_final(epath.Path(tmp_path / "30"))
  for partial in (pathlib.Path(killed.get()), tmp_path / "40.orbax-checkpoint-tmp-1700000000"):
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text('{"tree_metadata": {')
  before = _files(tmp_path)
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  restored = ckpt.restore_latest(ABSTRACT)
  _assert_is_step(restored, 20)
  assert restored.skipped == [] and ckpt.all_steps() == [10, 20]
  ckpt.close()
  assert _files(tmp_path) == before


# Saves that fail, and saves that must not replace the last good step too early.

def _fail_step_finalize(monkeypatch, step, error):
  """Makes Orbax's rename of `STEP.orbax-checkpoint-tmp` to `STEP` (the commit) raise `error`."""
  finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

  async def failing(self):
    if self.get_final().name == str(step):
      raise error
    await finalize(self)
  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", failing)


def test_old_steps_are_deleted_only_once_the_new_step_is_committed(tmp_path, monkeypatch):
  ckpt = _save_steps(tmp_path, [(10, None)], keep=1)
  seen = []
  finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

  async def watching(self):
    if self.get_final().name == "20":
      seen.append((tmp_path / "10").exists())
    await finalize(self)
  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", watching)
  ckpt.save(20, _state(20), META)
  ckpt.wait()
  assert seen == [True] and ckpt.all_steps() == [20] and not (tmp_path / "10").exists()
  ckpt.close()


def test_a_save_that_fails_to_commit_leaves_the_previous_step(tmp_path, monkeypatch):
  ckpt = _save_steps(tmp_path, [(10, None)], keep=1)  # keep=1: step 20 would replace step 10.
  before = _files(tmp_path / "10")
  _fail_step_finalize(monkeypatch, 20, OSError(errno.EIO, "Input/output error"))
  ckpt.save(20, _state(20), META)
  with pytest.raises(checkpointing.CheckpointSaveError, match="step 20.*step 10, is intact"):
    ckpt.wait()
  assert ckpt.latest_step() == 10 and _files(tmp_path / "10") == before
  _assert_is_step(ckpt.restore_latest(ABSTRACT), 10)
  ckpt.close()


def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_step(tmp_path, monkeypatch):
  ckpt = _save_steps(tmp_path, [(10, None)], keep=1)
  original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

  async def disk_full(self, item, directory):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
  assert ckpt.save(20, _state(20), META)  # Asynchronous: the write fails in the background...
  with pytest.raises(checkpointing.CheckpointSaveError) as failure:
    ckpt.wait()  # ...and the error surfaces here, saying what happened and what is safe.
  message = str(failure.value)
  for part in ["step 20", str(tmp_path), "No space left on device [ENOSPC]", "step 10, is intact",
               "20.orbax-checkpoint-tmp"]:
    assert part in message
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", original)
  assert ckpt.save(30, _state(30), META)  # Space is back: the next save works.
  ckpt.close()
  ckpt = checkpointing.Checkpoints(str(tmp_path), keep=1)
  _assert_is_step(ckpt.restore_latest(ABSTRACT), 30)
  ckpt.close()


def test_an_unwritable_directory_fails_the_save_at_once(tmp_path, monkeypatch):
  ckpt = _save_steps(tmp_path, [(10, None)])
  mkdir = async_path.mkdir

  async def denied(path, *args, **kwargs):  # As a read-only directory does (chmod does not stop root).
    if "orbax-checkpoint-tmp" in str(path):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return await mkdir(path, *args, **kwargs)
  monkeypatch.setattr(async_path, "mkdir", denied)
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"step 20 .*Permission denied \[EACCES\].*step 10, is intact"):
    ckpt.save(20, _state(20), META)
  assert ckpt.latest_step() == 10
  ckpt.close()


@pytest.mark.parametrize("surfaces_in", ["save", "close"])
def test_a_background_failure_surfaces_from_the_next_save_or_close(tmp_path, monkeypatch, surfaces_in):
  ckpt = _save_steps(tmp_path, [(10, None)])
  _fail_step_finalize(monkeypatch, 20, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
  ckpt.save(20, _state(20), META)
  with pytest.raises(checkpointing.CheckpointSaveError, match="step 20 .*No space left on device"):
    ckpt.save(30, _state(30), META) if surfaces_in == "save" else ckpt.close()
  if surfaces_in == "save":
    ckpt.close()


# Durable saves on demand (preemption).

def test_save_now_returns_once_the_step_is_durable(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  assert ckpt.save_now(10, _state(10), META)
  assert (tmp_path / "10" / "commit_success.txt").exists()
  assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))
  reader = checkpointing.Checkpoints(str(tmp_path), read_only=True)  # Another process would see it now.
  _assert_is_step(reader.restore_latest(ABSTRACT), 10)
  reader.close()
  ckpt.close()


def test_save_now_of_a_step_already_saved_or_in_flight_only_waits(tmp_path):
  ckpt = checkpointing.Checkpoints(str(tmp_path))
  ckpt.save_now(10, _state(10), META)
  assert ckpt.save_now(10, _state(10), META) is False
  assert ckpt.save(20, _state(20), META)
  assert ckpt.save_now(20, _state(20), META) is False  # The periodic save of 20 may be in flight.
  assert (tmp_path / "20" / "commit_success.txt").exists() and ckpt.all_steps() == [10, 20]
  ckpt.close()
