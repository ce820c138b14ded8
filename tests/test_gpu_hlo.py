"""scripts/gpu_hlo.py's reading of a compiled program, and scripts/mosaic_ptxas.py's of ptxas's report (the
GPU compiles themselves need jax's CUDA plugin)."""

import jax
import jax.numpy as jnp
import pytest

from scripts import gpu_hlo
from scripts import mosaic_ptxas

# ptxas -v on a Mosaic GPU kernel of ours for an H100 (the GELU epilogue, 4 stages; jax 0.10.2's plugin).
PTXAS_REPORT = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 741 by compiler to allow use of registers in GMMA in function 'anonymous_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'anonymous_mosaic_gpu_kernel', 32 bytes spill stores, 36 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'anonymous_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for anonymous_mosaic_gpu_kernel
    24 bytes stack frame, 32 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 24 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 275.267 ms
"""


def test_shape_bytes_sums_a_tuples_arrays():
  assert gpu_hlo.shape_bytes("(bf16[2,3]{1,0}, s8[4]{0})") == 2 * 3 * 2 + 4
  assert gpu_hlo.shape_bytes("f32[]") == 4


def test_entry_kernels_lists_each_kernel_with_the_bytes_it_reads_and_writes():
  x = jnp.ones((256, 128), jnp.float32)
  text = jax.jit(lambda x: (jnp.exp(x) * 2 + 1, x.sum(0))).lower(x).compile().as_text()
  kernels = {k["op_name"].rsplit("/", 1)[-1]: k for k in gpu_hlo.entry_kernels(text)}
  assert set(kernels) == {"add", "reduce_sum"}  # parameters and the output tuple are not kernels
  assert (kernels["add"]["read"], kernels["add"]["written"]) == (256 * 128 * 4, 256 * 128 * 4)
  assert (kernels["reduce_sum"]["read"], kernels["reduce_sum"]["written"]) == (256 * 128 * 4, 128 * 4)
  assert all(k["group"].startswith("fusion: ") for k in kernels.values())


def test_a_fusion_that_only_slices_an_operand_is_charged_the_slice():
  # One layer's weights out of a stacked [12, ...] parameter (stack_layers): the kernel reads 1/12.
  x = jnp.ones((12, 256, 128), jnp.float32)
  text = jax.jit(lambda x: jnp.exp(x.astype(jnp.bfloat16)[3]) * 2).lower(x).compile().as_text()
  (kernel,) = gpu_hlo.entry_kernels(text)
  assert (kernel["read"], kernel["written"]) == (256 * 128 * 4, 256 * 128 * 2)


def test_a_fusion_that_converts_an_operand_whole_is_charged_all_of_it():
  # The float32 -> bf16 cast of a weight: a fusion whose output is its operand converted.
  x = jnp.ones((12, 256, 128), jnp.float32)
  text = jax.jit(lambda x: x.astype(jnp.bfloat16)).lower(x).compile().as_text()
  (kernel,) = gpu_hlo.entry_kernels(text)
  assert (kernel["read"], kernel["written"]) == (12 * 256 * 128 * 4, 12 * 256 * 128 * 2)


def test_an_array_a_kernel_takes_several_times_is_charged_once():
  # The flash attention's query, key and value: three views of the stacked Q/K/V projection.
  text = """HloModule m

ENTRY %main (p: bf16[4,3,8]) -> bf16[4,8] {
  %p = bf16[4,3,8]{2,1,0} parameter(0)
  ROOT %attention = bf16[4,8]{1,0} custom-call(%p, %p, %p), custom_call_target="__gpu$xla.gpu.triton"
}
"""
  (kernel,) = gpu_hlo.entry_kernels(text)
  assert (kernel["group"], kernel["read"], kernel["written"]) == ("__gpu$xla.gpu.triton", 4 * 3 * 8 * 2, 4 * 8 * 2)


def test_ptxas_report_gives_registers_spills_and_notes():
  assert mosaic_ptxas.parse_ptxas(PTXAS_REPORT) == {"registers": 168, "spill_store_bytes": 32, "spill_load_bytes": 36,
                                                    "ptxas_notes": ["(C7519)"]}
  with pytest.raises(ValueError, match="not a ptxas -v report"):
    mosaic_ptxas.parse_ptxas("ptxas fatal : Unresolved extern function")
