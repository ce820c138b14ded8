#!/usr/bin/env bash
# Fills the git-ignored .gpu/ folder that scripts/gpu_benchmark.sh needs on a GPU machine with no
# network: wheels the CUDA image lacks (ml-collections; tensorboardX, which the main job's metrics
# writer imports: its first GPU run stopped there on 2026-11-28), the MiniLM checkpoint with its weights
# stored in float16 (45 MB: the float32 file's 87 MB would not fit the 64 MiB a device call carries;
# the loader reads them back as float32), and IMDB's labelled reviews (train and the local test
# split, without the unlabelled ones) re-packed as one .tar.gz that the input pipeline reads in place.
# Usage (repo root, venv active): [BASELINE=REV] bash scripts/prepare_gpu_carry.sh [SHARED_DIR]
set -euo pipefail
shared=${1:-../shared}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/minilm
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/whl ml_collections==1.1.0 tensorboardX==2.6.5
# FALLBACK_WHEELS=1: also the flax/optax/orbax versions tested on the CPU (2.3 MB), installed only if
# the image's cannot import bert_jax (they always could so far; the carry is near its limit).
if [ "${FALLBACK_WHEELS:-0}" = 1 ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
fi
minilm="$shared/models/all-MiniLM-L6-v2"
for f in config.json vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$minilm/$f" .gpu/minilm/
done
python3 - "$minilm/model.safetensors" "$shared/data/aclImdb_v1.tar.gz" <<'PY'
import re, sys, tarfile
import numpy as np
from safetensors.numpy import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in weights.items()},
          ".gpu/minilm/model.safetensors", metadata={"format": "pt"})
labelled = re.compile(r"aclImdb/(train|test)/(pos|neg)/[^/]+\.txt$")
kept = 0
with tarfile.open(sys.argv[2], "r:gz") as source, tarfile.open(".gpu/aclImdb_labelled.tar.gz", "w:gz") as out:
  for member in source:
    if member.isfile() and labelled.search(member.name):
      out.addfile(member, source.extractfile(member))
      kept += 1
print("float16 weights:", len(weights), "tensors; labelled reviews:", kept)
PY
# BASELINE=REV: that commit's code too (bert_jax, configs, scripts: 0.4 MB), which the `baseline` sweep
# variant of gpu_benchmark.sh times beside the working tree's on the same machine.
if [ -n "${BASELINE:-}" ]; then
  mkdir -p .gpu/baseline
  git archive "$BASELINE" bert_jax configs scripts | tar -x -C .gpu/baseline
  git rev-parse --short "$BASELINE" > .gpu/baseline/REVISION
fi
du -sh .gpu  # with the repository, under the 64 MiB a device call carries
