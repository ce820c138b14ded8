"""Bad input through the real command: each case ends with a short error naming the cause, a
non-zero exit, no traceback (unless --verbose), and no file of the workdir changed.

Each row runs `python -m bert_jax.main` in a subprocess; all rows start together, so the table costs
about as much as its slowest row.
"""

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from imdb_testdata import make_archive, sentiment_reviews, write_imdb

REPO_ROOT = Path(__file__).resolve().parents[1]


def _snapshot(workdir: Path) -> dict[str, str]:
  return {str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, minilm_dir):
  root = tmp_path_factory.mktemp("inputs")
  good = make_archive(write_imdb(root / "good", reviews={**sentiment_reviews("train", 20),
                                                        **sentiment_reviews("test", 4)}), root / "good.tar.gz")
  (root / "flat" / "reviews").mkdir(parents=True)
  (root / "flat" / "reviews" / "0_9.txt").write_text("a review outside the aclImdb layout")
  wrong_layout = make_archive(root / "flat", root / "wrong_layout.tar.gz", arcname="reviews")
  empty_reviews = {(split, cls): [b"   "] * 3 for split in ("train", "test") for cls in ("neg", "pos")}
  empty = make_archive(write_imdb(root / "empty", reviews=empty_reviews), root / "empty.tar.gz")
  corpus = root / "empty_corpus.txt"
  corpus.write_text("\n\n\n")
  not_gzip = root / "not_gzip.tar.gz"
  not_gzip.write_bytes(b"plain text, not a gzip archive")
  return {"good": good, "wrong_layout": wrong_layout, "empty": empty, "empty_corpus": corpus,
          "not_gzip": not_gzip, "minilm": minilm_dir}


def _tiny_flags(inputs, **overrides):
  values = {"data.data_dir": inputs["good"], "tokenizer": inputs["minilm"], "data.max_seq_length": 16,
            "data.max_train_examples": 0, "data.max_test_examples": 0, "model.hidden_size": 32,
            "model.intermediate_size": 64, "model.max_position_embeddings": 32, "train.batch_size": 8,
            "train.num_epochs": 1.0, "checkpoint.export_hf": False}
  values.update(overrides)
  return [f"--config.{key}={value}" for key, value in values.items()]


# (case, config, extra flags (a function of the inputs), what the error must say)
CASES = [
    ("unknown key", "imdb.py:tiny", lambda i: ["--config.trian.batch_size=8"], "trian"),
    ("wrong type", "imdb.py:tiny", lambda i: ["--config.train.batch_size=eight"], "train.batch_size"),
    ("out of range", "imdb.py:tiny", lambda i: _tiny_flags(i, learning_rate=-1), "learning_rate=-1.0"),
    ("missing data", "imdb.py:tiny", lambda i: _tiny_flags(i, **{"data.data_dir": "/no/such/aclImdb.tar.gz"}),
     "/no/such/aclImdb.tar.gz"),
    ("missing tokenizer", "imdb.py:tiny", lambda i: _tiny_flags(i, tokenizer="/no/such/vocab"), "/no/such/vocab"),
    ("archive of another layout", "imdb.py:tiny",
     lambda i: _tiny_flags(i, **{"data.data_dir": i["wrong_layout"]}), "aclImdb"),
    ("not an archive", "imdb.py:tiny", lambda i: _tiny_flags(i, **{"data.data_dir": i["not_gzip"]}),
     "not_gzip.tar.gz"),
    ("empty reviews", "imdb.py:tiny", lambda i: _tiny_flags(i, **{"data.data_dir": i["empty"]}), "empty"),
    ("labels out of range", "imdb.py:tiny", lambda i: _tiny_flags(i, **{"model.num_labels": 1}),
     "num_labels=1"),
    ("mesh larger than the devices", "imdb.py:tiny", lambda i: _tiny_flags(i, mesh_shape="(4,1,1)"),
     "mesh"),
    ("empty pretraining corpus", "pretrain.py:tiny",
     lambda i: [f"--config.data.data_dir={i['empty_corpus']}", f"--config.tokenizer={i['minilm']}"], "empty"),
]


@pytest.mark.slow
def test_bad_input_ends_with_a_clear_error_and_an_untouched_workdir(tmp_path, inputs):
  runs = {}
  for case, config, flags, _ in CASES:
    workdir = tmp_path / case.replace(" ", "_")
    workdir.mkdir()
    (workdir / "notes.txt").write_text("a file the run must leave alone")
    command = [sys.executable, "-m", "bert_jax.main", f"--config=configs/{config}", f"--workdir={workdir}",
               *flags(inputs)]
    runs[case] = (workdir, _snapshot(workdir), subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}))
  failures = []
  for case, _, _, expected in CASES:
    workdir, before, process = runs[case]
    _, stderr = process.communicate(timeout=900)
    error_lines = [line for line in stderr.splitlines() if line.startswith(("error: ", "FATAL Flags"))]
    problems = []
    if process.returncode == 0:
      problems.append("exit code 0")
    if "Traceback" in stderr:
      problems.append("a traceback")
    if len(error_lines) != 1 or expected not in error_lines[0]:
      problems.append(f"no one-line error naming {expected!r}: {error_lines or stderr[-600:]}")
    after = {name: digest for name, digest in _snapshot(workdir).items() if name in before}
    if after != before:
      problems.append("a workdir file changed")
    if any((workdir / "checkpoints").glob("*")) if (workdir / "checkpoints").exists() else False:
      problems.append("a checkpoint was written")
    if problems:
      failures.append(f"{case}: {'; '.join(problems)}")
  assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_verbose_shows_the_traceback(tmp_path, inputs):
  result = subprocess.run(
      [sys.executable, "-m", "bert_jax.main", "--config=configs/imdb.py:tiny", f"--workdir={tmp_path}",
       "--verbose", *_tiny_flags(inputs, learning_rate=-1)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0 and "Traceback" in result.stderr and "learning_rate=-1.0" in result.stderr


@pytest.mark.slow
def test_checkpoint_of_another_model_size_is_refused_and_kept(tmp_path, inputs):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "bert_jax.main", "--config=configs/imdb.py:tiny", f"--workdir={tmp_path}"]
  first = subprocess.run(command + _tiny_flags(inputs, **{"train.num_train_steps": 2}), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  if platform.libc_ver()[0] == "glibc":  # the configs' cpu_reuse_buffers reached the allocator (host_memory.py)
    assert "cpu_reuse_buffers: one-device steps run on the calling thread and their buffers stay" in first.stderr
  before = _snapshot(tmp_path)
  result = subprocess.run(command + _tiny_flags(inputs, **{"train.num_train_steps": 2, "model.hidden_size": 64}),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: The checkpoint in" in result.stderr and "hidden_size=32 there, 64 configured" in result.stderr
  assert _snapshot(tmp_path) == before
