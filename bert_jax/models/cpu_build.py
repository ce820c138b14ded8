"""Building the C++ kernels for XLA:CPU (`cpu_attention.cc`, `cpu_add_norm.cc`, with `cpu_kernels.h`).

Owns: compiling a kernel's source on first use with the C++ compiler `$CXX`, else `c++`, for this
processor (`-march=native`), and caching the library by source, header, compiler and processor under
`$BERT_JAX_KERNEL_CACHE`, else `~/.cache/bert_jax`, else a temp dir (only directories that only this
user can write: the library is loaded as code); loading it and registering its handlers with XLA;
and the check behind each 'auto' setting that picks a kernel (`available`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
from typing import Callable, NamedTuple

import jax
import jaxlib
from absl import logging

HEADER = pathlib.Path(__file__).with_name("cpu_kernels.h")


class Kernel(NamedTuple):
  """A kernel's source and, for its errors, its name and the config setting that picks it."""
  source: pathlib.Path
  name: str  # "cpu_fused attention"
  setting: str  # "attention_impl": the BertConfig field whose 'cpu_fused' value runs it
  fallback: str  # that field's value to use without the kernel
  targets: tuple[tuple[str, str], ...]  # (XLA FFI target, the library's handler symbol) of each handler

  @property
  def fix(self) -> str:
    return f"--config.model.{self.setting}={self.fallback}"


def _processor() -> str:
  """The processor's identity for the build cache: `-march=native` code runs only where it was built."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f if line.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[pathlib.Path]:
  if os.environ.get("BERT_JAX_KERNEL_CACHE"):
    return [pathlib.Path(os.environ["BERT_JAX_KERNEL_CACHE"])]
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return [pathlib.Path(xdg) / "bert_jax", pathlib.Path(tempfile.gettempdir()) / f"bert_jax-{os.getuid()}"]


def _private_dir(path: pathlib.Path) -> None:
  """Creates `path` (mode 0700) or checks that it is ours and not writable by others: we load code from it."""
  path.mkdir(mode=0o700, parents=True, exist_ok=True)
  info = path.stat()
  if info.st_uid != os.getuid() or info.st_mode & 0o022:
    raise OSError(f"{path} belongs to another user or is writable by others")


def build(kernel: Kernel, compiler: str | None = None) -> pathlib.Path:
  """`kernel`'s compiled library (built now unless a cached build of this source exists)."""
  compiler = compiler or os.environ.get("CXX", "c++")
  command = shlex.split(compiler) + ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
                                     f"-I{jax.ffi.include_dir()}", f"-I{HEADER.parent}", str(kernel.source)]
  identity = [kernel.source.read_text(), HEADER.read_text(), " ".join(command), _processor(), jaxlib.__version__]
  key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
  errors = []
  for cache in _cache_dirs():
    library = cache / f"{kernel.source.stem}-{key}.so"
    try:
      _private_dir(cache)
      if library.exists():
        return library
      partial = tempfile.NamedTemporaryFile(dir=cache, suffix=".so.partial", delete=False)
      partial.close()
    except OSError as e:
      errors.append(f"{cache}: {e}")
      continue
    try:
      result = subprocess.run(command + ["-o", partial.name], capture_output=True, text=True)
      if result.returncode:
        raise RuntimeError(f"Building the {kernel.name} kernel failed ({' '.join(command)}):\n"
                           f"{result.stderr[-4000:]}\nUse {kernel.fix} meanwhile.")
      os.replace(partial.name, library)  # atomic: a concurrent build of the same key writes the same bytes
      return library
    except OSError as e:  # no such compiler, or not executable
      raise RuntimeError(
          f"{kernel.setting}='cpu_fused' compiles its kernel with a C++17 compiler, and {compiler!r} could not be "
          f"run ({e.strerror or e}): install one (e.g. apt install g++), point $CXX at it, or use {kernel.fix}.") from None
    finally:
      if os.path.exists(partial.name):
        os.unlink(partial.name)
  raise RuntimeError(f"No usable cache for the {kernel.name} kernel ({'; '.join(errors)}): set "
                     "$BERT_JAX_KERNEL_CACHE to a directory of yours that only you can write.")


def register(kernel: Kernel) -> None:
  """Builds (or finds) `kernel`'s library, loads it and registers its handlers with XLA:CPU."""
  library = ctypes.cdll.LoadLibrary(str(build(kernel)))
  for target, symbol in kernel.targets:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


def available(kernel: Kernel, register_kernel: Callable[[], None]) -> bool:
  """Whether `register_kernel()` (the kernel module's cached `register`) succeeds here; if not, logs why."""
  try:
    register_kernel()
  except (RuntimeError, OSError) as e:  # no compiler, a failed build, or a library that will not load
    logging.warning("The %s kernel is unavailable, so %s='auto' uses %s: %s", kernel.name, kernel.setting,
                    kernel.fallback, e)
    return False
  return True
