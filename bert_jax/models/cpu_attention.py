"""Fused attention on XLA:CPU (`attention_impl='cpu_fused'`): a C++ kernel called through XLA's FFI.

Owns: building `cpu_attention.cc` on first use (the C++ compiler `$CXX`, else `c++`; cached by
source, compiler and processor under `$BERT_JAX_KERNEL_CACHE`, else `~/.cache/bert_jax`, else a temp
dir), registering it with XLA, and its custom VJP. The kernel computes what `attention.py`'s einsum
attention does, dropout mask included (the mask is drawn by the model and passed in), in float32.
On a 2-core Xeon one MiniLM-size layer's attention took 12 ms forward against XLA's 45, and 36-39 ms
forward and backward with dropout against 88-113 (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
_FORWARD, _BACKWARD = "bert_jax_attention_forward", "bert_jax_attention_backward"


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


def build(compiler: str | None = None) -> pathlib.Path:
  """The compiled kernel library (built now unless a cached build of this source exists)."""
  compiler = compiler or os.environ.get("CXX", "c++")
  command = shlex.split(compiler) + ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
                                     f"-I{jax.ffi.include_dir()}", str(SOURCE)]
  identity = [SOURCE.read_text(), " ".join(command), _processor(), jaxlib.__version__]
  key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
  errors = []
  for cache in _cache_dirs():
    library = cache / f"cpu_attention-{key}.so"
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
        raise RuntimeError(f"Building the cpu_fused attention kernel failed ({' '.join(command)}):\n"
                           f"{result.stderr[-4000:]}\nUse --config.model.attention_impl=einsum meanwhile.")
      os.replace(partial.name, library)  # atomic: a concurrent build of the same key writes the same bytes
      return library
    except OSError as e:  # no such compiler, or not executable
      raise RuntimeError(
          f"attention_impl='cpu_fused' compiles its kernel with a C++17 compiler, and {compiler!r} could not be "
          f"run ({e.strerror or e}): install one (e.g. apt install g++), point $CXX at it, or use "
          "--config.model.attention_impl=einsum.") from None
    finally:
      if os.path.exists(partial.name):
        os.unlink(partial.name)
  raise RuntimeError(f"No usable cache for the cpu_fused attention kernel ({'; '.join(errors)}): set "
                     "$BERT_JAX_KERNEL_CACHE to a directory of yours that only you can write.")


@functools.cache
def _register() -> None:
  library = ctypes.cdll.LoadLibrary(str(build()))
  jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.BertJaxAttentionForward), platform="cpu")
  jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.BertJaxAttentionBackward), platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernel builds (or is cached) and loads here; if not, logs why, once per process."""
  try:
    _register()
  except (RuntimeError, OSError) as e:  # no compiler, a failed build, or a library that will not load
    logging.warning("The cpu_fused attention kernel is unavailable, so attention_impl='auto' uses einsum: %s", e)
    return False
  return True


def _attributes(query, keep_prob) -> dict[str, np.float32]:
  """The kernels' attributes: sqrt(head_dim), which the scores are divided by, and the keep probability."""
  return dict(root=np.float32(np.sqrt(np.float32(query.shape[-1]))), keep_prob=np.float32(keep_prob))


def _forward(query, key, value, key_valid, keep, keep_prob):
  batch, seq, heads, _ = query.shape
  outputs = (jax.ShapeDtypeStruct(query.shape, jnp.float32), jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, outputs)(query, key, value, key_valid, keep, **_attributes(query, keep_prob))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(query, key, value, key_valid, keep, keep_prob):
  return _forward(query, key, value, key_valid, keep, keep_prob)[0]


def _attention_fwd(query, key, value, key_valid, keep, keep_prob):
  context, lse = _forward(query, key, value, key_valid, keep, keep_prob)
  return context, (query, key, value, key_valid, keep, lse)


def _attention_bwd(keep_prob, residuals, d_context):
  query, key, value, key_valid, keep, lse = residuals
  grads = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(query.shape, jnp.float32),) * 3)(
      query, key, value, key_valid, keep, lse, d_context, **_attributes(query, keep_prob))
  return (*grads, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, key_valid: jax.Array,
              keep: jax.Array | None = None, rate: float = 0.0) -> jax.Array:
  """Softmax attention of `query`, `key`, `value` `[batch, seq, heads, head_dim]` (float32) over the keys
  where `key_valid` `[batch, seq]` is True; with `keep` (bool `[batch, heads, seq, seq]`), inverted
  dropout at `rate` on the probabilities. Returns the context `[batch, seq, heads, head_dim]`."""
  if query.dtype != jnp.float32:
    raise ValueError(f"The cpu_fused attention kernel computes in float32; got {query.dtype}.")
  if query.ndim != 4 or key.shape != query.shape or value.shape != query.shape:
    raise ValueError(f"cpu_fused attention takes query, key and value of one shape [batch, seq, heads, head_dim]; "
                     f"got {query.shape}, {key.shape}, {value.shape}.")
  batch, seq, heads, _ = query.shape
  if key_valid.shape != (batch, seq):
    raise ValueError(f"key_valid must be [batch, seq] = {(batch, seq)}; got {key_valid.shape}.")
  if keep is not None and (keep.shape != (batch, heads, seq, seq) or not 0.0 < rate < 1.0):
    raise ValueError(f"keep must be [batch, heads, seq, seq] = {(batch, heads, seq, seq)} with a dropout rate in "
                     f"(0, 1); got {keep.shape} and rate={rate}.")
  _register()
  if keep is None:
    keep, keep_prob = jnp.zeros((1,), jnp.uint8), 1.0
  else:
    keep, keep_prob = keep.astype(jnp.uint8), 1.0 - rate
  return _attention(query, key, value, key_valid.astype(jnp.uint8), keep, keep_prob)
