#!/usr/bin/env bash
# Fills the git-ignored .gpu/ folder that scripts/gpu_benchmark.sh needs on a GPU machine with no
# network: wheels the CUDA image lacks (ml-collections), the bert-base-uncased vocab (from the MiniLM
# checkpoint, without its weights) and the same 2,000 IMDB train reviews the length_buckets case
# samples from the full archive (seed 0), as an aclImdb/ folder.
# Usage (repo root, venv active): bash scripts/prepare_gpu_carry.sh [SHARED_DIR]
set -euo pipefail
shared=${1:-../shared}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/fallback .gpu/minilm .gpu/imdb
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/whl ml_collections==1.1.0
# Used only if the image's flax/optax/orbax cannot import bert_jax: the versions tested on the CPU.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .gpu/fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
for f in config.json vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
  cp "$shared/models/all-MiniLM-L6-v2/$f" .gpu/minilm/
done
python3 - "$shared/data/aclImdb_v1.tar.gz" <<'PY'
import os, sys
from bert_jax import benchmark, input_pipeline
reviews = input_pipeline.load_imdb_split(sys.argv[1], "train")
sample = benchmark.sample_reviews(reviews, 2000)  # the length_buckets case's sample of the full split
for rank, i in enumerate(sample):
  folder = os.path.join(".gpu/imdb/aclImdb/train", input_pipeline.CLASSES[reviews.labels[i]])
  os.makedirs(folder, exist_ok=True)
  # Names keep the sorted order of the sample within each class.
  with open(os.path.join(folder, f"{rank:05d}_0.txt"), "w") as f:
    f.write(reviews.texts[i])
print("wrote", len(sample), "reviews")
PY
du -sh .gpu
