"""XLA:CPU's step buffers kept in the heap (`config.cpu_reuse_buffers`, bert_jax/host_memory.py)."""

import os
import pathlib
import platform
import subprocess
import sys

import jax
import pytest

from bert_jax import host_memory

# A fresh process (the settings are process-wide, and the dispatch one must come before JAX starts):
# a jitted step whose 64 MB output is dropped after each call, as a train step's buffers are; prints
# whether the heap setting was applied and the median page faults of a call after warm-up (a call
# now and then still grows the heap while the last output's memory is being freed).
_PROGRAM = """
import resource, statistics, sys
import jax, jax.numpy as jnp
from bert_jax import host_memory
kept = host_memory.keep_heap(host_memory.dispatch_on_caller(sys.argv[1] == "1"))
step = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, statistics.median(faults[2:]))
"""


def _faults_per_step(enabled: bool) -> tuple[str, float]:
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", _PROGRAM, "1" if enabled else "0"], capture_output=True, text=True,
                          timeout=120, env=env, check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  kept, faults = result.stdout.split()
  return kept, float(faults)


def _page_bytes() -> int:
  """The pages a fresh mapping is faulted in by: 2 MiB where transparent huge pages are always on."""
  try:
    always = "[always]" in pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    always = False
  return (2 << 20) if always else 4096


GLIBC = platform.libc_ver()[0] == "glibc"


def test_a_steps_buffers_are_reused_rather_than_faulted_in_anew():
  kept, faults = _faults_per_step(enabled=True)
  default_kept, default_faults = _faults_per_step(enabled=False)
  if not GLIBC:  # the setting is glibc's (mallopt): elsewhere it is not applied, and says so
    assert (kept, default_kept) == ("False", "False")
    return
  assert (kept, default_kept) == ("True", "False")
  assert default_faults >= (64 << 20) / _page_bytes() / 2  # glibc's default: the 64 MB faulted in per call
  assert faults < default_faults / 20


def test_caller_dispatch_after_jax_started_is_refused_with_the_fix(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))  # the check comes after glibc's
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  jax.devices()  # this process's backend has started
  with pytest.raises(RuntimeError, match="after JAX started its backends"):
    host_memory.dispatch_on_caller(True)
  assert jax.config.values["jax_cpu_enable_async_dispatch"]


def _no_mallopt(monkeypatch):
  """The allocator of this test process must stay as it is: any call of mallopt fails the test."""
  def refuse(name):
    raise AssertionError(f"glibc was loaded ({name}) to change this process's allocator")
  monkeypatch.setattr(host_memory.ctypes, "CDLL", refuse)


def test_nothing_is_set_when_off_or_without_glibc_or_a_cpu(monkeypatch):
  _no_mallopt(monkeypatch)
  assert not host_memory.dispatch_on_caller(False)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory.dispatch_on_caller(True)
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not host_memory.dispatch_on_caller(True)
  assert jax.config.values["jax_cpu_enable_async_dispatch"]


def test_caller_dispatch_is_not_set_with_several_cpu_devices(monkeypatch):
  # A pmap step over several CPU devices hung in its all-reduce with async dispatch off.
  _no_mallopt(monkeypatch)
  monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
  assert not host_memory.dispatch_on_caller(True)
  assert jax.config.values["jax_cpu_enable_async_dispatch"]
  assert host_memory._cpu_device_count() == 8


def test_the_heap_is_left_alone_without_caller_dispatch_or_off_a_cpu(monkeypatch):
  _no_mallopt(monkeypatch)
  assert not host_memory.keep_heap(False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not host_memory.keep_heap(True)
