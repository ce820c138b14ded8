"""Metrics out of the loop: TensorBoard events, progress lines and JSON result files.

Owns: summing step metrics into means and writing them. Only the primary process writes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import logging


class Writer:
  """TensorBoard scalars under `logdir` (tensorboardX: no TensorFlow needed)."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      import tensorboardX  # Imported here: only the primary process writes events.
      self._writer = tensorboardX.SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def summarize(sums: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """`{loss_sum, correct, count}` sums -> `{prefix}loss`, `{prefix}accuracy` means."""
  sums = jax.device_get(sums)
  count = float(sums["count"])
  return {f"{prefix}loss": float(sums["loss_sum"]) / max(count, 1.0),
          f"{prefix}accuracy": float(sums["correct"]) / max(count, 1.0)}


def add(total: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
  return metrics if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, metrics)


class Progress:
  """Logs `step, loss, examples/s, ETA` every `every_steps` and returns the window's summary."""

  def __init__(self, num_train_steps: int, batch_size: int, first_step: int):
    self.num_train_steps, self.batch_size = num_train_steps, batch_size
    self._window_start, self._window_step = time.perf_counter(), first_step
    self.train_seconds = 0.0  # time in train steps only: evaluation and checkpointing excluded
    self.examples_seen = 0

  def window(self, step: int, sums: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    summary = summarize(sums, "train_")
    elapsed = time.perf_counter() - self._window_start
    self.train_seconds += elapsed
    self.examples_seen += (step - self._window_step) * self.batch_size
    examples_per_second = (step - self._window_step) * self.batch_size / max(elapsed, 1e-9)
    eta = (self.num_train_steps - step) * self.batch_size / max(examples_per_second, 1e-9)
    summary.update(train_examples_per_second=examples_per_second,
                   learning_rate=float(last["learning_rate"]), grad_norm=float(last["grad_norm"]))
    self._window_start, self._window_step = time.perf_counter(), step
    logging.info("step %d/%d  loss %.4f  acc %.3f  %.1f examples/s  lr %.2e  ETA %s", step,
                 self.num_train_steps, summary["train_loss"], summary["train_accuracy"], examples_per_second,
                 summary["learning_rate"], _duration(eta))
    return summary

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent outside train steps (evaluation, checkpointing) out of training time."""
    self._window_start += seconds


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def write_json(path: str, values: dict[str, Any]) -> None:
  """Writes atomically (temp file + rename) on the primary process."""
  if jax.process_index() != 0:
    return
  values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", delete=False, suffix=".tmp") as f:
    json.dump(values, f, indent=2, sort_keys=True)
  os.chmod(f.name, 0o644)  # temp files are created private; results are for everyone to read
  os.replace(f.name, path)
