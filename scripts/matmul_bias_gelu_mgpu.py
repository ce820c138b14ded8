"""`gelu(a @ b + bias)` in one Hopper kernel: jax's warp-specialised Mosaic GPU matmul
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, Apache 2.0, The JAX Authors) with the bias and
exact GELU applied to the float32 accumulator in its epilogue, before the one bf16 write. With
`with_preactivation`, the epilogue also writes `a @ b + bias`, which the GELU's backward reads.

A prototype for scripts/bench_matmul.py, which times it: does the epilogue keep the matmul's speed? That
decides whether the model's feed-forward should get such a kernel (docs/performance.md, "What 55% would
take", "eleventh lease"). The model does not use it. Kept from jax's kernel: the tiling (`TuningConfig`),
the TMA/wgmma pipeline with two compute warpgroups side by side along N, the planar-snake grid, the
epilogue's buffered stores (`out_slots`). Dropped: the accumulate-into-C input, clusters and the collective hooks.
Ran on an H200 (jax 0.11.2): 1.7e-3 from the float32 result at 32,768 x 768 x 3072, against XLA's 2.6e-3
(with `_gelu`'s earlier form `(x + |x| (1 - q)) / 2` and the bias read through `plgpu.load` in lane
semantics; `out_slots` and the interpreter's tests came after that run).
Lowers wherever jax's CUDA plugin is installed (the SM count given: `scripts/gpu_hlo.py`'s venv), and runs
on a CPU in Mosaic GPU's interpreter, with its race detector (tests/test_benchmark.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


# Abramowitz & Stegun 7.1.26: erf(z) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0,
# within 1.5e-7 of erf. Mosaic GPU's layout inference has no rule for erf (jax 0.10.2 and 0.11.2).
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu(x):
  """Exact GELU, x Phi(x), from abs, max, exp and arithmetic alone: with z = |x| / sqrt(2) and
  erf(z) = 1 - q, x Phi(x) = (x + |x| (1 - q)) / 2 = max(x, 0) - |x| q / 2 for either sign of x. The last
  form keeps the negative tail's relative accuracy, which `1 - q` would round away."""
  z = abs(x) * np.float32(np.sqrt(0.5))
  t = 1.0 / (1.0 + _ERF_P * z)
  poly = _ERF_A[4]
  for a in reversed(_ERF_A[:4]):
    poly = poly * t + a
  q = poly * t * jnp.exp(-z * z)
  return jnp.maximum(x, 0.0) - 0.5 * abs(x) * q


def kernel(a_gmem, b_gmem, bias_gmem, *out_gmems, config, out_slots):
  """One persistent CTA per SM: loops over `[tile_m, 2 tile_n]` output blocks.

  a `[m, k]`, b `[k, n]` (bf16), bias `[n]` float32; out_gmems: gelu `[m, n]` and, optionally, the
  pre-activation `[m, n]`, both in a's dtype.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  dtype = a_gmem.dtype
  m, k = a_gmem.shape
  _, n = b_gmem.shape
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  cta_tile_n = 2 * tile_n  # the two compute warpgroups split N
  if m % tile_m or n % cta_tile_n or k % tile_k:
    raise ValueError(f"{(m, k, n)=} must be multiples of {(tile_m, tile_k, cta_tile_n)=}")
  m_iters, n_iters, k_iters = m // tile_m, n // cta_tile_n, k // tile_k
  swizzle = plgpu.find_swizzle(tile_k * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))
  epi_tile_m, epi_tile_n = config.epi_tile_m, config.epi_tile_n
  num_out_slots = min(out_slots, (tile_m * tile_n) // (epi_tile_m * epi_tile_n))
  out_swizzle = plgpu.find_swizzle(epi_tile_n * jnp.dtype(dtype).itemsize * 8)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(dtype).itemsize)),
                    plgpu.SwizzleTransform(out_swizzle))

  def get_pipeline(pipeline_body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        pipeline_body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tile_m, tile_k), lambda k: (0, k), transforms=transforms, memory_space=plgpu.SMEM),
            plgpu.BlockSpec((tile_k, cta_tile_n), lambda k: (k, 0), transforms=transforms,
                            memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=config.max_concurrent_steps,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None  # noqa: E731  # the bodies do not change the pipeline's allocations

  @functools.partial(
      pl.run_scoped,
      pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
      out_smem=plgpu.SMEM((len(out_gmems), 2, num_out_slots, epi_tile_m, epi_tile_n), dtype,
                          transforms=out_transforms),
      bias_smem=plgpu.SMEM((2, tile_n), jnp.float32),
      bias_barrier=plgpu.Barrier(num_barriers=2),
      collective_axes="wg",
  )
  def _pipeline_scope(pipeline_allocs, out_smem, bias_smem, bias_barrier):
    wg_idx = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="cluster_grid")
    def _mn_loop(loop_info):
      (lin_idx,) = loop_info.index
      m_idx, n_idx = plgpu.planar_snake(lin_idx, (m_iters, n_iters), config.grid_minor_dim, config.grid_tile_width)
      m_slice = pl.ds(m_idx * tile_m, tile_m)
      n_slice = pl.ds(n_idx * cta_tile_n + wg_idx * tile_n, tile_n)  # this warpgroup's columns

      def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
        def _acc_scope(acc_ref):
          # The bias's copy is issued before the k loop, so it arrives while the products run.
          plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem.at[wg_idx], bias_barrier.at[wg_idx])
          eval_pipeline(acc_ref)
          plgpu.barrier_wait(bias_barrier.at[wg_idx])
          bias = bias_smem[wg_idx]
          preactivation = acc_ref[...] + lax.broadcast_in_dim(bias, (tile_m, tile_n), [1])
          gelu = _gelu(preactivation)
          results = [gelu.astype(dtype)] + [preactivation.astype(dtype)] * (len(out_gmems) == 2)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          for epi_mi in range(tile_m // epi_tile_m):
            for epi_ni in range(tile_n // epi_tile_n):
              epi_m_slice = slice(epi_mi * epi_tile_m, (epi_mi + 1) * epi_tile_m)
              epi_n_slice = slice(epi_ni * epi_tile_n, (epi_ni + 1) * epi_tile_n)
              slot = (epi_mi * (tile_n // epi_tile_n) + epi_ni) % num_out_slots
              # This slot's last stores have read it; the other slots' may still be reading.
              plgpu.wait_smem_to_gmem(len(out_gmems) * (num_out_slots - 1), wait_read_only=True)
              for i, result in enumerate(results):
                out_smem[i, wg_idx, slot] = result[epi_m_slice, epi_n_slice]
              plgpu.commit_smem()
              for i, out_gmem in enumerate(out_gmems):
                plgpu.copy_smem_to_gmem(out_smem.at[i, wg_idx, slot],
                                        out_gmem.at[m_slice, n_slice].at[epi_m_slice, epi_n_slice])

      def mma_body(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg_idx * tile_n, tile_n)])
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(a_gmem.at[m_slice, :], b_gmem.at[:, pl.ds(n_idx * cta_tile_n,
                                                                                     cta_tile_n)],
                                              allocations=pipeline_allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store done before the kernel exits


def matmul_bias_gelu(a, b, bias, config, with_preactivation: bool = False, out_slots: int = 2, interpret=None):
  """`gelu(a @ b + bias)` `[m, n]` in a's dtype (and `a @ b + bias` with `with_preactivation`).

  a `[m, k]`, b `[k, n]` of one dtype, bias `[n]` (used in float32); `config` a `hopper_matmul_mgpu.
  TuningConfig` without a cluster. GELU is the exact one (erf), as BERT's `hidden_act='gelu'`.
  `out_slots` store buffers per output: with 2, one epilogue tile's stores overlap the next tile's
  writes; 1 frees the shared memory that a fourth pipeline stage needs when both outputs are written.
  `interpret`: parameters of Mosaic GPU's interpreter, which runs the kernel on a CPU (the tests').
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu

  if a.dtype != b.dtype:
    raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or bias.shape != (b.shape[1],):
    raise ValueError(f"need a [m, k], b [k, n] and bias [n]; got {a.shape}, {b.shape} and {bias.shape}")
  if out_slots < 1:
    raise ValueError(f"out_slots must be at least 1, got {out_slots}")
  if config.cluster_dimension is not None or config.wg_dimension != mgpu.MatmulDimension.N:
    raise ValueError("this kernel splits N between its two warpgroups and uses no cluster")
  config = dataclasses.replace(config, epi_tile_m=config.epi_tile_m or config.tile_m,
                               epi_tile_n=config.epi_tile_n or config.tile_n)
  (m, _), (_, n) = a.shape, b.shape
  out = jax.ShapeDtypeStruct((m, n), a.dtype)
  call = plgpu.kernel(
      functools.partial(kernel, config=config, out_slots=out_slots),
      out_type=(out, out) if with_preactivation else (out,),
      grid=(mgpu.get_num_sms(),),
      grid_names=("cluster_grid",),
      cluster=(1,),
      cluster_names=("cluster",),
      num_threads=3,
      thread_name="wg",
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  results = call(a, b, bias.astype(jnp.float32))
  return results if with_preactivation else results[0]
