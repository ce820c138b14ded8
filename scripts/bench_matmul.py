"""Times BERT-base's matmuls at pretraining's 256 x 128 tokens: XLA's (cuBLAS on a GPU) and jax's Hopper
matmul written in Pallas for Mosaic GPU (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`) at a few
tilings, each with its distance from XLA's product. Then the feed-forward's first matmul with its bias and
exact GELU: in XLA, and in our Mosaic kernels with both in the epilogue (bert_jax/models/feed_forward.py:
jax's cooperative schedule, and a ping-pong one that overlaps each epilogue with products), alone and also
writing the pre-activation that training keeps for the backward; each with its distance from the float32
result. Then the GELU's backward, which meets the output layer's input gradient `d_y @ W_out^T` (the
intermediate's shape): XLA's matmul and the model's pass (with the bias gradient the pass also sums, and
without), against our kernels with `* gelu'(pre-activation)` in the epilogue. The XLA rows apply the model's
own GELU (`bert.gelu`, erf); the eleventh lease's used `jax.nn.gelu` (erfc, a longer series). One JSON line
per (shape, variant).

  python -m scripts.bench_matmul [--tokens=32768] [--sweep]

The question: can matmul kernels of our own, with the passes around them in their epilogues, beat cuBLAS
and XLA's separate passes (docs/performance.md, "What 55% would take")? XLA runs with the training
configs' flags (`configs/common.py`: cuBLAS, not Triton, for its matmul fusions). Meant for a Hopper GPU:
elsewhere only XLA's rows run. Figures from an H200 in docs/performance.md ("eleventh lease").
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp

from bert_jax import partitioning
from configs import common
from scripts.bench_fused_norm import rel_l2, timed
from bert_jax.models import bert
from bert_jax.models import feed_forward
from bert_jax.models.feed_forward import matmul_bias_gelu
from bert_jax.models.feed_forward import matmul_gelu_grad
from bert_jax.models import hopper_matmul
from bert_jax.models.hopper_matmul import tuning_config

HIDDEN, INTERMEDIATE = 768, 3072


def shapes(tokens: int) -> dict[str, tuple[int, int, int]]:
  """(m, k, n) of each product `[m, k] @ [k, n]` of a BERT-base layer's step over `tokens` rows."""
  return {
      "qkv": (tokens, HIDDEN, 3 * HIDDEN),
      "attention_output": (tokens, HIDDEN, HIDDEN),
      "intermediate": (tokens, HIDDEN, INTERMEDIATE),
      "output": (tokens, INTERMEDIATE, HIDDEN),  # also the intermediate's input gradient
      "intermediate_weight_grad": (HIDDEN, tokens, INTERMEDIATE),  # x^T @ dy: the long sum over tokens
  }


def mosaic_tilings(sweep: bool) -> list[dict]:
  """Tilings of `hopper_matmul_mgpu.TuningConfig`: two compute warpgroups split N, so a block is
  tile_m x 2 tile_n. The first is the default."""
  tilings = [dict(tile_m=128, tile_n=128, tile_k=64, max_concurrent_steps=4, grid_minor_dim="N", grid_tile_width=4)]
  if sweep:
    # Block sizes and grid orders from the kernel's own sweep (its `main`). 256 x 2*128 blocks of 4 stages
    # need 295 kB of shared memory (an H100 has 227): 3 stages fit.
    for tile_m, tile_n, minor in itertools.product((128, 256), (64, 128), ("M", "N")):
      steps = 3 if tile_m * tile_n > 128 * 128 else 4
      tiling = dict(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=steps, grid_minor_dim=minor,
                    grid_tile_width=8)
      if tiling not in tilings:
        tilings.append(tiling)
  return tilings


def epilogue_variants() -> list[dict]:
  """The GELU-epilogue rows: keyword arguments of `mosaic_bias_gelu`.

  Cooperative (jax's schedule), first the eleventh lease's rows: the default tiling and two of the three
  fastest for the intermediate's plain product there, at 4 stages for the GELU alone and at 3 with the
  pre-activation too (4 stages and 2 store slots per output take 263,248 bytes of shared memory; an H100
  has 232,448). Then the controls that separate the stages' part from the second output's: the GELU alone
  at 3 stages, and both outputs at 4 stages with 1 store slot each.

  Ping-pong: 128 x 128 blocks per warpgroup in two grid orders, with the most stages that fit (3 with one
  store slot per output; with the pre-activation and 2 slots, 2), then two rows with Mosaic's approximate
  exp and division in the GELU.
  """
  tilings = [dict(feed_forward.BLOCKS, grid_minor_dim="N", grid_tile_width=4),
             feed_forward.BLOCKS,
             dict(tile_m=256, tile_n=64, tile_k=64, grid_minor_dim="N", grid_tile_width=8)]
  cooperative = ([dict(with_preactivation=False, tiling=dict(t, max_concurrent_steps=4)) for t in tilings]
                 + [dict(with_preactivation=True, tiling=dict(t, max_concurrent_steps=3)) for t in tilings]
                 + [dict(with_preactivation=False, tiling=dict(tilings[1], max_concurrent_steps=3))]
                 + [dict(with_preactivation=True, tiling=dict(t, max_concurrent_steps=4), out_slots=1)
                    for t in tilings])
  blocks = tilings[:2][::-1]  # the model's block first
  pingpong = ([dict(with_preactivation=False, tiling=dict(t, max_concurrent_steps=3)) for t in blocks]
              + [dict(with_preactivation=True, tiling=dict(t, max_concurrent_steps=3), out_slots=1) for t in blocks]
              + [dict(with_preactivation=True, tiling=dict(t, max_concurrent_steps=2)) for t in blocks]
              + [dict(with_preactivation=True, tiling=dict(blocks[0], max_concurrent_steps=3), out_slots=1,
                      approx_math=True),
                 dict(with_preactivation=False, tiling=dict(blocks[0], max_concurrent_steps=3), approx_math=True)])
  return cooperative + [dict(v, schedule="pingpong") for v in pingpong]


def variant_name(with_preactivation: bool, schedule: str = "cooperative", approx_math: bool = False, **_) -> str:
  """A GELU-epilogue row's name: mosaic_bias_gelu[_preactivation][_pingpong][_approx]."""
  return ("mosaic_bias_gelu" + "_preactivation" * with_preactivation + "_pingpong" * (schedule == "pingpong")
          + "_approx" * approx_math)


def gelu_grad_variants() -> list[dict]:
  """The GELU-backward rows: keyword arguments of `mosaic_gelu_grad`. The pre-activation block read in the
  epilogue takes 64 kB of shared memory, so the schedules get a stage less than the forward's: cooperative
  at 2 stages with 2 store slots or 3 with 1 (3 with 2 need 245,824 bytes), ping-pong at 2. The last two
  rows also sum the bias gradient, in XLA, from the kernel's output."""
  block = feed_forward.BLOCKS
  tall = dict(block, tile_m=256, tile_n=64)
  return [dict(tiling=dict(block, max_concurrent_steps=2)),
          dict(tiling=dict(block, max_concurrent_steps=3), out_slots=1),
          dict(tiling=dict(tall, max_concurrent_steps=3), out_slots=1),
          dict(tiling=dict(block, max_concurrent_steps=2), schedule="pingpong"),
          dict(tiling=dict(block, max_concurrent_steps=2), out_slots=1, schedule="pingpong"),
          dict(tiling=dict(block, max_concurrent_steps=3), out_slots=1, with_bias_grad=True),
          dict(tiling=dict(block, max_concurrent_steps=2), out_slots=1, schedule="pingpong", with_bias_grad=True)]


def gelu_grad_variant_name(schedule: str = "cooperative", with_bias_grad: bool = False, **_) -> str:
  """A GELU-backward row's name: mosaic_gelu_grad[_pingpong][_bias_grad]."""
  return "mosaic_gelu_grad" + "_pingpong" * (schedule == "pingpong") + "_bias_grad" * with_bias_grad


def mosaic_matmul(tiling: dict):
  """jax's kernel jitted at `tiling`, and the `TuningConfig` fields it was given."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu
  config, given = tuning_config(tiling)
  return jax.jit(lambda a, b: mgpu.matmul(a, b, None, config)), given


def mosaic_bias_gelu(with_preactivation: bool, tiling: dict, out_slots: int = 2, schedule: str = "cooperative",
                     approx_math: bool = False):
  """Our epilogue kernel (`feed_forward.matmul_bias_gelu`) jitted at `tiling`, and the settings given."""
  config, given = tuning_config(tiling)
  kernel = functools.partial(matmul_bias_gelu, config=config, with_preactivation=with_preactivation,
                             out_slots=out_slots, schedule=schedule, approx_math=approx_math)
  return jax.jit(kernel), dict(given, out_slots=out_slots)


def mosaic_gelu_grad(tiling: dict, out_slots: int = 2, schedule: str = "cooperative", with_bias_grad: bool = False):
  """Our GELU-backward kernel jitted at `tiling` (with XLA's sum of the bias gradient after it), and the
  settings given."""
  config, given = tuning_config(tiling)
  kernel = functools.partial(matmul_gelu_grad, config=config, out_slots=out_slots, schedule=schedule)
  fn = (lambda a, b, pre: with_bias_gradient(kernel(a, b, pre))) if with_bias_grad else kernel
  return jax.jit(fn), dict(given, out_slots=out_slots)


def xla_matmul(a, b):
  return a @ b


def xla_bias_gelu(a, b, bias):
  return bert.gelu(a @ b + bias)


def xla_bias_gelu_preactivation(a, b, bias):
  """What the model's forward keeps for training: the GELU and its input, which the backward reads."""
  preactivation = a @ b + bias
  return bert.gelu(preactivation), preactivation


def xla_gelu_grad(a, b, preactivation):
  """The model's backward through the GELU from its output's gradient `a @ b`."""
  return jax.vjp(bert.gelu, preactivation)[1](a @ b)[0]


def with_bias_gradient(d_preactivation):
  """The gradient of the GELU's input and the bias gradient the model's backward sums from it."""
  return d_preactivation, jnp.sum(d_preactivation.astype(jnp.float32), axis=0)


def xla_gelu_grad_bias_grad(a, b, preactivation):
  return with_bias_gradient(xla_gelu_grad(a, b, preactivation))


def float32_gelu_grad(a, b, preactivation):
  """The reference of the GELU-backward rows, in float32."""
  d_gelu = jnp.dot(a, b, preferred_element_type=jnp.float32)
  return jax.vjp(lambda x: jax.nn.gelu(x, approximate=False), preactivation.astype(jnp.float32))[1](d_gelu)[0]


def float32_bias_gelu(a, b, bias):
  """The reference of the GELU rows: products, bias and GELU in float32."""
  preactivation = jnp.dot(a, b, preferred_element_type=jnp.float32) + bias.astype(jnp.float32)
  return jax.nn.gelu(preactivation, approximate=False)


def row(name, variant, mkn, make, args, reference) -> dict:
  """Times `make()`'s function (a jitted function and its tiling, or None) on `args`. An error anywhere,
  building the kernel included (a tiling that does not fit, a jax without the kernel), is reported."""
  m, k, n = mkn
  out = {"shape": name, "m_k_n": list(mkn), "variant": variant, "tiling": None,
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    fn, out["tiling"] = make()
    result = fn(*args)
    ms = timed(fn, args)
  except Exception as e:  # noqa: BLE001
    return dict(out, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
  out.update(ms=round(ms, 4), tflops=float(f"{2 * m * k * n / ms / 1e9:.4g}"))
  if reference is not None:  # of the first output: the pre-activation or the bias gradient come second
    out["rel_l2"] = rel_l2(result[0] if isinstance(result, tuple) else result, reference)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=256 * 128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--sweep", action="store_true", help="time the Mosaic kernel at more tilings")
  args = parser.parse_args()
  partitioning.add_xla_flags(common.XLA_FLAGS)  # as training compiles: before JAX starts a backend
  dtype = jnp.dtype(args.dtype)
  on_hopper = hopper_matmul.is_hopper(jax.devices()[0])
  keys = iter(jax.random.split(jax.random.key(0), 16))
  for name, (m, k, n) in shapes(args.tokens).items():
    a = jax.random.normal(next(keys), (m, k), dtype)
    b = (jax.random.normal(next(keys), (k, n), jnp.float32) / k**0.5).astype(dtype)
    xla = jax.jit(xla_matmul)
    reference = xla(a, b)
    print(json.dumps(row(name, "xla", (m, k, n), lambda: (xla, None), (a, b), None)), flush=True)
    if name == "intermediate":
      bias = jax.random.normal(next(keys), (n,), dtype)
      gelu_reference = jax.jit(float32_bias_gelu)(a, b, bias)
      for fn in (xla_bias_gelu, xla_bias_gelu_preactivation):
        variant = fn.__name__
        print(json.dumps(row(name, variant, (m, k, n), lambda fn=fn: (jax.jit(fn), None), (a, b, bias),
                             gelu_reference)), flush=True)
      if on_hopper:
        for variant in epilogue_variants():
          make = functools.partial(mosaic_bias_gelu, **variant)
          print(json.dumps(row(name, variant_name(**variant), (m, k, n), make, (a, b, bias), gelu_reference)),
                flush=True)
      # The backward: `a` stands for d_y, `b` for W_out^T, at the same shapes.
      preactivation = jax.jit(xla_bias_gelu_preactivation)(a, b, bias)[1]
      grad_reference = jax.jit(float32_gelu_grad)(a, b, preactivation)
      for fn in (xla_gelu_grad, xla_gelu_grad_bias_grad):
        print(json.dumps(row(name, fn.__name__, (m, k, n), lambda fn=fn: (jax.jit(fn), None), (a, b, preactivation),
                             grad_reference)), flush=True)
      if on_hopper:
        for variant in gelu_grad_variants():
          make = functools.partial(mosaic_gelu_grad, **variant)
          print(json.dumps(row(name, gelu_grad_variant_name(**variant), (m, k, n), make, (a, b, preactivation),
                               grad_reference)), flush=True)
    if on_hopper:
      for tiling in mosaic_tilings(args.sweep):
        print(json.dumps(row(name, "mosaic", (m, k, n), functools.partial(mosaic_matmul, tiling), (a, b), reference)),
              flush=True)


if __name__ == "__main__":
  main()
