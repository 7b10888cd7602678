#!/usr/bin/env bash
# test-install.sh - installs the build into a temporary prefix and builds examples/ against it
# twice, as an engine would: with CMake's find_package(kvcodec) and with pkg-config; then runs
# codec_demo on the committed codec and fixture. Fails loudly on any step. Part of .ci/run.
#   usage: scripts/test-install.sh [BUILD_DIR]   (default build/, made by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build}
P=$(mktemp -d /tmp/kvcodec-install.XXXXXX)
trap 'rm -rf "$P"' EXIT
say() { printf '[test-install] %s\n' "$*" >&2; }
cmake --install "$B" --prefix "$P" >/dev/null
say "installed into $P: $(cd "$P" && find . -name '*.so*' -o -name '*.pc' -o -name 'kvcodecConfig.cmake' | tr '\n' ' ')"
run_demo() {
  LD_LIBRARY_PATH="$P/lib:$P/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$1" checkpoints/smollm2-135m-ae32.h5 \
    tests/fixtures/codec_kv_l4l5_32tok.f32 4
}
say "examples/ with find_package(kvcodec)"
cmake -S examples -B "$P/ex-cmake" -DCMAKE_PREFIX_PATH="$P" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$P/ex-cmake" >/dev/null
run_demo "$P/ex-cmake/codec_demo" | tail -3
say "examples/codec_demo.c with pkg-config"
libdir=$(ls -d "$P"/lib/pkgconfig "$P"/lib64/pkgconfig 2>/dev/null | head -1 || true)
cc -std=c11 -O2 -o "$P/codec_demo_pc" examples/codec_demo.c $(PKG_CONFIG_PATH="$libdir" pkg-config --cflags --libs kvcodec)
run_demo "$P/codec_demo_pc" | tail -3
say "ok: both builds ran"
