#!/usr/bin/env bash
# Builds the GPU test binaries and qwen-cli here (no CUDA needed: cudarc
# loads the driver at run time) and puts them, stripped, in gpu-bin/
# (git-ignored). Then run scripts/gpu-run.sh on a machine with a GPU, from
# the repo root, with gpu-bin/ beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only this script's files are replaced: scripts/gpu-bench.sh adds its own.
mkdir -p gpu-bin && rm -f gpu-bin/twin gpu-bin/trace gpu-bin/golden_cuda gpu-bin/qwen-cli

# name=cargo args of one test target
targets=(
  "twin=-p qwen-kernels-cuda --test twin"
  "trace=-p qwen-kernels-cuda --test trace"
  "golden_cuda=-p model-qwen3 --test golden_cuda"
)
for t in "${targets[@]}"; do
  name=${t%%=*}
  # shellcheck disable=SC2086
  bin=$(cargo test --release --no-run --message-format=json ${t#*=} 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -n 1)
  [ -n "$bin" ] || { echo "could not build $name" >&2; exit 1; }
  cp "$bin" "gpu-bin/$name"
done
cargo build --release -p qwen-cli
cp "${CARGO_TARGET_DIR:-target}/release/qwen-cli" gpu-bin/
strip gpu-bin/twin gpu-bin/trace gpu-bin/golden_cuda gpu-bin/qwen-cli
ls -la gpu-bin
# gpu-bin/ can outgrow what a copy of the tree may carry: also pack it.
tar -cJf gpu-bin.tar.xz gpu-bin
ls -la gpu-bin.tar.xz
