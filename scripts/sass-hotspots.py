#!/usr/bin/env python3
"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS view.

On the GPU machine, profile one launch and export its source page:

    ncu --kernel-name regex:attn_tc_d128_r1 --launch-skip 5 --launch-count 1 \\
        --set full --import-source no -o rep gpu-bin/bench-attention --bench FILTER
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv

then, anywhere: scripts/sass-hotspots.py sass.csv WARPS

WARPS is the number of warps the launch ran (grid x block threads / 32), so
that counts come out per warp. Consecutive instructions that ran the same
number of times are one basic block (a loop body, a branch arm); blocks
that hold at least --min of the instructions or 2% of the stall samples
are listed with their instructions per warp, samples, the two commonest
stall reasons and the commonest opcodes. This is how the tensor-core
attention's per-step copy arithmetic (a runtime division by the KV block
size, 559 of a step's ~860 instructions) was found (BENCHMARKS.md).
Usage: scripts/sass-hotspots.py FILE WARPS [--min FRACTION] [--list START END]
"""
import argparse, collections, csv, signal

signal.signal(signal.SIGPIPE, signal.SIG_DFL)

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("warps", type=int)
ap.add_argument("--min", type=float, default=0.004, help="smallest share of the instructions to list")
ap.add_argument("--list", nargs=2, type=int, metavar=("START", "END"),
                help="print the SASS lines START..END with their counts instead")
a = ap.parse_args()

with open(a.file) as f:
    rows = list(csv.reader(f))
# Row 0 names the kernel; row 1 holds the column names.
head = rows[1]
col = {h: i for i, h in enumerate(head)}
data = rows[2:]
stalls = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]


def num(r, name):
    v = r[col[name]].replace(",", "")
    return int(v) if v.strip() else 0


def opcode(src):
    parts = src.split()
    if not parts:
        return "?"
    op = parts[1] if parts[0].startswith("@") and len(parts) > 1 else parts[0]
    return op.split(".")[0]


if a.list:
    for i in range(a.list[0], min(a.list[1], len(data))):
        r = data[i]
        print(f"{i:5d} {num(r, 'Instructions Executed'):9d} {num(r, 'Warp Stall Sampling (All Samples)'):5d}  "
              f"{r[col['Source']].strip()}")
    raise SystemExit

blocks = []
for i, r in enumerate(data):
    ex = num(r, "Instructions Executed")
    if blocks and blocks[-1]["ex"] == ex:
        b = blocks[-1]
    else:
        b = {"start": i, "ex": ex, "n": 0, "samples": 0, "ops": collections.Counter(),
             "stalls": collections.Counter()}
        blocks.append(b)
    b["n"] += 1
    b["samples"] += num(r, "Warp Stall Sampling (All Samples)")
    b["ops"][opcode(r[col["Source"]])] += 1
    for s in stalls:
        b["stalls"][s[len("stall_"):]] += num(r, s)

total = sum(b["ex"] * b["n"] for b in blocks)
samples = sum(b["samples"] for b in blocks) or 1
print(f"{total / a.warps:.0f} instructions a warp, {samples} stall samples, {len(data)} SASS lines")
print(f"{'line':>5} {'instrs':>6} {'runs/warp':>9} {'instr/warp':>10} {'share':>6} {'samples':>7}  top stalls; top opcodes")
for b in blocks:
    share = b["ex"] * b["n"] / total if total else 0
    if share < a.min and b["samples"] < 0.02 * samples:
        continue
    st = ", ".join(f"{k} {v}" for k, v in b["stalls"].most_common(2) if v)
    ops = " ".join(f"{k}:{v}" for k, v in b["ops"].most_common(6))
    print(f"{b['start']:5d} {b['n']:6d} {b['ex'] / a.warps:9.1f} {b['ex'] * b['n'] / a.warps:10.0f} "
          f"{100 * share:5.1f}% {b['samples']:7d}  {st}; {ops}")
