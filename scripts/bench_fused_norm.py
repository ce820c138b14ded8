"""Times BERT's "add & norm", `LayerNorm(residual + dropout(h + bias))`: XLA's passes against the
Pallas kernel (`bert_jax.models.fused_norm`), forward and forward + backward, with the kernel's
distance from XLA's values and gradients. One JSON line per variant.

  python -m scripts.bench_fused_norm [--rows=32768] [--hidden=768] [--dtype=bfloat16] [--sweep]

Rows are tokens (BERT-base pretraining at 256 x 128: 32,768). The dropout mask (rate 0.1) is drawn
inside each timed function as the model draws it, so both sides pay for it: XLA's from
`Dropout.keep_mask`, the kernel's inside it from the same `Dropout.words` (the same mask, "nineteenth"
in docs/performance.md; before it the kernel read XLA's mask). `xla_no_dropout` shows what the mask
costs XLA. `--sweep` also times the kernel at each tiling
(rows per block, warps, backward blocks per program); the default `Tiling` came from that sweep.
Meant for a GPU: elsewhere the kernel runs in Pallas's interpreter, which says nothing about speed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import dropout, fused_norm

RATE, EPS = 0.1, 1e-12


def keep_mask(key, shape):
  """The model's mask: `Dropout.keep_mask` (its bits and threshold) under `key`."""
  return dropout.Dropout(RATE).apply({}, shape, rngs={"dropout": key}, method=dropout.Dropout.keep_mask)


def xla(h, bias, residual, scale, offset, key, with_dropout=True):
  dtype = h.dtype
  dropped = h + bias
  if with_dropout:
    dropped = jnp.where(keep_mask(key, h.shape), dropped / jnp.asarray(1.0 - RATE, dtype), jnp.zeros((), dtype))
  norm = nn.LayerNorm(epsilon=EPS, dtype=dtype)
  return norm.apply({"params": {"scale": scale, "bias": offset}}, residual + dropped)


def words(key, shape):
  """The words that key `keep_mask(key, shape)` (`Dropout.words`)."""
  return dropout.Dropout(RATE).apply({}, tuple(shape[:-2]), rngs={"dropout": key}, method=dropout.Dropout.words)


def pallas(tiling: fused_norm.Tiling):
  def add_norm(h, bias, residual, scale, offset, key):
    return fused_norm.add_dropout_layer_norm(h, bias, words(key, h.shape), residual, scale, offset, rate=RATE,
                                             eps=EPS, tiling=tiling)
  return add_norm


def timed(fn, args, steps: int = 20, samples: int = 7) -> float:
  """Median milliseconds per call over `samples` runs of `steps` back-to-back calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps)
  return 1e3 * statistics.median(times)


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=32768)
  parser.add_argument("--hidden", type=int, default=768)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--sweep", action="store_true")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (args.rows, args.hidden)
  h, residual, dy = (jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in keys[:3])
  bias = (0.1 * jax.random.normal(keys[3], (args.hidden,))).astype(dtype)
  scale = 1.0 + 0.1 * jax.random.normal(keys[4], (args.hidden,))
  offset = 0.1 * jax.random.normal(keys[5], (args.hidden,))
  inputs = (h, bias, residual, scale, offset, jax.random.key(1))
  common = {"rows": args.rows, "hidden": args.hidden, "dtype": args.dtype, "device": jax.devices()[0].device_kind}

  def forward_and_backward(fn):
    return jax.jit(fn), jax.jit(lambda *a: jax.vjp(lambda *d: fn(*d, a[-1]), *a[:-1])[1](dy))

  reference = None
  variants = [("xla", xla, None), ("xla_no_dropout", lambda *a: xla(*a, with_dropout=False), None)]
  tilings = [fused_norm.Tiling()]
  if args.sweep:
    tilings += [fused_norm.Tiling(*t) for t in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8), (8, 32))
                if 32 * 4 * t[1] <= t[0] * args.hidden <= 16 * 1024 * t[1] and fused_norm.Tiling(*t) != tilings[0]]
  variants += [("pallas", pallas(t), t) for t in tilings]
  for name, fn, tiling in variants:
    row = dict(common, variant=name, tiling=list(tiling) if tiling else None)
    forward, backward = forward_and_backward(fn)
    try:
      row["forward_ms"], row["forward_backward_ms"] = timed(forward, inputs), timed(backward, inputs)
      grads = backward(*inputs)
    except Exception as e:  # pylint: disable=broad-except  # a tiling Triton rejects: report, go on
      print(json.dumps(dict(row, error=f"{type(e).__name__}: {str(e)[:200]}")), flush=True)
      continue
    if name == "xla":
      reference = forward(*inputs), grads
    elif name == "pallas":
      row["output_rel_l2"] = rel_l2(forward(*inputs), reference[0])
      row["grads_rel_l2"] = {g: rel_l2(a, b) for g, a, b in zip(("h", "bias", "residual", "scale", "offset"),
                                                                 grads, reference[1])}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
