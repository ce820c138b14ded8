"""Raw text for pretraining: documents as lists of sentences, from text files, aclImdb or TFDS.

Owns: finding and reading the source, `<br />` cleaning and a simple regex sentence splitter, and a
cheap fingerprint of the source for caches. Does not own: tokenization or instances
(`pretraining_data`), nor the labelled IMDB splits (`input_pipeline`).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Iterable

from bert_jax import archives

_HINT = ("set --config.data.data_dir to a .txt file (one sentence per line, a blank line between "
         "documents), a folder of .txt files, aclImdb_v1.tar.gz or its unpacked aclImdb/ folder; or "
         "--config.data.data_dir='' with --config.data.tfds_name=NAME")
# An unlabelled review in the archive; the aclImdb/ top folder (and a leading ./) are optional.
_UNSUP_MEMBER_RE = re.compile(r"^(?:\./)?(?:aclImdb/)?train/unsup/([^/]+\.txt)$")
_BREAK_RE = re.compile(r"<br\s*/?>", re.IGNORECASE)
# A sentence ends at . ! ? (repeated, maybe closed by quotes or brackets) followed by white space.
_SENTENCE_END_RE = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)\s+")
# Tokens after which a full stop rarely ends a sentence; the splitter joins across them.
_ABBREVIATIONS = frozenset(("mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "prof.", "e.g.", "i.e."))


def read_documents(data_dir: str, *, tfds_name: str = "", tfds_split: str = "train",
                   tfds_text_key: str = "text", max_documents: int = 0) -> list[list[str]]:
  """Documents, each a list of sentences (non-empty strings), in a deterministic order.

  `data_dir`: a `.txt` file or a folder of them (sorted, recursive; one sentence per line, a blank
  line or a new file starts a document); an aclImdb archive (streamed in place) or folder, whose
  `train/unsup` reviews (sorted by id) are the documents; or '' with `tfds_name` for
  `tfds.data_source(tfds_name, split=tfds_split)`, one document per record's `tfds_text_key`.
  Reviews and TFDS texts lose `<br />` tags and are split into sentences by `split_sentences`.
  `max_documents` > 0 keeps the first that many.
  """
  if max_documents < 0:
    raise ValueError(f"max_documents={max_documents} must be >= 0 (0 means all).")
  limit = max_documents or None
  if not data_dir:
    if not tfds_name:
      raise ValueError(f"No pretraining text: data_dir and tfds_name are both empty; {_HINT}.")
    documents, source = _read_tfds(tfds_name, tfds_split, tfds_text_key, limit), f"tfds {tfds_name}"
  else:
    path = os.path.expanduser(data_dir)
    kind = _source_kind(path)
    if kind == "archive":
      documents = [split_sentences(text) for text in _read_unsup_archive(path)[:limit]]
    elif kind == "imdb_folder":
      documents = [split_sentences(_read_text(p)) for p in _unsup_files(path)[:limit]]
    else:
      documents = _read_text_documents(_text_files(path), limit)
    source = path
  documents = [doc for doc in documents if doc]
  if not documents:
    raise ValueError(f"The pretraining corpus {source!r} has no sentences (every document is empty); "
                     f"check the files or {_HINT}.")
  return documents


def split_sentences(text: str) -> list[str]:
  """Splits a review-like text into sentences: at `<br />` tags, line breaks and `.!?` + space.

  A full stop after a common abbreviation (Mr., Dr., vs., e.g., ...) does not end a sentence.
  """
  sentences = []
  for line in _BREAK_RE.sub("\n", text).splitlines():
    pieces = []
    for piece in _SENTENCE_END_RE.sub("\\1\n", line.strip()).split("\n"):
      piece = piece.strip()
      if piece and pieces and pieces[-1].rsplit(None, 1)[-1].lower() in _ABBREVIATIONS:
        pieces[-1] += " " + piece
      elif piece:
        pieces.append(piece)
    sentences.extend(pieces)
  return sentences


def fingerprint(data_dir: str) -> str | None:
  """A digest of the files behind `data_dir` (paths, sizes, mtimes), or None for TFDS (''): then
  use `texts_fingerprint`.

  Cheap (no reading), so a cache keyed on it can skip reading the corpus altogether.
  """
  if not data_dir:
    return None
  path = os.path.abspath(os.path.expanduser(data_dir))
  kind = _source_kind(path)
  files = {"archive": lambda: [path], "imdb_folder": lambda: _unsup_files(path),
           "text": lambda: _text_files(path)}[kind]()
  digest = hashlib.sha256(repr((kind, path)).encode())
  for name in files:
    stat = os.stat(name)
    digest.update(repr((os.path.relpath(name, path), stat.st_size, stat.st_mtime_ns)).encode())
  return digest.hexdigest()


def texts_fingerprint(documents: list[list[str]]) -> str:
  """A digest of the documents' sentences, for sources without files to stat (TFDS)."""
  digest = hashlib.sha256()
  for document in documents:
    digest.update(len(document).to_bytes(8, "little"))
    for sentence in document:
      data = sentence.encode("utf-8", "surrogatepass")
      digest.update(len(data).to_bytes(8, "little") + data)  # Length prefix: ["ab", "c"] != ["a", "bc"].
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Sources.


def _source_kind(path: str) -> str:
  """'archive', 'imdb_folder' or 'text'; raises for a missing path or an unknown file type."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Pretraining data_dir {path!r} does not exist; {_HINT}.")
  if os.path.isdir(path):
    return "imdb_folder" if _imdb_root(path) else "text"
  if path.endswith(archives.SUFFIXES):
    return "archive"
  if path.endswith(".txt"):
    return "text"
  raise ValueError(f"Pretraining data_dir {path!r} is neither a .txt file nor a .tar.gz/.tgz/.tar "
                   f"archive; {_HINT}.")


def _imdb_root(path: str) -> str | None:
  """The folder holding `train/unsup` (`path` or `path/aclImdb`), or None if it is not aclImdb."""
  for root in (os.path.join(path, "aclImdb"), path):
    train, test = os.path.join(root, "train"), os.path.join(root, "test")
    if os.path.isdir(os.path.join(train, "unsup")) or (os.path.isdir(train) and os.path.isdir(test)):
      return root
  return None


def _review_key(name: str) -> tuple[int, str]:
  """Sorts `<id>_<rating>.txt` by numeric id (0, 1, 2, ..., 10), then by name."""
  stem = os.path.basename(name).split("_")[0]
  return (int(stem) if stem.isdigit() else -1, name)


def _unsup_files(path: str) -> list[str]:
  folder = os.path.join(_imdb_root(path), "train", "unsup")
  names = sorted((n for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else [],
                 key=_review_key)
  if not names:
    raise ValueError(f"No train/unsup/*.txt reviews in the aclImdb folder {path!r} (looked in "
                     f"{folder!r}); unpack the full aclImdb_v1.tar.gz or {_HINT}.")
  return [os.path.join(folder, n) for n in names]


def _read_unsup_archive(path: str) -> list[str]:
  """The archive's `train/unsup` reviews sorted by id, in one streaming pass (no seeking)."""
  members, first_members = archives.read_matching(path, _UNSUP_MEMBER_RE, hint=_HINT)
  found = [(_review_key(match.string), data) for match, data in members]
  if not found:
    raise ValueError(f"No [aclImdb/]train/unsup/*.txt reviews in archive {path!r} (its first members: "
                     f"{first_members}); pretraining reads the unlabelled reviews of the full "
                     f"aclImdb_v1.tar.gz, or {_HINT}.")
  found.sort(key=lambda item: item[0])
  return [data.decode("utf-8", "replace") for _, data in found]


def _text_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                 for name in names if name.endswith(".txt"))
  if not files:
    raise ValueError(f"No .txt files in {path!r} (searched recursively); {_HINT}.")
  return files


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _read_text_documents(files: Iterable[str], limit: int | None) -> list[list[str]]:
  """Original BERT format: one sentence per line, a blank line (or the end of a file) ends a document."""
  documents = []
  for name in files:
    document = []
    with open(name, encoding="utf-8", errors="replace") as f:
      for line in f:
        line = line.strip()
        if line:
          document.append(line)
        elif document:
          documents.append(document)
          document = []
        if limit and len(documents) >= limit:
          return documents
    if document:
      documents.append(document)
      if limit and len(documents) >= limit:
        return documents
  return documents


def _read_tfds(name: str, split: str, text_key: str, limit: int | None) -> list[list[str]]:
  """Reads through `tfds.data_source` (ArrayRecord; needs no TensorFlow), record by record."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; only this path needs it
    source = tfds.data_source(name, split=split)
  except Exception as e:  # pylint: disable=broad-except  # not downloaded, no network, missing deps...
    raise FileNotFoundError(
        f"Could not load TFDS {name!r} split {split!r} ({type(e).__name__}: {e}). Prepare it "
        f"(TFDS_DATA_DIR) or {_HINT}.") from e
  documents = []
  # Record by record: the batched `__getitems__` is broken under `tfds.testing.mock_data`.
  for i in range(min(len(source), limit or len(source))):
    record = source[i]
    if text_key not in record:
      raise ValueError(f"TFDS {name!r} records have no {text_key!r} feature (they have "
                       f"{sorted(record)}); set --config.data.tfds_text_key to the text feature.")
    text = record[text_key]
    documents.append(split_sentences(text.decode("utf-8", "replace") if isinstance(text, bytes)
                                     else str(text)))
  return documents
