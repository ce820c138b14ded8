"""Trains a WordPiece vocab on a corpus with the `tokenizers` library.

  python -m bert_jax.vocab --data_dir=CORPUS --output_dir=DIR [--vocab_size=30522]

CORPUS is any source `configs/pretrain.py` reads (text files, an aclImdb archive's unlabelled reviews;
or --tfds_name). DIR gets `vocab.txt` (BERT's special tokens first, [PAD] as id 0) and the tokenizer
files of transformers, so `--config.tokenizer=DIR` uses it; pretraining from scratch then sizes the
embedding table to the vocab.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable

from absl import app
from absl import flags
from absl import logging

from bert_jax import corpus

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_DATA_DIR = flags.DEFINE_string("data_dir", "", "Text file or folder, or aclImdb archive/folder.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "", "A tensorflow-datasets text dataset (when no --data_dir).")
_TFDS_SPLIT = flags.DEFINE_string("tfds_split", "train", "Split of --tfds_name.")
_TFDS_TEXT_KEY = flags.DEFINE_string("tfds_text_key", "text", "Text feature of --tfds_name.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0, "Read at most this many documents (0 = all).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory to write vocab.txt to.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 30522, "Number of tokens, special tokens included.")
_MIN_FREQUENCY = flags.DEFINE_integer("min_frequency", 2, "Merges must occur at least this often.")
_LOWERCASE = flags.DEFINE_bool("lowercase", True, "Lowercase and strip accents (an uncased vocab).")


def train_wordpiece(sentences: Iterable[str], output_dir: str, *, vocab_size: int, min_frequency: int = 2,
                    lowercase: bool = True) -> str:
  """Trains on `sentences` and writes `output_dir/vocab.txt` plus transformers' tokenizer files.

  Returns the vocab.txt path. Raises ValueError if the corpus yields fewer tokens than the special ones.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"--vocab_size={vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} special tokens.")
  wordpiece = tokenizers.BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
  wordpiece.train_from_iterator(sentences, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS), wordpieces_prefix="##")
  if wordpiece.get_vocab_size() <= len(SPECIAL_TOKENS):
    raise ValueError("The corpus gave no tokens beside the special ones; is it empty?")
  os.makedirs(output_dir, exist_ok=True)
  vocab_path = os.path.join(output_dir, "vocab.txt")
  # Through a temporary directory and a rename: an existing vocab is never left half-written.
  tmp_dir = output_dir + ".tmp-vocab"
  os.makedirs(tmp_dir, exist_ok=True)
  (written,) = wordpiece.save_model(tmp_dir)
  fast = transformers.BertTokenizerFast(vocab=written, do_lower_case=lowercase, strip_accents=lowercase)
  fast.save_pretrained(tmp_dir)
  for name in sorted(os.listdir(tmp_dir)):
    os.replace(os.path.join(tmp_dir, name), os.path.join(output_dir, name))
  os.rmdir(tmp_dir)
  return vocab_path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _OUTPUT_DIR.value:
    raise app.UsageError("--output_dir is required.")
  try:
    documents = corpus.read_documents(
        _DATA_DIR.value, tfds_name=_TFDS_NAME.value, tfds_split=_TFDS_SPLIT.value,
        tfds_text_key=_TFDS_TEXT_KEY.value, max_documents=_MAX_DOCUMENTS.value)
    sentences = (sentence for document in documents for sentence in document)
    path = train_wordpiece(sentences, _OUTPUT_DIR.value, vocab_size=_VOCAB_SIZE.value,
                           min_frequency=_MIN_FREQUENCY.value, lowercase=_LOWERCASE.value)
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  with open(path, encoding="utf-8") as f:
    size = sum(1 for _ in f)
  logging.info("Wrote %s: %d tokens from %d documents. Use it with --config.tokenizer=%s", path, size,
               len(documents), _OUTPUT_DIR.value)
  print(path)


if __name__ == "__main__":
  app.run(main)
