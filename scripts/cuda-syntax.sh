#!/usr/bin/env bash
# Parses and type-checks every CUDA module with g++ against host stand-ins
# (scripts/cuda-stub/), as compile.rs assembles it: numerics.cuh,
# dependent_launch.cuh, async_copy.cuh, tensor_core.cuh, then the kernel file. For machines without NVRTC:
# it catches C++ mistakes (templates are instantiated by the kernels) before
# a device call, not what only NVRTC checks (PTX, asm operands, registers).
set -euo pipefail
cd "$(dirname "$0")/.."
src=crates/kernels-cuda/src
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for cu in "$src"/*.cu; do
  # Modules of several files (device.rs's MODULES): the files before it.
  before=()
  [ "$(basename "$cu")" = layer.cu ] && before=("$src/norm.cu" "$src/attention.cu")
  [ "$(basename "$cu")" = attention_tc.cu ] && before=("$src/rope.cu")
  [ "$(basename "$cu")" = gemm_wgmma.cu ] && before=("$src/rope.cu")
  # Inline PTX is target code: stand a no-op in for each asm statement.
  cat "$src/numerics.cuh" "$src/dependent_launch.cuh" "$src/async_copy.cuh" "$src/tensor_core.cuh" "${before[@]}" "$cu" |
    sed -E 's/asm volatile\(/ASM_STUB(/' >"$tmp/$(basename "$cu").cpp"
  if ! g++ -std=c++17 -fsyntax-only -Wno-attributes -include scripts/cuda-stub/cuda_bf16.h \
    -D'ASM_STUB(...)=((void)0)' -I scripts/cuda-stub "$tmp/$(basename "$cu").cpp"; then
    echo "FAILED: $cu" >&2
    fail=1
  fi
done
[ $fail = 0 ] && echo "all CUDA modules parse"
exit $fail
