"""XLA:CPU's step buffers kept in the process's heap (`config.cpu_reuse_buffers`).

Owns: how the host's allocator serves XLA:CPU's buffers. XLA:CPU allocates each execution's buffers
anew and frees them after. With glibc's defaults, large blocks are mapped for each allocation (or
come from a worker thread's arena, whose free memory goes back to the OS), so every step faults its
pages in again: on this project's 2-core Xeon, about 190,000 page faults and 0.4 s of system time per
MiniLM train step of 1.9 s (docs/performance.md). Two settings keep those pages mapped:

- `dispatch_on_caller`, before JAX starts its backends: executions on one CPU device run on the
  calling thread (`jax_cpu_enable_async_dispatch=False`), so their buffers come from glibc's main heap.
  Steps over several CPU devices still run on XLA's threads (JAX dispatches those asynchronously).
- `keep_heap`, once the backend is known: on a CPU backend with glibc, large blocks come from the heap
  rather than their own mappings (`M_MMAP_MAX=0`), and freed memory is never trimmed back to the OS
  (`M_TRIM_THRESHOLD=-1`), so the next step reuses the same pages. The process then holds its peak
  heap until it exits, which is what a training process does anyway.

Neither changes what is computed. On GPUs and TPUs the host allocator is left as it is (unmeasured
there, and their step buffers live on the device).
"""

from __future__ import annotations

import ctypes
import platform

import jax
from absl import logging

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def dispatch_on_caller(enabled: bool) -> None:
  """With `enabled`, XLA:CPU runs single-device executions on the calling thread. Call before JAX
  starts its backends (the flag is read when the CPU client is made)."""
  if not enabled:
    return
  from jax._src import xla_bridge  # no public API says whether a backend has started
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("config.cpu_reuse_buffers=True came after JAX started its backends: call "
                       "host_memory.dispatch_on_caller at the start of the program.")
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def keep_heap(enabled: bool) -> bool:
  """With `enabled`, on a CPU backend with glibc, keeps freed memory in the heap for reuse. Returns
  whether it did (logged either way when enabled)."""
  if not enabled:
    return False
  backend = jax.default_backend()
  if backend != "cpu":
    return False
  if platform.libc_ver()[0] != "glibc":
    logging.info("cpu_reuse_buffers: not glibc (%s), so the allocator is left as it is.", platform.libc_ver())
    return False
  libc = ctypes.CDLL(None)
  if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
    logging.warning("cpu_reuse_buffers: glibc refused mallopt; each step will fault its buffers in anew.")
    return False
  logging.info("cpu_reuse_buffers: XLA:CPU's step buffers stay in the heap (no per-step mappings or trims).")
  return True
