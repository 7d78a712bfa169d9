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

// One warp: weight row `n` against the `tt` token rows starting at `x`
// (row stride K), writing out[t0 + i, n].
template <typename X>
__device__ __forceinline__ void project_rows(const X* x, const __nv_bfloat16* w, float* out, int t0, int tt, int K,
                                             int N, int n, int add) {
    int lane = threadIdx.x;
    bool vec = (K & 7) == 0;
    const __nv_bfloat16* wr = w + (size_t)n * K;
    float acc[TOKEN_TILE][8];
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++)
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
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
#pragma unroll
            for (int i = 0; i < TOKEN_TILE; i++) {
                if (i < tt) {
                    float xf[8];
                    load8_x(x + (size_t)i * K + base + u * 256 + 8 * lane, xf, vec);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[i][e] = acc[i][e] + wf[u][e] * xf[e];
                }
            }
        }
    }
    for (; base < full; base += 256) {
        float wf[8];
        load8_bf16(wr + base + 8 * lane, wf, vec);
#pragma unroll
        for (int i = 0; i < TOKEN_TILE; i++) {
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
            for (int i = 0; i < TOKEN_TILE; i++)
                if (i < tt) acc[i][e] = acc[i][e] + wv * load1_x(x + (size_t)i * K + k);
        }
    }
#pragma unroll
    for (int i = 0; i < TOKEN_TILE; i++) {
        if (i < tt) {
            float v = row_combine(acc[i]);
            if (lane == 0) {
                size_t o = (size_t)(t0 + i) * N + n;
                out[o] = add ? out[o] + v : v;
            }
        }
    }
}

// Rows [row0, T): rows before row0 are the tensor-core GEMM's (gemm.cu).
template <typename X>
__device__ __forceinline__ void project(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N,
                                        int add) {
    int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    int t0 = row0 + blockIdx.y * TOKEN_TILE;
    project_rows(x + (size_t)t0 * K, w, out, t0, min(TOKEN_TILE, T - t0), K, N, n, add);
}

extern "C" __global__ void matmul_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int row0, int T,
                                       int K, int N, int add) {
    project(x, w, out, row0, T, K, N, add);
}

extern "C" __global__ void matmul_f32x(const float* x, const __nv_bfloat16* w, float* out, int row0, int T, int K,
                                       int N, int add) {
    project(x, w, out, row0, T, K, N, add);
}

// Fused RMSNorm + projection in one launch: the block's first warps
// normalise its tile of token rows into shared memory (exactly as
// rms_norm_bf16 does: f32 norm, f32 weight, one rounding to bf16), then
// every warp projects its weight row from there. Dynamic shared memory:
// TOKEN_TILE * K bf16.
extern "C" __global__ void rms_norm_matmul_bf16(const float* x, const float* norm_w, float eps,
                                                const __nv_bfloat16* w, float* out, int T, int K, int N,
                                                int rows_per_warp) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    int t0 = blockIdx.y * TOKEN_TILE;
    int tt = min(TOKEN_TILE, T - t0);
    int warp = threadIdx.y, lane = threadIdx.x;
    for (int i = warp; i < tt; i += blockDim.y) {
        const float* xr = x + (size_t)(t0 + i) * K;
        float inv = warp_inv_rms(xr, K, eps);
        for (int k = lane; k < K; k += 32) xs[(size_t)i * K + k] = __float2bfloat16_rn(norm_w[k] * (xr[k] * inv));
    }
    __syncthreads();
    // Each warp takes rows_per_warp rows, so the norm above is paid once
    // per blockDim.y * rows_per_warp weight rows.
    for (int r = 0; r < rows_per_warp; r++) {
        int n = (blockIdx.x * rows_per_warp + r) * blockDim.y + warp;
        if (n < N) project_rows(xs, w, out, t0, tt, K, N, n, 0);
    }
}

// x = hi + lo with hi = bf16(x) and lo = bf16(x - hi): two bf16 GEMMs on the
// tensor cores then carry about 16 of f32's 24 mantissa bits of x (the
// logits projection keeps its input in f32).
extern "C" __global__ void split_hi_lo(const float* x, __nv_bfloat16* hi, __nv_bfloat16* lo, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
    hi[i] = h;
    lo[i] = __float2bfloat16_rn(x[i] - bf(h));
}
