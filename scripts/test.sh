#!/usr/bin/env bash
# test.sh - sets up (packages, model, build) and runs the whole test suite; exits non-zero
# if any test fails. CUDA parity tests skip with a message where no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "$@"
cd build
ctest --output-on-failure --timeout 900
