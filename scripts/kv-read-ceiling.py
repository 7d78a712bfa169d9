#!/usr/bin/env python3
"""The read-bandwidth ceiling of a decode step's KV-cache reads, for the GPU
machine (CuPy, no Rust): what a kernel that only reads keys and values, with
no attention arithmetic, reaches over the same pages as attention does.

Layouts (one layer's K and V caches, bf16, block size 16, 8 kv heads of 128):
  ours       [blocks, 16, kv_heads, head_dim]: a (sequence, kv head) reads
             256 bytes of every 2,048-byte slot row (the engine's layout)
  head-major [blocks, kv_heads, 16, head_dim]: 4,096 contiguous bytes a
             (block, kv head)
  stream     each (sequence, kv head)'s bytes contiguous: no paging at all

Each (sequence, kv head) is one block of 128 threads with many 16-byte loads
in flight; the blocks' pages are a random permutation of the cache, and the
sequences' contexts are the batch shapes below. Prints GB/s (K + V bytes
read over the kernel time, CUDA events, median of 20 after 3 warm-ups) and
the same over a plain contiguous read of as many bytes (the ceiling).

    python3 scripts/kv-read-ceiling.py [--json FILE]
"""
import argparse
import json

import cupy as cp
import numpy as np

SRC = r"""
extern "C" __global__ void __launch_bounds__(128)
kv_read(const uint4* __restrict__ kc, const uint4* __restrict__ vc, const int* __restrict__ tables,
        const int* __restrict__ ctx, const int* __restrict__ order, int max_blocks, int hkv, int layout,
        unsigned* __restrict__ sink) {
    int w = order[blockIdx.x / hkv], g = blockIdx.x % hkv;
    int n = ctx[w];
    int r = threadIdx.x / 16, c = threadIdx.x % 16;  // 8 rows of 16 uint4 a pass
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (int p0 = 0; p0 < n; p0 += 64) {
        uint4 kv[16];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int p = p0 + r + 8 * u;
            long long idx = 0;
            bool ok = p < n;
            if (ok) {
                long long blk = tables[(long long)w * max_blocks + p / 16], off = p % 16;
                if (layout == 0) idx = ((blk * 16 + off) * hkv + g) * 16 + c;
                else if (layout == 1) idx = ((blk * hkv + g) * 16 + off) * 16 + c;
                else idx = (((long long)w * hkv + g) * (long long)max_blocks * 16 + p) * 16 + c;
            }
            kv[2 * u] = ok ? __ldcs(kc + idx) : make_uint4(0, 0, 0, 0);
            kv[2 * u + 1] = ok ? __ldcs(vc + idx) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 16; u++) {
            acc.x ^= kv[u].x; acc.y ^= kv[u].y; acc.z ^= kv[u].z; acc.w ^= kv[u].w;
        }
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[0] = 1;
}
extern "C" __global__ void plain_read(const uint4* __restrict__ a, long long n, unsigned* __restrict__ sink) {
    uint4 acc = make_uint4(0, 0, 0, 0);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        uint4 v = __ldcs(a + i);
        acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[0] = 1;
}
"""

HKV, D, BS = 8, 128, 16
ROW_UINT4 = D * 2 // 16  # 16-byte pieces of one head's row


def timed(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b) * 1e-3)
    return float(np.median(ts))


def shapes(rng):
    """(name, contexts): the throughput workload's buckets and uniform ones."""
    return [
        ("256 x U[150,1350]", rng.integers(150, 1351, 256)),
        ("256 x 650", np.full(256, 650)),
        ("128 x U[500,1600]", rng.integers(500, 1601, 128)),
        ("48 x U[900,1900]", rng.integers(900, 1901, 48)),
        ("16 x U[1000,2000]", rng.integers(1000, 2001, 16)),
        ("16 x 1536", np.full(16, 1536)),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    mod = cp.RawModule(code=SRC, options=("-std=c++17",))
    kv_read, plain = mod.get_function("kv_read"), mod.get_function("plain_read")
    rng = np.random.default_rng(0)
    dev = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {dev['name'].decode()}, {dev['multiProcessorCount']} SMs")
    sink = cp.zeros(1, dtype=cp.uint32)
    rows = []
    for name, ctx in shapes(rng):
        ctx = ctx.astype(np.int32)
        seqs = len(ctx)
        max_blocks = int(-(-ctx.max() // BS))
        nblocks = seqs * max_blocks
        # Pages: a random permutation of the cache's blocks, as after many steps.
        perm = rng.permutation(nblocks).astype(np.int32).reshape(seqs, max_blocks)
        words = nblocks * BS * HKV * ROW_UINT4
        kc = cp.zeros(words * 4, dtype=cp.uint32)
        vc = cp.zeros(words * 4, dtype=cp.uint32)
        tables, dctx = cp.asarray(perm), cp.asarray(ctx)
        nbytes = int(ctx.sum()) * HKV * D * 2 * 2
        res = {"shape": name, "GB": nbytes / 1e9}
        orders = {
            "as given": np.arange(seqs, dtype=np.int32),
            "longest first": np.argsort(-ctx, kind="stable").astype(np.int32),
        }
        for layout, lname in enumerate(["ours", "head-major", "stream"]):
            for oname, order in orders.items():
                if layout != 0 and oname != "as given":
                    continue
                dorder = cp.asarray(order)
                args = (kc, vc, tables, dctx, dorder, np.int32(max_blocks), np.int32(HKV), np.int32(layout), sink)
                t = timed(lambda: kv_read((seqs * HKV,), (128,), args))
                res[f"{lname}, {oname}"] = nbytes / t / 1e9
        n16 = nbytes // 16
        flat = cp.zeros(n16 * 4, dtype=cp.uint32)
        t = timed(lambda: plain((132 * 16,), (256,), (flat, np.int64(n16), sink)))
        res["plain read"] = nbytes / t / 1e9
        del kc, vc, flat
        rows.append(res)
        print(json.dumps(res))
    keys = [k for k in rows[0] if k not in ("shape", "GB")]
    print("\n| shape | GB | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['shape']} | {r['GB']:.3f} | " + " | ".join(f"{r[k]:.0f}" for k in keys) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
