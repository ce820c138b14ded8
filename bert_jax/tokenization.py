"""WordPiece tokenization for BERT, on top of transformers' fast (Rust) `BertTokenizerFast`.

Owns: turning texts (or text pairs) into fixed-length int32 numpy arrays. Does not own: caching
or batching of data sets (see `input_pipeline`).
"""

from __future__ import annotations

import inspect
import os
from typing import Sequence

import numpy as np
import transformers

from bert_jax import hf


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _check_vocab_file(path: str) -> None:
  # transformers appends missing special tokens silently; a vocab without them is not a BERT vocab.
  with open(path, encoding="utf-8") as f:
    tokens = {line.rstrip("\n") for line in f}
  missing = [t for t in SPECIAL_TOKENS if t not in tokens]
  if missing:
    raise ValueError(f"{path} ({len(tokens)} tokens) lacks BERT's special tokens {missing}; "
                     "is it the WordPiece vocab.txt of a BERT model?")


class Tokenizer:
  """Batch-encodes texts to `[CLS] A [SEP] (B [SEP])`, padded with id 0 to `max_seq_length`."""

  def __init__(self, hf_tokenizer: transformers.PreTrainedTokenizerBase):
    self.hf_tokenizer = hf_tokenizer

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str, do_lower_case: bool | None = None) -> "Tokenizer":
    """Loads from a directory holding `vocab.txt` (or `tokenizer.json`), a `vocab.txt` file, a hub id,
    or `pip:PACKAGE` (the HF directory inside an installed package)."""
    kwargs = {} if do_lower_case is None else {"do_lower_case": do_lower_case}
    path = os.path.expanduser(str(path_or_hub_id))
    if path.startswith("pip:"):  # a checkpoint shipped in a Python package, as hf.load_pretrained takes it
      path = hf.resolve(path)
    if os.path.isfile(path):
      _check_vocab_file(path)
      if os.path.basename(path) != "vocab.txt" and not path.endswith(".txt"):
        raise ValueError(f"Tokenizer file {path!r} is not a WordPiece vocab.txt; pass the file or its directory.")
      # transformers 5 takes the file as `vocab` and silently ignores the older `vocab_file`.
      init_params = inspect.signature(transformers.BertTokenizerFast.__init__).parameters
      kwargs["vocab" if "vocab" in init_params else "vocab_file"] = path
      return cls(transformers.BertTokenizerFast(**kwargs))
    if os.path.isdir(path):
      names = os.listdir(path)
      if "vocab.txt" not in names and "tokenizer.json" not in names:
        raise FileNotFoundError(
            f"Tokenizer directory {path!r} has neither vocab.txt nor tokenizer.json; "
            "point to a Hugging Face BERT directory or a vocab.txt file.")
      if "vocab.txt" in names:
        _check_vocab_file(os.path.join(path, "vocab.txt"))
      return cls(transformers.BertTokenizerFast.from_pretrained(path, **kwargs))
    if os.sep in path_or_hub_id and not os.path.exists(path):
      raise FileNotFoundError(f"Tokenizer path {path!r} does not exist.")
    return cls(transformers.BertTokenizerFast.from_pretrained(path_or_hub_id, **kwargs))

  @property
  def vocab_size(self) -> int:
    return len(self.hf_tokenizer)

  @property
  def pad_token_id(self) -> int:
    return self.hf_tokenizer.pad_token_id

  def encode(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *,
             max_seq_length: int) -> dict[str, np.ndarray]:
    """Returns `input_ids`, `token_type_ids`, `attention_mask`, each int32 `[len(texts), max_seq_length]`.

    Longer inputs are truncated (the longest segment first for pairs), in one batched call.
    """
    if max_seq_length < (3 if text_pairs is not None else 2):
      raise ValueError(f"max_seq_length={max_seq_length} leaves no room for [CLS] and [SEP].")
    texts = list(texts)
    if text_pairs is not None:
      text_pairs = list(text_pairs)
      if len(text_pairs) != len(texts):
        raise ValueError(f"Got {len(texts)} texts but {len(text_pairs)} text pairs; they must match.")
    encoded = self.hf_tokenizer(
        texts, text_pairs, max_length=max_seq_length, padding="max_length",
        truncation="longest_first", return_token_type_ids=True, return_attention_mask=True,
        return_tensors="np")
    return {name: encoded[name].astype(np.int32)
            for name in ("input_ids", "token_type_ids", "attention_mask")}
