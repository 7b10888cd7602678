#!/usr/bin/env bash
# main.sh - the main job on a fresh machine: set up (packages, model, build), print the
# perplexity of the default model on the first 16k tokens of the default eval text
# (context 512), generate a short completion, then capture real K/V from the train corpus
# and train a small codec on them (outputs in out/, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
THREADS=$(nproc)
echo "== perplexity: SmolLM2-135M-Instruct Q4_1 on data/corpora/eval-debian-handbook.txt (first 16384 tokens, ctx 512)"
./build/kvcodec ppl --text data/corpora/eval-debian-handbook.txt --tokens 16384 --ctx 512 --threads "$THREADS"
echo "== generate (greedy, 48 tokens)"
./build/kvcodec generate --threads "$THREADS" --max-tokens 48 --stats \
  --prompt "The history of the Debian project began in 1993, when Ian Murdock"
mkdir -p out
echo "== capture: pre-RoPE K, V, Q of all layers over 4096 tokens of data/corpora/train-python-docs.txt"
./build/kvcodec capture --text data/corpora/train-python-docs.txt --tokens 4096 --threads "$THREADS" --out out/kv_train4k.h5
echo "== train: linear K/V codecs, latent 32 of 64, with cross-layer reuse analysis (per-layer table below)"
./build/kvcodec train --data out/kv_train4k.h5 --latent 32 --epochs 20 --warmup 20 --lr 3e-3 --threads "$THREADS" \
  --reuse threshold=0.25 --out out/codec_ae32.h5 | tail -n 32
echo "== wrote out/kv_train4k.h5 and out/codec_ae32.h5 (kvcodec inspect FILE shows them); the committed default"
echo "   codecs trained on 32k tokens are in checkpoints/ (docs/training.md)"
