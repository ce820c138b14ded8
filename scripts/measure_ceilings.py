"""The device's two ceilings, measured: matmul TFLOP/s and memory bandwidth (one JSON line).

Run from the repo root: `python -m scripts.measure_ceilings [--size=8192] [--copy_mib=2048]`.
The matmul is a `size`-cube product of random normal matrices in bfloat16 (and float32); the
bandwidth is a scale of a `copy_mib` float32 array, counting the bytes read plus those written.
MFU in `bert_jax.benchmark` is against the datasheet peak; these say what the chip reaches here.
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

flags.DEFINE_integer("size", 8192, "Side of the square matrices.")
flags.DEFINE_integer("copy_mib", 2048, "Size of the array of the bandwidth test, in MiB.")
flags.DEFINE_integer("repeats", 20, "Timed calls, queued back to back.")


def _seconds_per_call(fn, *args, repeats: int) -> float:
  """Seconds per call of `fn`, from `repeats` calls queued back to back and one wait at the end:
  a wait after each call would add the dispatch and sync gap to a kernel of a millisecond or two."""
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  size, repeats = flags.FLAGS.size, flags.FLAGS.repeats
  row = {"device": jax.devices()[0].device_kind, "size": size}
  for dtype in ("bfloat16", "float32"):
    a, b = (jax.random.normal(k, (size, size), dtype) for k in jax.random.split(jax.random.key(0)))
    seconds = _seconds_per_call(jax.jit(jnp.matmul), a, b, repeats=repeats)
    row[f"matmul_tflops_{dtype}"] = 2 * size**3 / seconds / 1e12
  x = jax.random.normal(jax.random.key(1), (flags.FLAGS.copy_mib * 2**20 // 4,), jnp.float32)
  seconds = _seconds_per_call(jax.jit(lambda v: v * 1.5), x, repeats=repeats)
  row["bandwidth_gb_per_second"] = 2 * x.nbytes / seconds / 1e9
  print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
