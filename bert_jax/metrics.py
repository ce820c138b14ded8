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
import jax.numpy as jnp
import numpy as np
from absl import logging


class Writer:
  """TensorBoard scalars under `logdir` (tensorboardX: no TensorFlow needed), and the same values as
  JSON lines in `logdir/metrics.jsonl` (`{"step": ..., name: value}`) for scripts and plots.

  A resumed run appends: steps redone after the last checkpoint appear again, the later line wins.
  """

  def __init__(self, logdir: str):
    self._writer = self._lines = None
    if jax.process_index() == 0:
      import tensorboardX  # Imported here: only the primary process writes events.
      self._writer = tensorboardX.SummaryWriter(logdir)
      self._lines = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is not None:
      for name, value in values.items():
        self._writer.add_scalar(name, float(value), step)
      self._writer.flush()
      self._lines.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
      self._lines.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._lines.close()


# Each reported mean: (numerator, denominator) among the summed step metrics. Classification sums
# `correct`; pretraining sums the masked-LM and next-sentence terms.
_MEANS = {"loss": ("loss_sum", "count"), "accuracy": ("correct", "count"),
          "mlm_loss": ("mlm_loss_sum", "mlm_count"), "mlm_accuracy": ("mlm_correct", "mlm_count"),
          "nsp_loss": ("nsp_loss_sum", "count"), "nsp_accuracy": ("nsp_correct", "count")}


def summarize(sums: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """Summed step metrics -> `{prefix}loss`, `{prefix}accuracy`, ... means (those the sums allow)."""
  sums = jax.device_get(sums)
  return {f"{prefix}{name}": float(sums[numerator]) / max(float(sums[denominator]), 1.0)
          for name, (numerator, denominator) in _MEANS.items() if numerator in sums}


def add(total: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
  """`total + metrics`, leaf by leaf; `metrics` when `total` is None."""
  return metrics if total is None else _add(total, metrics)


@jax.jit
def _add(total: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
  # One compiled program for the whole dict: one launch per step on every device, not one per metric.
  return jax.tree_util.tree_map(jnp.add, total, metrics)


class Progress:
  """Logs `step, loss, examples/s, ETA` every window; keeps the run's totals across resumes."""

  def __init__(self, num_train_steps: int, batch_size: int, first_step: int, *, train_seconds: float = 0.0,
               examples_seen: int = 0, final_train_loss: float | None = None, nonfinite_steps: int = 0):
    self.num_train_steps, self.batch_size = num_train_steps, batch_size
    # Totals of earlier runs of the same workdir (from the checkpoint), so a resumed run reports the whole.
    self.train_seconds = train_seconds  # time in train steps only: evaluation and checkpointing excluded
    self.examples_seen = examples_seen
    self.final_train_loss = final_train_loss  # mean over the last logging window
    self.nonfinite_steps = nonfinite_steps  # steps skipped for a NaN/Inf loss or gradient
    self._window_start, self._window_step = time.perf_counter(), first_step

  def window(self, step: int, sums: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    summary = summarize(sums, "train_")
    elapsed = time.perf_counter() - self._window_start
    examples = (step - self._window_step) * self.batch_size
    self.train_seconds += elapsed
    self.examples_seen += examples
    self.final_train_loss = summary["train_loss"]
    self._window_start, self._window_step = time.perf_counter(), step
    examples_per_second = examples / max(elapsed, 1e-9)
    eta = (self.num_train_steps - step) * self.batch_size / max(examples_per_second, 1e-9)
    summary.update(train_examples_per_second=examples_per_second,
                   learning_rate=float(last["learning_rate"]), grad_norm=float(last["grad_norm"]))
    accuracies = "  ".join(f"{name[len('train_'):]} {value:.3f}" for name, value in summary.items()
                           if name.endswith("accuracy"))
    logging.info("step %d/%d  loss %.4f  %s  %.1f examples/s  lr %.2e  ETA %s", step, self.num_train_steps,
                 summary["train_loss"], accuracies, examples_per_second, summary["learning_rate"], _duration(eta))
    return summary

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent outside train steps (evaluation, checkpointing) out of training time."""
    self._window_start += seconds

  def state_dict(self, step: int) -> dict[str, Any]:
    """Totals up to `step` (the open window included), to store with a checkpoint of that step."""
    open_window = time.perf_counter() - self._window_start if step > self._window_step else 0.0
    return {"train_seconds": self.train_seconds + open_window,
            "examples_seen": self.examples_seen + (step - self._window_step) * self.batch_size,
            "final_train_loss": self.final_train_loss, "nonfinite_steps": self.nonfinite_steps}

  def results(self) -> dict[str, Any]:
    return {"final_train_loss": self.final_train_loss, "nonfinite_steps": self.nonfinite_steps,
            "train_seconds": self.train_seconds,
            "train_examples_per_second": self.examples_seen / max(self.train_seconds, 1e-9)}


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
