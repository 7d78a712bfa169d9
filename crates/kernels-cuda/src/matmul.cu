// Projections with bf16 weights and f32 accumulation, one warp per
// (weight row, tile of tokens), in the 256-lane row-reduction order
// (twin of matmul.rs). Results depend on nothing but their own row and
// token, so they do not change with the batch.

#define TOKEN_TILE 4
#define UNROLL 4

__device__ __forceinline__ void load8_x(const __nv_bfloat16* p, float* f, bool vec) { load8_bf16(p, f, vec); }
__device__ __forceinline__ void load8_x(const float* p, float* f, bool vec) {
    if (vec) {
        float4 a = *reinterpret_cast<const float4*>(p);
        float4 b = *reinterpret_cast<const float4*>(p + 4);
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = p[e];
    }
}
__device__ __forceinline__ float load1_x(const __nv_bfloat16* p) { return bf(*p); }
__device__ __forceinline__ float load1_x(const float* p) { return *p; }

// Eight consecutive bf16 as loaded, widened only when used, so a batch of
// loads in flight costs 4 registers each.
__device__ __forceinline__ uint4 load8_raw(const __nv_bfloat16* p, bool vec) {
    if (vec) {
        // Weights: read once a step, so evicted from L2 first.
        uint4 r;
        asm("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                     : "l"(p), "l"(l2_evict_first()));
        return r;
    }
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return make_uint4(h[0] | ((u32)h[1] << 16), h[2] | ((u32)h[3] << 16), h[4] | ((u32)h[5] << 16),
                      h[6] | ((u32)h[7] << 16));
}

// NB chunks of 256 from `base` into the lanes: every chunk's weights are
// loaded before any is used, so each thread keeps NB 16-byte loads in
// flight; they are still added in increasing chunk order, as the spec
// orders them. The first batch of a kernel waits for the kernel before
// (dependent_launch.cuh) only after its weight loads are issued.
template <int NB, int TT, typename X>
__device__ __forceinline__ void dot_chunks(const X* x, const __nv_bfloat16* wr, int tt, int K, int base, bool vec,
                                           bool& wait, float acc[TT][8]) {
    int lane = threadIdx.x;
    uint4 raw[NB];
#pragma unroll
    for (int u = 0; u < NB; u++) raw[u] = load8_raw(wr + base + u * 256 + 8 * lane, vec);
    if (wait) {
        wait_for_producers();
        start_dependents();
        wait = false;
    }
#pragma unroll
    for (int u = 0; u < NB; u++) {
        float wf[8];
        widen8(raw[u], wf);
#pragma unroll
        for (int i = 0; i < TT; i++) {
            if (i < tt) {
                float xf[8];
                load8_x(x + (size_t)i * K + base + u * 256 + 8 * lane, xf, vec);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] = acc[i][e] + wf[e] * xf[e];
            }
        }
    }
}

// One warp: the weight row `wr` against the `tt` ≤ TT token rows starting
// at `x` (row stride K); every lane gets res[i] for i < tt. TT = 1 serves
// batch-1 decode with a quarter of the accumulators, so more warps fit on
// an SM.
template <int TT, typename X>
__device__ __forceinline__ void dot_rows(const X* x, const __nv_bfloat16* wr, int tt, int K, bool wait,
                                         float res[TT]) {
    int lane = threadIdx.x;
    bool vec = (K & 7) == 0;
    float acc[TT][8];
#pragma unroll
    for (int i = 0; i < TT; i++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.0f;
    int full = K / 256 * 256;
    int base = 0;
    // (8 loads in flight per thread measured slower: 8B 148 -> 138 tok/s.)
    for (; base + UNROLL * 256 <= full; base += UNROLL * 256) dot_chunks<UNROLL, TT>(x, wr, tt, K, base, vec, wait, acc);
    for (; base < full; base += 256) dot_chunks<1, TT>(x, wr, tt, K, base, vec, wait, acc);
    if (wait) {
        wait_for_producers();
        start_dependents();
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int k = full + 8 * lane + e;
        if (k < K) {
            float wv = bf(wr[k]);
#pragma unroll
            for (int i = 0; i < TT; i++)
                if (i < tt) acc[i][e] = acc[i][e] + wv * load1_x(x + (size_t)i * K + k);
        }
    }
#pragma unroll
    for (int i = 0; i < TT; i++)
        if (i < tt) res[i] = row_combine(acc[i]);
}

// dot_rows for weight row `n`, written to out[t0 + i, n] (added when `add`).
template <int TT, typename X>
__device__ __forceinline__ void project_rows(const X* x, const __nv_bfloat16* w, float* out, int t0, int tt, int K,
                                             int N, int n, int add, bool wait) {
    float res[TT];
    dot_rows<TT>(x, w + (size_t)n * K, tt, K, wait, res);
#pragma unroll
    for (int i = 0; i < TT; i++) {
        if (i < tt && threadIdx.x == 0) {
            size_t o = (size_t)(t0 + i) * N + n;
            out[o] = add ? out[o] + res[i] : res[i];
        }
    }
}

// Rows [row0, T): rows before row0 are the tensor-core GEMM's (gemm.cu).
template <int TT, typename X>
__device__ __forceinline__ void project(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N,
                                        int add) {
    int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    int t0 = row0 + blockIdx.y * TT;
    project_rows<TT>(x + (size_t)t0 * K, w, out, t0, min(TT, T - t0), K, N, n, add, true);
}

// The single-token f32 kernel serves the vocabulary projection, many waves
// long: held to 64 registers so that 8 blocks share an SM and keep more
// loads in flight (H100 trace: 108.5 -> 101.9 us for Qwen3's 151,936 rows;
// BENCHMARKS.md). The single-token bf16 one is matmul_bf16_t1 below.
#define MATMUL(NAME, X, TT, MIN_BLOCKS)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)                                           \
        NAME(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N, int add) {      \
        project<TT>(x, w, out, row0, T, K, N, add);                                                         \
    }
MATMUL(matmul_bf16, __nv_bfloat16, TOKEN_TILE, 1)
MATMUL(matmul_f32x, float, TOKEN_TILE, 1)
MATMUL(matmul_f32x_t1, float, 1, 8)

// Many tokens at once (exact decode batches, exact prompts): a block of
// TILE_WARPS warps takes TILE_WARPS weight rows against TILE_TOKENS tokens,
// the tokens' x staged in shared memory as f32 a slab of TILE_SLAB at a
// time, so a token's x is widened once a block instead of once a row, and
// each weight element loaded once for TILE_TOKENS tokens. The sums are
// dot_rows' (lane l, element e of every chunk, chunks in order, then
// row_combine). Needs K % TILE_SLAB == 0 (matmul.rs checks). Shared
// layout of a chunk: elements 0-3 of every lane, then 4-7, so that a
// warp's 16-byte reads of one half touch consecutive banks.
#define TILE_WARPS 8
#define TILE_TOKENS 8
#define TILE_SLAB 1024
template <typename X>
__device__ __forceinline__ void project_tiled(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K,
                                              int N, int add) {
    __shared__ __align__(16) float xs[TILE_TOKENS * TILE_SLAB];
    int lane = threadIdx.x, warp = threadIdx.y, tid = warp * 32 + lane;
    int n = blockIdx.x * TILE_WARPS + warp;
    int t0 = row0 + blockIdx.y * TILE_TOKENS, tt = min(TILE_TOKENS, T - t0);
    const __nv_bfloat16* wr = w + (size_t)min(n, N - 1) * K;
    float acc[TILE_TOKENS][8];
#pragma unroll
    for (int i = 0; i < TILE_TOKENS; i++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[i][e] = 0.0f;
    const int CH = TILE_SLAB / 256;
    for (int base = 0; base < K; base += TILE_SLAB) {
        uint4 raw[CH];
#pragma unroll
        for (int u = 0; u < CH; u++) raw[u] = *reinterpret_cast<const uint4*>(wr + base + u * 256 + 8 * lane);
        if (base == 0) {
            wait_for_producers();
            start_dependents();
        }
        // Every warp is done with the slab before.
        __syncthreads();
        for (int p = tid; p < TILE_TOKENS * (TILE_SLAB / 8); p += 32 * TILE_WARPS) {
            int i = p / (TILE_SLAB / 8), c = (p / 32) % CH, l = p % 32;
            float f[8];
            if (i < tt)
                load8_x(x + (size_t)(t0 + i) * K + base + c * 256 + 8 * l, f, true);
            else
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] = 0.0f;
            float* d = xs + i * TILE_SLAB + c * 256 + 4 * l;
            *reinterpret_cast<float4*>(d) = make_float4(f[0], f[1], f[2], f[3]);
            *reinterpret_cast<float4*>(d + 128) = make_float4(f[4], f[5], f[6], f[7]);
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < CH; u++) {
            float wf[8];
            widen8(raw[u], wf);
#pragma unroll
            for (int i = 0; i < TILE_TOKENS; i++) {
                const float* xr = xs + i * TILE_SLAB + u * 256 + 4 * lane;
                float4 a = *reinterpret_cast<const float4*>(xr);
                float4 b = *reinterpret_cast<const float4*>(xr + 128);
                float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] = acc[i][e] + wf[e] * xv[e];
            }
        }
    }
    if (n >= N) return;
#pragma unroll
    for (int i = 0; i < TILE_TOKENS; i++) {
        float r = row_combine(acc[i]);
        if (i < tt && lane == 0) {
            size_t o = (size_t)(t0 + i) * N + n;
            out[o] = add ? out[o] + r : r;
        }
    }
}

#define MATMUL_TILED(NAME, X)                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * TILE_WARPS)                                           \
        NAME(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N, int add) {       \
        project_tiled<X>(x, w, out, row0, T, K, N, add);                                                    \
    }
MATMUL_TILED(matmul_bf16_tiled, __nv_bfloat16)
MATMUL_TILED(matmul_f32x_tiled, float)

// The single-token bf16 projections stream each warp's weight rows through
// a ring of RING_STAGES batches of UNROLL chunks in shared memory
// (async_copy.cuh): a batch in flight while the one before is summed, at
// no register cost, and the ring runs on from one of the warp's rows into
// the next, so a warp with rows · batches < RING_STAGES has every weight
// in flight before its wait. emit(j, sum) on every lane; each sum is
// dot_rows' (lane l, element e of every 256-wide chunk, chunks in order,
// the tail, then row_combine). K a multiple of 8.
#define RING_WARPS 4
template <int RING_STAGES, typename RowPtr, typename Emit>
__device__ __forceinline__ void t1_rows_ring(const __nv_bfloat16* xr, int K, int rows, RowPtr row_ptr, Emit emit) {
    __shared__ __align__(16) uint4 ring[RING_WARPS][RING_STAGES][UNROLL][32];
    int lane = threadIdx.x;
    uint4(*mine)[UNROLL][32] = ring[threadIdx.y];
    int chunks = K / 256, batches = (chunks + UNROLL - 1) / UNROLL, total = rows * batches;
    unsigned long long once = l2_evict_first();
    // Every batch commits a group, empty past the last one, so that "all
    // but the newest RING_STAGES - 1 groups" is always batch v.
    auto issue = [&](int v) {
        if (v < total) {
            const __nv_bfloat16* wr = row_ptr(v / batches);
            int b = v % batches;
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int c = b * UNROLL + u;
                if (c < chunks) copy16_async_once(&mine[v % RING_STAGES][u][lane], wr + (size_t)c * 256 + 8 * lane, once);
            }
        }
        copies_commit();
    };
#pragma unroll
    for (int v = 0; v < RING_STAGES - 1; v++) issue(v);
    wait_for_producers();
    start_dependents();
    for (int j = 0; j < rows; j++) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int b = 0; b < batches; b++) {
            int v = j * batches + b;
            issue(v + RING_STAGES - 1);
            // The batch's activations are loaded while its weights arrive.
            uint4 xv[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int c = b * UNROLL + u;
                if (c < chunks) xv[u] = *reinterpret_cast<const uint4*>(xr + (size_t)c * 256 + 8 * lane);
            }
            copies_wait_groups<RING_STAGES - 1>();
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                if (b * UNROLL + u < chunks) {
                    float wf[8], xf[8];
                    widen8(mine[v % RING_STAGES][u][lane], wf);
                    widen8(xv[u], xf);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[e] = acc[e] + wf[e] * xf[e];
                }
            }
        }
        // The tail past whole chunks, under a branch the warp takes as one:
        // rows of whole chunks (every Qwen3 projection) skip its code.
        if (chunks * 256 < K) {
            const __nv_bfloat16* wr = row_ptr(j);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                int k = chunks * 256 + 8 * lane + e;
                if (k < K) acc[e] = acc[e] + bf(wr[k]) * bf(xr[k]);
            }
        }
        emit(j, row_combine(acc));
    }
}

// One weight row a warp; K a multiple of 8 (matmul.rs sends other rows
// to matmul_bf16: the same sums). Without a fallback inside, this kernel
// is the ring's code alone, which every SM fetches once a layer on a cold
// instruction cache.
template <int RING_STAGES>
__device__ __forceinline__ void matmul_t1(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int row0, int K,
                                          int N, int add) {
    int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    const __nv_bfloat16* wr = w + (size_t)n * K;
    t1_rows_ring<RING_STAGES>(x + (size_t)row0 * K, K, 1, [&](int) { return wr; },
                              [&](int, float r) {
                                  if (threadIdx.x == 0) {
                                      size_t o = (size_t)row0 * N + n;
                                      out[o] = add ? out[o] + r : r;
                                  }
                              });
}

// Two stages (16 KB a block) for large weights: measured faster than three
// and four on 8B (167.2 -> 169.8 tok/s; three again -1.6% in the
// 2026-11-27 10:16 session), and the freed shared memory lets the next
// kernel's blocks start beside these. Three (`_deep`) where the step is a chain of short kernels (0.6B:
// a 2,048- or 3,072-long row has two batches in flight before the wait, and
// the kernel before has the time to let them land; +2%): matmul.rs picks.
extern "C" __global__ void __launch_bounds__(32 * RING_WARPS, 8)
    matmul_bf16_t1(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N,
                   int add) {
    matmul_t1<2>(x, w, out, row0, K, N, add);
}
extern "C" __global__ void __launch_bounds__(32 * RING_WARPS, 8)
    matmul_bf16_t1_deep(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N,
                        int add) {
    matmul_t1<3>(x, w, out, row0, K, N, add);
}

// Gate/up projection and SiLU gate for one token where the weights are
// small (`w` holds the I gate rows, then the I up rows): a warp takes unit
// i, its gate row i then its up row I + i through one ring of three
// stages (so a 1,024-long pair is wholly in flight before the wait), and
// writes bf16(silu(g)·u) as silu_mul in activation.cu rounds it. Against
// the projection then silu_mul: one kernel and its hand-over fewer, and
// the f32 pair never leaves the warp (0.6B batch 1 +1.2-2.2%; 8B, whose
// 201 MB of gate/up take matmul_silu_t1 below, measured -0.6% with it).
// K a multiple of 8.
extern "C" __global__ void __launch_bounds__(32 * RING_WARPS, 8)
    matmul_silu_ring_t1(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int K, int I) {
    int i = blockIdx.x * blockDim.y + threadIdx.y;
    if (i >= I) return;
    float g = 0.0f;
    t1_rows_ring<3>(x, K, 2, [&](int j) { return w + ((size_t)j * I + i) * K; },
                    [&](int j, float r) {
                        if (j == 0)
                            g = r;
                        else if (threadIdx.x == 0)
                            out[i] = __float2bfloat16_rn(q_silu(g) * r);
                    });
}

// Gate/up projection and SiLU gate for one token (`w` holds the I gate
// rows, then the I up rows): a block of four warps takes units 2b and
// 2b + 1, warps 0-1 their gate rows and warps 2-3 their up rows, each row
// with dot_rows (the sums matmul_bf16_t1 forms), then writes bf16(silu(g)·u) as
// silu_mul in activation.cu rounds it. The f32 pair never leaves the block.
extern "C" __global__ void __launch_bounds__(128, 8)
    matmul_silu_t1(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int K, int I) {
    __shared__ float res_s[4];
    int warp = threadIdx.y, lane = threadIdx.x;
    int unit = blockIdx.x * 2 + (warp & 1);
    float res[1] = {0.0f};
    if (unit < I) dot_rows<1>(x, w + (size_t)(warp >= 2 ? I + unit : unit) * K, 1, K, true, res);
    if (lane == 0) res_s[warp] = res[0];
    __syncthreads();
    // Warp 0 has waited for the kernel before: a block's unit 2b is < I.
    if (warp == 0 && lane < 2 && blockIdx.x * 2 + lane < I)
        out[blockIdx.x * 2 + lane] = __float2bfloat16_rn(q_silu(res_s[lane]) * res_s[2 + lane]);
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): two bf16 GEMMs on the
// tensor cores then carry about 16 of f32's 24 mantissa bits of x (the
// logits projection keeps its input in f32).
extern "C" __global__ void split_hi_lo(const float* x, __nv_bfloat16* hi, __nv_bfloat16* lo, int n) {
    wait_for_producers();
    start_dependents();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
    hi[i] = h;
    lo[i] = __float2bfloat16_rn(x[i] - bf(h));
}
