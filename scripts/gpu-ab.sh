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
#                                    tok/s and time to first token (latency)
#                                    and each side's means.
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
def load(side, i):
    try:
        return json.load(open(os.path.join(out, f"ab-{side}-{i}.json")))
    except (OSError, ValueError):
        return None
runs_of = {s: [load(s, i) for i in range(1, runs + 1)] for s in ("base", "new")}
# The headline of the mode: output tok/s (throughput) or decode tok/s
# (latency, with the time to first token beside it).
cols = [("output_tok_s", "tok/s", "{:,.1f}")] if any(
    d and "output_tok_s" in d for d in runs_of["base"] + runs_of["new"]) else [
    ("decode_tok_s", "tok/s", "{:,.1f}"), ("ttft_ms", "TTFT ms", "{:,.2f}")]
def cell(d, key, fmt):
    return "-" if not d or key not in d else fmt.format(d[key])
head = [f"{side} {name}" for side in ("base", "new") for _, name, _ in cols]
print("| round | " + " | ".join(head) + " |")
print("|---|" + "---|" * len(head))
for i in range(runs):
    cells = [cell(runs_of[side][i], key, fmt) for side in ("base", "new") for key, _, fmt in cols]
    print(f"| {i + 1} | " + " | ".join(cells) + " |")
means = []
for side in ("base", "new"):
    for key, _, fmt in cols:
        v = [d[key] for d in runs_of[side] if d and key in d]
        means.append(sum(v) / len(v) if v else None)
if all(m is not None for m in means):
    n = len(cols)
    cells = []
    for j, (key, _, fmt) in enumerate(cols * 2):
        m = means[j]
        text = fmt.format(m)
        if j >= n:
            text += f" ({100 * (m / means[j - n] - 1):+.2f}%)"
        cells.append(text)
    print("| mean | " + " | ".join(cells) + " |")
EOF
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
