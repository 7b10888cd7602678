#!/usr/bin/env bash
# transform_codec.sh - the measurements behind docs/transform.md (not a test): captures K/V of
# the train corpus, trains transform codecs at several rates and variants, and measures them
# and the baselines with the context protocol on the eval corpus, one JSON per point in
# docs/results/transform/. Every step skips what already exists, so a rerun resumes.
#   usage: bench/transform_codec.sh [--samples 66] [--chunk 512] [--only REGEX] [--threads N]
# Headline protocol: prefill 512 eval tokens in one chunk, compress, score the next 64; 66
# samples = 4,158 scored tokens; 95% bootstrap intervals over samples.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=66 CHUNK=512 ONLY="" THREADS=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --samples) SAMPLES="$2"; shift ;;
    --chunk) CHUNK="$2"; shift ;;
    --only) ONLY="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "transform_codec.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done
K=./build/kvcodec
OUT=docs/results/transform
mkdir -p out "$OUT"
CAP=out/kv_train40k.h5
[ -f "$CAP" ] || $K capture --text data/corpora/train-python-docs.txt --tokens 40960 --out "$CAP" --threads "$THREADS"

# name | train flags (empty: not a transform codec)
train() { # name flags...
  local name=$1; shift
  [ -f "out/$name.h5" ] && return 0
  echo "== train $name: $*" >&2
  /usr/bin/time -f "$name: %e s wall, %U s user" $K train --codec transform --data "$CAP" --out "out/$name.h5" \
    --threads "$THREADS" --quiet "$@" 2>>"$OUT/train-times.txt"
}
train tc_b2 --bits 2
train tc_b1.5 --bits 1.5
train tc_b1.25 --bits 1.25
train tc_b3 --bits 3
train tc_b2_perhead --bits 2 --per-head
train tc_b2_nopred --bits 2 --no-predict
train tc_b2_uniform --bits 2 --quant uniform
train tc_b2_mse --bits 2 --weights mse
train tc_b2_kl --bits 2 --calibrate kl
train tc_b1.5_kl --bits 1.5 --calibrate kl

# name | repr | keep
POINTS=(
  "f16|f16|full"
  "int8|int8|full"
  "int4|int4|full"
  "int2|int2|full"
  "ae32-int8|ae:checkpoints/smollm2-135m-ae32.h5,int8|full"
  "tc_b3|tc:out/tc_b3.h5|full"
  "tc_b2|tc:out/tc_b2.h5|full"
  "tc_b1.5|tc:out/tc_b1.5.h5|full"
  "tc_b1.25|tc:out/tc_b1.25.h5|full"
  "tc_b2_kl|tc:out/tc_b2_kl.h5|full"
  "tc_b1.5_kl|tc:out/tc_b1.5_kl.h5|full"
  "tc_b2_perhead|tc:out/tc_b2_perhead.h5|full"
  "tc_b2_nopred|tc:out/tc_b2_nopred.h5|full"
  "tc_b2_uniform|tc:out/tc_b2_uniform.h5|full"
  "tc_b2_mse|tc:out/tc_b2_mse.h5|full"
  "tc_b2_nosinks|tc:out/tc_b2.h5,sinks=0|full"
  "tc_b2+h2o50|tc:out/tc_b2.h5|h2o:budget=0.5"
  "tc_b1.5_kl+h2o50|tc:out/tc_b1.5_kl.h5|h2o:budget=0.5"
  "int4+h2o50|int4|h2o:budget=0.5"
)
for p in "${POINTS[@]}"; do
  IFS='|' read -r name repr keep <<<"$p"
  [ -n "$ONLY" ] && ! [[ "$name" =~ $ONLY ]] && continue
  j="$OUT/$name.s$SAMPLES.c$CHUNK.json"
  [ -f "$j" ] && continue
  echo "== eval $name ($repr / $keep)" >&2
  $K eval --repr "$repr" --keep "$keep" --measures context --samples "$SAMPLES" --chunk "$CHUNK" \
    --threads "$THREADS" --json "$j" | tail -4
done
echo "== done: $OUT" >&2
