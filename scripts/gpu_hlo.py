"""A benchmark train step compiled for an H100 on a machine without a GPU: its kernels and their bytes.

With jax's CUDA plugin installed, XLA compiles for a GPU described by a target config, no GPU needed
(deviceless ahead-of-time compilation). This prints what the compiled step launches, grouped by kind
(cuBLAS matmuls, cuDNN attention, Pallas kernels, XLA's fusions by name), with the bytes each group
reads and writes and what those bytes take at the H100's memory bandwidth. A check of the program's
structure between GPU leases (which fusions XLA forms, what a code change adds or removes), not a
timing: the figures are bytes, counted as each kernel's operands and outputs whole (an operand that a
fusion only slices: the slices). Only the ENTRY
computation is read: a `while` (scanned layers) or `call` there is listed as one entry, and a warning
says so.

Setup, once (a separate venv: the plugin and its NVIDIA libraries are about 3 GB):
  python3 -m venv /tmp/gpu_hlo && /tmp/gpu_hlo/bin/pip install "jax[cuda12]==$(python -c \
      'import jax; print(jax.__version__)')" && /tmp/gpu_hlo/bin/pip install -e .
Then, from the repo root, with the benchmark's config flags:
  /tmp/gpu_hlo/bin/python -m scripts.gpu_hlo --config=configs/benchmark.py:base_gpu --config.dtype=bfloat16 \
      --config.batch_size=256 --config.model.attention_impl=cudnn --config.model.attention_probs_dropout_prob=0
--grep=REGEX lists the single kernels whose name or op name matches; --hlo_out=FILE keeps the HLO.
"""

from __future__ import annotations

import collections
import contextlib
import math
import re
from unittest import mock

import flax.linen as nn
import jax
from absl import app
from absl import flags
from jax.experimental import topologies

from bert_jax import benchmark  # defines --config
from bert_jax import partitioning
from bert_jax import state as state_lib
from bert_jax.models import feed_forward

flags.DEFINE_enum("case", "pretrain_train", ["train", "pretrain_train"], "Which train step to compile.")
flags.DEFINE_string("grep", "", "List the kernels whose name or op name matches this regex.")
flags.DEFINE_string("hlo_out", "", "Write the compiled HLO here.")

# XLA's GpuTargetConfigProto for an H100 SXM (132 SMs, 228 KiB shared memory per SM, 50 MiB L2).
H100_TARGET_CONFIG = """
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  core_count: 132
  fpus_per_core: 128
  threads_per_warp: 32
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  l2_cache_size: 52428800
  memory_bandwidth: 3350000000000
  clock_rate_ghz: 1.98
  device_memory_size: 85520809984
}
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
"""
H100_BANDWIDTH = float(re.search(r"memory_bandwidth: (\d+)", H100_TARGET_CONFIG)[1])  # bytes/s
H100_SMS = int(re.search(r"core_count: (\d+)", H100_TARGET_CONFIG)[1])

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}  # no kernel


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (a tuple's elements summed)."""
  return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(shape))


# Ops through which a fusion's parameter reaches a slice without being read whole.
_PASS_THROUGH = {"convert", "bitcast", "copy", "reshape"}


def _parse(lines) -> dict[str, tuple[str, str, list[str], str]]:
  """`name -> (shape, opcode, operand names, the text after the opcode's parenthesis)` of a computation's
  instructions."""
  out = {}
  for line in lines:
    match = _INSTRUCTION.match(line)
    if match:
      name, shape, opcode, rest = match.groups()
      out[name] = (shape, opcode, re.findall(r"%([\w.\-]+)", rest.split("),")[0]), rest)
  return out


def fused_parameter_reads(hlo_text: str) -> dict[str, list[int | None]]:
  """For each fused computation, the bytes read of each parameter that reaches only slices (through
  `_PASS_THROUGH` ops): the slices' elements at the parameter's element size. None: read whole."""
  reads = {}
  for block in re.split(r"\n(?=%)", hlo_text):
    header = re.match(r"%([\w.\-]+) \(", block)
    if not header:
      continue
    instructions = _parse(block.split("\n}")[0].split("\n")[1:])  # this computation's lines only
    users = collections.defaultdict(list)
    for name, (_, _, operands, _) in instructions.items():
      for operand in operands:
        users[operand].append(name)

    def sliced_elements(name):  # elements read through slices, or None if something reads it whole
      if not users[name]:  # the fusion's output (its ROOT): read whole
        return None
      total = 0
      for user in users[name]:
        shape, opcode, _, _ = instructions[user]
        if opcode == "slice":
          total += shape_bytes(shape) // _BYTES[_ARRAY.search(shape).group(1)]
        elif opcode in _PASS_THROUGH and (inner := sliced_elements(user)) is not None:
          total += inner
        else:
          return None
      return total

    params = sorted((int(rest.split(")")[0]), name) for name, (_, opcode, _, rest) in instructions.items()
                    if opcode == "parameter")
    per_param = []
    for _, name in params:
      shape = instructions[name][0]
      elements = sliced_elements(name)
      read = None if elements is None else elements * _BYTES[_ARRAY.search(shape).group(1)]
      per_param.append(None if read is None or read >= shape_bytes(shape) else read)
    reads[header.group(1)] = per_param
  return reads


def entry_kernels(hlo_text: str) -> list[dict]:
  """The ENTRY computation's instructions that run as kernels: name, group, op name, bytes read and written.

  A fusion's operand counts whole, unless the fusion only slices it: then what the slices take. An
  operand given twice counts once."""
  entry = hlo_text[hlo_text.index("\nENTRY"):].split("\n")[1:]
  parameter_reads = fused_parameter_reads(hlo_text)
  sizes, kernels = {}, []
  for line in entry:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, rest = match.groups()
    sizes[name] = shape_bytes(shape)
    if opcode in _FREE:
      continue
    operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    called = re.search(r"calls=%([\w.\-]+)", rest)
    sliced = parameter_reads.get(called.group(1), []) if opcode == "fusion" and called else []
    # An array passed to one kernel several times counts once: our flash attention takes the stacked
    # Q/K/V projection as its query, key and value, each a third of it. (A fusion that slices one
    # operand twice, differently, would be charged its first slice only; none does here.)
    read = sum(sliced[i] if i < len(sliced) and sliced[i] is not None else sizes.get(o, 0)
               for i, o in enumerate(operands) if o not in operands[:i])
    # A fusion's group is its name without the number (`loop_select_fusion.12` -> `loop_select_fusion`).
    group = target.group(1) if target else f"{opcode}: {re.sub(r'[.0-9]+$', '', name)}"
    kernels.append(dict(name=name, group=group, op_name=op_name.group(1) if op_name else "",
                        read=read, written=sizes[name]))
  return kernels


def print_summary(kernels: list[dict], grep: str) -> None:
  groups = collections.defaultdict(lambda: [0, 0])
  for k in kernels:
    groups[k["group"]][0] += 1
    groups[k["group"]][1] += k["read"] + k["written"]
  print(f"{len(kernels)} kernels per step")
  nested = sorted({k["group"] for k in kernels if k["group"].split(":")[0] in ("while", "call", "conditional")})
  if nested:
    print(f"warning: {nested} run computations of their own, whose kernels are not listed one by one")
  print(f"{'kernels':>8} {'GB':>8} {'ms at HBM':>10}  group")
  for group, (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
    print(f"{count:8d} {nbytes / 1e9:8.3f} {nbytes / H100_BANDWIDTH * 1e3:10.2f}  {group}")
  outside = sum(k["read"] + k["written"] for k in kernels if not k["group"].startswith("__cublas"))
  print(f"outside the matmuls: {outside / 1e9:.2f} GB, {outside / H100_BANDWIDTH * 1e3:.2f} ms at HBM bandwidth")
  if grep:
    for k in kernels:
      if re.search(grep, k["name"]) or re.search(grep, k["op_name"]):
        print(f"{k['name'][:36]:36} {k['group'][:28]:28} read {k['read'] / 1e6:8.1f} MB  "
              f"written {k['written'] / 1e6:8.1f} MB  {k['op_name'][-90:]}")


def compile_step(config, case: str, mesh) -> str:
  """The optimized HLO of the benchmark's `case` train step over `mesh`, as `bert_jax.train` jits it."""
  model_config = state_lib.model_config(config)
  module, loss_fn = benchmark.case_model(case, model_config)
  train_step, abstract_state = benchmark.abstract_train_step(module, config, mesh, loss_fn)
  num_predictions = config.num_predictions if case == "pretrain_train" else 0
  batch = benchmark.abstract_batch(model_config, config, mesh, num_predictions)
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.RULES):
    return train_step.lower(abstract_state, batch).compile().as_text()


def h100_devices():
  """The devices of one H100 described by `H100_TARGET_CONFIG`, for XLA to compile for without a GPU."""
  return topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1").devices


@contextlib.contextmanager
def compiling_for_h100():
  """The model picks and checks its kernels ('auto', cuDNN, the Pallas add & norm's interpret mode, the
  feed-forward's Hopper kernels and their grid of one CTA per SM) by the default backend and device, the
  CPU's here: inside, it is told it runs on the H100 it is compiled for."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu  # pylint: disable=g-import-not-at-top
  with (mock.patch.object(jax, "default_backend", return_value="gpu"),
        mock.patch.object(feed_forward, "check_backend"),
        mock.patch.object(hopper_matmul_mgpu, "get_num_sms", return_value=H100_SMS)):
    yield


def main(argv):
  del argv
  config = flags.FLAGS.config
  # Before any backend starts: the CPU is JAX's only backend (no CUDA driver needed); the CUDA plugin
  # still compiles for the target config.
  jax.config.update("jax_platforms", "cpu")
  partitioning.add_xla_flags(config.get("xla_flags", ""))
  mesh = partitioning.make_mesh(config.mesh_shape, h100_devices())
  with compiling_for_h100():
    hlo_text = compile_step(config, flags.FLAGS.case, mesh)
  if flags.FLAGS.hlo_out:
    with open(flags.FLAGS.hlo_out, "w") as f:
      f.write(hlo_text)
  print_summary(entry_kernels(hlo_text), flags.FLAGS.grep)


if __name__ == "__main__":
  app.run(main)
