"""Matmuls for Hopper GPUs (sm_90: H100, H200) written in Pallas for Mosaic GPU, whose epilogue does more
than round and store the float32 accumulator: an `Epilogue` reads one operand per output block and gives
the results to store (`feed_forward`'s GELU forward and backward). Two schedules:

- `kernel` ("cooperative"): jax's warp-specialised Hopper matmul
  (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, Apache 2.0, The JAX Authors) with such an
  epilogue. Kept: the tiling (`TuningConfig`), the TMA/wgmma pipeline with two compute warpgroups side
  by side along N, the planar-snake grid. Dropped: the accumulate-into-C input, clusters, collective hooks.
- `pingpong_kernel`: the two compute warpgroups take turns over their own output blocks, so that one's
  epilogue runs while the other's products do, as CUTLASS's ping-pong Hopper kernels do.

Owns: the kernels and `call`. Does not own: what an epilogue computes (`feed_forward`), or the choice of
tiling (`feed_forward`'s constants, `scripts/bench_matmul.py`'s rows).
- Both lower for an H100 wherever jax's CUDA plugin is installed (the SM count given:
  `scripts/gpu_hlo.py`'s venv). Both run on a CPU in Mosaic GPU's interpreter, with its race detector
  (tests/test_feed_forward.py).
- Mosaic GPU is imported where a kernel is built, so importing the model does not need it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax


INTERPRETED_SMS = 2


def is_hopper(device) -> bool:
  """Whether `device` is a Hopper GPU (sm_90), which these kernels' wgmma and TMA need."""
  return str(getattr(device, "compute_capability", "")).startswith("9.")


def tuning_config(tiling: dict):
  """`hopper_matmul_mgpu.TuningConfig` at `tiling` (`grid_minor_dim` as "M" or "N"), and the fields it was
  given: written against jax 0.10.2's kernel, a later jax may have renamed or dropped a field, which is then
  left out."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  fields = {field.name for field in dataclasses.fields(mgpu.TuningConfig)}
  given = {name: value for name, value in tiling.items() if name in fields}
  return mgpu.TuningConfig(**dict(given, grid_minor_dim=mgpu.MatmulDimension[given["grid_minor_dim"]])), given


@dataclasses.dataclass(frozen=True)
class Epilogue:
  """What a kernel does with a block's float32 accumulator `[tile_m, tile_n]`, besides rounding and storing.

  One operand is read per block: its part of the block, `operand_block(gmem, m_slice, n_slice)`, is copied
  into shared memory (`operand_shape(tile_m, tile_n)`, `operand_dtype`) while the block's products run.
  `results(acc_tile, operand_ref, epi_m_slice, epi_n_slice)` gives the `num_outputs` float32 tiles stored
  for one `[epi_m, epi_n]` tile of the block.
  """
  num_outputs: int
  operand_block: Callable
  operand_shape: Callable
  operand_dtype: Any
  results: Callable


def _epilogue(acc, epilogue, operand_ref, out_smem, out_gmems, m_slice, n_slice):
  """Stores `epilogue.results` of `acc` to `out_gmems` at `[m_slice, n_slice]` through `out_smem`.

  acc `[tile_m, tile_n]` float32; operand_ref: the block's operand in shared memory; out_smem `[outputs,
  slots, epi_m, epi_n]`: one warpgroup's store buffers, which its earlier stores may still be reading. The
  results are computed one `[epi_m, epi_n]` tile at a time, so that only one tile's results and temporaries
  are live beside the accumulator (fewer registers than the whole block's).
  Every read of `operand_ref` comes before the last `commit_smem` (a warpgroup barrier): the kernels refill
  it for the next block right after this returns.
  """
  import jax.experimental.pallas as pl
  import jax.experimental.pallas.mosaic_gpu as plgpu

  num_outputs, num_slots, epi_tile_m, epi_tile_n = out_smem.shape
  (tile_m, tile_n), dtype = acc.shape, out_smem.dtype
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's stores, whatever slot they used
  for epi_mi in range(tile_m // epi_tile_m):
    for epi_ni in range(tile_n // epi_tile_n):
      epi_m_slice = pl.ds(epi_mi * epi_tile_m, epi_tile_m)
      epi_n_slice = pl.ds(epi_ni * epi_tile_n, epi_tile_n)
      acc_tile = acc[epi_mi * epi_tile_m:(epi_mi + 1) * epi_tile_m, epi_ni * epi_tile_n:(epi_ni + 1) * epi_tile_n]
      results = [r.astype(dtype) for r in epilogue.results(acc_tile, operand_ref, epi_m_slice, epi_n_slice)]
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


def _epilogue_buffers(config, dtype, out_slots, epilogue):
  """The epilogue's shared memory, for each of the two compute warpgroups: `out_slots` store buffers per
  output (fewer if the block has fewer store tiles), the operand of its block and the barrier its copy
  arrives on. Keyword allocations for `pl.run_scoped`."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  num_slots = min(out_slots, (config.tile_m * config.tile_n) // (config.epi_tile_m * config.epi_tile_n))
  operand_shape = epilogue.operand_shape(config.tile_m, config.tile_n)
  # A 2-D operand is read by the tile in the accumulator's layout: tiled and swizzled as TMA and wgmma want.
  operand_transforms = _swizzled(operand_shape[-1], epilogue.operand_dtype) if len(operand_shape) == 2 else ()
  return dict(
      out_smem=plgpu.SMEM((epilogue.num_outputs, 2, num_slots, config.epi_tile_m, config.epi_tile_n), dtype,
                          transforms=_swizzled(config.epi_tile_n, dtype)),
      operand_smem=plgpu.SMEM((2, *operand_shape), epilogue.operand_dtype, transforms=operand_transforms),
      operand_loaded=plgpu.Barrier(num_barriers=2),
  )


def kernel(a_gmem, b_gmem, operand_gmem, *out_gmems, config, out_slots, epilogue):
  """One persistent CTA per SM: loops over `[tile_m, 2 tile_n]` output blocks.

  a `[m, k]`, b `[k, n]` (bf16), the epilogue's operand; out_gmems: its `num_outputs` results `[m, n]` in
  a's dtype.
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
      **_epilogue_buffers(config, dtype, out_slots, epilogue),
      collective_axes="wg",
  )
  def _pipeline_scope(pipeline_allocs, out_smem, operand_smem, operand_loaded):
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
          # The operand's copy is issued before the k loop, so it arrives while the products run. The last
          # block's epilogue read its copy before its last commit_smem, a warpgroup barrier.
          plgpu.copy_gmem_to_smem(epilogue.operand_block(operand_gmem, m_slice, n_slice), operand_smem.at[wg_idx],
                                  operand_loaded.at[wg_idx])
          eval_pipeline(acc_ref)
          plgpu.barrier_wait(operand_loaded.at[wg_idx])
          _epilogue(acc_ref[...], epilogue, operand_smem.at[wg_idx], out_smem.at[:, wg_idx], out_gmems, m_slice,
                    n_slice)

      def mma_body(_, a_smem, b_smem, acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem.at[:, pl.ds(wg_idx * tile_n, tile_n)])
        plgpu.wgmma_wait(0)
        return acc_ref

      get_pipeline(mma_body, compute_context)(a_gmem.at[m_slice, :], b_gmem.at[:, pl.ds(n_idx * cta_tile_n,
                                                                                     cta_tile_n)],
                                              allocations=pipeline_allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store done before the kernel exits


def pingpong_kernel(a_gmem, b_gmem, operand_gmem, *out_gmems, config, out_slots, num_ctas, epilogue):
  """One persistent CTA per SM, three warpgroups. The CTA's `[tile_m, tile_n]` output blocks alternate
  between two consumer warpgroups, each with its own ring of `max_concurrent_steps` stages; the third
  warpgroup loads the rings in the order the blocks are consumed. One consumer's epilogue then runs while
  the other's products do (the "ping-pong" schedule of CUTLASS's Hopper kernels), where `kernel`'s two
  warpgroups stop their products together for theirs.

  a `[m, k]`, b `[k, n]` (bf16), the epilogue's operand; out_gmems as `kernel`'s.
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

  def body(a_smem, b_smem, out_smem, operand_smem, a_loaded, b_loaded, consumed, operand_loaded):
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
        # As in `kernel`: issued before the k loop; the last block's epilogue read it before its last commit.
        plgpu.copy_gmem_to_smem(epilogue.operand_block(operand_gmem, m_slice, n_slice), operand_smem.at[consumer],
                                operand_loaded.at[consumer])

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
          plgpu.barrier_wait(operand_loaded.at[consumer])
          _epilogue(acc_ref[...], epilogue, operand_smem.at[consumer], out_smem.at[:, consumer], out_gmems, m_slice,
                    n_slice)

        pl.run_scoped(products_and_epilogue, plgpu.ACC((tile_m, tile_n), jnp.float32))

      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store done before the kernel exits

  pl.run_scoped(
      body,
      a_smem=plgpu.SMEM((2 * stages, tile_m, tile_k), dtype, transforms=transforms),
      b_smem=plgpu.SMEM((2 * stages, tile_k, tile_n), dtype, transforms=transforms),
      a_loaded=plgpu.Barrier(num_barriers=2 * stages),
      b_loaded=plgpu.Barrier(num_barriers=2 * stages),
      consumed=plgpu.Barrier(num_barriers=2 * stages),
      **_epilogue_buffers(config, dtype, out_slots, epilogue),
      collective_axes="wg",
  )


def check_operands(a, b):
  """Raises unless a `[m, k]` and b `[k, n]` share a dtype."""
  if a.dtype != b.dtype:
    raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f"need a [m, k] and b [k, n]; got {a.shape} and {b.shape}")


def call(a, b, operand, epilogue, config, out_slots, schedule, approx_math, interpret):
  """The kernel of `schedule` with `epilogue` over `a @ b`: a tuple of its `num_outputs` results."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mgpu

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
  # In the interpreter, 2 "SMs": each CTA loops over several blocks, as on a GPU, at a fraction of the cost.
  num_sms = mgpu.get_num_sms() if interpret is None else INTERPRETED_SMS
  if schedule == "cooperative":  # jax's kernel's grid: one cluster of one CTA per SM
    body = functools.partial(kernel, config=config, out_slots=out_slots, epilogue=epilogue)
    grid = dict(grid=(num_sms,), grid_names=("cluster_grid",), cluster=(1,), cluster_names=("cluster",))
  else:
    body = functools.partial(pingpong_kernel, config=config, out_slots=out_slots, num_ctas=num_sms,
                             epilogue=epilogue)
    grid = dict(grid=(num_sms,), grid_names=("sm",))
  compiler_params = plgpu.CompilerParams(approx_math=approx_math,
                                         lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  call = plgpu.kernel(body, out_type=(out,) * epilogue.num_outputs, num_threads=3, thread_name="wg",
                      interpret=interpret, compiler_params=compiler_params, **grid)
  return call(a, b, operand)
