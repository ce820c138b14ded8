"""Faults never lose work: SIGKILL and SIGTERM mid-run, then resume; NaN/Inf steps stop or skip.

The kill tests run the real command in a subprocess, on a model large enough that training lasts
several seconds, and compare with an uninterrupted run of the same config: the per-step training
losses logged after the restart and the final parameters must be bitwise equal on CPU.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bert_jax import train
from configs import imdb as imdb_configs

from imdb_testdata import make_archive, sentiment_reviews, write_imdb

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("imdb")
  reviews = {**sentiment_reviews("train", 40), **sentiment_reviews("test", 8)}
  return make_archive(write_imdb(root / "unpacked", reviews=reviews), root / "aclImdb_v1.tar.gz")


def _flags(archive, minilm_dir, **overrides):
  """Command-line flags of a tiny run with dropout on: 100 steps of batch 8, a checkpoint every 10."""
  values = {"data.data_dir": archive, "tokenizer": minilm_dir, "data.max_seq_length": 64,
            "data.max_train_examples": 0, "data.max_test_examples": 0, "data.validation_fraction": 0.0,
            "model.hidden_size": 128, "model.intermediate_size": 512, "model.max_position_embeddings": 64,
            "train.batch_size": 8, "train.num_epochs": 10.0, "train.log_every_steps": 1,
            "train.eval_every_steps": 1000, "checkpoint.every_steps": 10, "checkpoint.keep": 3}
  values.update(overrides)
  return [f"--config.{key}={value}" for key, value in values.items()]


def _command(workdir, flags):
  return [sys.executable, "-m", "bert_jax.main", "--config=configs/imdb.py:tiny", f"--workdir={workdir}", *flags]


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _run(workdir, flags):
  result = subprocess.run(_command(workdir, flags), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=_env())
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _committed_steps(workdir: Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _start_and_signal(workdir, flags, sig, after_step: int) -> subprocess.Popen:
  """Starts the run and sends `sig` once the checkpoint of `after_step` is committed."""
  process = subprocess.Popen(_command(workdir, flags), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
  deadline = time.time() + 600
  while not any(s >= after_step for s in _committed_steps(workdir)):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  process.send_signal(sig)
  return process


def _losses_by_step(workdir: Path) -> dict[int, float]:
  """The train loss logged for each step; a step redone after a restart keeps its later value."""
  losses = {}
  for line in (workdir / "tensorboard" / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train_loss" in record:
      losses[record["step"]] = record["train_loss"]
  return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, archive, minilm_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _run(workdir, _flags(archive, minilm_dir))
  return workdir


def _assert_same_run(resumed: Path, reference: Path, from_step: int):
  expected, got = _losses_by_step(reference), _losses_by_step(resumed)
  assert len(expected) == 100 and sorted(got) == sorted(expected)
  for step in range(from_step + 1, 101):
    assert got[step] == expected[step], step  # bitwise: same data order, dropout, optimizer state
  assert (resumed / "hf_model" / "model.safetensors").read_bytes() == \
      (reference / "hf_model" / "model.safetensors").read_bytes()  # the final parameters
  assert json.loads((resumed / "results.json").read_text())["final_train_loss"] == \
      json.loads((reference / "results.json").read_text())["final_train_loss"]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_exact(tmp_path, archive, minilm_dir, uninterrupted):
  flags = _flags(archive, minilm_dir)
  process = _start_and_signal(tmp_path, flags, signal.SIGKILL, after_step=20)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert not (tmp_path / "results.json").exists()  # killed before the end
  restart = max(_committed_steps(tmp_path))
  result = _run(tmp_path, flags)
  assert f"Resuming from the checkpoint at step {restart}" in result.stderr
  _assert_same_run(tmp_path, uninterrupted, restart)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, archive, minilm_dir, uninterrupted):
  flags = _flags(archive, minilm_dir)
  process = _start_and_signal(tmp_path, flags, signal.SIGTERM, after_step=10)
  sent = time.time()
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert time.time() - sent < 60
  stopped = int(stderr.split("Stopped on SIGTERM at step ")[1].split()[0])
  assert stopped in _committed_steps(tmp_path) and stopped < 100  # the current step, saved durably
  assert not (tmp_path / "results.json").exists()
  result = _run(tmp_path, flags)
  assert f"Resuming from the checkpoint at step {stopped}" in result.stderr
  _assert_same_run(tmp_path, uninterrupted, stopped)


def _diverging_config(archive, minilm_dir, **overrides):
  """A learning rate of 1e30 overflows the parameters on the first update: step 2 is NaN."""
  config = imdb_configs.get_config("tiny")
  config.tokenizer = str(minilm_dir)
  config.data.data_dir = str(archive)
  config.data.max_seq_length = 16
  config.data.max_train_examples = 0
  config.data.max_test_examples = 0
  config.model.update(hidden_size=32, intermediate_size=64, max_position_embeddings=32)
  config.learning_rate = 1e30
  config.optimizer.warmup_fraction = 0.0
  config.train.update(batch_size=8, num_epochs=1.0, log_every_steps=4, eval_every_steps=100)
  config.checkpoint.update(every_steps=1, export_hf=False)
  config.update_from_flattened_dict(overrides)  # keys like "train.batch_size"
  return config


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, archive, minilm_dir):
  with pytest.raises(train.Diverged, match=r"step 2 is NaN or Inf.*last checkpoint \(step 1\) is untouched"):
    train.train_and_evaluate(_diverging_config(archive, minilm_dir), str(tmp_path))
  assert _committed_steps(tmp_path) == [1]
  assert not (tmp_path / "results.json").exists()


def test_nonfinite_steps_are_skipped_when_configured(tmp_path, archive, minilm_dir):
  config = _diverging_config(archive, minilm_dir, **{"train.on_nonfinite": "skip"})
  results = train.train_and_evaluate(config, str(tmp_path))
  # Step 1's update overflows the parameters; every later step is non-finite and changes nothing.
  assert results["nonfinite_steps"] == results["steps"] - 1
  assert results["steps"] == 9  # 72 training reviews (validation takes 10%), batch 8


def test_nonfinite_step_leaves_the_state_unchanged(tiny_config):
  import functools

  import jax
  import optax

  from bert_jax import hf
  from bert_jax import models
  from bert_jax import steps
  module = models.BertForSequenceClassification(tiny_config)
  tx = optax.adam(1e-3)
  state = steps.create_state(hf.init_params(module), tx, seed=0)
  poisoned = jax.tree_util.tree_map(lambda x: x, state.params)
  poisoned["bert"]["embeddings"]["word_embeddings"]["embedding"] = \
      poisoned["bert"]["embeddings"]["word_embeddings"]["embedding"] * np.nan
  state = state.replace(params=poisoned)
  batch = {"input_ids": np.ones((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
           "token_type_ids": np.zeros((2, 4), np.int32), "labels": np.array([0, 1], np.int32),
           "weights": np.ones(2, np.float32)}
  new_state, metrics = jax.jit(functools.partial(steps.train_step, model=module, tx=tx))(state, batch)
  assert int(metrics["nonfinite"]) == 1 and int(new_state.step) == 1
  for new, old in zip(jax.tree_util.tree_leaves((new_state.params, new_state.opt_state)),
                      jax.tree_util.tree_leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
