"""The benchmark prints one JSON line per case with the figures other tools read."""

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

from bert_jax import benchmark
from bert_jax import device_peaks
from configs import benchmark as benchmark_configs
from scripts import bench_attention


def _tiny_benchmark_config(**overrides):
  config = benchmark_configs.get_config("minilm_cpu")
  config.init_checkpoint = ""
  config.model.update(vocab_size=2000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
  config.update({**dict(batch_size=4, seq_len=16, num_predictions=3, num_steps=1, num_warmup_steps=1), **overrides})
  return config


def test_one_json_line_per_case_with_the_torch_ratio():
  lines = []
  benchmark.run(_tiny_benchmark_config(compare_torch=True), emit=lines.append)
  rows = [json.loads(line) for line in lines]
  assert [row["case"] for row in rows] == ["train", "eval", "pretrain_train"]
  for row in rows:
    assert row["examples_per_second"] > 0 and row["step_seconds"] > 0 and 0 < row["mfu"]
  for row in rows[:2]:
    assert row["ratio"] == row["examples_per_second"] / row["torch_examples_per_second"]
    assert row["paired_ratio_quartiles"] is None  # one sample each: no spread to show
  assert "ratio" not in rows[2]  # the peer comparison covers classification only
  # What else sets the speed is on each row: the dropout PRNG and XLA's flags.
  assert rows[0]["prng_impl"] == jax.config.jax_default_prng_impl
  assert rows[0]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  assert rows[0]["host_cpu"].endswith(f" x {os.cpu_count()}") and len(rows[0]["host_cpu"]) > 4


def test_host_cpu_names_the_processor_model_and_its_cores(tmp_path):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.50GHz\n"
                     "processor\t: 1\nmodel name\t: Example CPU @ 2.50GHz\n")
  assert device_peaks.host_cpu(str(cpuinfo)) == f"Example CPU @ 2.50GHz x {os.cpu_count()}"
  # No cpuinfo (not Linux): the platform's name for the processor instead, never an empty name.
  assert not device_peaks.host_cpu(str(tmp_path / "missing")).startswith(" x ")


def test_a_timed_sample_dispatches_its_steps_back_to_back_and_waits_once():
  events = []

  def step():
    events.append("step")
    return len(events)

  first, per_step = benchmark._median_step_seconds(step, lambda out: events.append(("wait", out)), num_steps=2,
                                                   num_warmup=2, steps_per_sample=3)
  # Compile + first step, one more warm-up step, then two samples of three steps with one wait each.
  assert events == ["step", ("wait", [1]), "step", ("wait", 3),
                    "step", "step", "step", ("wait", [5, 6, 7]), "step", "step", "step", ("wait", [9, 10, 11])]
  assert first > 0 and per_step > 0


def test_compared_runners_take_turns_sample_by_sample_after_their_own_warm_up():
  events = []

  def runner(name):
    return (lambda: events.append(name) or name), (lambda out: events.append(("wait", name)))

  timings = benchmark._interleaved_step_seconds([runner("ours"), runner("torch")], num_steps=4, num_warmup=1)
  waits = [event[1] for event in events if isinstance(event, tuple)]
  # Each warms up alone, then the order alternates so that a drift in speed falls on both alike.
  assert waits == ["ours", "torch", "ours", "torch", "torch", "ours", "ours", "torch", "torch", "ours"]
  assert [len(samples) for _, samples in timings] == [4, 4]


def test_paired_ratio_quartiles_are_our_speed_over_theirs_pair_by_pair():
  ours, theirs = [1.0, 2.0, 1.0, 4.0, 2.0], [2.0, 2.0, 3.0, 4.0, 4.0]  # seconds per step
  assert benchmark.paired_ratio_quartiles(ours, theirs) == [1.0, 2.0, 2.0]  # ratios 2, 1, 3, 1, 2
  assert benchmark.paired_ratio_quartiles(ours[:3], theirs[:3]) is None


def test_mfu_divides_by_the_datasheet_peak_or_a_cpu_matmul_measured_on_the_spot():
  chip = lambda kind: types.SimpleNamespace(platform="gpu" if "TPU" not in kind else "tpu", device_kind=kind)  # noqa: E731
  assert device_peaks.peak_tflops(chip("NVIDIA H100 80GB HBM3"), "bfloat16") == 989.0
  assert device_peaks.peak_tflops(chip("TPU v5 lite"), "bfloat16") == 197.0  # v5e, not v5p's 459
  assert device_peaks.peak_tflops(chip("NVIDIA GeForce RTX 4090"), "bfloat16") is None  # unknown: no MFU
  assert device_peaks.peak_tflops(jax.devices("cpu")[0], "float32") > 0


def test_a_cpu_s_bf16_peak_is_timed_on_the_dot_its_dense_layers_run(monkeypatch):
  # bf16 operands summed into float32 (`projection._contract_as_matrices`): a bf16-output dot would
  # take Eigen's slower path and put MFU above 1.
  assert device_peaks.measured_matmul_tflops("bfloat16", size=64, rounds=1, accumulate="float32") > 0
  measured = []
  monkeypatch.setattr(device_peaks, "measured_matmul_tflops", lambda dtype, **kw: measured.append((dtype, kw)) or 1.0)
  device_peaks.peak_tflops(jax.devices("cpu")[0], "bfloat16")
  assert measured == [("bfloat16", {"accumulate": "float32"})]


def test_a_timed_round_queues_its_calls_and_the_best_round_counts(monkeypatch):
  events = []
  clock = iter([0.0, 6.0, 10.0, 13.0])  # round 1 takes 6 s, round 2 takes 3 s
  monkeypatch.setattr(device_peaks.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(device_peaks.jax, "block_until_ready", lambda out: events.append("wait"))
  seconds = device_peaks.best_seconds_per_call(lambda x: events.append("call"), 1, rounds=2, calls_per_round=3)
  assert seconds == 3.0 / 3  # the best round, per call
  assert events == ["call", "wait"] + (["call"] * 3 + ["wait"]) * 2  # a warm-up, then one wait per round
  with pytest.raises(ValueError, match="calls_per_round=0"):
    device_peaks.best_seconds_per_call(lambda x: x, 1, rounds=2, calls_per_round=0)


def test_ceilings_script_prints_matmul_and_bandwidth_figures():
  result = subprocess.run([sys.executable, "-m", "scripts.measure_ceilings", "--size=128", "--copy_mib=4",
                           "--repeats=2"], capture_output=True, text=True, timeout=120, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["matmul_tflops_bfloat16"] > 0 and row["matmul_tflops_float32"] > 0
  assert row["bandwidth_gb_per_second"] > 0


def test_matmul_script_times_each_of_a_layer_s_products_with_xla_off_hopper():
  result = subprocess.run([sys.executable, "-m", "scripts.bench_matmul", "--tokens=64"], capture_output=True,
                          text=True, timeout=120, check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [(r["shape"], r["variant"]) for r in rows] == [
      ("qkv", "xla"), ("attention_output", "xla"), ("intermediate", "xla"), ("intermediate", "xla_bias_gelu"),
      ("intermediate", "xla_bias_gelu_preactivation"), ("intermediate", "xla_gelu_grad"),
      ("intermediate", "xla_gelu_grad_bias_grad"), ("output", "xla"),
      ("intermediate_weight_grad", "xla")]  # the Pallas kernels need a Hopper GPU
  assert rows[0]["m_k_n"] == [64, 768, 2304] and rows[-1]["m_k_n"] == [768, 64, 3072]
  assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
  gelu_rows = [r for r in rows if "gelu" in r["variant"]]
  assert len(gelu_rows) == 4 and all(0 < r["rel_l2"] < 1e-2 for r in gelu_rows)  # bf16 against float32


def test_attention_script_gives_each_variant_its_gradients_in_bf16_off_the_gpu():
  # The float32 reference of the dropout kernel returns float32 for bf16 inputs: its cotangent must follow
  # (a bf16 one failed its row on the eleventh lease, and pallas_dropout was compared with no-dropout values).
  result = subprocess.run([sys.executable, "-m", "scripts.bench_attention", "--batch=4", "--seq=16", "--heads=2",
                           "--head-dim=8", "--dtype=bfloat16"], capture_output=True, text=True, timeout=120,
                          check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r["variant"] for r in rows] == ["einsum", "einsum_dropout", "einsum_with_pallas_mask"]  # no kernels off GPU
  assert all("error" not in r and r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)


def test_the_attention_script_compares_the_dropout_kernel_with_the_einsums_given_its_mask():
  assert bench_attention.reference_for("pallas_dropout") == "einsum_with_pallas_mask"
  assert bench_attention.reference_for("cudnn") == bench_attention.reference_for("pallas") == "einsum"
  assert [bench_attention.reference_for(v) for v in ("einsum", "einsum_with_pallas_mask", "einsum_dropout")] == [
      None, None, None]  # the references, and the einsums with a mask of their own


def test_flops_formula_counts_attention_and_the_mlm_head():
  config = benchmark_configs.get_config("base_gpu")
  model_config = benchmark.models.BertConfig()
  d, L, I, V, T = 768, 12, 3072, 30522, 128
  assert benchmark.forward_flops(model_config, T) == 2 * T * L * (4 * d * d + 2 * d * I) + 4 * L * T * T * d
  assert benchmark.forward_flops(model_config, T, 20) - benchmark.forward_flops(model_config, T) == (
      2 * 20 * (d * d + d * V))
  assert config.dtype == "bfloat16"


def test_the_gpu_presets_keep_berts_attention_dropout_with_the_kernel_auto_picks():
  for preset in ("base_gpu", "base_gpu_512"):
    config = benchmark_configs.get_config(preset)
    assert config.model.attention_impl == "auto" and config.model.attention_probs_dropout_prob is None  # 0.1


def test_the_cpu_bf16_preset_is_the_cpu_preset_in_bf16_with_ynnpack_matmuls():
  cpu, bf16 = benchmark_configs.get_config("minilm_cpu"), benchmark_configs.get_config("minilm_cpu_bf16")
  assert (bf16.dtype, bf16.model.dtype, cpu.dtype) == ("bfloat16", "bfloat16", "float32")
  assert "--xla_cpu_experimental_ynn_fusion_type=" in cpu.xla_flags.split()  # Eigen for float32
  assert "--xla_cpu_experimental_ynn_fusion_type=" not in bf16.xla_flags.split()  # XLA's default: YNNPACK
  differs = {key for key in cpu.keys() if cpu[key] != bf16[key]}
  assert differs == {"dtype", "model", "xla_flags"}
  assert cpu.model.to_dict() == {**bf16.model.to_dict(), "dtype": "float32"}


def test_flops_of_a_pruned_last_layer_leave_out_the_rows_it_does_not_compute():
  plain, pruned = benchmark.models.BertConfig(), benchmark.models.BertConfig(prune_last_layer=True)
  d, I, T, P = 768, 3072, 128, 20
  for predictions, rows in ((0, 1), (P, 1 + P)):  # classification reads [CLS]; pretraining also the predictions
    # The last layer's queries, attention output, feed-forward and attention skip T - rows rows.
    skipped = 2 * (T - rows) * (2 * d * d + 2 * d * I) + 4 * (T - rows) * T * d
    assert benchmark.forward_flops(plain, T, predictions) - benchmark.forward_flops(pruned, T, predictions) == skipped
  # Under scan_layers the switch does not apply: every position is computed.
  assert (benchmark.forward_flops(pruned.replace(scan_layers=True), T, P)
          == benchmark.forward_flops(plain.replace(scan_layers=True), T, P))


def test_compile_depth_reports_trace_and_compile_seconds_unrolled_and_scanned():
  lines = []
  config = _tiny_benchmark_config(cases=("compile_depth",), compile_depths=(2,))  # each model: one compile
  config.model.update(attention_impl="dot_product", attention_probs_dropout_prob=0.0, remat_policy="dots")
  benchmark.run(config, emit=lines.append)
  rows = [json.loads(line) for line in lines]
  assert [(row["num_hidden_layers"], row["scan_layers"]) for row in rows] == [(2, False), (2, True)]
  for row in rows:
    assert row["case"] == "compile_depth" and row["compile_seconds"] > 0 and row["trace_seconds"] > 0
    assert (row["attention_impl"], row["remat_policy"]) == ("dot_product", "dots")  # switches flow via config.model


def test_training_cases_refuse_fused_attention_with_attention_dropout():
  config = _tiny_benchmark_config(cases=("train",))
  config.model.update(attention_impl="dot_product", attention_probs_dropout_prob=0.1)
  with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
    benchmark.run(config, emit=lambda line: None)


def test_unknown_case_is_named():
  with pytest.raises(ValueError, match=r"unknown case\(s\) \['trian'\]"):
    benchmark.run(_tiny_benchmark_config(cases=("trian",)), emit=lambda line: None)


def test_zero_steps_per_sample_is_refused():
  with pytest.raises(ValueError, match=r"steps_per_sample=0: give 1"):
    benchmark.run(_tiny_benchmark_config(steps_per_sample=0), emit=lambda line: None)


def test_length_buckets_case_prices_a_padded_and_a_bucketed_epoch(tmp_path, minilm_dir):
  from imdb_testdata import make_archive, write_imdb  # pylint: disable=g-import-not-at-top
  words = "a film with some words and more words in it".split()
  reviews = {("train", cls): [" ".join(words[:2 + i % 9] * (1 + i % 3)).encode() for i in range(24)]
             for cls in ("neg", "pos")}
  archive = make_archive(write_imdb(tmp_path / "imdb", splits=("train",), reviews=reviews), tmp_path / "imdb.tar.gz")
  config = _tiny_benchmark_config(cases=("length_buckets",), data_dir=str(archive), tokenizer=str(minilm_dir),
                                  seq_len=32, length_buckets=(8, 16), num_reviews=40)
  config.model.vocab_size = 30522  # the MiniLM vocab's ids index real embeddings
  lines = []
  benchmark.run(config, emit=lines.append)
  (row,) = [json.loads(line) for line in lines]
  assert row["case"] == "length_buckets" and row["num_reviews"] == 40 and row["num_batches"] == 10
  assert row["padded_batches_by_length"] == {"32": 10}
  assert sum(row["bucketed_batches_by_length"].values()) == 10
  assert set(row["bucketed_batches_by_length"]) <= {"8", "16", "32"} and len(row["bucketed_batches_by_length"]) > 1
  assert row["bucketed_real_token_fraction"] > row["padded_real_token_fraction"]
  for name in ("padded", "bucketed"):  # an epoch costs the timed step of each of its batches' widths
    expected = sum(count * row["step_seconds_by_length"][width]
                   for width, count in row[f"{name}_batches_by_length"].items())
    assert row[f"{name}_epoch_seconds"] == pytest.approx(expected)
  assert row["speedup"] == pytest.approx(row["padded_epoch_seconds"] / row["bucketed_epoch_seconds"])
  assert row["bucketed_compile_seconds"] > 0 and row["padded_compile_seconds"] > 0
