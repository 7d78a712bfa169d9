#!/usr/bin/env python3
"""Whether a memory-bound kernel and a chain of small GEMMs overlap on one
GPU when they run on two streams: the question behind running a decode
step as two micro-batches (one half's attention beside the other half's
projections). For the GPU machine (PyTorch; cuBLAS GEMMs, not this
engine's kernels: the hardware's co-scheduling is what is measured).

  A  a read of GB of bf16 that misses L2, the stand-in for a decode step's
     attention reading its KV pages: torch.sum (a grid over every SM), or
     with --blocks N a CuPy grid-stride read kernel of N blocks of 512
     threads (N below the SM count leaves SMs free for B)
  B  LAYERS layers of Qwen3-0.6B's four projections at ROWS rows (qkv
     1024->4096, o 2048->1024, gate/up 1024->6144, down 3072->1024), each
     layer's weights its own

Prints the time of A alone, B alone, A then B on one stream, and A and B
on two streams (B's at the higher priority), each replayed from a CUDA
graph, CUDA events, median of 10.

    python3 scripts/overlap-probe.py [--rows 128] [--gb 0.33] [--layers 4] [--blocks N]
"""
import argparse
import statistics

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--gb", type=float, default=0.33, help="GB A reads (default: half a layer's KV at 256 sequences)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=0, help="A as a read kernel of this many blocks (0: torch.sum)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    n = int(a.gb * 1e9 / 2)
    kv = torch.randn(n, device=dev, dtype=torch.bfloat16)
    shapes = [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024)]
    ws = [[torch.randn(k, m, device=dev, dtype=torch.bfloat16) for k, m in shapes] for _ in range(a.layers)]
    xs = [torch.randn(a.rows, k, device=dev, dtype=torch.bfloat16) for k, _ in shapes]
    lo = torch.cuda.Stream(priority=0)
    hi = torch.cuda.Stream(priority=-1)

    if a.blocks:
        import cupy as cp

        read = cp.RawKernel(
            r"""
extern "C" __global__ void __launch_bounds__(512) read(const uint4* a, long long n, unsigned* sink) {
    uint4 acc = make_uint4(0, 0, 0, 0);
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += 4 * step) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = i + u * step < n ? __ldcs(a + i + u * step) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < 4; u++) { acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w; }
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) sink[0] = 1;
}""",
            "read",
        )
        # CuPy has no bf16: the same bytes as int16, shared through DLPack.
        kv_c = cp.from_dlpack(kv.view(torch.int16))
        sink = cp.from_dlpack(torch.zeros(1, device=dev, dtype=torch.int32))

        def work_a():
            st = cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
            with st:
                read((a.blocks,), (512,), (kv_c, cp.int64(n * 2 // 16), sink))

    else:

        def work_a():
            return kv.sum()

    def work_b():
        for layer in ws:
            for x, w in zip(xs, layer):
                torch.matmul(x, w)

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)

    def both_streams():
        cur = torch.cuda.current_stream()
        start = torch.cuda.Event()
        start.record(cur)
        for st, fn in ((lo, work_a), (hi, work_b)):
            st.wait_event(start)
            with torch.cuda.stream(st):
                fn()
        for st in (lo, hi):
            done = torch.cuda.Event()
            done.record(st)
            cur.wait_event(done)

    # Each variant is replayed from a CUDA graph, so that the host's launch
    # overhead (PyTorch's, ~10 us an op) is not what gets measured.
    def graph(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # warm-up outside the capture (cuBLAS workspaces)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    print(f"{torch.cuda.get_device_name()}: A reads {a.gb:.2f} GB, B is {a.layers} x 4 GEMMs at {a.rows} rows")
    ta, tb = timed(graph(work_a)), timed(graph(work_b))
    tab = timed(graph(lambda: (work_a(), work_b())))
    tpar = timed(graph(both_streams))
    print(f"A alone {ta:.3f} ms ({a.gb / ta:.2f} TB/s), B alone {tb:.3f} ms")
    print(f"A then B (one stream) {tab:.3f} ms; A beside B (two streams) {tpar:.3f} ms")
    print(f"overlap saves {tab - tpar:.3f} ms of the {min(ta, tb):.3f} ms the shorter one takes")


if __name__ == "__main__":
    main()
