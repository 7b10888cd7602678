#!/usr/bin/env bash
# test-targets.sh - builds kvcodec for several x86-64 instruction sets and runs the whole test
# suite with each, to show that no test depends on the code a compiler happens to generate
# (docs/portability.md). Targets this CPU cannot execute are built and checked, then reported
# as "not run" with the reason; every target it can execute must pass.
#   usage: scripts/test-targets.sh [--targets "native default none x86-64-v2 haswell ..."]
#   (a target NAME-nofp16 is -march=NAME without AVX512-FP16)
#                                  [--out FILE.md] [--jobs N] [--keep]
# Each target builds in build-targets/<target>/ (CUDA off: the targets differ in C only).
# Exit status: 0 when every runnable target passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS="native default none x86-64-v2 haswell skylake-avx512 icelake-server sapphirerapids sapphirerapids-nofp16"
OUT=""
JOBS=$(nproc)
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --targets) TARGETS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test-targets.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

bash scripts/setup.sh --no-build >/dev/null
say() { printf '[test-targets] %s\n' "$*" >&2; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
gccv=$(gcc -dumpfullversion)
rows=()
fail=0
for t in $TARGETS; do
  case "$t" in
    native) flags=(-DKVC_NATIVE=ON)
            nat=$(gcc -march=native -Q --help=target 2>/dev/null | awk '/^  -march=/{print $2}' | head -1 || true)
            desc="-DKVC_NATIVE=ON (-march=native, which gcc $(gcc -dumpfullversion) resolves to $nat here)" ;;
    default) flags=(); desc="default (-DKVC_ARCH=x86-64-v3)" ;;
    none) flags=(-DKVC_ARCH=none); desc="-DKVC_ARCH=none (compiler default: x86-64)" ;;
    *-nofp16) flags=(-DKVC_ARCH="${t%-nofp16}" -DCMAKE_C_FLAGS=-mno-avx512fp16)
              desc="-DKVC_ARCH=${t%-nofp16} with -mno-avx512fp16 (for CPUs with AVX-512 but not its FP16 part)" ;;
    *) flags=(-DKVC_ARCH="$t"); desc="-DKVC_ARCH=$t" ;;
  esac
  dir="build-targets/$t"
  mkdir -p build-targets
  say "$t: configure and build in $dir"
  t0=$(date +%s)
  if ! cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DKVC_CUDA=OFF "${flags[@]}" >"$dir.log" 2>&1 ||
     ! cmake --build "$dir" -j"$JOBS" >>"$dir.log" 2>&1; then
    rows+=("| $t | $desc | build failed (see $dir.log) | |"); fail=1; continue
  fi
  # a fused multiply-add/subtract that nobody wrote: gcc 12's vectoriser makes them from
  # a*c - b*s even under -ffp-contract=off (docs/portability.md)
  fused=$(objdump -d "$dir/libkvc.a" 2>/dev/null | grep -cE 'vfmaddsub|vfmsubadd' || true)
  why=""; envs=()
  if ! "$dir/kvcodec" --version >/dev/null 2>"$dir.cpu"; then
    missing=$(sed -n 's/.*lacks \(.*\), which this build.*/\1/p' "$dir.cpu")
    # The compiler was allowed these extensions, and the CPU lacks them. If the built code
    # holds no instruction of any of them, the suite still says something about this
    # target: run it with the check waived; otherwise report it as not run.
    used=0
    for f in $missing; do
      case "$f" in
        avx512fp16) re='^(v[a-z0-9]*(ph|sh|phx|shx)|vmovw|vcvt[a-z0-9]*(sh|ph)2[a-z0-9]*)$'; skip='^(vcvtps2ph|vcvtph2ps)$' ;;
        avx512bf16) re='^(vcvtne2ps2bf16|vcvtneps2bf16|vdpbf16ps)$'; skip='^$' ;;
        avx512vnni) re='^vp(dpbusd|dpbusds|dpwssd|dpwssds)$'; skip='^$' ;;
        *) re='.'; skip='^$' ;;   # anything else: assume used
      esac
      n=$(objdump -d --no-show-raw-insn "$dir/kvcodec" "$dir/libkvc.a" 2>/dev/null |
          awk -F'\t' 'NF>=2{split($2,a," "); print a[1]}' | grep -E "$re" | grep -vcE "$skip" || true)
      used=$((used + n))
      why="$why$f: $n instructions; "
    done
    if [ "$used" -gt 0 ]; then
      rows+=("| $t | $desc | built; not run: this CPU lacks $missing and the build uses it (${why%; }) | $fused |")
      say "$t: not run here (lacks $missing)"
      continue
    fi
    envs=(KVC_CPU_CHECK=warn)
    why="CPU check waived: this CPU lacks $missing, and the build holds no instruction of it; "
  fi
  say "$t: running the suite"
  if (cd "$dir" && env "${envs[@]}" ctest --timeout 900 >"../$t.ctest.log" 2>&1); then
    res=$(grep -E 'tests passed' "build-targets/$t.ctest.log" | tail -1)
    rows+=("| $t | $desc | ${why}passed: $res ($(( $(date +%s) - t0 )) s) | $fused |")
  else
    res=$(grep -E 'tests passed|\(Failed\)|\*\*\*' "build-targets/$t.ctest.log" | tr '\n' ' ' | cut -c1-300)
    rows+=("| $t | $desc | FAILED: $res | $fused |"); fail=1
  fi
  [ "$fused" = 0 ] || { fail=1; say "$t: $fused vfmaddsub/vfmsubadd in libkvc.a"; }
  [ "$KEEP" = 1 ] || rm -rf "$dir/tests" "$dir/CMakeFiles"
done

table=$(
  echo "CPU: $cpu; gcc $gccv; $(date -u +%Y-%m-%d)"
  echo
  echo "| target | configure flags | result | fused add-sub in libkvc.a |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
)
echo "$table"
if [ -n "$OUT" ]; then printf '%s\n' "$table" >"$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"; fi
exit $fail
