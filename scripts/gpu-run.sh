#!/usr/bin/env bash
# Runs the binaries built by scripts/gpu-build.sh on a GPU machine, from the
# repo root. Every GPU test and the CUDA end-to-end checks; exits non-zero on
# the first failure. Logs go to $OUT (or ./gpu-logs) when set.
set -uo pipefail
cd "$(dirname "$0")/.."
# Unpack the binaries when only the archive travelled.
[ -d gpu-bin ] || tar -xJf gpu-bin.tar.xz
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fail=0
# Tests that would skip without a GPU fail instead.
export QWEN_REQUIRE_GPU=1
run() {
  local name=$1; shift
  echo "=== $name"
  if "$@" 2>&1 | tee "$out/$name.log"; then :; else echo "FAILED: $name"; fail=1; fi
}
run twin env CARGO_MANIFEST_DIR="$PWD/crates/kernels-cuda" gpu-bin/twin --test-threads 1 --nocapture
run trace gpu-bin/trace --nocapture
run golden_cuda env CARGO_MANIFEST_DIR="$PWD/crates/model-qwen3" gpu-bin/golden_cuda --test-threads 1
run cli_cuda gpu-bin/qwen-cli generate --backend cuda --chat --no-think --temperature 0 --max-tokens 24 --json \
  --prompt "Give me a short introduction to large language models."
run cli_auto gpu-bin/qwen-cli generate --prompt "The quick brown fox" --max-tokens 16 --seed 1
long=$(python3 -c 'import json;print([p["text"] for p in json.load(open("fixtures/tiny-qwen3/reference.json"))["prompts"] if p["name"]=="long"][0])')
run verify_cuda gpu-bin/qwen-cli verify --backend cuda --prompt "The quick brown fox jumps over the lazy dog."
run verify_cuda_long gpu-bin/qwen-cli verify --backend cuda --prompt "$long"
exit $fail
