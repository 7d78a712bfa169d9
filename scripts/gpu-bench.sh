#!/usr/bin/env bash
# Kernel benchmarks (the qwen-benches crate) for the GPU machine.
#
#   scripts/gpu-bench.sh            Here (no CUDA needed): builds the bench
#                                   binaries in release and copies them,
#                                   stripped, to gpu-bin/bench-<op>. Run it
#                                   after scripts/gpu-build.sh, which empties
#                                   gpu-bin/; this script leaves its files alone.
#   scripts/gpu-bench.sh run [ARGS] On the GPU machine, from the repo root with
#                                   gpu-bin/ beside it: runs every
#                                   gpu-bin/bench-* with --bench (ARGS go to
#                                   criterion, e.g. a filter regex), one log
#                                   per binary in $OUT (or ./gpu-logs) plus
#                                   bench-summary.txt with every summary line.
#
# The one command, on the GPU machine (gpu-bin/ travels with the tree):
#   scripts/gpu-bench.sh run
# It benches the CUDA backend only, to spend device time on the GPU; set
# QWEN_BENCH_BACKENDS=cuda,cpu to bench that machine's CPU as well, and
# QWEN_BENCH_QUICK=1 for a run of about a minute instead of about five.
# See benches/lib.rs for the other QWEN_BENCH_* settings.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  mkdir -p gpu-bin
  # One line per bench target: "<name> <executable>".
  local built
  built=$(cargo bench --no-run --message-format=json -p qwen-benches |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["target"]["name"], m["executable"])')
  [ -n "$built" ] || { echo "no bench binaries were built" >&2; exit 1; }
  while read -r name exe; do
    cp "$exe" "gpu-bin/bench-$name"
    strip "gpu-bin/bench-$name"
  done <<<"$built"
  ls -la gpu-bin
  # gpu-bin/ can outgrow what a copy of the tree may carry: also pack it.
  tar -cJf gpu-bin.tar.xz gpu-bin
  ls -la gpu-bin.tar.xz
}

run() {
  # Unpack the binaries when only the archive travelled.
  [ -d gpu-bin ] || tar -xJf gpu-bin.tar.xz
  local out=${OUT:-gpu-logs}
  mkdir -p "$out"
  # Criterion's saved baselines would otherwise land in ./target/criterion;
  # keep them out of $OUT, which should hold only the logs.
  export CRITERION_HOME=${CRITERION_HOME:-${TMPDIR:-/tmp}/qwen-criterion}
  export QWEN_BENCH_BACKENDS=${QWEN_BENCH_BACKENDS:-cuda}
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader || true
  local fail=0 bin name
  shopt -s nullglob
  local bins=(gpu-bin/bench-*)
  [ ${#bins[@]} -gt 0 ] || { echo "no gpu-bin/bench-*: run scripts/gpu-bench.sh first" >&2; exit 1; }
  for bin in "${bins[@]}"; do
    name=$(basename "$bin")
    echo "=== $name"
    if "$bin" --bench "$@" 2>&1 | tee "$out/$name.log"; then :; else
      echo "FAILED: $name"
      fail=1
    fi
  done
  if [[ ,$QWEN_BENCH_BACKENDS, == *,cuda,* ]] && grep -q '^skipping CUDA benches' "$out"/bench-*.log; then
    echo "FAILED: CUDA benches were skipped (see the reason in the logs)"
    fail=1
  fi
  # The harness prints "  <op>/<backend>/<shape> ..." summary lines after each
  # benchmark and again as a table at the end of each binary: keep the tables.
  for bin in "${bins[@]}"; do
    name=$(basename "$bin")
    sed -n '/^summary (/,$p' "$out/$name.log"
  done | tee "$out/bench-summary.txt"
  exit $fail
}

case "${1:-build}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 [build | run [criterion args]]" >&2; exit 2 ;;
esac
