"""The device's peak FLOP/s that MFU divides by, and its ceilings measured on the spot.

Owns: the datasheet table of dense peaks (GPUs, TPUs), the measured matmul throughput that stands in
for a CPU's peak, the host processor's name, and the back-to-back timing both `bert_jax.benchmark` and
`scripts/measure_ceilings.py` use. Imports no flags, so scripts with their own flags can use it.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Dense peak TFLOP/s per chip by (device kind substring, dtype); CPUs are measured on the spot.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v4", "float32"): 275.0 / 4,
    ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5", "bfloat16"): 459.0,
}


def best_seconds_per_call(fn: Callable[..., Any], *args, rounds: int, calls_per_round: int) -> float:
  """Seconds per call of jitted `fn(*args)`: after one warm-up call, the best of `rounds` rounds of
  `calls_per_round` calls queued back to back and one wait. Queue several where a call takes a
  millisecond or two, or the wait's dispatch and sync gap would count."""
  if rounds < 1 or calls_per_round < 1:
    raise ValueError(f"rounds={rounds} and calls_per_round={calls_per_round}: each must be at least 1.")
  jax.block_until_ready(fn(*args))

  def one_round() -> float:
    start = time.perf_counter()
    for _ in range(calls_per_round):
      out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  return min(one_round() for _ in range(rounds)) / calls_per_round


def measured_matmul_tflops(dtype: str, size: int = 2048, rounds: int = 5, calls_per_round: int = 1,
                           accumulate: str | None = None) -> float:
  """The device's matmul throughput here and now: `size`-square random normal matrices in `dtype`,
  their products summed into `accumulate` (None: `dtype`) and returned in it."""
  a, b = (jax.random.normal(key, (size, size), dtype) for key in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=accumulate))
  seconds = best_seconds_per_call(matmul, a, b, rounds=rounds, calls_per_round=calls_per_round)
  return 2 * size**3 / seconds / 1e12


def peak_tflops(device: jax.Device, dtype: str) -> float | None:
  """`device`'s dense peak in `dtype`: the datasheet's, a CPU's measured matmul, or None if unknown."""
  if device.platform == "cpu":
    # The dense layers' CPU form: bf16 sums into float32, the dot XLA:CPU's YNNPACK runs with the
    # processor's bf16 instructions (a bf16-output dot goes to Eigen, which has none).
    return measured_matmul_tflops(dtype, accumulate="float32")
  for (kind, peak_dtype), value in PEAK_TFLOPS.items():
    if kind.lower() in device.device_kind.lower() and peak_dtype == dtype:
      return value
  return None


def host_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> str:
  """The host's processor model and logical core count, e.g. 'Intel(R) Xeon(R) Processor @ 2.50GHz x 2'.

  CPU figures depend on it, and a cloud VM's processor can change from one run to the next. The model
  name comes from `cpuinfo_path` (Linux), else from `platform`.
  """
  name = ""
  try:
    with open(cpuinfo_path) as cpuinfo:
      name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
  except OSError:
    pass
  return f"{name or platform.processor() or platform.machine()} x {os.cpu_count()}"
