"""BERT's feed-forward, `gelu(x @ W_in + b_in) @ W_out`, with the GELU forward and backward inside matmul
kernels for Hopper GPUs (`hopper_matmul`): `config.model.feed_forward_impl='mosaic'` (or 'mosaic_pingpong').

XLA runs the feed-forward as cuBLAS matmuls with separate passes over `[tokens, intermediate]`, the largest
tensors of a layer: the GELU forward, and its backward with the bias gradient (on an H200 at batch 768,
13.5 ms of a 129 ms BERT-base step: docs/performance.md, "eighth lease"). Here the forward's matmul
applies the bias and GELU to its float32 accumulator and writes the GELU and its input, and the backward's
`d_y @ W_out^T` multiplies by the GELU's derivative at that input before it writes: the passes' bytes
are the kernels' own reads and writes. The weight gradients and `d_x` stay XLA's (cuBLAS) matmuls, and the
bias gradient XLA's sum.

Owns: the GELU's erf-free arithmetic, the two epilogues, their kernels' settings, and the custom VJP.
Off a GPU the kernels run in Mosaic GPU's interpreter (slowly: for tests). Not yet timed in a train step
on a GPU; `scripts/bench_matmul.py` times each kernel against XLA's matmul and pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bert_jax.models import hopper_matmul

# The kernels' settings in the model (`hopper_matmul.call`), forward and backward, by `feed_forward_impl`.
# 'mosaic': jax's cooperative kernel, 128 x 2*128 blocks, 64-wide k steps, a grid ordered along M in bands
# of 8 blocks. The forward writes two outputs, which fit beside 3 pipeline stages with 2 store slots each;
# the backward's pre-activation block (64 kB) leaves room for 3 stages with 1.
# 'mosaic_pingpong': our ping-pong kernel, 128 x 128 blocks per warpgroup, which overlaps one warpgroup's
# epilogue with the other's products: 3 stages with 1 slot forward, 2 with 2 backward (what fits).
# No spills in any of the four (scripts/mosaic_ptxas.py); which is faster waits for a GPU's bench_matmul rows.
BLOCKS = dict(tile_m=128, tile_n=128, tile_k=64, grid_minor_dim="M", grid_tile_width=8)
KERNELS = {
    "mosaic": (dict(schedule="cooperative", out_slots=2, tiling=dict(BLOCKS, max_concurrent_steps=3)),
               dict(schedule="cooperative", out_slots=1, tiling=dict(BLOCKS, max_concurrent_steps=3))),
    "mosaic_pingpong": (dict(schedule="pingpong", out_slots=1, tiling=dict(BLOCKS, max_concurrent_steps=3)),
                        dict(schedule="pingpong", out_slots=2, tiling=dict(BLOCKS, max_concurrent_steps=2))),
}


def size_multiples() -> tuple[int, int, int]:
  """(tokens, hidden, intermediate): what every setting's blocks divide. `feed_forward` pads the tokens; the
  model sizes must be multiples (BERT-base's and MiniLM's are)."""
  settings = [kernel for kernels in KERNELS.values() for kernel in kernels]
  rows = math.lcm(*(k["tiling"]["tile_m"] for k in settings))
  hidden = math.lcm(*(k["tiling"]["tile_k"] for k in settings))
  intermediate = math.lcm(*(k["tiling"]["tile_n"] * (2 if k["schedule"] == "cooperative" else 1) for k in settings))
  return rows, hidden, intermediate


def interprets() -> bool:
  """Whether the kernels run in Mosaic GPU's interpreter: on a CPU backend (for tests)."""
  return jax.default_backend() == "cpu"


def check_backend() -> None:
  """Raises unless the kernels can run here: a Hopper GPU (sm_90), or a CPU (in the interpreter)."""
  if interprets():
    return
  backend, device = jax.default_backend(), jax.devices()[0]
  if backend != "gpu" or not hopper_matmul.is_hopper(device):
    raise ValueError(f"BertConfig.feed_forward_impl='mosaic*' runs Hopper GPU kernels (sm_90: H100, H200; wgmma and "
                     f"TMA); this is {backend!r} ({device.device_kind}). Use --config.model.feed_forward_impl=xla.")


def feed_forward(x: jax.Array, w_in: jax.Array, b_in: jax.Array, w_out: jax.Array, impl: str = "mosaic") -> jax.Array:
  """`gelu(x @ w_in + b_in) @ w_out` `[..., hidden]`, exact GELU, the output layer's bias left to the add & norm.

  x `[..., hidden]`, w_in `[hidden, intermediate]`, b_in `[intermediate]`, w_out `[intermediate, hidden]`,
  all in one dtype (bfloat16); `impl` names the kernels' settings (`KERNELS`). The rows are padded to the
  kernels' block; the padding's gradients are zero.
  """
  check_backend()
  if impl not in KERNELS:
    raise ValueError(f"feed_forward impl={impl!r} is not one of {tuple(KERNELS)}")
  rows_multiple = size_multiples()[0]
  rows = x.reshape(-1, x.shape[-1])
  padding = -rows.shape[0] % rows_multiple
  y = _feed_forward(jnp.pad(rows, ((0, padding), (0, 0))), w_in, b_in, w_out, impl)
  return y[:rows.shape[0]].reshape(x.shape[:-1] + w_out.shape[-1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _feed_forward(x, w_in, b_in, w_out, impl):
  return jnp.dot(_kernel(matmul_bias_gelu, KERNELS[impl][0])(x, w_in, b_in), w_out)


def _feed_forward_forward(x, w_in, b_in, w_out, impl):
  h, preactivation = _kernel(matmul_bias_gelu, KERNELS[impl][0])(x, w_in, b_in, with_preactivation=True)
  return jnp.dot(h, w_out), (x, w_in, b_in, w_out, h, preactivation)


def _feed_forward_backward(impl, residuals, d_y):
  x, w_in, b_in, w_out, h, preactivation = residuals
  d_preactivation = _kernel(matmul_gelu_grad, KERNELS[impl][1])(d_y, w_out.T, preactivation)
  d_b_in = jnp.sum(d_preactivation.astype(jnp.float32), axis=0).astype(b_in.dtype)
  return (jnp.dot(d_preactivation, w_in.T), jnp.dot(x.T, d_preactivation), d_b_in, jnp.dot(h.T, d_y))


_feed_forward.defvjp(_feed_forward_forward, _feed_forward_backward)


def _kernel(fn, settings):
  """`fn` at `settings` (one of `KERNELS`' entries); in Mosaic GPU's interpreter on a CPU."""
  config, _ = hopper_matmul.tuning_config(settings["tiling"])
  return functools.partial(fn, config=config, out_slots=settings["out_slots"], schedule=settings["schedule"],
                           interpret=_interpret_params() if interprets() else None)


def _interpret_params():
  # jax-private (jax 0.10.2): a jax that moves it fails the model's CPU tests of this path loudly.
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  return InterpretGPUParams()


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0,
# within 1.5e-7 of erf. Mosaic GPU's layout inference has no rule for erf (jax 0.10.2 and 0.11.2).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erfc_pieces(x):
  """(q, e): q = erfc(|x| / sqrt(2)) within 1.5e-7 (A&S 7.1.26) and e = exp(-x^2 / 2), which it contains."""
  z = abs(x) * np.float32(np.sqrt(0.5))
  t = 1.0 / (1.0 + _ERF_P * z)
  poly = _ERF_A[4]
  for a in reversed(_ERF_A[:4]):
    poly = poly * t + a
  e = jnp.exp(-z * z)
  return poly * t * e, e


def _gelu(x):
  """Exact GELU, x Phi(x), from abs, max, exp and arithmetic alone: with erf(|x| / sqrt(2)) = 1 - q,
  x Phi(x) = (x + |x| (1 - q)) / 2 = max(x, 0) - |x| q / 2 for either sign of x. The last form keeps the
  negative tail's relative accuracy, which `1 - q` would round away."""
  q, _ = _erfc_pieces(x)
  return jnp.maximum(x, 0.0) - 0.5 * abs(x) * q


def _gelu_grad(x):
  """The exact GELU's derivative, Phi(x) + x phi(x), from the same pieces: Phi(x) = 1 - q / 2 for x >= 0 and
  q / 2 below, phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
  q, e = _erfc_pieces(x)
  return jnp.where(x >= 0.0, 1.0 - 0.5 * q, 0.5 * q) + x * e * np.float32(1.0 / np.sqrt(2.0 * np.pi))


def bias_gelu_epilogue(with_preactivation: bool) -> hopper_matmul.Epilogue:
  """gelu(acc + bias), and acc + bias with `with_preactivation`; the operand is the bias `[n]` (float32)."""

  def results(acc_tile, bias_ref, epi_m_slice, epi_n_slice):
    del epi_m_slice
    bias = bias_ref[epi_n_slice]
    preactivation = acc_tile + lax.broadcast_in_dim(bias, acc_tile.shape, [1])
    return [_gelu(preactivation)] + [preactivation] * with_preactivation

  return hopper_matmul.Epilogue(num_outputs=1 + with_preactivation,
                                operand_block=lambda gmem, m_slice, n_slice: gmem.at[n_slice],
                                operand_shape=lambda tile_m, tile_n: (tile_n,), operand_dtype=jnp.float32,
                                results=results)


def gelu_grad_epilogue(dtype) -> hopper_matmul.Epilogue:
  """acc * gelu'(preactivation): the GELU's backward applied to its output's gradient `acc`; the operand is
  the pre-activation `[m, n]` the forward kept, in `dtype`."""

  def results(acc_tile, preactivation_ref, epi_m_slice, epi_n_slice):
    return [acc_tile * _gelu_grad(preactivation_ref[epi_m_slice, epi_n_slice].astype(jnp.float32))]

  return hopper_matmul.Epilogue(num_outputs=1, operand_block=lambda gmem, m_slice, n_slice: gmem.at[m_slice, n_slice],
                                operand_shape=lambda tile_m, tile_n: (tile_m, tile_n), operand_dtype=jnp.dtype(dtype),
                                results=results)


def matmul_bias_gelu(a, b, bias, config, with_preactivation: bool = False, out_slots: int = 2,
                     schedule: str = "cooperative", approx_math: bool = False, interpret=None):
  """`gelu(a @ b + bias)` `[m, n]` in a's dtype (and `a @ b + bias` with `with_preactivation`): the
  feed-forward's first matmul and its activation, forward.

  a `[m, k]`, b `[k, n]` of one dtype, bias `[n]` (used in float32); `config` a `hopper_matmul_mgpu.
  TuningConfig` without a cluster. GELU is the exact one (erf), as BERT's `hidden_act='gelu'`.
  `out_slots` store buffers per output: with 2, one epilogue tile's stores overlap the next tile's
  writes; 1 frees the shared memory that a fourth pipeline stage needs when both outputs are written.
  `schedule`: "cooperative" (`kernel`: both compute warpgroups on one `[tile_m, 2 tile_n]` block) or
  "pingpong" (`pingpong_kernel`: each on its own `[tile_m, tile_n]` blocks, in turns).
  `approx_math`: Mosaic's fast approximate exp and division in the GELU (`CompilerParams`).
  `interpret`: parameters of Mosaic GPU's interpreter, which runs the kernel on a CPU (the tests').
  """
  hopper_matmul.check_operands(a, b)
  if bias.shape != (b.shape[1],):
    raise ValueError(f"need a bias [n] = [{b.shape[1]}]; got {bias.shape}")
  results = hopper_matmul.call(a, b, bias.astype(jnp.float32), bias_gelu_epilogue(with_preactivation), config,
                               out_slots, schedule, approx_math, interpret)
  return results if with_preactivation else results[0]


def matmul_gelu_grad(a, b, preactivation, config, out_slots: int = 2, schedule: str = "cooperative",
                     approx_math: bool = False, interpret=None):
  """`(a @ b) * gelu'(preactivation)` `[m, n]` in a's dtype: the feed-forward's backward from the output
  layer's gradient `a` `[m, k]` and its kernel transposed `b` `[k, n]` to the gradient of the GELU's input,
  where XLA runs the matmul and then a pass that reads its output and the pre-activation.

  preactivation `[m, n]` in a's dtype (what `matmul_bias_gelu(..., with_preactivation=True)` keeps); the
  other arguments as `matmul_bias_gelu`'s.
  """
  hopper_matmul.check_operands(a, b)
  if preactivation.shape != (a.shape[0], b.shape[1]) or preactivation.dtype != a.dtype:
    raise ValueError(f"need a pre-activation [m, n] = {[a.shape[0], b.shape[1]]} in {a.dtype}; got "
                     f"{list(preactivation.shape)} in {preactivation.dtype}")
  (result,) = hopper_matmul.call(a, b, preactivation, gelu_grad_epilogue(a.dtype), config, out_slots, schedule,
                                 approx_math, interpret)
  return result
