#!/usr/bin/env python3
"""Summarises a kernel trace (QWEN_CUDA_TRACE=FILE, crates/kernels-cuda/src/trace.rs).

Each record is the time a kernel's first block got past its wait for the
kernel before, i.e. when that kernel completed; so the gap between two
records is the critical-path time of the kernel of the earlier one (its
run, what it waited on that was not already done, and the hand-over).
Kernels are named by grid and block size, with the kernel that follows
them (o_proj and down have one shape; what comes after tells them apart).
Usage: scripts/trace-summary.py FILE [--from FRACTION] [--max-gap-us US]
"""
import argparse, collections, signal, statistics

import trace_records

signal.signal(signal.SIGPIPE, signal.SIG_DFL)

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--from", dest="start", type=float, default=0.5,
                help="skip this fraction of the records (warm-up, prompt)")
ap.add_argument("--max-gap-us", type=float, default=1000.0,
                help="gaps longer than this are host time between steps; left out")
a = ap.parse_args()

recs = [(t, f"{gx}x{gy} blocks of {th}") for t, gx, gy, th in trace_records.read(a.file)]
recs = recs[int(len(recs) * a.start):]
groups = collections.defaultdict(list)
for (t0, k0), (t1, k1) in zip(recs, recs[1:]):
    us = (t1 - t0) / 1e3
    if us <= a.max_gap_us:
        groups[(k0, k1)].append(us)
total = sum(sum(v) for v in groups.values())
print(f"{'kernel':>26} {'then':>26} {'count':>6} {'median us':>10} {'p10':>7} {'p90':>7} {'share':>7}")
for (k0, k1), v in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
    q = statistics.quantiles(v, n=10) if len(v) > 1 else [v[0]] * 9
    print(f"{k0:>26} {k1:>26} {len(v):>6} {statistics.median(v):>10.2f} {q[0]:>7.2f} {q[-1]:>7.2f} "
          f"{100 * sum(v) / total:>6.1f}%")
