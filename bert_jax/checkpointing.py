"""One Orbax `CheckpointManager` for training and evaluation: save, keep latest K + best, restore intact steps.

Owns: the layout of `WORKDIR/checkpoints` (one directory per step holding the train state, a JSON `meta`
item that says which model and data the state belongs to, and a JSON `checksums` item over the state's
arrays) and what counts as damaged. Orbax writes each step to `STEP.orbax-checkpoint-tmp` and renames it
when complete, so a killed save never looks finished, and it deletes old steps only once the new one is
committed. A step damaged after that (a missing, truncated or altered file) is skipped with a warning,
never deleted or modified, and left out of the kept steps. Does not own when to save: the trainer does.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a step being written: `20.orbax-checkpoint-tmp[-TIMESTAMP]`
# Small files of every finished step: reading them finds most damage without reading the arrays.
_REQUIRED_JSON = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")
_OPTIONAL_JSON = ("metrics/metrics", "checksums/metadata")  # required where their item directory exists


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: Any
  meta: dict
  skipped: list[tuple[int, str]]  # damaged steps passed over, newest first, each with the reason


class DamagedCheckpointError(ValueError):
  def __init__(self, step: int, directory: str, reason: str):
    super().__init__(f"The checkpoint at step {step} in {directory} is damaged: {reason}. Its files were "
                     "left untouched.")
    self.step, self.reason = step, reason


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints exist, but none can be restored."""


class CheckpointSaveError(RuntimeError):
  """A save failed (disk full, no permission...); the steps saved before it are untouched."""


class Checkpoints:
  """Steps under `directory`; keeps the latest `keep` and the best by `best_metric` (its maximum)."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str = "validation_accuracy",
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self._damaged: dict[int, str] = {}  # step -> reason; found when listing the steps, or by a restore
    self._in_flight: int | None = None  # the step of the asynchronous save not waited for yet
    self._name_format = _IntactSteps(self._damaged, self.directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=self._metric, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=self._metric, best_mode="max",  # best_fn is what makes Orbax write the metrics with each step
        step_name_format=self._name_format,
        # Directories made within save(): failing to make one raises there, at once, rather than leaving
        # Orbax's background writers waiting 5 minutes for a directory that never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only, read_only=read_only)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler()}  # named, so any item's metadata reads back
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def _metric(self, metrics: dict) -> float:
    return float(metrics.get(self.best_metric, -math.inf))

  def all_steps(self) -> list[int]:
    """Finished steps, less those known to be damaged."""
    return sorted(self.manager.all_steps())

  def damaged_steps(self) -> dict[int, str]:
    """Steps found damaged so far (by reading their small files, or by a restore), with the reason."""
    return dict(sorted(self._damaged.items()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest `best_metric`; the latest if none recorded it."""
    scored = self._scored_steps()
    return scored[0] if scored else self.latest_step()

  def _scored_steps(self) -> list[int]:
    """The steps that recorded `best_metric`, best first."""
    scored = [(metrics[self.best_metric], step) for step in self.all_steps()
              if (metrics := self.manager.metrics(step)) and self.best_metric in metrics]
    return [step for _, step in sorted(scored, reverse=True)]

  def save(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> bool:
    """Starts an asynchronous save of `step`; `wait()` (or the next save) makes it durable.

    Returns False, saving nothing, when `step` is saved already or holds a damaged checkpoint (left as it
    is). Raises `CheckpointSaveError` when this save, or the previous one, failed.
    """
    self.wait()
    if step in self._damaged:
      logging.warning("Not saving step %d: %s holds a damaged checkpoint of it, left for inspection (%s).",
                      step, self._step_dir(step), self._damaged[step])
      return False
    if step in self.manager.all_steps():
      logging.info("Step %d is already saved in %s.", step, self.directory)
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                              checksums=ocp.args.JsonSave(_checksums(state)))
    try:
      self.manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(step, error) from error
    self._in_flight = step
    return True

  def save_now(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> bool:
    """Saves `step` and returns once it is durable (on preemption); if `step` is saved already, only waits."""
    saved = self.save(step, state, meta, metrics)
    self.wait()
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous save is durable; raises `CheckpointSaveError` if it failed."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      raise self._save_failed(step, error) from error

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
    # Orbax struck the steps this save would replace off its list when the save began, but deletes them
    # only after a save commits: they are still on disk, so list the directory again.
    self.manager.reload()
    previous = [s for s in self.all_steps() if s != step]
    kept = (f"The previous checkpoint, step {previous[-1]}, is intact: this save did not touch it."
            if previous else "There is no earlier checkpoint.")
    partial = [name for name in (os.listdir(self.directory) if os.path.isdir(self.directory) else [])
               if name.startswith(f"{step}{ORBAX_TMP_SUFFIX}")]
    leftover = (f" Its partial write {os.path.join(self.directory, partial[0])} is ignored on resume; "
                "delete it to free the space." if partial else "")
    return CheckpointSaveError(
        f"Saving the checkpoint of step {step} to {self.directory} failed: {_describe(error)}. {kept}"
        f"{leftover} Free space or fix the directory's permissions, then resume.")

  def read_meta(self, step: int) -> dict:
    self._check_exists(step)
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:  # pylint: disable=broad-except
      raise self._mark_damaged(step, f"meta could not be read: {_describe(error)}") from error

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state of `step` with the shapes, dtypes and shardings of `abstract_state`.

    Raises `DamagedCheckpointError` if a file of `step` is missing or damaged, or the arrays read back
    differ from their checksums at save time; `ValueError` if `step` holds another structure of state.
    """
    return self._restore_checked(step, abstract_state)[0]

  def restore_latest(self, abstract_state: Any) -> Restored | None:
    """The newest intact step; None if there is no checkpoint at all.

    Damaged steps are skipped (each with a warning, and listed in `Restored.skipped`) and left untouched;
    raises `NoIntactCheckpointError` if there are checkpoints but none is intact.
    """
    return self._restore_first_intact(sorted(self.all_steps(), reverse=True), abstract_state, latest=True)

  def restore_best(self, abstract_state: Any) -> Restored | None:
    """The intact step with the highest `best_metric` (else the newest), as `restore_latest`."""
    scored = self._scored_steps()
    rest = sorted(set(self.all_steps()) - set(scored), reverse=True)
    return self._restore_first_intact(scored + rest, abstract_state, latest=False)

  def _restore_first_intact(self, candidates: list[int], abstract_state: Any, latest: bool) -> Restored | None:
    for step in candidates:
      try:
        state, meta = self._restore_checked(step, abstract_state)
      except DamagedCheckpointError:
        continue
      # Steps found damaged by their small files count too: they never were candidates.
      skipped = [(s, r) for s, r in sorted(self._damaged.items(), reverse=True) if s > step or not latest]
      if skipped:
        logging.warning("Restored step %d of %s, skipping damaged steps: %s", step, self.directory,
                        "; ".join(f"{s} ({r})" for s, r in skipped))
      return Restored(step, state, meta, skipped)
    if not self._damaged:
      return None
    raise NoIntactCheckpointError(
        f"None of the checkpoints in {self.directory} can be restored: "
        + "; ".join(f"step {s}: {r}" for s, r in sorted(self._damaged.items(), reverse=True))
        + ". The files were left untouched for inspection. To start afresh, move those step directories "
        "away or use a new --workdir.")

  def _restore_checked(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    self._check_exists(step)
    if step in self._damaged:
      raise DamagedCheckpointError(step, self.directory, self._damaged[step])
    try:
      saved_shapes = _shapes(self.manager.item_metadata(step)["state"])
    except Exception as error:  # pylint: disable=broad-except
      raise self._mark_damaged(step, f"the state's metadata could not be read: {_describe(error)}") from error
    _check_same_structure(saved_shapes, _shapes(abstract_state), step, self.directory)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as error:  # pylint: disable=broad-except
      raise self._mark_damaged(step, f"Orbax could not read it: {_describe(error)}") from error
    checksums_file = self._step_dir(step) / "checksums" / "metadata"
    saved_sums = json.loads(checksums_file.read_text()) if checksums_file.exists() else {}  # none: older step
    for name, (value, dtype, shape) in _checksums(restored["state"]).items():
      saved = saved_sums.get(name)  # compared where this restore asked for the saved dtype and shape
      if saved and saved[1:] == [dtype, shape] and saved[0] != value:
        raise self._mark_damaged(step, f"the array {name} read back differs from its checksum at save time "
                                       "(a state file was altered)")
    return restored["state"], restored["meta"]

  def _check_exists(self, step: int) -> None:
    if step not in self.manager.all_steps() and step not in self._damaged:
      raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; it has {self.all_steps()}.")

  def _mark_damaged(self, step: int, reason: str) -> DamagedCheckpointError:
    """Records `step` as damaged: it is no longer restored, counted among the kept steps, or deleted."""
    logging.warning("Skipping the checkpoint at step %d in %s: %s. Its files were left untouched.", step,
                    self.directory, reason)
    self._damaged[step] = reason
    self.wait()  # Let an in-flight save land before listing the directory again.
    self.manager.reload()
    return DamagedCheckpointError(step, self.directory, reason)

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / self._name_format.build_name(step)


class _IntactSteps:
  """Orbax's standard step naming (`DIR/STEP`), listing only the steps whose small files read back whole.

  Orbax lists the steps through this when it opens the directory and on `reload()`: a damaged step is
  thus neither latest nor best, does not count among the latest K, and is never deleted, since Orbax only
  deletes steps it lists. Orbax's `*.orbax-checkpoint-tmp*` directories are not steps to it at all.
  """

  def __init__(self, damaged: dict[int, str], directory: str):
    self._standard = ocp.step.standard_name_format()
    self._damaged = damaged
    self._directory = directory

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_step(self, base_path, step: int):
    return self._standard.find_step(base_path, step)

  def find_all(self, base_path):
    for metadata in self._standard.find_all(base_path):
      if metadata.step not in self._damaged and (reason := _file_problem(metadata.path)):
        logging.warning("Skipping the checkpoint at step %d in %s: %s. Its files were left untouched.",
                        metadata.step, self._directory, reason)
        self._damaged[metadata.step] = reason
      if metadata.step not in self._damaged:
        yield metadata


def _file_problem(step_dir: epath.Path) -> str | None:
  """What is wrong with the small JSON files of a finished step, or None."""
  for name in _REQUIRED_JSON + _OPTIONAL_JSON:
    path = step_dir / name
    if not path.exists():
      if name in _REQUIRED_JSON or path.parent.exists():
        return f"{name} is missing"
      continue
    try:
      value = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON (a truncated file)
      return f"{name} is not readable JSON ({error})"
    if not isinstance(value, dict):
      return f"{name} is not a JSON object"
    if name == "_CHECKPOINT_METADATA" and not value.get("commit_timestamp_nsecs"):
      return "_CHECKPOINT_METADATA has no commit time: the save never finished"
  return None


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_same_structure(saved: dict, wanted: dict, step: int, directory: str) -> None:
  """A state of another structure is a configuration mistake, not damage: say so and stop."""
  if saved != wanted:
    wants = [f"{name} {shape}" for name, shape in sorted(wanted.items()) if saved.get(name) != shape][:3]
    has = [f"{name} {shape}" for name, shape in sorted(saved.items()) if wanted.get(name) != shape][:3]
    raise ValueError(
        f"The checkpoint at step {step} in {directory} holds another state than this run builds (this run "
        f"wants {wants or 'nothing more'}, the checkpoint has {has or 'nothing more'}). Use the model and "
        "optimizer that wrote it, or a new --workdir; the checkpoint was left untouched.")


def _checksums(state: Any) -> dict[str, list]:
  """{path: [checksum, dtype, shape]} of the arrays of `state`, computed on the devices that hold them."""
  named = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
           for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
           if isinstance(leaf, (jax.Array, np.ndarray))
           and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended)]  # typed PRNG keys have no bits
  sums = jax.device_get(_fold_all([leaf for _, leaf in named]))
  return {name: [int(total), str(leaf.dtype), list(leaf.shape)] for (name, leaf), total in zip(named, sums)}


@jax.jit
def _fold_all(arrays: list) -> list:
  return [_fold(x) for x in arrays]


def _fold(x: jax.Array) -> jax.Array:
  """The sum of the array's bits, element i weighted by 2i+1, modulo 2**32: any one flipped bit changes
  it, and integer addition makes it the same however the array is sharded."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)  # 8 bytes: two uint32 each
  bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
  weights = 2 * jax.lax.iota(jnp.uint32, bits.size) + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def _describe(error: BaseException) -> str:
  """The OS reason (`No space left on device [ENOSPC]`) if there is one, else the first line of each cause."""
  chain = []
  while error is not None and len(chain) < 4:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      where = f" ({e.filename})" if e.filename else ""
      return f"{e.strerror or os.strerror(e.errno)} [{errno.errorcode.get(e.errno, e.errno)}]{where}"
  lines = [str(e).split("\n")[0].split(" [tensorstore_spec=")[0].split(" See full TensorStore")[0]
           for e in chain]
  text = ": ".join(line for line in lines if line) or type(chain[0]).__name__
  return text if len(text) <= 300 else text[:297] + "..."
