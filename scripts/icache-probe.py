#!/usr/bin/env python3
"""How long a kernel waits on fetching its own machine code, and whether
that code is still cached when the same kernel runs again after others.

A batch-1 decode step runs each of a layer's kernels once a layer, and the
traces (BENCHMARKS.md) showed attention's post-wait work taking far longer
on a cold instruction cache than on a warm one. This probe measures the
cache itself with straight-line kernels (one warp per SM, N bytes of
independent FADDs, no memory traffic): cycles of a kernel run cold (after
a large kernel of other code), run again right after itself, and run
again after other kernels holding M bytes of code in all.

Runs on the GPU machine (CuPy, NVRTC). Usage:
  python3 scripts/icache-probe.py [--json FILE]
  python3 scripts/icache-probe.py --cycle 3,8,34,8,3,10,8 [--cycle ...]
      (a layer's kernels in turn: cycles of each against it warm)
"""
import argparse
import json

import cupy as cp
import numpy as np

SMS = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]


def kernel_source(name, kb):
    """A kernel of about `kb` KB of SASS: 16-byte FADDs over 8 independent
    chains, so the warp could issue one a cycle if its code were there."""
    n = kb * 1024 // 16
    body = "\n".join(
        f'    asm volatile("add.f32 %0, %0, %1;" : "+f"(a{i % 8}) : "f"(b));' for i in range(n)
    )
    acc = " + ".join(f"a{i}" for i in range(8))
    return f"""
extern "C" __global__ void {name}(float* out, long long* cycles, float b) {{
    float a0 = threadIdx.x, a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3, a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6,
          a7 = a0 + 7;
    long long t0 = clock64();
{body}
    long long t1 = clock64();
    out[blockIdx.x * blockDim.x + threadIdx.x] = {acc};
    if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}}
"""


class Probe:
    def __init__(self, sizes):
        self.names = {kb: f"k{kb}" for kb in sizes}
        src = "".join(kernel_source(n, kb) for kb, n in self.names.items())
        mod = cp.RawModule(code=src, options=("--fmad=false",))
        self.k = {kb: mod.get_function(n) for kb, n in self.names.items()}
        self.out = cp.zeros(SMS * 32, dtype=cp.float32)
        self.cyc = {kb: cp.zeros(SMS, dtype=cp.int64) for kb in sizes}

    def launch(self, kb):
        self.k[kb]((SMS,), (32,), (self.out, self.cyc[kb], np.float32(1.0)))

    def median(self, kb):
        cp.cuda.Device().synchronize()
        return float(np.median(cp.asnumpy(self.cyc[kb])))


def cycle(sizes, rounds=20):
    """Kernels of `sizes` KB run in turn, as a decode layer's kernels do
    (a size repeated is the same kernel again), `rounds` times; the median
    cycles of each position over the later rounds, against the same kernel
    run twice in a row."""
    kinds = sorted(set(sizes))
    p = Probe(kinds)
    warm = {}
    for kb in kinds:
        p.launch(kb)
        p.launch(kb)
        warm[kb] = p.median(kb)
    seen = [[] for _ in sizes]
    for r in range(rounds):
        for i, kb in enumerate(sizes):
            p.launch(kb)
            if r >= 2:
                seen[i].append(p.median(kb))
    return [(kb, warm[kb], float(np.median(s))) for kb, s in zip(sizes, seen)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--cycle", action="append", default=[],
                    help="comma-separated kernel sizes in KB run in turn (repeatable)")
    args = ap.parse_args()
    if args.cycle:
        out = {}
        for c in args.cycle:
            sizes = [int(v) for v in c.split(",")]
            rows = cycle(sizes)
            out[c] = rows
            print(f"cycle {c} (KB: total distinct {sum(set(sizes))}): "
                  + "  ".join(f"{kb}KB {int(got)}/{int(w)}" for kb, w, got in rows)
                  + f"  extra cycles {int(sum(got - w for _, w, got in rows))}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    targets = [4, 8, 16, 32]
    fillers = [8, 16, 32, 48, 64, 96, 128, 192, 256]
    flush = 512
    sizes = sorted(set(targets + fillers + [flush]))
    p = Probe(sizes)
    for kb in sizes:  # load every kernel once
        p.launch(kb)
    cp.cuda.Device().synchronize()
    rows = []
    for kb in targets:
        for rep in range(3):
            p.launch(flush)
            p.launch(kb)
            cold = p.median(kb)
            p.launch(kb)
            warm = p.median(kb)
            row = {"kernel_kb": kb, "rep": rep, "cold": cold, "again": warm}
            for m in fillers:
                p.launch(kb)
                p.launch(m)
                p.launch(kb)
                row[f"after_{m}kb"] = p.median(kb)
            rows.append(row)
    keys = ["kernel_kb", "rep", "cold", "again"] + [f"after_{m}kb" for m in fillers]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(int(r[k])) for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
