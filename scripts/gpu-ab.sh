#!/usr/bin/env bash
# A/B runs of `qwen-cli bench` between a base commit and the working tree,
# for the GPU machine: machines differ by 1-3% at the same commit, so a
# change is only ever compared with its base in the same device call.
#
#   scripts/gpu-ab.sh build BASE     Here (no CUDA needed): builds qwen-cli at
#                                    BASE (any git revision, in a temporary
#                                    worktree) to gpu-bin/qwen-cli-base and the
#                                    working tree's to gpu-bin/qwen-cli, then
#                                    packs gpu-bin.tar.xz. Run it after
#                                    scripts/gpu-build.sh, which empties gpu-bin/.
#   scripts/gpu-ab.sh run [RUNS] [-- BENCH-ARGS]
#                                    On the GPU machine, from the repo root:
#                                    RUNS (default 3) rounds of base then new,
#                                    each `qwen-cli bench --backend cuda --json`
#                                    with BENCH-ARGS (default: the throughput
#                                    workload on the Qwen3-0.6B shape with
#                                    --tensor-core-decode); one JSON a run in
#                                    $OUT (or ./gpu-logs), then a table of every
#                                    run's output tok/s (throughput) or decode
#                                    tok/s (latency) and each side's mean.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  local base=${1:?usage: scripts/gpu-ab.sh build BASE}
  local rev
  rev=$(git rev-parse --verify "$base^{commit}")
  # Global: the trap runs after this function has returned.
  AB_TREE=$(mktemp -d)
  trap 'git worktree remove --force "$AB_TREE" >/dev/null 2>&1 || true; rm -rf "$AB_TREE"' EXIT
  git worktree add --detach "$AB_TREE" "$rev" >/dev/null
  local tmp=$AB_TREE
  # The base builds in a target directory of its own, its dependencies kept
  # for the next A/B but this workspace's crates cleaned first: cargo's
  # fingerprints do not tell two checkouts of the same crates apart by path,
  # so an earlier base's (or, in a shared directory, the working tree's)
  # artifacts could pass for fresh.
  local target=${CARGO_TARGET_DIR:-$PWD/target}
  mkdir -p gpu-bin
  local p
  for p in $(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"]))'); do
    CARGO_TARGET_DIR="$target/ab-base" cargo clean --release -p "$p" >/dev/null 2>&1 || true
  done
  (cd "$tmp" && CARGO_TARGET_DIR="$target/ab-base" cargo build --release -p qwen-cli)
  cp "$target/ab-base/release/qwen-cli" gpu-bin/qwen-cli-base
  CARGO_TARGET_DIR="$target" cargo build --release -p qwen-cli
  cp "$target/release/qwen-cli" gpu-bin/qwen-cli
  strip gpu-bin/qwen-cli-base gpu-bin/qwen-cli
  echo "base: $(git log -1 --format='%h %s' "$rev" | cut -c1-72)"
  echo "new:  the working tree at $(git log -1 --format=%h)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
  # gpu-bin/ can outgrow what a copy of the tree may carry: also pack it.
  tar -cJf gpu-bin.tar.xz gpu-bin
  ls -la gpu-bin gpu-bin.tar.xz
}

run() {
  [ -d gpu-bin ] || tar -xJf gpu-bin.tar.xz
  local runs=3
  if [ $# -gt 0 ] && [ "$1" != "--" ]; then runs=$1; shift; fi
  [ $# -gt 0 ] && [ "$1" = "--" ] && shift
  local args=("$@")
  [ ${#args[@]} -gt 0 ] || args=(--dummy-weights qwen3-0.6b --mode throughput --tensor-core-decode)
  local out=${OUT:-gpu-logs}
  mkdir -p "$out"
  export QWEN_KERNEL_CACHE=${QWEN_KERNEL_CACHE:-$PWD/gpu-bin/kcache}
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
  local i side
  for i in $(seq 1 "$runs"); do
    for side in base new; do
      local bin=gpu-bin/qwen-cli
      [ $side = base ] && bin=gpu-bin/qwen-cli-base
      echo "=== round $i: $side" >&2
      "$bin" bench --backend cuda --json "${args[@]}" >"$out/ab-$side-$i.json" 2>"$out/ab-$side-$i.log" ||
        echo "FAILED: $side round $i (see $out/ab-$side-$i.log)" >&2
    done
  done
  python3 - "$out" "$runs" <<'EOF' | tee "$out/ab-summary.txt"
import json, os, sys
out, runs = sys.argv[1], int(sys.argv[2])
def value(side, i):
    try:
        d = json.load(open(os.path.join(out, f"ab-{side}-{i}.json")))
    except (OSError, ValueError):
        return None
    return d.get("output_tok_s", d.get("decode_tok_s"))
rows = {s: [value(s, i) for i in range(1, runs + 1)] for s in ("base", "new")}
print("| round | base tok/s | new tok/s |")
print("|---|---|---|")
for i in range(runs):
    cells = ["-" if v is None else f"{v:,.1f}" for v in (rows["base"][i], rows["new"][i])]
    print(f"| {i + 1} | {cells[0]} | {cells[1]} |")
means = {s: [v for v in vs if v is not None] for s, vs in rows.items()}
if means["base"] and means["new"]:
    b = sum(means["base"]) / len(means["base"])
    n = sum(means["new"]) / len(means["new"])
    print(f"| mean | {b:,.1f} | {n:,.1f} ({100 * (n / b - 1):+.2f}%) |")
EOF
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
