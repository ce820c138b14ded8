"""One Orbax `CheckpointManager` for training and evaluation: save, keep latest K + best, restore.

Owns: the layout of `WORKDIR/checkpoints` (one directory per step holding the train state and a
JSON `meta` item that says which model and data the state belongs to). Orbax writes each step to a
temporary directory and renames it when complete, so a crash never leaves a half-written step
that looks finished, and the previous steps are untouched.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "validation_accuracy"


def _best_metric(metrics: dict) -> float:
  return metrics[BEST_METRIC]


class Checkpoints:
  """Steps under `directory`; keeps the latest `keep` and the best by validation accuracy."""

  def __init__(self, directory: str, *, keep: int = 2, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    # best_fn is what makes Orbax write the metrics with each step; the policy decides what is kept.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_best_metric, best_mode="max",
                                           create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the highest validation accuracy; the latest if none was validated."""
    scored = [(metrics[BEST_METRIC], step) for step in self.all_steps()
              if (metrics := self.manager.metrics(step)) and BEST_METRIC in metrics]
    return max(scored)[1] if scored else self.latest_step()

  def save(self, step: int, state: Any, meta: dict, metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save; `wait()` (or the next save) makes it durable."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=metrics, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state of `step` with the shapes, dtypes and shardings of `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
