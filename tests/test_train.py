"""The fine-tuning job end to end on tiny models and data: results, resume, evaluate, predict, refusals."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (keeps the import cost out of the first test)

from bert_jax import config_checks
from bert_jax import evaluate
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax import train
from configs import imdb as imdb_configs

from imdb_testdata import make_archive, sentiment_reviews, write_imdb

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  root = tmp_path_factory.mktemp("imdb")
  reviews = {**sentiment_reviews("train", 40), **sentiment_reviews("test", 12)}
  return make_archive(write_imdb(root / "unpacked", reviews=reviews), root / "aclImdb_v1.tar.gz")


def tiny_config(archive, minilm_dir, **overrides):
  config = imdb_configs.get_config("tiny")
  config.tokenizer = str(minilm_dir)
  config.data.data_dir = str(archive)
  config.data.max_seq_length = 16
  config.data.max_train_examples = 0
  config.data.max_test_examples = 0
  config.data.validation_fraction = 0.2
  config.model.update(hidden_size=32, intermediate_size=64, max_position_embeddings=32)
  config.train.update(batch_size=8, eval_batch_size=8, num_epochs=1.0, log_every_steps=2)
  config.checkpoint.every_steps = 4
  config.train.eval_every_steps = 4
  config.checkpoint.export_hf = False
  config.update_from_flattened_dict(overrides)  # keys like "train.batch_size"
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, archive, minilm_dir):
  """One tiny run shared by the tests that only read its workdir."""
  workdir = tmp_path_factory.mktemp("trained")
  results = train.train_and_evaluate(tiny_config(archive, minilm_dir), str(workdir))
  return workdir, results


def test_tiny_run_writes_results_events_and_checkpoints(trained):
  workdir, results = trained
  written = json.loads((workdir / "results.json").read_text())
  assert written == results
  for key in ("test_accuracy", "test_loss", "num_test_examples", "final_train_loss", "steps",
              "train_seconds", "train_examples_per_second"):
    assert key in written, key
  assert written["num_test_examples"] == 24  # every test review exactly once (3 batches of 8)
  assert written["steps"] == 8  # 64 training reviews / batch 8
  assert json.loads((workdir / "config.json").read_text())["train"]["batch_size"] == 8
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, archive, minilm_dir, monkeypatch, caplog):
  config = tiny_config(archive, minilm_dir, **{"model.hidden_dropout_prob": 0.1})
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "a"))

  original = train._batches_from

  def crash_after_six(*args):
    for i, batch in enumerate(original(*args)):
      if i == 6:
        raise KeyboardInterrupt("simulated preemption")
      yield batch

  monkeypatch.setattr(train, "_batches_from", crash_after_six)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  monkeypatch.setattr(train, "_batches_from", original)
  caplog.set_level("INFO")
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"))
  assert any("Resuming from the checkpoint at step 4" in r.getMessage() for r in caplog.records)
  # Same data order, dropout masks and optimizer state: bitwise the same on CPU.
  assert resumed["test_loss"] == uninterrupted["test_loss"]
  assert resumed["final_train_loss"] == uninterrupted["final_train_loss"]


def test_checkpoint_of_another_model_is_refused_and_kept(trained, archive, minilm_dir):
  workdir, _ = trained
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  bigger = tiny_config(archive, minilm_dir, **{"model.hidden_size": 64})
  with pytest.raises(ValueError, match="another model.*hidden_size=32 there, 64 configured"):
    train.train_and_evaluate(bigger, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # config.json included


def test_evaluate_scores_an_archive_holding_only_test(tmp_path, trained, archive, minilm_dir):
  workdir, _ = trained
  held_out = make_archive(write_imdb(tmp_path / "held_out", splits=("test",),
                                     reviews=sentiment_reviews("test", 5)), tmp_path / "held_out.tar.gz")
  config = tiny_config(archive, minilm_dir, mode="evaluate", **{"data.data_dir": str(held_out)})
  results = evaluate.evaluate(config, str(workdir))
  written = json.loads((workdir / "evaluate_results.json").read_text())
  assert written["num_test_examples"] == 10 and written["checkpoint_step"] == results["checkpoint_step"]
  assert 0.0 <= written["test_accuracy"] <= 1.0 and np.isfinite(written["test_loss"])


def test_evaluate_scores_the_same_test_set_as_training(trained, archive, minilm_dir):
  workdir, results = trained
  config = tiny_config(archive, minilm_dir, mode="evaluate", **{"evaluate.checkpoint": "best"})
  scored = evaluate.evaluate(config, str(workdir))
  assert scored["checkpoint_step"] == results["checkpoint_step"]
  assert scored["test_accuracy"] == results["test_accuracy"]
  assert scored["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)


def test_evaluate_computes_as_the_config_says_on_the_checkpoint_s_model(trained, archive, minilm_dir):
  # attention_impl is how to compute, not what the model is: another device may need another kernel.
  workdir, results = trained
  config = tiny_config(archive, minilm_dir, mode="evaluate", **{"model.attention_impl": "einsum"})
  module, _, meta, _ = state_lib.restore_params(config, str(workdir), "best", partitioning.make_mesh((1, 1, 1)))
  assert (meta["model"]["attention_impl"], module.config.attention_impl) == ("auto", "einsum")
  assert module.config.hidden_size == meta["model"]["hidden_size"] == 32
  scored = evaluate.evaluate(config, str(workdir))
  assert scored["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)  # the kernels agree to rounding


@pytest.fixture(scope="module")
def varied_archive(tmp_path_factory):
  """Reviews of 5 to 20+ tokens (the longest truncated at max_seq_length 16), in both splits."""
  root = tmp_path_factory.mktemp("varied")
  filler = "and then the story goes on".split()
  reviews = {(split, cls): [f"a {word} movie {' '.join(filler[:i % 7] * (1 + i % 3))}".encode() for i in range(count)]
             for split, count in (("train", 40), ("test", 12))
             for cls, word in (("neg", "bad"), ("pos", "good"))}
  return make_archive(write_imdb(root / "unpacked", reviews=reviews), root / "aclImdb_v1.tar.gz")


def test_evaluate_with_length_buckets_scores_as_with_full_padding(trained, varied_archive, archive, minilm_dir):
  """Batches cut to 8 or 12 columns (shortest reviews first) score as padded to 16 (float32 sums)."""
  workdir, _ = trained
  scored = {buckets: evaluate.evaluate(tiny_config(archive, minilm_dir, mode="evaluate", **{
      "data.data_dir": str(varied_archive), "data.length_buckets": buckets}), str(workdir)) for buckets in ((), (8, 12))}
  assert scored[()]["num_test_examples"] == scored[(8, 12)]["num_test_examples"] == 24
  assert scored[(8, 12)]["test_accuracy"] == scored[()]["test_accuracy"]
  assert scored[(8, 12)]["test_loss"] == pytest.approx(scored[()]["test_loss"], rel=1e-5)


def test_a_run_with_length_buckets_resumes_only_with_the_same_buckets(tmp_path, varied_archive, minilm_dir):
  def config(**overrides):
    return tiny_config(varied_archive, minilm_dir, **{"train.num_epochs": 0.25, **overrides})
  bucketed = train.train_and_evaluate(config(**{"data.length_buckets": (8, 12)}), str(tmp_path))
  assert bucketed["steps"] == 2 and np.isfinite(bucketed["test_loss"])
  # The same buckets again: the settings read back from the checkpoint match (JSON lists vs tuples).
  assert train.train_and_evaluate(config(**{"data.length_buckets": (8, 12)}), str(tmp_path)) == bucketed
  with pytest.raises(ValueError, match=r"length_buckets=\[8, 12\], the config now gives \[\]"):
    train.train_and_evaluate(config(), str(tmp_path))


def test_predict_writes_label_and_probability_per_line(tmp_path, trained, archive, minilm_dir):
  workdir, _ = trained
  texts = tmp_path / "texts.txt"
  texts.write_text("a great movie\na boring movie\nan awful movie\n")
  config = tiny_config(archive, minilm_dir, mode="predict", **{"predict.input_file": str(texts)})
  out = io.StringIO()
  evaluate.predict(config, str(workdir), out=out)
  rows = out.getvalue().splitlines()
  assert len(rows) == 3
  for row in rows:
    label, probability = row.split("\t")
    assert label in ("neg", "pos") and 0.5 <= float(probability) <= 1.0


def test_rerunning_a_finished_run_keeps_its_results(trained, archive, minilm_dir):
  workdir, results = trained
  again = train.train_and_evaluate(tiny_config(archive, minilm_dir), str(workdir))
  assert again == results  # no step left to train; totals come from the checkpoint


def test_gradient_accumulation_matches_the_full_batch(tmp_path, archive, minilm_dir):
  common = {"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0,
            "train.num_epochs": 0.25}
  full = train.train_and_evaluate(tiny_config(archive, minilm_dir, **common), str(tmp_path / "full"))
  accumulated = train.train_and_evaluate(
      tiny_config(archive, minilm_dir, **common, **{"train.grad_accum_steps": 4}), str(tmp_path / "accum"))
  # Summation order differs between one batch of 8 and four of 2: float32 rounding only.
  assert accumulated["test_loss"] == pytest.approx(full["test_loss"], rel=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("learning_rate", -1e-5, "config.learning_rate=-1e-05 is out of range"),
    ("train.batch_size", 0, "config.train.batch_size=0"),
    ("train.grad_accum_steps", 3, "a positive divisor of train.batch_size=8"),
    ("data.validation_fraction", 1.0, "config.data.validation_fraction=1.0"),
    ("optimizer.name", "sgd", r"one of \('adamw', 'lamb'\)"),
    ("mode", "serve", "config.mode='serve'"),
    ("model.hidden_dropout_prob", 2.0, r"config.model: BertConfig.hidden_dropout_prob=2.0 must be in \[0, 1\)"),
    ("data.length_buckets", (12, 8), r"config.data.length_buckets=\(12, 8\) is out of range: increasing"),
    ("data.length_buckets", (8, 32), r"up to data.max_seq_length=16"),
])
def test_out_of_range_values_are_named_before_any_work(archive, minilm_dir, key, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.check(tiny_config(archive, minilm_dir, **{key: value}))


def test_label_count_below_imdb_s_classes_is_refused_before_any_work(archive, minilm_dir):
  with pytest.raises(ValueError, match=r"config.model.num_labels=1 is out of range: at least 2"):
    config_checks.check(tiny_config(archive, minilm_dir, **{"model.num_labels": 1}))


def test_evaluate_takes_buckets_beyond_the_config_s_max_seq_length(trained, varied_archive, archive, minilm_dir):
  """It scores at the checkpoint's max_seq_length (16 here), whatever the config's (8): a bucket of 16
  passes the checks and cuts nothing."""
  workdir, _ = trained
  config = tiny_config(archive, minilm_dir, mode="evaluate", **{
      "data.data_dir": str(varied_archive), "data.max_seq_length": 8, "data.length_buckets": (8, 16)})
  config_checks.check(config)
  reference = tiny_config(archive, minilm_dir, mode="evaluate", **{"data.data_dir": str(varied_archive)})
  assert evaluate.evaluate(config, str(workdir))["test_loss"] == pytest.approx(
      evaluate.evaluate(reference, str(workdir))["test_loss"], rel=1e-5)


def test_max_seq_length_beyond_positions_is_refused(tmp_path, archive, minilm_dir):
  config = tiny_config(archive, minilm_dir, **{"data.max_seq_length": 33})
  with pytest.raises(ValueError, match="data.max_seq_length=33.*max_position_embeddings=32"):
    train.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_data_parallel_devices_is_refused(archive, minilm_dir):
  config = tiny_config(archive, minilm_dir, **{"train.batch_size": 12, "train.grad_accum_steps": 3})
  with pytest.raises(ValueError, match=r"train.batch_size=12.*\(3\) x the 8 data-parallel devices"):
    config_checks.check_batch_layout(config, data_parallel_size=8)


def test_missing_paths_are_named_before_any_work(tmp_path, archive, minilm_dir):
  config = tiny_config(archive, minilm_dir, **{"data.data_dir": str(tmp_path / "nowhere.tar.gz")})
  with pytest.raises(FileNotFoundError, match="config.data.data_dir=.*nowhere.tar.gz.* does not exist"):
    config_checks.check(config)
  config = tiny_config(archive, minilm_dir, **{"init_checkpoint": str(tmp_path / "no_model")})
  with pytest.raises(FileNotFoundError, match="config.init_checkpoint="):
    config_checks.check(config)


@pytest.mark.slow
def test_command_line_reports_a_bad_value_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "--config=configs/imdb.py:tiny", f"--workdir={tmp_path}",
       "--config.learning_rate=-1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "error: config.learning_rate=-1.0 is out of range" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_preset_on_the_real_archive_from_the_command_line(tmp_path, imdb_archive, minilm_dir):
  result = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "--config=configs/imdb.py:tiny", f"--workdir={tmp_path}",
       f"--config.data.data_dir={imdb_archive}", f"--config.tokenizer={minilm_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["num_test_examples"] == 1000
  assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())
  assert (tmp_path / "hf_model" / "model.safetensors").exists()
  assert results["test_accuracy"] > 0.55  # it learns something from 1,800 reviews in 2 epochs


class _Dispatched:
  """A step's outputs as `jax.block_until_ready` sees them; notes when the loop waits on them."""

  def __init__(self, step, waited):
    self.step, self.waited = step, waited

  def block_until_ready(self):
    self.waited.append(self.step)
    return self


def test_the_loop_waits_for_the_step_dispatched_max_steps_ahead_back():
  waited = []
  in_flight = train._InFlight(2)
  for step in range(5):
    in_flight.dispatched(_Dispatched(step, waited))
    assert waited == list(range(step - 1)), f"after dispatching step {step}"


def test_the_train_and_eval_loops_pass_every_step_through_the_bound(tmp_path, archive, minilm_dir, monkeypatch):
  calls = []  # per _InFlight, in the order they were made: how many dispatches each saw

  class Counted(train._InFlight):
    def __init__(self, limit):
      super().__init__(limit)
      self.index = len(calls)
      calls.append(0)

    def dispatched(self, outputs):
      calls[self.index] += 1
      super().dispatched(outputs)

  monkeypatch.setattr(train, "_InFlight", Counted)
  results = train.train_and_evaluate(tiny_config(archive, minilm_dir, **{"train.num_epochs": 0.25}), str(tmp_path))
  # The train loop's 2 steps; validation at its end (16 reviews, 2 batches of 8); the test set (24, 3 batches).
  assert results["steps"] == 2 and results["num_test_examples"] == 24
  assert calls == [2, 2, 3]
