#!/usr/bin/env bash
# main.sh - the main job on a fresh machine: set up (packages, model, build), print the
# perplexity of the default model on the first 16k tokens of the default eval text
# (context 512), then generate a short completion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
THREADS=$(nproc)
echo "== perplexity: SmolLM2-135M-Instruct Q4_1 on data/corpora/eval-debian-handbook.txt (first 16384 tokens, ctx 512)"
./build/kvcodec ppl --text data/corpora/eval-debian-handbook.txt --tokens 16384 --ctx 512 --threads "$THREADS"
echo "== generate (greedy, 48 tokens)"
./build/kvcodec generate --threads "$THREADS" --max-tokens 48 --stats \
  --prompt "The history of the Debian project began in 1993, when Ian Murdock"
