"""BERT's add & norm on XLA:CPU (`layer_norm_impl='cpu_fused'`): a C++ kernel called through XLA's FFI.

Owns: `cpu_add_norm.cc` (built on first use by `cpu_build`), registering it with XLA, and its custom
VJP. The kernel computes `LayerNorm(residual + dropout(y + bias))` as `bert.add_norm`'s XLA path does,
dropout mask included (drawn by the model and passed in), in float32: one pass over the rows forward
and one backward, where XLA:CPU makes several (docs/performance.md, "twentieth").
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.models import cpu_build

_FORWARD, _BACKWARD = "bert_jax_add_norm_forward", "bert_jax_add_norm_backward"
KERNEL = cpu_build.Kernel(source=pathlib.Path(__file__).with_name("cpu_add_norm.cc"), name="cpu_fused add & norm",
                          setting="layer_norm_impl", fallback="xla",
                          targets=((_FORWARD, "BertJaxAddNormForward"), (_BACKWARD, "BertJaxAddNormBackward")))


@functools.cache
def _register() -> None:
  cpu_build.register(KERNEL)


@functools.cache
def available() -> bool:
  """Whether the kernel builds (or is cached) and loads here; if not, logs why, once per process."""
  return cpu_build.available(KERNEL, _register)


def _forward(y, bias, residual, keep, scale, offset, eps, keep_prob):
  rows = y.shape[0]
  outputs = (jax.ShapeDtypeStruct(y.shape, jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.float32),
             jax.ShapeDtypeStruct((rows,), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, outputs)(y, bias, residual, keep, scale, offset, eps=np.float32(eps),
                                             keep_prob=np.float32(keep_prob))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _add_norm(y, bias, residual, keep, scale, offset, eps, keep_prob):
  return _forward(y, bias, residual, keep, scale, offset, eps, keep_prob)[0]


def _add_norm_fwd(y, bias, residual, keep, scale, offset, eps, keep_prob):
  out, mean, rstd = _forward(y, bias, residual, keep, scale, offset, eps, keep_prob)
  return out, (y, bias, residual, keep, scale, offset, mean, rstd)


def _add_norm_bwd(eps, keep_prob, residuals, d_out):
  y, bias, residual, keep, scale, offset, mean, rstd = residuals
  hidden = (jax.ShapeDtypeStruct(bias.shape, jnp.float32),)
  d_y, d_residual, d_bias, d_scale, d_offset = jax.ffi.ffi_call(
      _BACKWARD, (jax.ShapeDtypeStruct(y.shape, jnp.float32),) * 2 + hidden * 3)(
          y, bias, residual, keep, scale, offset, mean, rstd, d_out, keep_prob=np.float32(keep_prob))
  return d_y, d_bias, d_residual, None, d_scale, d_offset


_add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)


def add_dropout_layer_norm(y: jax.Array, bias: jax.Array, keep: jax.Array | None, residual: jax.Array,
                           scale: jax.Array, offset: jax.Array, *, rate: float = 0.0, eps: float) -> jax.Array:
  """`LayerNorm(residual + dropout(y + bias)) * scale + offset` over the last axis: `y`, `residual`
  `[..., hidden]`, `bias`, `scale`, `offset` `[hidden]`; with `keep` (bool like `y`), inverted dropout
  at `rate` where it is False. Computes in float32 and returns `y`'s dtype."""
  hidden = y.shape[-1]
  if residual.shape != y.shape or any(p.shape != (hidden,) for p in (bias, scale, offset)):
    raise ValueError(f"The cpu_fused add & norm takes y and residual of one shape [..., hidden] and bias, scale "
                     f"and offset [hidden]; got {y.shape}, {residual.shape}, {bias.shape}, {scale.shape}, "
                     f"{offset.shape}.")
  if (keep is None) != (rate == 0.0) or not 0.0 <= rate < 1.0 or (keep is not None and keep.shape != y.shape):
    raise ValueError(f"The cpu_fused add & norm takes a keep mask of y's shape {y.shape} with a dropout rate in "
                     f"(0, 1), or neither; got {None if keep is None else keep.shape} and rate={rate}.")
  _register()
  flat = lambda x: x.reshape(-1, hidden).astype(jnp.float32)  # noqa: E731
  keep = jnp.zeros((1,), jnp.uint8) if keep is None else keep.reshape(-1, hidden).astype(jnp.uint8)
  out = _add_norm(flat(y), bias.astype(jnp.float32), flat(residual), keep, scale.astype(jnp.float32),
                  offset.astype(jnp.float32), eps, 1.0 - rate)
  return out.reshape(y.shape).astype(y.dtype)
