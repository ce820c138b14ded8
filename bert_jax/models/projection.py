"""The weight matmuls of BERT: `x @ kernel + bias` with logically named parameters, and their XLA:CPU forms.

Owns: the `Projection` module and the arithmetic of every dense layer (Q/K/V, attention output,
feed-forward, heads). On XLA:CPU the same arithmetic is written so that autodiff's gradients take
faster forms (the same values, float32 rounding aside): the weight gradient is a 2-D matmul over the
tokens axis, and the bias gradient a matmul with a vector of ones. Together they made a MiniLM-size
train step 14% faster on this project's 2-core Xeon (docs/performance.md, "ninth"). A bf16 matmul
on XLA:CPU has a custom VJP instead, whose backward matmuls YNNPACK runs with bf16 instructions
(`_bf16_matmul`). GPUs and TPUs keep the plain forms, which their compilers fuse and lay out themselves.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout
from jax.experimental.layout import with_layout_constraint

from bert_jax.models import config as config_lib


def kernel_init(config: config_lib.BertConfig, *axes: str):
  """BERT's initialiser (truncated normal, std `initializer_range`) tagged with logical axes."""
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(config.initializer_range), axes)


def zeros_init(*axes: str):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Projection(nn.Module):
  """`x[..., *in] @ kernel[*in, *out] + bias[*out]`, both parameters tagged with logical axis names.

  Like `nn.DenseGeneral`, but the kernel is created at its full shape: DenseGeneral initialises a
  flattened kernel, which cannot carry one logical name per axis under a rules context.
  """
  config: config_lib.BertConfig
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]

  @nn.compact
  def weights(self, in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(kernel `[*in_shape, *features]`, bias `[*features]`) in the compute dtype."""
    c = self.config
    kernel = self.param("kernel", kernel_init(c, *self.in_axes, *self.out_axes), tuple(in_shape) + self.features,
                        c.parameter_dtype)
    bias = self.param("bias", zeros_init(*self.out_axes), self.features, c.parameter_dtype)
    return kernel.astype(c.compute_dtype), bias.astype(c.compute_dtype)

  def __call__(self, x):
    return add_bias(*self.unbiased(x))

  def unbiased(self, x) -> tuple[jax.Array, jax.Array]:
    """(`x @ kernel`, bias): for a consumer that adds the bias itself, as a fused kernel can."""
    n_in = len(self.in_axes)
    kernel, bias = self.weights(x.shape[-n_in:])
    return contract(x.astype(self.config.compute_dtype), kernel, n_in), bias


def dense(config: config_lib.BertConfig, features, in_axes: tuple[str, ...], out_axes: tuple[str, ...],
          name: str) -> Projection:
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  return Projection(config, features, in_axes, out_axes, name=name)


def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """`x[..., *in] @ kernel[*in, *out]` over the last `n_in` axes of `x`."""
  return jax.lax.platform_dependent(x, kernel, cpu=functools.partial(_contract_as_matrices, n_in=n_in),
                                    default=functools.partial(_contract_general, n_in=n_in))


def _contract_general(x, kernel, n_in):
  dims = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x, kernel, (dims, ((), ())))


def _contract_as_matrices(x, kernel, n_in):
  # `[tokens, in] @ [in, out]` (the reshapes are free): autodiff's weight gradient is then the 2-D
  # `x^T @ d_out` over the tokens axis, which XLA:CPU hands to Eigen as it is. From the N-D form
  # (two contracting axes, batch and seq) XLA:CPU first copies `x` into a transposed layout.
  in_size = math.prod(x.shape[x.ndim - n_in:])
  matmul = _bf16_matmul if x.dtype == kernel.dtype == jnp.bfloat16 else jnp.dot
  y = matmul(x.reshape(-1, in_size), kernel.reshape(in_size, -1))
  return y.reshape(x.shape[:x.ndim - n_in] + kernel.shape[n_in:])


def _sum_in_float32(a, b):
  """`a [m, k] @ b [k, n]`, bf16 summed in float32 and rounded to bf16 once."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _row_major(a):
  """`a` stored row by row: XLA would otherwise keep a transpose as a column-major view of its operand."""
  return with_layout_constraint(a, Layout(major_to_minor=tuple(range(a.ndim))))


# XLA:CPU's YNNPACK runs a bf16 matmul with the processor's bf16 instructions (avx512_bf16, AMX) only
# as `bf16 [m, k] @ bf16 [k, n] -> float32`, fastest with both operands stored row by row: a
# bf16-output dot goes to Eigen, and one with a float32 operand, or contracting its left operand's
# rows, is widened to float32 first. So the forward sums into float32 and rounds to bf16 once (MiniLM
# eval in bf16 43-45% faster than float32 on an AMD EPYC Zen 5; with bf16-output dots no faster:
# docs/performance.md, "twelfth"). Autodiff's backward dots took the float32 cotangent of that sum,
# and the weight gradient contracts over `x`'s rows: 360-630 GFLOP/s against the forward's 830 there.
# This VJP hands YNNPACK the bf16 cotangent and row-major transposes: MiniLM train steps 37-39% faster
# ("thirteenth"). The forward stores its kernel row by row too: a no-op for the dense layers' own,
# a copy of the tied MLM decoder's `table.T` (whose dot XLA widened to float32 otherwise). Like the
# fused kernels' VJPs it has no forward mode (jax.jvp). remat_policy='dots' saves the float32 sums,
# float32's memory.
@jax.custom_vjp
def _bf16_matmul(x, kernel):
  """`x [tokens, in] @ kernel [in, out]` in bf16, summed in float32: `[tokens, out]` bf16."""
  return _sum_in_float32(x, _row_major(kernel))


def _bf16_matmul_forward(x, kernel):
  return _bf16_matmul(x, kernel), (x, kernel)


def _bf16_matmul_backward(residuals, d_y):
  x, kernel = residuals
  return _sum_in_float32(d_y, _row_major(kernel.T)), _sum_in_float32(_row_major(x.T), d_y)


_bf16_matmul.defvjp(_bf16_matmul_forward, _bf16_matmul_backward)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y[..., *out] + bias[*out]`."""
  if y.shape[y.ndim - bias.ndim:] != bias.shape:  # a broadcast bias: the plain form
    return y + bias
  return jax.lax.platform_dependent(y, bias, cpu=_add_bias_spread_by_matmul, default=jnp.add)


def _add_bias_spread_by_matmul(y, bias):
  # The bias spread over the tokens as the outer product `ones[tokens, 1] @ bias[1, out]`, which XLA
  # folds into a broadcast. Autodiff's transpose then makes the bias gradient the matmul
  # `ones^T @ d_y`, where it would be a sum over the tokens: XLA:CPU computes such column sums as
  # strided reduce-windows (2-3 GB/s here), the matmul reads d_y at full speed.
  tokens = math.prod(y.shape[:y.ndim - bias.ndim])
  spread = jnp.dot(jnp.ones((tokens, 1), bias.dtype), bias.reshape(1, -1))
  return y + spread.reshape(y.shape)


def _project_each(x, kernels, biases, query_rows=None):
  inputs = (x,) * 3 if query_rows is None else (query_rows, x, x)
  return tuple(add_bias(contract(rows, kernel, 1), bias) for rows, kernel, bias in zip(inputs, kernels, biases))


def _project_stacked(x, kernels, biases, query_rows=None, *, bias_in_slices: bool = False):
  if query_rows is not None:  # the query apart, the key and value stacked
    return (add_bias(contract(query_rows, kernels[0], 1), biases[0]),
            *_project_stacked(x, kernels[1:], biases[1:], bias_in_slices=bias_in_slices))
  stacked, bias = project_qkv_stacked(x, kernels, biases)
  if bias_in_slices:
    # XLA:GPU folds a bias added to a matmul's output into cuBLAS's `C` operand, which it first writes
    # out broadcast to [batch, seq, 3, heads, head_dim] (151 MB per BERT-base layer at 256 x 128) for
    # cuBLAS to read back. Behind the barrier the add happens in the copy that slices out q, k and v,
    # and the bias gradient stays in the pass that stacks theirs (docs/performance.md, "fourteenth").
    stacked = jax.lax.optimization_barrier(stacked)
  stacked = add_bias(stacked, bias)
  return tuple(stacked[:, :, i] for i in range(len(kernels)))


def project_qkv_stacked(x: jax.Array, kernels, biases) -> tuple[jax.Array, jax.Array]:
  """`x` `[batch, seq, hidden]` times the query's, key's and value's kernels in one matmul, without their
  biases: `[batch, seq, 3, heads, head_dim]`, and the biases stacked `[3, heads, head_dim]`, for a
  consumer that reads the three where the matmul leaves them and adds the biases itself
  (`flash_attention.flash_attention_qkv`). `kernels` and `biases` as `project_qkv` takes them (or the
  key's and value's only: `[batch, seq, 2, heads, head_dim]`)."""
  return contract(x, jnp.stack(kernels, axis=1), 1), jnp.stack(biases)


def project_qkv(x: jax.Array, kernels, biases, query_rows: jax.Array | None = None, *, bias_in_slices: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Query, key and value `[batch, seq, heads, head_dim]` of `x` `[batch, seq, hidden]`; with `query_rows`
  `[batch, n, hidden]` (some of `x`'s rows), the query of those rows only, `[batch, n, heads, head_dim]`.

  `kernels` `[hidden, heads, head_dim]` and `biases` `[heads, head_dim]`, three of each. On GPUs and
  TPUs they are stacked into one matmul, whose backward sums the three input gradients inside the
  matmul rather than in extra passes over `[batch, seq, hidden]`. With the erf `gelu`: +5.8% on a
  BERT-base pretraining step on an H100. On XLA:CPU the stacked form was not clearly faster (with
  YNNPACK matmuls it made MiniLM eval slower), so the CPU keeps three matmuls.

  `bias_in_slices` (GPUs only): the biases are added where q, k and v are sliced out of the stacked
  matmul, not to its output. In the compiled H100 program that is 3.3-3.4 GB less memory traffic per
  BERT-base step at 256 x 128 when the attention reads [batch, seq, heads, head_dim] as it is (cuDNN,
  XLA's dot_product_attention), and 5.3 GB more before the einsum attention's transposes
  (docs/performance.md, "fourteenth"). Our Pallas attention slices nothing: `project_qkv_stacked`.
  """
  gpu = functools.partial(_project_stacked, bias_in_slices=bias_in_slices)
  return jax.lax.platform_dependent(x, kernels, biases, query_rows, cpu=_project_each, cuda=gpu, rocm=gpu,
                                    default=_project_stacked)
