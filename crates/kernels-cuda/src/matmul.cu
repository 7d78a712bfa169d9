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
    // UNROLL chunks' weights are loaded before any is used, so each thread
    // keeps several 16-byte loads in flight; they are still added to the
    // lanes in increasing chunk order, as the spec orders them.
    for (; base + UNROLL * 256 <= full; base += UNROLL * 256) {
        float wf[UNROLL][8];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) load8_bf16(wr + base + u * 256 + 8 * lane, wf[u], vec);
        if (wait) {
            // Weights do not depend on the kernel before (dependent_launch.cuh):
            // the first loads are in flight while it finishes.
            wait_for_producers();
            start_dependents();
            wait = false;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
#pragma unroll
            for (int i = 0; i < TT; i++) {
                if (i < tt) {
                    float xf[8];
                    load8_x(x + (size_t)i * K + base + u * 256 + 8 * lane, xf, vec);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[i][e] = acc[i][e] + wf[u][e] * xf[e];
                }
            }
        }
    }
    if (wait) {
        wait_for_producers();
        start_dependents();
    }
    for (; base < full; base += 256) {
        float wf[8];
        load8_bf16(wr + base + 8 * lane, wf, vec);
#pragma unroll
        for (int i = 0; i < TT; i++) {
            if (i < tt) {
                float xf[8];
                load8_x(x + (size_t)i * K + base + 8 * lane, xf, vec);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][e] = acc[i][e] + wf[e] * xf[e];
            }
        }
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

// The single-token bf16 kernel is held to 64 registers, so 8 blocks (32
// warps) fit on an SM: 4,224 rows in flight on an H100, one wave for the
// 4,096-row projections of 8B-class models instead of 1.1. (The f32 one
// serves the vocabulary projection, many waves long, and would spill.)
#define MATMUL(NAME, X, TT, MIN_BLOCKS)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)                                           \
        NAME(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N, int add) {      \
        project<TT>(x, w, out, row0, T, K, N, add);                                                         \
    }
MATMUL(matmul_bf16, __nv_bfloat16, TOKEN_TILE, 1)
MATMUL(matmul_bf16_t1, __nv_bfloat16, 1, 8)
MATMUL(matmul_f32x, float, TOKEN_TILE, 1)
MATMUL(matmul_f32x_t1, float, 1, 1)

// Fused RMSNorm + projection in one launch: the block's first warps
// normalise its tile of token rows into shared memory (exactly as
// rms_norm_bf16 does: f32 norm, f32 weight, one rounding to bf16), then
// every warp projects its weight rows from there. Dynamic shared memory:
// TT * K bf16. With SILU, w holds N = 2I rows (gate, then up): a warp's
// unit u is the pair of rows u and I + u, and it writes the bf16
// silu(gate)·up of activation.cu to out [T, I] instead of the f32 pair.
template <int TT, bool SILU>
__device__ __forceinline__ void rms_norm_matmul(const float* x, const float* norm_w, float eps,
                                                const __nv_bfloat16* w, void* out, int T, int K, int N,
                                                int rows_per_warp) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    int t0 = blockIdx.y * TT;
    int tt = min(TT, T - t0);
    int warp = threadIdx.y, lane = threadIdx.x;
    int units = SILU ? N / 2 : N;
    // The weights do not depend on the kernel before: bring the start of
    // this warp's rows into L2 while it finishes.
    if (blockIdx.y == 0) {
        size_t head = (size_t)min(K, UNROLL * 256) * 2;
        for (int r = 0; r < rows_per_warp; r++) {
            int u = (blockIdx.x * rows_per_warp + r) * blockDim.y + warp;
            if (u < units) {
                prefetch_l2(w + (size_t)u * K, head, lane, 32);
                if (SILU) prefetch_l2(w + (size_t)(units + u) * K, head, lane, 32);
            }
        }
    }
    wait_for_producers();
    start_dependents();
    for (int i = warp; i < tt; i += blockDim.y) {
        const float* xr = x + (size_t)(t0 + i) * K;
        float inv = warp_inv_rms(xr, K, eps);
        for (int k = lane; k < K; k += 32) xs[(size_t)i * K + k] = __float2bfloat16_rn(norm_w[k] * (xr[k] * inv));
    }
    __syncthreads();
    // Each warp takes rows_per_warp units, so the norm above is paid once
    // per blockDim.y * rows_per_warp units.
    for (int r = 0; r < rows_per_warp; r++) {
        int u = (blockIdx.x * rows_per_warp + r) * blockDim.y + warp;
        if (u >= units) continue;
        if (!SILU) {
            project_rows<TT>(xs, w, static_cast<float*>(out), t0, tt, K, N, u, 0, false);
            continue;
        }
        float g[TT], up[TT];
        dot_rows<TT>(xs, w + (size_t)u * K, tt, K, false, g);
        dot_rows<TT>(xs, w + (size_t)(units + u) * K, tt, K, false, up);
#pragma unroll
        for (int i = 0; i < TT; i++)
            if (i < tt && lane == 0)
                static_cast<__nv_bfloat16*>(out)[(size_t)(t0 + i) * units + u] = __float2bfloat16_rn(q_silu(g[i]) * up[i]);
    }
}

#define RMS_NORM_MATMUL(NAME, OUT, TT, SILU)                                                                     \
    extern "C" __global__ void NAME(const float* x, const float* norm_w, float eps, const __nv_bfloat16* w,      \
                                    OUT* out, int T, int K, int N, int rows_per_warp) {                          \
        rms_norm_matmul<TT, SILU>(x, norm_w, eps, w, out, T, K, N, rows_per_warp);                              \
    }
RMS_NORM_MATMUL(rms_norm_matmul_bf16, float, TOKEN_TILE, false)
RMS_NORM_MATMUL(rms_norm_matmul_bf16_t1, float, 1, false)
RMS_NORM_MATMUL(rms_norm_matmul_silu_bf16, __nv_bfloat16, TOKEN_TILE, true)
RMS_NORM_MATMUL(rms_norm_matmul_silu_bf16_t1, __nv_bfloat16, 1, true)

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
