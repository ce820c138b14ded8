"""The device's two ceilings, measured: matmul TFLOP/s and memory bandwidth (one JSON line).

Run from the repo root: `python -m scripts.measure_ceilings [--size=8192] [--copy_mib=2048]`.
The matmul is a `size`-cube product of random normal matrices in bfloat16 (and float32); the
bandwidth is a scale of a `copy_mib` float32 array, counting the bytes read plus those written.
MFU in `bert_jax.benchmark` is against the datasheet peak; these say what the chip reaches here.
"""

import json

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from bert_jax import device_peaks

flags.DEFINE_integer("size", 8192, "Side of the square matrices.")
flags.DEFINE_integer("copy_mib", 2048, "Size of the array of the bandwidth test, in MiB.")
flags.DEFINE_integer("repeats", 20, "Calls queued back to back per timed round (best of 3 rounds).")


def main(argv):
  del argv
  size, repeats = flags.FLAGS.size, flags.FLAGS.repeats
  row = {"device": jax.devices()[0].device_kind, "size": size}
  for dtype in ("bfloat16", "float32"):
    row[f"matmul_tflops_{dtype}"] = device_peaks.measured_matmul_tflops(dtype, size, rounds=3,
                                                                        calls_per_round=repeats)
  x = jax.random.normal(jax.random.key(1), (flags.FLAGS.copy_mib * 2**20 // 4,), jnp.float32)
  seconds = device_peaks.best_seconds_per_call(jax.jit(lambda v: v * 1.5), x, rounds=3, calls_per_round=repeats)
  row["bandwidth_gb_per_second"] = 2 * x.nbytes / seconds / 1e9
  print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
