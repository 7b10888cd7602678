#!/usr/bin/env bash
# test-sanitize.sh - builds kvcodec with AddressSanitizer and UndefinedBehaviorSanitizer
# (build-asan/, CUDA off, -O1 -g) and runs the whole test suite under them; exits non-zero
# on any failure or sanitizer report. Part of .ci/run.
#   usage: scripts/test-sanitize.sh [ctest arguments, e.g. -R test_capture]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-build
echo "[test-sanitize] building build-asan/ (ASan + UBSan)" >&2
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DKVC_SANITIZE=ON -DKVC_CUDA=OFF >/dev/null
if ! cmake --build build-asan -j"$(nproc)" >build-asan/build.log 2>&1; then
  tail -40 build-asan/build.log >&2
  echo "[test-sanitize] ERROR: build failed (build-asan/build.log)" >&2
  exit 1
fi
# abort on the first report of either sanitizer, so ctest sees a failure
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=0:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
cd build-asan
ctest --output-on-failure --timeout 1800 "$@"
