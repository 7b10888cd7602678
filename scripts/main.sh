#!/usr/bin/env bash
# main.sh - the main job on a fresh machine, end to end: set up (packages, model, build),
# generate a short completion, capture real K/V from a subset of the train corpus, train a
# latent-32 codec on them, then sweep a small grid of compressed caches (that codec, KIVI
# int8/int4, eviction policies) on the eval corpus and print the table and the plots' paths.
# Outputs in out/ (git-ignored); a rerun reuses the capture, the codec and finished sweep
# points (rm -rf out/ to start over). About 6 minutes on 2 cores once set up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
THREADS=$(nproc)
export OMP_WAIT_POLICY=PASSIVE
mkdir -p out
echo "== generate (greedy, 32 tokens, through an int8 cache)"
./build/kvcodec generate --threads "$THREADS" --max-tokens 32 --stats --repr int8 \
  --prompt "The history of the Debian project began in 1993, when Ian Murdock"
if [ ! -f out/kv_train8k.h5 ]; then
  echo "== capture: pre-RoPE K, V, Q of all 30 layers over 8192 tokens of data/corpora/train-python-docs.txt"
  ./build/kvcodec capture --text data/corpora/train-python-docs.txt --tokens 8192 --threads "$THREADS" \
    --out out/kv_train8k.h5
fi
if [ ! -f out/codec_ae32.h5 ]; then
  echo "== train: linear K/V codecs, latent 32 of 64, cross-layer reuse where the error is <= 0.25"
  ./build/kvcodec train --data out/kv_train8k.h5 --latent 32 --epochs 20 --warmup 20 --lr 3e-3 \
    --threads "$THREADS" --reuse threshold=0.25 --out out/codec_ae32.h5
fi
echo "== sweep: configs/main.grid on data/corpora/eval-debian-handbook.txt (prefill 512, compress, score 64; 8 samples)"
./build/kvcodec sweep --grid configs/main.grid --out out/sweeps/main --threads "$THREADS" \
  --peers 'docs/peers/kvpress.csv;docs/peers/llamacpp.csv'
echo "== done: table above; out/sweeps/main/results.csv, results.json, pareto.png (ours and the peer tools)."
echo "   The full results with every method: docs/results.md"
