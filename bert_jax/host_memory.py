"""XLA:CPU's step buffers kept in the process's heap (`config.cpu_reuse_buffers`).

Owns: how the host's allocator serves XLA:CPU's buffers. XLA:CPU allocates each execution's buffers
anew and frees them after. With glibc's defaults, large blocks are mapped for each allocation (or
come from a worker thread's arena, whose free memory goes back to the OS), so every step faults its
pages in again: on this project's 2-core Xeon, about 190,000 page faults and 0.4 s of system time per
MiniLM train step of 1.9 s; the step is 10% faster without them (docs/performance.md). Two settings,
applied together and only with glibc, keep those pages mapped:

- `dispatch_on_caller`, before JAX starts its backends: one-device executions on the CPU run on the
  calling thread (`jax_cpu_enable_async_dispatch=False`), so their buffers come from glibc's main heap.
  Not in a process with several CPU devices (`--xla_force_host_platform_device_count`,
  `jax_num_cpu_devices`): there a pmap step hung in its all-reduce in 4 of 12 runs with the setting
  and 0 of 12 without (8 simulated devices, executables from JAX's compilation cache). On a machine
  whose backend turns out to be a GPU or TPU, this touches only JAX's host CPU client.
- `keep_heap`, once the backend is known to be a CPU: large blocks come from the heap rather than
  their own mappings, and freed memory is never trimmed back to the OS, so the next step reuses the
  same pages. The process then holds its peak heap until it exits.

Neither changes what is computed.
"""

from __future__ import annotations

import ctypes
import os
import platform

import jax
from absl import logging

from bert_jax import partitioning

# glibc's mallopt parameters (malloc.h) and, per mallopt(3), the values that turn each off:
# M_MMAP_MAX=0 "disables the use of mmap(2) for servicing large allocation requests", and
# M_TRIM_THRESHOLD=-1 "disables trimming completely".
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def dispatch_on_caller(enabled: bool) -> bool:
  """With `enabled`, glibc, and a CPU among the platforms JAX may use: XLA:CPU runs one-device
  executions on the calling thread. Call before JAX starts its backends (the CPU client reads the
  option when it is made). Returns whether it did; pass that to `keep_heap`."""
  if not enabled or platform.libc_ver()[0] != "glibc":
    return False  # without glibc's heap setting, dispatching on the caller would only lose overlap
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms and "cpu" not in platforms.split(","):
    return False
  if _cpu_device_count() > 1:
    logging.info("cpu_reuse_buffers: several CPU devices, so JAX's dispatch is left asynchronous.")
    return False
  if partitioning.backends_started():
    raise RuntimeError("config.cpu_reuse_buffers=True came after JAX started its backends: call "
                       "host_memory.dispatch_on_caller at the start of the program, or set it to False.")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


def _cpu_device_count() -> int:
  """The CPU devices this process asks for: XLA_FLAGS' last `--xla_force_host_platform_device_count`,
  else `jax_num_cpu_devices`, else 1."""
  prefix = "--xla_force_host_platform_device_count="
  counts = [flag[len(prefix):] for flag in os.environ.get("XLA_FLAGS", "").split() if flag.startswith(prefix)]
  if counts:
    return int(counts[-1])
  return max(int(jax.config.jax_num_cpu_devices), 1)


def keep_heap(dispatched_on_caller: bool) -> bool:
  """After `dispatch_on_caller` returned True, on a CPU backend: keeps freed memory in glibc's heap for
  reuse. Returns whether it did; logs either way."""
  if not dispatched_on_caller:
    return False
  backend = jax.default_backend()
  if backend != "cpu":
    logging.info("cpu_reuse_buffers: the backend is %s, so the host's allocator is left as it is.", backend)
    return False
  libc = ctypes.CDLL(None)
  if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
    logging.warning("cpu_reuse_buffers: glibc refused mallopt; each step will fault its buffers in anew.")
    return False
  logging.info("cpu_reuse_buffers: one-device steps run on the calling thread and their buffers stay in the "
               "heap (no per-step mappings or trims).")
  return True
