#!/usr/bin/env bash
# The GPU figures of docs/performance.md: the chip's measured ceilings, cuDNN numerics against
# float32, a kernel profile, BERT-base bf16 step times (seq 128 and 512, with transformers' PyTorch
# BERT on the same GPU), the pretraining MFU at batch 256 with each speed variant, the length-bucket
# epoch and the default einsum attention for contrast. All stages together take far longer than one
# device call may (10 minutes; each benchmark process 60 to over 100 s on an H100, the first on a
# fresh machine the longest): pick with STAGES.
#
# Needs the git-ignored .gpu/ folder (bash scripts/prepare_gpu_carry.sh). On the lent machine:
#   device run, carry [".gpu"], command "bash scripts/gpu_benchmark.sh"
# Results: $OUT/bench.jsonl (one JSON line per case), $OUT/check_gpu.txt, $OUT/attention.jsonl, $OUT/matmul.jsonl,
# $OUT/main_results.json, $OUT/env.txt, logs.
# STAGES="check profile" runs a subset (default: ceilings check profile base128 base512 sweep recipe128
# einsum128); PROFILE_EINSUM=0 profiles only the cuDNN step;
# PROFILE_ARGS="--case=pretrain_train --config.batch_size=256" picks the traced step; DUMP_HLO=1
# also keeps its optimized HLO ($OUT/hlo_after_optimizations.txt.gz);
# CASES_512="('train','length_buckets')" narrows the seq-512 stage; SWEEP="default gelu_tanh" narrows the
# batch-256 pretraining variants (SWEEP="default baseline baseline default": the default against the code
# of an earlier commit carried in .gpu/baseline, BASELINE=REV bash scripts/prepare_gpu_carry.sh, an A/B on
# one machine; each row of bench.jsonl names its run, "run"); SWEEP_SECONDS (default 150) limits each
# of them (100 s was too short for every variant on 2026-11-27: the timeouts cost most of a lease). BUDGET_SECONDS (the
# device call's timeout_s) cuts each process's limit to what is left of the call, less 20 s, and
# skips what would start with under 30 s left, so a long STAGES list still ends with its summary.
# STAGES=recipe128 times the base_gpu preset as it is at 256 x 128 (BERT's attention dropout in our Pallas
# kernel, which 'auto' picks in bf16; the other stages' `fast` flags run cuDNN without attention dropout).
# STAGES=attention times the attention core alone (scripts/bench_attention.py), STAGES=fused_norm the add & norm
# (scripts/bench_fused_norm.py); STAGES=matmul the layer's
# matmuls, XLA's against jax's Pallas matmul for Hopper (scripts/bench_matmul.py; MATMUL_ARGS, default
# --sweep, MATMUL_ARGS= for the default tiling alone); STAGES=main runs the
# main job (configs/imdb.py:minilm) on all the labelled reviews within MAIN_SECONDS (default 400),
# MAIN_EXTRA="--config.a=1 --config.b=2" adding flags (split at spaces, as BENCH_EXTRA is: no
# spaces inside a value).
# A dry run elsewhere: ATTENTION=dot_product BENCH_EXTRA="--config.dtype=float32 ..." bash scripts/gpu_benchmark.sh
set -u
out=${OUT:-/tmp/bert_jax_gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: the baseline variant runs from .gpu/baseline
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6  # leave room for PyTorch in the same process
attention=${ATTENTION:-cudnn}
read -ra extra <<< "${BENCH_EXTRA:-}"  # flags added to every benchmark and profile run

# Packages the CUDA image lacks; the image's own flax/optax/orbax unless they cannot import ours.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .gpu/whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import bert_jax.benchmark, bert_jax.train" 2> "$out/stderr.log"; then
  tail -n 3 "$out/stderr.log"
  if compgen -G ".gpu/fallback/*.whl" > /dev/null; then
    echo "the image's packages cannot import bert_jax: installing the carried flax/optax/orbax"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/fallback/*.whl
  else
    echo "the image's packages cannot import bert_jax; FALLBACK_WHEELS=1 bash scripts/prepare_gpu_carry.sh carries ours"
  fi
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax, transformers, torch; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$out/env.txt"

fast=(--config.model.attention_impl="$attention" --config.model.attention_probs_dropout_prob=0)
deadline=${BUDGET_SECONDS:+$((BUDGET_SECONDS - 20))}  # in bash's SECONDS, which count from the script's start
limited() {  # limited SECONDS COMMAND...: COMMAND under `timeout`, cut to what BUDGET_SECONDS leaves; 125: skipped
  local seconds=$1 left
  shift
  if [ -n "$deadline" ]; then
    left=$((deadline - SECONDS))
    (( left < 30 )) && return 125
    (( left < seconds )) && seconds=$left
  fi
  timeout -k 10 "$seconds" "$@"
}
explain() {  # explain NAME SECONDS STATUS [LOG]: what became of a `limited` run that exited with STATUS
  case $3 in
    0) ;;
    124|137) echo "$1 timed out (limit $2 s, or what BUDGET_SECONDS left)";;
    125) echo "$1 skipped: under 30 s of BUDGET_SECONDS left";;
    *) echo "$1 failed (exit $3)"; grep -v "^[IW][0-9]" "${4:-$out/stderr.log}" | tail -n 4;;
  esac
}
run_case() {  # run_case NAME SECONDS FLAGS...: JSON lines (with "run": NAME) to bench.jsonl, stderr to stderr.log
  local name=$1 seconds=$2 status
  shift 2
  echo "== $name" | tee -a "$out/stderr.log"
  limited "$seconds" python3 -m bert_jax.benchmark "$@" "${extra[@]}" 2>> "$out/stderr.log" \
    | python3 -c 'import json, sys
for line in sys.stdin:
  try:
    line = json.dumps(dict(json.loads(line), run=sys.argv[1])) + "\n"
  except ValueError:  # not a row: passed on as it is
    pass
  sys.stdout.write(line)' "$name" >> "$out/bench.jsonl"
  status=${PIPESTATUS[0]}
  explain "$name" "$seconds" "$status"
}
profile() {  # profile SECONDS FLAGS...: kernel table to profile.txt
  limited "$1" python3 -m scripts.profile_gpu "${@:2}" "${extra[@]}" --xplane_dir="$out" >> "$out/profile.txt" \
    2>> "$out/stderr.log"
  explain profile "$1" $?
}
for stage in ${STAGES:-ceilings check profile base128 base512 sweep recipe128 einsum128}; do
  case $stage in
    check)
      echo "== numerics: speed switches vs float32 einsum"
      limited 150 python3 -m scripts.check_gpu > "$out/check_gpu.txt" 2>> "$out/stderr.log"
      explain check 150 $?
      cat "$out/check_gpu.txt";;
    matmul)  # the layer's matmuls: cuBLAS against jax's Pallas Hopper matmul (scripts/bench_matmul.py)
      echo "== matmuls"
      read -ra matmul_args <<< "${MATMUL_ARGS---sweep}"  # split at spaces, as BENCH_EXTRA is
      limited 240 python3 -m scripts.bench_matmul "${matmul_args[@]}" > "$out/matmul.jsonl" 2>> "$out/stderr.log"
      explain matmul 240 $?
      python3 - "$out/matmul.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(r["shape"], r["variant"], r["tiling"] or "", r.get("error") or
        f"{r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s" + (f", rel L2 {r['rel_l2']:.1e}" if "rel_l2" in r else ""))
PY
      ;;
    attention)  # the attention core alone: einsums, cuDNN, the Pallas kernel at each tiling
      echo "== attention kernels"
      limited 240 python3 -m scripts.bench_attention --sweep > "$out/attention.jsonl" 2>> "$out/stderr.log"
      explain attention 240 $?
      limited 90 python3 -m scripts.bench_attention --batch=16 --seq=512 >> "$out/attention.jsonl" 2>> "$out/stderr.log"
      explain attention512 90 $?
      python3 - "$out/attention.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(r["shape"], r["variant"], r["tiling"], r.get("error") or
        f"fwd {r['forward_ms']:.3f} ms, fwd+bwd {r['forward_backward_ms']:.3f} ms, "
        f"out {r.get('output_rel_l2', 0):.1e}, grads {max((r.get('grads_rel_l2') or {'-': 0}).values()):.1e}")
PY
      ;;
    fused_norm)  # the add & norm alone: XLA's passes against the Pallas kernel, both drawing the dropout mask
      echo "== add & norm"
      limited 120 python3 -m scripts.bench_fused_norm > "$out/fused_norm.jsonl" 2>> "$out/stderr.log"
      explain fused_norm 120 $?
      python3 - "$out/fused_norm.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
  r = json.loads(line)
  print(r["rows"], r["hidden"], r["variant"], r["tiling"], r.get("error") or
        f"fwd {r['forward_ms']:.3f} ms, fwd+bwd {r['forward_backward_ms']:.3f} ms, "
        f"out {r.get('output_rel_l2', 0):.1e}, grads {max((r.get('grads_rel_l2') or {'-': 0}).values()):.1e}")
PY
      ;;
    ceilings)
      echo "== ceilings"
      limited 60 python3 -m scripts.measure_ceilings >> "$out/env.txt" 2>> "$out/stderr.log"
      explain ceilings 60 $?
      tail -n 1 "$out/env.txt";;
    profile)
      echo "== profile"
      read -ra profile_args <<< "${PROFILE_ARGS:-}"
      [ "${PROFILE_EINSUM:-1}" = 1 ] && profile 120 --config=configs/benchmark.py:base_gpu \
        --config.model.attention_impl=einsum  # PROFILE_EINSUM=0: skip
      if [ "${DUMP_HLO:-0}" = 1 ]; then
        hlo=$(mktemp -d)
        XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$hlo --xla_dump_hlo_module_re=jit_train_step" \
          profile 150 --config=configs/benchmark.py:base_gpu "${fast[@]}" "${profile_args[@]}"
        if compgen -G "$hlo/*jit_train_step*after_optimizations.txt" > /dev/null; then
          cat "$hlo"/*jit_train_step*after_optimizations.txt | gzip > "$out/hlo_after_optimizations.txt.gz"
        else
          echo "no optimized HLO of jit_train_step was dumped"
        fi
      else
        profile 150 --config=configs/benchmark.py:base_gpu "${fast[@]}" "${profile_args[@]}"
      fi
      cat "$out/profile.txt";;
    base128) run_case base128 200 --config=configs/benchmark.py:base_gpu "${fast[@]}" --config.compare_torch=True;;
    b256|sweep)
      # BERT's pretraining batch (256 x 128 tokens); sweep: each speed variant, one process apiece.
      b256=(--config=configs/benchmark.py:base_gpu "${fast[@]}" --config.batch_size=256 "--config.cases=('pretrain_train',)")
      variants=${SWEEP:-default triton_gemm gelu_tanh no_hidden_dropout cudnn_layer_norm cublaslt cublaslt_gelu_tanh b512 scan_remat xla_attention pallas_attention einsum_dropout pallas_dropout xla_norm no_prune stack_layers mosaic_ffn mosaic_ffn_pingpong wait_each}
      [ "$stage" = b256 ] && variants=default
      for variant in $variants; do  # each adds an XLA flag (after config.xla_flags: it wins), a PRNG or a model flag
        xla_flag="" prng=${JAX_DEFAULT_PRNG_IMPL:-threefry2x32} flags=()
        case $variant in
          default) ;;
          triton_gemm) xla_flag=--xla_gpu_enable_triton_gemm=true;;  # XLA's default; configs turn it off
          cudnn_layer_norm) xla_flag=--xla_gpu_enable_cudnn_layer_norm=true;;
          cublaslt) xla_flag=--xla_gpu_enable_cublaslt=true;;
          # Original BERT's tanh GELU, which cuBLASLt can run with the bias in the matmul's epilogue.
          cublaslt_gelu_tanh) xla_flag=--xla_gpu_enable_cublaslt=true flags=(--config.model.hidden_act=gelu_new);;
          b512) flags=(--config.batch_size=512);;  # AdamW and the step's fixed costs spread over twice the tokens
          gelu_tanh) flags=(--config.model.hidden_act=gelu_new);;  # original BERT's GELU: forward in cuBLASLt's epilogue
          no_hidden_dropout) flags=(--config.model.hidden_dropout_prob=0);;
          scan_remat) flags=(--config.model.scan_layers=True --config.model.remat_policy=dots);;
          xla_attention) flags=(--config.model.attention_impl=dot_product);;
          pallas_attention) flags=(--config.model.attention_impl=pallas);;  # our Pallas flash attention
          # BERT's attention dropout 0.1, as the recipe trains: XLA's einsums and mask, or in the Pallas kernels.
          einsum_dropout) flags=(--config.model.attention_impl=einsum --config.model.attention_probs_dropout_prob=0.1);;
          pallas_dropout) flags=(--config.model.attention_impl=pallas --config.model.attention_probs_dropout_prob=0.1);;
          xla_norm) flags=(--config.model.layer_norm_impl=xla);;  # XLA's add & norm (the presets: one Pallas kernel)
          no_prune) flags=(--config.model.prune_last_layer=False);;  # the last layer computes every position
          stack_layers) flags=(--config.model.stack_layers=True);;  # the layers' parameters stacked: ~380 fewer optimizer kernels
          mosaic_ffn) flags=(--config.model.feed_forward_impl=mosaic);;  # the GELU forward and backward in our matmul kernels
          mosaic_ffn_pingpong) flags=(--config.model.feed_forward_impl=mosaic_pingpong);;  # the same, ping-pong schedule
          wait_each) flags=(--config.steps_per_sample=1);;  # the timing before steps_per_sample
          baseline)  # the default from the code of BASELINE=REV bash scripts/prepare_gpu_carry.sh
            if [ ! -d .gpu/baseline ]; then
              echo "baseline: no .gpu/baseline (BASELINE=REV bash scripts/prepare_gpu_carry.sh)"
              continue
            fi
            (cd .gpu/baseline && run_case "baseline $(cat REVISION)" "${SWEEP_SECONDS:-150}" "${b256[@]}")
            continue;;
          *) echo "unknown variant $variant"; continue;;
        esac
        XLA_FLAGS="${XLA_FLAGS:-}${xla_flag:+ $xla_flag}" JAX_DEFAULT_PRNG_IMPL=$prng \
          run_case "${variant/#default/pretrain128_b256}" "${SWEEP_SECONDS:-150}" "${b256[@]}" "${flags[@]}"
      done;;
    base512) run_case base512 400 --config=configs/benchmark.py:base_gpu_512 "${fast[@]}" --config.compare_torch=True \
      --config.tokenizer=.gpu/minilm --config.data_dir=.gpu/aclImdb_labelled.tar.gz ${CASES_512:+"--config.cases=$CASES_512"};;
    main)
      # The README's main job as it runs on the CPU (configs/imdb.py:minilm: one epoch, float32,
      # 'auto' kernels), from the carried float16 copy of the MiniLM weights; MAIN_EXTRA adds flags.
      echo "== main job"
      read -ra main_extra <<< "${MAIN_EXTRA:-}"
      workdir=$(mktemp -d)
      limited "${MAIN_SECONDS:-400}" python3 -m bert_jax.main --config=configs/imdb.py:minilm --workdir="$workdir" \
        --config.init_checkpoint=.gpu/minilm --config.data.data_dir=.gpu/aclImdb_labelled.tar.gz \
        "${main_extra[@]}" > "$out/main.log" 2>&1
      explain main "${MAIN_SECONDS:-400}" $? "$out/main.log"
      grep -E "Kernels|Training|step [0-9]+|Final evaluation|Error" "$out/main.log" | cut -c 1-400 | tail -n 12
      if [ -f "$workdir/results.json" ]; then
        cp "$workdir/results.json" "$out/main_results.json" && cat "$out/main_results.json"
      fi;;
    einsum128) run_case einsum128 120 --config=configs/benchmark.py:base_gpu --config.model.attention_impl=einsum \
      "--config.cases=('train','pretrain_train')";;
    recipe128)  # the preset as it is: BERT's attention dropout 0.1, in our Pallas kernel ('auto' in bf16)
      run_case recipe128 120 --config=configs/benchmark.py:base_gpu --config.batch_size=256 "--config.cases=('pretrain_train',)";;
    *) echo "unknown stage $stage";;
  esac
done

# `if`, not `&&`: a run without benchmark rows (STAGES=main) still exits 0.
if [ -f "$out/bench.jsonl" ]; then python3 - "$out/bench.jsonl" <<'PY'
import json, sys
print(f"{'run':<24}{'case':<15}{'dtype':<9}{'batch':>6}{'seq':>5}{'attn':>12}{'ex/s':>10}{'MFU':>7}{'torch ex/s':>11}{'ratio':>7}"
      f"{'compile s':>10}  settings")
for line in open(sys.argv[1]):
  row = json.loads(line)
  if row["case"] == "length_buckets":
    print(f"length_buckets: padded {row['padded_epoch_seconds']:.1f} s, bucketed {row['bucketed_epoch_seconds']:.1f} s,"
          f" speedup {row['speedup']:.2f}, step s by length {row['step_seconds_by_length']}")
    continue
  mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
  torch_ex = f"{row['torch_examples_per_second']:.0f}" if "torch_examples_per_second" in row else "-"
  ratio = f"{row['ratio']:.2f}" if "ratio" in row else "-"
  print(f"{row.get('run', '')[:23]:<24}{row['case']:<15}{row['dtype']:<9}{row['batch_size']:>6}{row['seq_len']:>5}"
        f"{row.get('attention_impl', '?'):>12}{row['examples_per_second']:>10.1f}{mfu:>7}{torch_ex:>11}{ratio:>7}"
        f"{row['compile_seconds']:>10.1f}  {row.get('hidden_act')} drop={row.get('hidden_dropout_prob')} "
        f"attn_drop={row.get('attention_probs_dropout_prob')} "
        f"norm={row.get('layer_norm_impl')} ffn={row.get('feed_forward_impl')} prune={row.get('prune_last_layer')} "
        f"stacked={row.get('stack_layers')} steps/sample={row.get('steps_per_sample')} "
        f"{row.get('prng_impl')} {row.get('xla_flags')}")
PY
fi
