"""`gelu(a @ b + bias)` in one Hopper kernel: a Mosaic GPU matmul with the bias and exact GELU applied
to the float32 accumulator in its epilogue, before the one bf16 write. With `with_preactivation`, the
epilogue also writes `a @ b + bias`, which the GELU's backward reads. Two schedules:

- `kernel` ("cooperative"): jax's warp-specialised Hopper matmul
  (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, Apache 2.0, The JAX Authors) with this
  epilogue. Kept: the tiling (`TuningConfig`), the TMA/wgmma pipeline with two compute warpgroups side
  by side along N, the planar-snake grid. Dropped: the accumulate-into-C input, clusters, collective hooks.
- `pingpong_kernel`: the two compute warpgroups take turns over their own output blocks, so that one's
  epilogue runs while the other's products do, as CUTLASS's ping-pong Hopper kernels do.

A prototype for scripts/bench_matmul.py, which times both: can an epilogue kernel beat cuBLAS plus XLA's
separate pass? That decides whether the model's feed-forward should get one (docs/performance.md, "What
55% would take", "eleventh lease"). The model does not use it.
- The cooperative kernel ran on an H200 (jax 0.11.2): 1.7e-3 from the float32 result at
  32,768 x 768 x 3072, against XLA's 2.6e-3. That run had `_gelu`'s earlier form `(x + |x| (1 - q)) / 2`
  read the bias through `plgpu.load` in lane semantics, and applied the GELU to the whole block before
  its stores. The epilogue by tiles, `out_slots`, the ping-pong kernel and the interpreter's tests came
  after it.
- Both lower for an H100 wherever jax's CUDA plugin is installed (the SM count given:
  `scripts/gpu_hlo.py`'s venv). Both run on a CPU in Mosaic GPU's interpreter, with its race detector
  (tests/test_benchmark.py).
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


def _epilogue(acc, bias_ref, out_smem, out_gmems, m_slice, n_slice):
  """Stores gelu(acc + bias) (and acc + bias) to `out_gmems` at `[m_slice, n_slice]` through `out_smem`.

  acc `[tile_m, tile_n]` float32, bias_ref `[tile_n]` float32 in shared memory, out_smem `[outputs, slots,
  epi_m, epi_n]`: one warpgroup's store buffers, which its earlier stores may still be reading. The bias
  and GELU are applied one `[epi_m, epi_n]` tile at a time, so that only one tile's results and
  temporaries are live beside the accumulator (fewer registers than the whole block's).
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  num_outputs, num_slots, epi_tile_m, epi_tile_n = out_smem.shape
  (tile_m, tile_n), dtype = acc.shape, out_smem.dtype
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's stores, whatever slot they used
  for epi_mi in range(tile_m // epi_tile_m):
    for epi_ni in range(tile_n // epi_tile_n):
      epi_m_slice = slice(epi_mi * epi_tile_m, (epi_mi + 1) * epi_tile_m)
      epi_n_slice = slice(epi_ni * epi_tile_n, (epi_ni + 1) * epi_tile_n)
      bias = bias_ref[pl.ds(epi_ni * epi_tile_n, epi_tile_n)]
      preactivation = acc[epi_m_slice, epi_n_slice] + lax.broadcast_in_dim(bias, (epi_tile_m, epi_tile_n), [1])
      results = [_gelu(preactivation).astype(dtype)]
      if num_outputs == 2:
        results.append(preactivation.astype(dtype))
      slot = (epi_mi * (tile_n // epi_tile_n) + epi_ni) % num_slots
      # This slot's last stores have read it; the other slots' may still be reading.
      plgpu.wait_smem_to_gmem(num_outputs * (num_slots - 1), wait_read_only=True)
      for i, result in enumerate(results):
        out_smem[i, slot] = result
      plgpu.commit_smem()
      for i, out_gmem in enumerate(out_gmems):
        plgpu.copy_smem_to_gmem(out_smem.at[i, slot], out_gmem.at[m_slice, n_slice].at[epi_m_slice, epi_n_slice])


def _iterations(a_shape, b_shape, block):
  """Blocks along m and n and steps along k of `[m, k] @ [k, n]` in blocks `(block_m, block_k, block_n)`."""
  (m, k), (_, n) = a_shape, b_shape
  if m % block[0] or k % block[1] or n % block[2]:
    raise ValueError(f"(m, k, n) = {(m, k, n)} must be multiples of the blocks' {block}")
  return m // block[0], n // block[2], k // block[1]


def _swizzled(minor_elements, dtype):
  """Shared-memory transforms (tiled and swizzled for TMA and wgmma) of buffers whose rows hold
  `minor_elements` of `dtype`."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  swizzle = plgpu.find_swizzle(minor_elements * jnp.dtype(dtype).itemsize * 8)
  return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _epilogue_buffers(config, dtype, out_slots, num_outputs):
  """The epilogue's shared memory, for each of the two compute warpgroups: `out_slots` store buffers per
  output (fewer if the block has fewer store tiles), the bias of its block's columns and the barrier its
  copy arrives on. Keyword allocations for `pl.run_scoped`."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  num_slots = min(out_slots, (config.tile_m * config.tile_n) // (config.epi_tile_m * config.epi_tile_n))
  return dict(
      out_smem=plgpu.SMEM((num_outputs, 2, num_slots, config.epi_tile_m, config.epi_tile_n), dtype,
                          transforms=_swizzled(config.epi_tile_n, dtype)),
      bias_smem=plgpu.SMEM((2, config.tile_n), jnp.float32),
      bias_loaded=plgpu.Barrier(num_barriers=2),
  )


def kernel(a_gmem, b_gmem, bias_gmem, *out_gmems, config, out_slots):
  """One persistent CTA per SM: loops over `[tile_m, 2 tile_n]` output blocks.

  a `[m, k]`, b `[k, n]` (bf16), bias `[n]` float32; out_gmems: gelu `[m, n]` and, optionally, the
  pre-activation `[m, n]`, both in a's dtype.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  dtype = a_gmem.dtype
  tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
  cta_tile_n = 2 * tile_n  # the two compute warpgroups split N
  m_iters, n_iters, k_iters = _iterations(a_gmem.shape, b_gmem.shape, (tile_m, tile_k, cta_tile_n))
  transforms = _swizzled(tile_k, dtype)

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
      **_epilogue_buffers(config, dtype, out_slots, len(out_gmems)),
      collective_axes="wg",
  )
  def _pipeline_scope(pipeline_allocs, out_smem, bias_smem, bias_loaded):
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
          plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem.at[wg_idx], bias_loaded.at[wg_idx])
          eval_pipeline(acc_ref)
          plgpu.barrier_wait(bias_loaded.at[wg_idx])
          _epilogue(acc_ref[...], bias_smem.at[wg_idx], out_smem.at[:, wg_idx], out_gmems, m_slice, n_slice)

      def mma_body(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg_idx * tile_n, tile_n)])
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(a_gmem.at[m_slice, :], b_gmem.at[:, pl.ds(n_idx * cta_tile_n,
                                                                                     cta_tile_n)],
                                              allocations=pipeline_allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store done before the kernel exits


def pingpong_kernel(a_gmem, b_gmem, bias_gmem, *out_gmems, config, out_slots, num_ctas):
  """One persistent CTA per SM, three warpgroups. The CTA's `[tile_m, tile_n]` output blocks alternate
  between two consumer warpgroups, each with its own ring of `max_concurrent_steps` stages; the third
  warpgroup loads the rings in the order the blocks are consumed. One consumer's epilogue then runs while
  the other's products do (the "ping-pong" schedule of CUTLASS's Hopper kernels), where `kernel`'s two
  warpgroups stop their products together for theirs.

  a `[m, k]`, b `[k, n]` (bf16), bias `[n]` float32; out_gmems as `kernel`'s.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  dtype = a_gmem.dtype
  tile_m, tile_n, tile_k, stages = config.tile_m, config.tile_n, config.tile_k, config.max_concurrent_steps
  m_iters, n_iters, k_iters = _iterations(a_gmem.shape, b_gmem.shape, (tile_m, tile_k, tile_n))
  transforms = _swizzled(tile_k, dtype)
  num_tiles = m_iters * n_iters

  def block_slices(j):
    """The rows and columns of this CTA's j-th block."""
    lin_idx = lax.axis_index("sm") + j * num_ctas
    m_idx, n_idx = plgpu.planar_snake(lin_idx, (m_iters, n_iters), config.grid_minor_dim, config.grid_tile_width)
    return pl.ds(m_idx * tile_m, tile_m), pl.ds(n_idx * tile_n, tile_n)

  def ring(consumer, step):
    """Consumer `consumer`'s stage for its `step`-th k step: rings are `stages` consecutive slots of
    a_smem, b_smem and the barriers. Each barrier is waited on at each of its uses by one warpgroup alone,
    which keeps Mosaic's per-thread phase tracking in step."""
    return consumer * stages + lax.rem(step, stages)

  def body(a_smem, b_smem, out_smem, bias_smem, a_loaded, b_loaded, consumed, bias_loaded):
    wg_idx = lax.axis_index("wg")
    num_blocks = (num_tiles - lax.axis_index("sm") + num_ctas - 1) // num_ctas  # this CTA's

    def blocks_of(consumer):  # blocks j = consumer, consumer + 2, ...
      return lax.div(num_blocks - consumer + 1, 2)

    @pl.when(wg_idx == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, num_blocks)
      def _block(j):
        consumer = lax.rem(j, 2)
        m_slice, n_slice = block_slices(j)

        @pl.loop(0, k_iters)
        def _k_step(i):
          step = lax.div(j, 2) * k_iters + i  # the consumer's step
          slot = ring(consumer, step)

          @pl.when(step >= stages)
          def _wait_for_the_consumer():
            plgpu.barrier_wait(consumed.at[slot])

          k_slice = pl.ds(i * tile_k, tile_k)
          plgpu.copy_gmem_to_smem(a_gmem.at[m_slice, k_slice], a_smem.at[slot], a_loaded.at[slot])
          plgpu.copy_gmem_to_smem(b_gmem.at[k_slice, n_slice], b_smem.at[slot], b_loaded.at[slot])

      # Wait for the hand-backs of each ring's last stages too, so that no barrier ends with a phase unseen.
      for consumer in range(2):
        num_steps = blocks_of(consumer) * k_iters

        @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
        def _drain(step, consumer=consumer):
          plgpu.barrier_wait(consumed.at[ring(consumer, step)])

    @pl.when(wg_idx < 2)
    def _consumer():
      plgpu.set_max_registers(232, action="increase")
      consumer = wg_idx

      @pl.loop(0, blocks_of(consumer))
      def _block(jj):
        m_slice, n_slice = block_slices(consumer + 2 * jj)
        plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice], bias_smem.at[consumer], bias_loaded.at[consumer])

        def products_and_epilogue(acc_ref):
          @pl.loop(0, k_iters)
          def _k_step(i):
            slot = ring(consumer, jj * k_iters + i)
            plgpu.barrier_wait(a_loaded.at[slot])
            plgpu.barrier_wait(b_loaded.at[slot])
            plgpu.wgmma(acc_ref, a_smem.at[slot], b_smem.at[slot])
            # One wgmma stays in flight: the one before has read its stage, which goes back to the
            # producer. (The interpreter runs wgmmas synchronously: this rests on reasoning.)
            plgpu.wgmma_wait(1)

            @pl.when(i > 0)
            def _release():
              plgpu.barrier_arrive(consumed.at[ring(consumer, jj * k_iters + i - 1)])

          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(consumed.at[ring(consumer, jj * k_iters + k_iters - 1)])
          plgpu.barrier_wait(bias_loaded.at[consumer])
          _epilogue(acc_ref[...], bias_smem.at[consumer], out_smem.at[:, consumer], out_gmems, m_slice, n_slice)

        pl.run_scoped(products_and_epilogue, plgpu.ACC((tile_m, tile_n), jnp.float32))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store done before the kernel exits

  pl.run_scoped(
      body,
      a_smem=plgpu.SMEM((2 * stages, tile_m, tile_k), dtype, transforms=transforms),
      b_smem=plgpu.SMEM((2 * stages, tile_k, tile_n), dtype, transforms=transforms),
      a_loaded=plgpu.Barrier(num_barriers=2 * stages),
      b_loaded=plgpu.Barrier(num_barriers=2 * stages),
      consumed=plgpu.Barrier(num_barriers=2 * stages),
      **_epilogue_buffers(config, dtype, out_slots, len(out_gmems)),
      collective_axes="wg",
  )


def matmul_bias_gelu(a, b, bias, config, with_preactivation: bool = False, out_slots: int = 2,
                     schedule: str = "cooperative", approx_math: bool = False, interpret=None):
  """`gelu(a @ b + bias)` `[m, n]` in a's dtype (and `a @ b + bias` with `with_preactivation`).

  a `[m, k]`, b `[k, n]` of one dtype, bias `[n]` (used in float32); `config` a `hopper_matmul_mgpu.
  TuningConfig` without a cluster. GELU is the exact one (erf), as BERT's `hidden_act='gelu'`.
  `out_slots` store buffers per output: with 2, one epilogue tile's stores overlap the next tile's
  writes; 1 frees the shared memory that a fourth pipeline stage needs when both outputs are written.
  `schedule`: "cooperative" (`kernel`: both compute warpgroups on one `[tile_m, 2 tile_n]` block) or
  "pingpong" (`pingpong_kernel`: each on its own `[tile_m, tile_n]` blocks, in turns).
  `approx_math`: Mosaic's fast approximate exp and division in the GELU (`CompilerParams`).
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
  if schedule not in ("cooperative", "pingpong"):
    raise ValueError(f"schedule must be 'cooperative' or 'pingpong', got {schedule!r}")
  if config.cluster_dimension is not None or config.wg_dimension != mgpu.MatmulDimension.N:
    raise ValueError("these kernels use no cluster, and the cooperative one splits N between its two warpgroups "
                     "(wg_dimension=N)")
  if schedule == "pingpong" and config.max_concurrent_steps < 2:
    raise ValueError("the ping-pong schedule needs max_concurrent_steps >= 2: each warpgroup's wgmma holds one "
                     "stage while the next one loads")
  config = dataclasses.replace(config, epi_tile_m=config.epi_tile_m or config.tile_m,
                               epi_tile_n=config.epi_tile_n or config.tile_n)
  (m, _), (_, n) = a.shape, b.shape
  out = jax.ShapeDtypeStruct((m, n), a.dtype)
  num_sms = mgpu.get_num_sms()
  if schedule == "cooperative":  # jax's kernel's grid: one cluster of one CTA per SM
    body = functools.partial(kernel, config=config, out_slots=out_slots)
    grid = dict(grid=(num_sms,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",))
  else:
    body = functools.partial(pingpong_kernel, config=config, out_slots=out_slots, num_ctas=num_sms)
    grid = dict(grid=(num_sms,), grid_names=("sm",))
  compiler_params = plgpu.CompilerParams(approx_math=approx_math,
                                         lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  call = plgpu.kernel(body, out_type=(out, out) if with_preactivation else (out,), num_threads=3,
                      thread_name="wg", interpret=interpret, compiler_params=compiler_params, **grid)
  results = call(a, b, bias.astype(jnp.float32))
  return results if with_preactivation else results[0]
