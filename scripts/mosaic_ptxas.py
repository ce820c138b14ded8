"""Registers and spills of the Mosaic GPU kernels that scripts/bench_matmul.py times, compiled for an H100
on a machine without a GPU: one JSON line per kernel row, from ptxas's own report.

A check between GPU leases: an epilogue that spills, or a tiling that takes more registers than jax's
plain matmul (which runs at cuBLAS's speed), shows here before a GPU times it. Not a timing.

Setup: `scripts/gpu_hlo.py`'s venv (jax's CUDA plugin, whose ptxas compiles the kernels). From the repo root:
  /tmp/gpu_hlo/bin/python -m scripts.mosaic_ptxas [--tokens=32768]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp


def parse_ptxas(report: str) -> dict:
  """Registers a thread, spill stores and loads (bytes), and ptxas's numbered notes, from `ptxas -v`'s text.

  A kernel with warpgroups of different roles sets their registers at run time (`setmaxnreg`): the count
  is the launch's, the same 168 for every kernel here at 384 threads a CTA.
  """
  registers = re.search(r"Used (\d+) registers", report)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  if registers is None or spills is None:
    raise ValueError(f"not a ptxas -v report: {report[:200]!r}")
  return {"registers": int(registers.group(1)), "spill_store_bytes": int(spills.group(1)),
          "spill_load_bytes": int(spills.group(2)), "ptxas_notes": sorted(set(re.findall(r"\(C\d+\)", report)))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=256 * 128)
  args = parser.parse_args()
  dump = pathlib.Path(tempfile.mkdtemp(prefix="mosaic_ptxas_"))
  # Read by jax's CUDA plugin when it compiles a Mosaic GPU kernel: ptxas's report (-v) beside the PTX, there.
  os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_TO=str(dump))
  jax.config.update("jax_platforms", "cpu")  # before a backend starts: no CUDA driver needed
  from scripts import bench_matmul  # pylint: disable=g-import-not-at-top
  from scripts import gpu_hlo  # pylint: disable=g-import-not-at-top

  sharding = jax.sharding.SingleDeviceSharding(gpu_hlo.h100_devices()[0])
  m, k, n = bench_matmul.shapes(args.tokens)["intermediate"]
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)  # noqa: E731
  rows = [("mosaic", lambda t=t: bench_matmul.mosaic_matmul(t), (spec(m, k), spec(k, n)))
          for t in bench_matmul.mosaic_tilings(False)]
  rows += [(bench_matmul.variant_name(**v), lambda v=v: bench_matmul.mosaic_bias_gelu(**v),
            (spec(m, k), spec(k, n), spec(n)))
           for v in bench_matmul.epilogue_variants()]
  rows += [(bench_matmul.gelu_grad_variant_name(**v), lambda v=v: bench_matmul.mosaic_gelu_grad(**v),
            (spec(m, k), spec(k, n), spec(m, n)))
           for v in bench_matmul.gelu_grad_variants() if not v.get("with_bias_grad")]  # the same kernel as another
  try:
    with gpu_hlo.compiling_for_h100():  # the kernels' grid: one CTA per SM of an H100
      for variant, make, operands in rows:
        print(json.dumps(_compiled_row(variant, make, operands, dump, (m, k, n))), flush=True)
  finally:
    shutil.rmtree(dump)


def _compiled_row(variant, make, operands, dump: pathlib.Path, mkn) -> dict:
  fn, tiling = make()
  seen = set(dump.glob("*.ptxas"))
  row = {"variant": variant, "m_k_n": list(mkn), "tiling": tiling}
  try:
    fn.trace(*operands).lower().compile()
    (report,) = set(dump.glob("*.ptxas")) - seen
    row.update(parse_ptxas(report.read_text()))
  except Exception as e:  # noqa: BLE001  # a row that does not compile is reported, the others still run
    row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
  for log in dump.glob("*.mlir-passes.log"):  # tens of MB a kernel
    log.unlink()
  return row


if __name__ == "__main__":
  main()
