"""Bias + dropout + residual add + LayerNorm in one pass: a Pallas (Triton) kernel for GPUs.

Owns: `add_dropout_layer_norm`, the "add & norm" that closes each half of a post-LN BERT layer,
`LayerNorm(residual + dropout(h + bias))`, and its backward pass. XLA runs it as several fused
passes over `[tokens, hidden]`, and in the backward pass recomputes the dropout's hash. Here the
forward pass reads `h` and the residual once and writes the output and the pre-norm sum; the
backward pass reads the output gradient and that sum once and writes both input gradients, the
three parameter gradients as per-program column sums. At 32,768 x 768 in bfloat16 on an H200,
forward and backward took 0.26 ms against XLA's 0.32, and a BERT-base pretraining step at 256 x 128
ran 4-5% faster (docs/performance.md, with the keep mask then read from memory).

Both kernels draw the dropout mask themselves, tile by tile, from the hash every dropout mask of the
model uses (`dropout.keep`, keyed by `Dropout.words`): the mask is the XLA path's, bit for bit. A mask
computed by XLA and read by the kernels cost a BERT-base step at 256 x 128 1.7 GB of memory traffic
(one fusion writing all 24 masks, each read forward and backward; docs/performance.md, "nineteenth").

The arithmetic follows the plain path's roundings (bias add, dropout scaling and residual add each
rounded to the compute dtype, statistics in float32), so it agrees with
`LayerNorm(residual + Dropout(h + bias))` to the compute dtype's rounding (`tests/test_fused_norm.py`).
Off a GPU, Pallas's interpreter runs it: correct, slow, for tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from bert_jax.models import dropout as dropout_lib


class Tiling(NamedTuple):
  """How the kernels split `[rows, hidden]`: rows per block, Triton warps per program, and the
  blocks each backward program loops over (its column sums of the parameter gradients are written
  once per program: `[programs, hidden]` float32 each). The defaults were the fastest forward +
  backward of 38 tilings at 32,768 x 768 in bfloat16 on an H200 (docs/performance.md)."""
  block_rows: int = 1
  num_warps: int = 1
  backward_blocks: int = 32


def _column_chunks(n_cols: int) -> tuple[int, int]:
  """(chunk, count): the hidden axis as `count` unmasked chunks of a power-of-2 width (768: 3 x 256)."""
  chunk = n_cols & -n_cols  # the largest power of 2 dividing n_cols
  while chunk > 256:
    chunk //= 2
  if chunk < 16:  # an odd width: one masked power-of-2 block
    return pl.next_power_of_2(n_cols), 1
  return chunk, n_cols // chunk


def _tiles(n_rows: int, n_cols: int, first_row, block_rows: int):
  """One block of rows as `[block_rows, chunk]` tiles: the rows, their mask, and per tile
  (index, in-bounds mask, columns)."""
  rows = first_row + jnp.arange(block_rows)
  row_ok = rows < n_rows
  chunk, count = _column_chunks(n_cols)
  tiles = []
  for c in range(count):
    cols = c * chunk + jnp.arange(chunk)
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    tiles.append(((rows[:, None], cols[None, :]), ok, cols))
  return rows, row_ok, tiles


def _load_row_vector(ref, cols, n_cols):
  return plgpu.load(ref.at[cols], mask=cols < n_cols, other=0).astype(jnp.float32)


class _Dropout(NamedTuple):
  """The dropout the kernels draw (static): `threshold` (`dropout.drop_threshold`), the rows of each
  `[rows, hidden]` slice that one pair of words keys (`h.shape[-2]`), and the divisor of the kept
  elements, `1 - rate` rounded to the compute dtype as the plain path rounds it."""
  threshold: int
  slice_rows: int
  keep_divisor: float


def _row_keys(words_ref, rows, row_ok, drop: _Dropout):
  """The block's rows' words (their slice's, `[block_rows, 1]` each) and rows within their slice.
  `words_ref` holds the slices' word pairs flat, `[2 * slices]`."""
  slices = jax.lax.div(rows, np.int32(drop.slice_rows))
  first = plgpu.load(words_ref.at[2 * slices], mask=row_ok, other=0)
  second = plgpu.load(words_ref.at[2 * slices + 1], mask=row_ok, other=0)
  return first[:, None], second[:, None], jax.lax.rem(rows, np.int32(drop.slice_rows))


def _dropout(x, keys, cols, n_cols, drop: _Dropout):
  """`x` `[block_rows, chunk]` (compute dtype) with the dropped elements zeroed and the kept divided by
  `1 - rate`, in float32 and rounded, as the plain path's `Dropout` does."""
  first, second, rows_in_slice = keys
  keep = dropout_lib.keep(first, second, rows_in_slice, cols, n_cols, drop.threshold)
  return jnp.where(keep, (x.astype(jnp.float32) / drop.keep_divisor).astype(x.dtype), jnp.zeros((), x.dtype))


def _forward_kernel(*refs, drop: _Dropout | None, eps: float, block_rows: int):
  if drop is not None:
    h_ref, bias_ref, words_ref, residual_ref, scale_ref, offset_ref, y_ref, z_ref, mean_ref, rstd_ref = refs
  else:
    h_ref, bias_ref, residual_ref, scale_ref, offset_ref, y_ref, z_ref, mean_ref, rstd_ref = refs
  n_rows, n_cols = h_ref.shape
  dtype, f32 = h_ref.dtype, jnp.float32
  rows, row_ok, tiles = _tiles(n_rows, n_cols, pl.program_id(0) * block_rows, block_rows)
  keys = _row_keys(words_ref, rows, row_ok, drop) if drop is not None else None
  sums, zs = jnp.zeros((block_rows,), f32), []
  for at, ok, cols in tiles:
    h = plgpu.load(h_ref.at[at], mask=ok, other=0).astype(f32)
    dropped = (h + _load_row_vector(bias_ref, cols, n_cols)[None, :]).astype(dtype)
    if drop is not None:
      dropped = _dropout(dropped, keys, cols, n_cols, drop)
    residual = plgpu.load(residual_ref.at[at], mask=ok, other=0).astype(f32)
    z = (residual + dropped.astype(f32)).astype(dtype)
    plgpu.store(z_ref.at[at], z, mask=ok)
    z = jnp.where(ok, z.astype(f32), 0.0)
    zs.append(z)
    sums += jnp.sum(z, axis=1)
  mean = sums / n_cols
  squares = jnp.zeros((block_rows,), f32)
  for (_, ok, _), z in zip(tiles, zs):
    centred = jnp.where(ok, z - mean[:, None], 0.0)
    squares += jnp.sum(centred * centred, axis=1)
  rstd = 1.0 / jnp.sqrt(squares / n_cols + eps)
  for (at, ok, cols), z in zip(tiles, zs):
    scale = _load_row_vector(scale_ref, cols, n_cols)
    offset = _load_row_vector(offset_ref, cols, n_cols)
    y = (z - mean[:, None]) * rstd[:, None] * scale[None, :] + offset[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=ok)
  plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
  plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(*refs, drop: _Dropout | None, block_rows: int, blocks: int):
  if drop is not None:
    (dy_ref, z_ref, words_ref, mean_ref, rstd_ref, scale_ref,
     d_residual_ref, d_h_ref, d_scale_ref, d_offset_ref, d_bias_ref) = refs
  else:
    dy_ref, z_ref, mean_ref, rstd_ref, scale_ref, d_residual_ref, d_scale_ref, d_offset_ref, d_bias_ref = refs
  n_rows, n_cols = dy_ref.shape
  dtype, f32 = z_ref.dtype, jnp.float32
  program = pl.program_id(0)
  _, _, first_tiles = _tiles(n_rows, n_cols, 0, block_rows)
  scales = [_load_row_vector(scale_ref, cols, n_cols) for _, _, cols in first_tiles]

  def block(i, sums):
    rows, row_ok, tiles = _tiles(n_rows, n_cols, (program * blocks + i) * block_rows, block_rows)
    keys = _row_keys(words_ref, rows, row_ok, drop) if drop is not None else None
    mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0)
    rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0)
    dys, normeds, gs = [], [], []
    mean_g_normed = mean_g = jnp.zeros((block_rows,), f32)
    for (at, ok, _), scale in zip(tiles, scales):
      dy = plgpu.load(dy_ref.at[at], mask=ok, other=0).astype(f32)
      z = plgpu.load(z_ref.at[at], mask=ok, other=0).astype(f32)
      normed = jnp.where(ok, (z - mean[:, None]) * rstd[:, None], 0.0)
      g = dy * scale[None, :]
      mean_g_normed += jnp.sum(g * normed, axis=1)
      mean_g += jnp.sum(g, axis=1)
      dys.append(dy), normeds.append(normed), gs.append(g)
    mean_g_normed, mean_g = mean_g_normed / n_cols, mean_g / n_cols
    new_sums = []
    for (at, ok, cols), dy, normed, g, (d_scale, d_offset, d_bias) in zip(tiles, dys, normeds, gs, sums):
      dz = ((g - mean_g[:, None] - normed * mean_g_normed[:, None]) * rstd[:, None]).astype(dtype)
      plgpu.store(d_residual_ref.at[at], dz, mask=ok)
      d_h = dz
      if drop is not None:
        d_h = _dropout(dz, keys, cols, n_cols, drop)
        plgpu.store(d_h_ref.at[at], d_h, mask=ok)
      new_sums.append((d_scale + jnp.sum(dy * normed, axis=0), d_offset + jnp.sum(dy, axis=0),
                       d_bias + jnp.sum(jnp.where(ok, d_h.astype(f32), 0.0), axis=0)))
    return tuple(new_sums)

  zeros = tuple((jnp.zeros(cols.shape, f32),) * 3 for _, _, cols in first_tiles)
  sums = jax.lax.fori_loop(0, blocks, block, zeros)
  for (_, _, cols), tile_sums in zip(first_tiles, sums):
    for ref, total in zip((d_scale_ref, d_offset_ref, d_bias_ref), tile_sums):
      plgpu.store(ref.at[program, cols], total, mask=cols < n_cols)


def interprets(interpret: bool | None = None) -> bool:
  """Whether a Pallas kernel runs in Pallas's interpreter: `interpret`, or when None, unless JAX's
  backend is a GPU (the kernels are written for Triton)."""
  return jax.default_backend() != "gpu" if interpret is None else interpret


def _call(kernel, out_shape, grid: int, tiling: Tiling, interpret: bool | None, name: str):
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(grid,), interpret=interprets(interpret), name=name,
                        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps))


def _forward(h, bias, words, residual, scale, offset, drop, eps, tiling, interpret):
  """`words` int32 `[*h.shape[:-2], 2]` (None without dropout)."""
  n_cols = h.shape[-1]
  rows = h.reshape(-1, n_cols)
  n_rows = rows.shape[0]
  # The slices' word pairs flat (a bitcast): the kernels gather their rows' by slice index.
  flat_words = () if drop is None else (words.reshape(-1),)
  kernel = functools.partial(_forward_kernel, drop=drop, eps=eps, block_rows=tiling.block_rows)
  out_shape = (jax.ShapeDtypeStruct(rows.shape, h.dtype), jax.ShapeDtypeStruct(rows.shape, h.dtype),
               jax.ShapeDtypeStruct((n_rows,), jnp.float32), jax.ShapeDtypeStruct((n_rows,), jnp.float32))
  inputs = (rows, bias, *flat_words, residual.reshape(-1, n_cols), scale, offset)
  y, z, mean, rstd = _call(kernel, out_shape, pl.cdiv(n_rows, tiling.block_rows), tiling, interpret,
                           "add_dropout_layer_norm")(*inputs)
  return y.reshape(h.shape), (z, flat_words, mean, rstd, scale, offset)


def _backward(drop, eps, tiling, interpret, saved, dy):
  del eps
  z, flat_words, mean, rstd, scale, offset = saved
  n_rows, n_cols = z.shape
  programs = pl.cdiv(n_rows, tiling.block_rows * tiling.backward_blocks)
  kernel = functools.partial(_backward_kernel, drop=drop, block_rows=tiling.block_rows,
                             blocks=tiling.backward_blocks)
  sums = jax.ShapeDtypeStruct((programs, n_cols), jnp.float32)
  out_shape = ((jax.ShapeDtypeStruct(z.shape, z.dtype),) * (1 if drop is None else 2)) + (sums,) * 3
  inputs = (dy.reshape(-1, n_cols), z, *flat_words, mean, rstd, scale)
  outputs = _call(kernel, out_shape, programs, tiling, interpret, "add_dropout_layer_norm_backward")(*inputs)
  d_residual = outputs[0].reshape(dy.shape)
  d_h = d_residual if drop is None else outputs[1].reshape(dy.shape)
  d_scale, d_offset, d_bias = (s.sum(axis=0) for s in outputs[-3:])
  # The bias comes in h's dtype, as z does (checked in `add_dropout_layer_norm`).
  return (d_h, d_bias.astype(z.dtype), None, d_residual, d_scale.astype(scale.dtype),
          d_offset.astype(offset.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _add_dropout_layer_norm(h, bias, words, residual, scale, offset, drop, eps, tiling, interpret):
  return _forward(h, bias, words, residual, scale, offset, drop, eps, tiling, interpret)[0]


_add_dropout_layer_norm.defvjp(_forward, _backward)


def add_dropout_layer_norm(h: jax.Array, bias: jax.Array, words: jax.Array | None, residual: jax.Array,
                           scale: jax.Array, offset: jax.Array, *, rate: float, eps: float,
                           tiling: Tiling = Tiling(), interpret: bool | None = None) -> jax.Array:
  """`LayerNorm(residual + dropout(h + bias))` `[..., hidden]`, in `h`'s dtype.

  `h` and `residual` `[..., rows, hidden]` in the compute dtype, `bias` `[hidden]` in the same; `words`
  int32 `[..., 2]` (`h.shape[:-2]`: `Dropout.words`), which key the dropout's mask
  `dropout.keep_mask(words, h.shape, rate)` (kept elements scaled by `1 / (1 - rate)`); with `rate`
  0 there is no dropout and `words` may be None; `scale` and `offset` `[hidden]`, the norm's
  parameters in their own dtype. `interpret`: see `interprets`.
  """
  hidden = h.shape[-1:]
  if residual.shape != h.shape or residual.dtype != h.dtype or bias.dtype != h.dtype:
    raise ValueError(f"add_dropout_layer_norm takes h, residual and bias in one dtype and h's shape for the "
                     f"residual; got h {h.dtype}{list(h.shape)}, residual {residual.dtype}{list(residual.shape)}, "
                     f"bias {bias.dtype}.")
  if bias.shape != hidden or scale.shape != hidden or offset.shape != hidden:
    raise ValueError(f"add_dropout_layer_norm's bias, scale and offset are [hidden] = {list(hidden)}; got "
                     f"{list(bias.shape)}, {list(scale.shape)}, {list(offset.shape)}.")
  drop = None
  if rate and words is None:
    raise ValueError(f"add_dropout_layer_norm with rate={rate} needs the dropout's words, int32 "
                     f"{list(h.shape[:-2]) + [2]} (Dropout.words); got None. Pass rate=0 for no dropout.")
  if rate:
    if h.ndim < 2 or words.shape != h.shape[:-2] + (2,):
      raise ValueError(f"add_dropout_layer_norm's dropout words are int32 [*h.shape[:-2], 2] = "
                       f"{list(h.shape[:-2]) + [2]} (Dropout.words), one pair per [rows, hidden] slice of h "
                       f"{list(h.shape)}; got {list(words.shape)}.")
    rows, _ = dropout_lib.slice_shape(h.shape)
    # The plain path divides by `1 - rate` rounded to the compute dtype (bfloat16: 0.8984375 for 0.9).
    drop = _Dropout(dropout_lib.drop_threshold(rate), rows, float(np.asarray(1.0 - rate, h.dtype)))
    words = words.astype(jnp.int32)
  return _add_dropout_layer_norm(h, bias, words if drop else None, residual, scale, offset, drop, float(eps), tiling,
                                 interpret)
