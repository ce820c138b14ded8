"""BERT's masked LM targets, drawn per batch: 15% of tokens, 80% [MASK] / 10% random / 10% unchanged.

Owns: choosing positions (token-level or whole words) and replacing them, vectorised over the batch
with numpy. Does not own: sentence pairs or batching (`pretraining_data`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import ml_collections
import numpy as np

from bert_jax import tokenization


def word_continuation_table(tokenizer: tokenization.Tokenizer) -> np.ndarray:
  """bool [vocab_size]: True for '##' pieces, which continue the word before them."""
  table = np.zeros(tokenizer.vocab_size, bool)
  for token, index in tokenizer.hf_tokenizer.get_vocab().items():
    table[index] = token.startswith("##")
  return table


def mask_tokens(batch: dict[str, np.ndarray], *, rng: np.random.Generator, masked_lm_prob: float,
                max_predictions_per_seq: int, vocab_size: int, mask_id: int,
                special_ids: Sequence[int],
                word_continuation: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """BERT's masked LM: a copy of `batch` with `input_ids` [B, L] masked, plus the targets.

  Each sequence predicts min(P, max(1, round(num_real_tokens * masked_lm_prob))) tokens (P =
  `max_predictions_per_seq`; real = `attention_mask`, specials included, as in BERT), chosen among
  real tokens not in `special_ids`: 80% become `mask_id`, 10% a random non-special id, 10% stay.
  With `word_continuation` (bool [vocab_size]) whole words are chosen, in random order, skipping a
  word that would exceed the count, as BERT's whole-word masking does; a '##' piece after a special
  token starts a word. Adds `masked_lm_positions` (ascending), `masked_lm_ids` (the original ids)
  int32 [B, P] and `masked_lm_weights` float32 [B, P] (0 on unused slots, whose position and id are 0).
  """
  ids = batch["input_ids"]
  num_rows, length = ids.shape
  real = batch["attention_mask"].astype(bool)
  special_ids = np.unique(np.asarray(special_ids, np.int64))
  candidate = real & ~np.isin(ids, special_ids)
  num_predict = np.minimum(max_predictions_per_seq,
                           np.maximum(1, np.rint(real.sum(1) * masked_lm_prob))).astype(np.int64)
  chosen = _choose(candidate, ids, num_predict, rng, word_continuation)  # bool [B, L]
  # A stable sort of "not chosen" lists the chosen positions first, in ascending order.
  slots = max_predictions_per_seq
  order = np.argsort(~chosen, axis=1, kind="stable")[:, :slots]
  order = np.pad(order, ((0, 0), (0, slots - order.shape[1])))  # When L < P.
  valid = np.arange(slots) < chosen.sum(1)[:, None]  # [B, P]
  positions = np.where(valid, order, 0)
  original = np.where(valid, np.take_along_axis(ids, positions, axis=1), 0)
  draw = rng.random((num_rows, slots))
  random_ids = rng.integers(vocab_size - len(special_ids), size=(num_rows, slots))
  for special in special_ids:  # The k-th non-special id, by stepping over each (sorted) special id.
    random_ids += random_ids >= special
  replacement = np.where(draw < 0.8, mask_id, np.where(draw < 0.9, random_ids, original))
  masked = dict(batch)
  masked["input_ids"] = ids.copy()
  row, slot = np.nonzero(valid)
  masked["input_ids"][row, positions[row, slot]] = replacement[row, slot]
  masked["masked_lm_positions"] = positions.astype(np.int32)
  masked["masked_lm_ids"] = original.astype(np.int32)
  masked["masked_lm_weights"] = valid.astype(np.float32)
  return masked


def _choose(candidate: np.ndarray, ids: np.ndarray, num_predict: np.ndarray,
            rng: np.random.Generator, word_continuation: np.ndarray | None) -> np.ndarray:
  """bool [B, L]: the positions to predict, whole words in a random order, vectorised over rows."""
  num_rows, length = candidate.shape
  start = candidate
  if word_continuation is not None:  # A '##' piece right after another candidate continues its word.
    after_candidate = np.pad(candidate[:, :-1], ((0, 0), (1, 0)))
    start = candidate & ~(word_continuation[ids] & after_candidate)
  word = np.cumsum(start, axis=1) - 1  # [B, L] the word of each candidate position
  num_words = start.sum(1)
  # Random keys on word starts only: argsort lists every row's words in random order, then the rest.
  order = np.argsort(np.where(start, rng.random((num_rows, length)), 2.0), axis=1)
  rank = np.arange(length)
  if word_continuation is None:  # Every word is one piece: take the first num_predict.
    take = rank < np.minimum(num_predict, num_words)[:, None]
  else:
    row_offset = np.arange(num_rows)[:, None] * length
    word_length = np.bincount((row_offset + np.maximum(word, 0))[candidate],
                              minlength=num_rows * length).reshape(num_rows, length)
    ordered_length = np.take_along_axis(
        word_length, np.take_along_axis(np.maximum(word, 0), order, axis=1), axis=1)
    take = np.zeros((num_rows, length), bool)
    count = np.zeros(num_rows, np.int64)
    for k in range(int(num_words.max(initial=0))):  # Greedy like BERT: skip words that do not fit.
      if (count >= num_predict).all():
        break
      fits = (k < num_words) & (count + ordered_length[:, k] <= num_predict)
      take[:, k] = fits
      count += np.where(fits, ordered_length[:, k], 0)
  # Scatter the taken ranks back to word ids (column `length` absorbs ranks past the last word).
  word_taken = np.zeros((num_rows, length + 1), bool)
  ordered_word = np.where(rank < num_words[:, None], np.take_along_axis(word, order, axis=1), length)
  np.put_along_axis(word_taken, ordered_word, take, axis=1)
  return candidate & np.take_along_axis(word_taken, np.maximum(word, 0), axis=1)


def mask_fn(config_data: ml_collections.ConfigDict,
            tokenizer: tokenization.Tokenizer) -> Callable[[dict, np.random.Generator], dict]:
  """The `mask` for `pretraining_batches`: `mask_tokens` with config.data's settings and the vocab."""
  hf = tokenizer.hf_tokenizer
  continuation = word_continuation_table(tokenizer) if config_data.whole_word_masking else None
  settings = dict(masked_lm_prob=config_data.masked_lm_prob, vocab_size=tokenizer.vocab_size,
                  max_predictions_per_seq=config_data.max_predictions_per_seq,
                  mask_id=hf.mask_token_id, special_ids=hf.all_special_ids,
                  word_continuation=continuation)

  def mask(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return mask_tokens(batch, rng=rng, **settings)
  return mask
