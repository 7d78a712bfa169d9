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
    if (vec) return *reinterpret_cast<const uint4*>(p);
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return make_uint4(h[0] | ((u32)h[1] << 16), h[2] | ((u32)h[3] << 16), h[4] | ((u32)h[5] << 16),
                      h[6] | ((u32)h[7] << 16));
}

__device__ __forceinline__ void widen8(uint4 u, float* f) {
    u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// NB chunks of 256 from `base` into the lanes, for R weight rows `rs`
// elements apart at once: every chunk's weights are loaded before any is
// used, so each thread keeps R·NB 16-byte loads in flight, and each x chunk
// is read once for all R rows. Each row's chunks are still added in
// increasing order, as the spec orders them. While `pending`, `before`
// runs once right after the loads are issued: the first batch of a kernel
// waits for the kernel before (dependent_launch.cuh) only then.
template <int NB, int TT, int R, typename X, typename F>
__device__ __forceinline__ void dot_chunks(const X* x, const __nv_bfloat16* wr, size_t rs, int tt, int K, int base,
                                           bool vec, bool& pending, F& before, float acc[R][TT][8]) {
    int lane = threadIdx.x;
    uint4 raw[R][NB];
#pragma unroll
    for (int u = 0; u < NB; u++)
#pragma unroll
        for (int r = 0; r < R; r++) raw[r][u] = load8_raw(wr + r * rs + base + u * 256 + 8 * lane, vec);
    if (pending) {
        before();
        pending = false;
    }
#pragma unroll
    for (int u = 0; u < NB; u++) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; r++) widen8(raw[r][u], wf[r]);
#pragma unroll
        for (int i = 0; i < TT; i++) {
            if (i < tt) {
                float xf[8];
                load8_x(x + (size_t)i * K + base + u * 256 + 8 * lane, xf, vec);
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][i][e] = acc[r][i][e] + wf[r][e] * xf[e];
            }
        }
    }
}

// One warp: R weight rows (`wr`, then every `rs` elements) against the
// `tt` ≤ TT token rows starting at `x` (row stride K); every lane gets
// res[r][i] for i < tt. TT = 1 serves batch-1 decode with a quarter of the
// accumulators, so more warps fit on an SM; R = 2 doubles the loads in
// flight where few warps stream many rows.
template <int TT, int R, typename X, typename F>
__device__ __forceinline__ void dot_rows(const X* x, const __nv_bfloat16* wr, size_t rs, int tt, int K, bool& pending,
                                         F& before, float res[R][TT]) {
    int lane = threadIdx.x;
    bool vec = (K & 7) == 0;
    float acc[R][TT][8];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < TT; i++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[r][i][e] = 0.0f;
    int full = K / 256 * 256;
    int base = 0;
    // (8 loads in flight per thread measured slower: 8B 148 -> 138 tok/s.)
    for (; base + UNROLL * 256 <= full; base += UNROLL * 256)
        dot_chunks<UNROLL, TT, R>(x, wr, rs, tt, K, base, vec, pending, before, acc);
    for (; base < full; base += 256) dot_chunks<1, TT, R>(x, wr, rs, tt, K, base, vec, pending, before, acc);
    if (pending) {
        before();
        pending = false;
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int k = full + 8 * lane + e;
        if (k < K) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wv = bf(wr[r * rs + k]);
#pragma unroll
                for (int i = 0; i < TT; i++)
                    if (i < tt) acc[r][i][e] = acc[r][i][e] + wv * load1_x(x + (size_t)i * K + k);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < TT; i++)
            if (i < tt) res[r][i] = row_combine(acc[r][i]);
}

// Hooks of a kernel's first weight batch (see dot_chunks).
struct NoHook {
    __device__ void operator()() const {}
};
struct WaitForProducers {
    __device__ void operator()() const {
        wait_for_producers();
        start_dependents();
    }
};

// dot_rows for weight row `n`, written to out[t0 + i, n] (added when `add`).
template <int TT, typename X, typename F>
__device__ __forceinline__ void project_rows(const X* x, const __nv_bfloat16* w, float* out, int t0, int tt, int K,
                                             int N, int n, int add, bool& pending, F& before) {
    float res[1][TT];
    dot_rows<TT, 1>(x, w + (size_t)n * K, 0, tt, K, pending, before, res);
#pragma unroll
    for (int i = 0; i < TT; i++) {
        if (i < tt && threadIdx.x == 0) {
            size_t o = (size_t)(t0 + i) * N + n;
            out[o] = add ? out[o] + res[0][i] : res[0][i];
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
    bool pending = true;
    WaitForProducers wait;
    project_rows<TT>(x + (size_t)t0 * K, w, out, t0, min(TT, T - t0), K, N, n, add, pending, wait);
}

// The single-token f32 kernel serves the vocabulary projection, many waves
// long; the single-token bf16 one is matmul_bf16_t1 below.
#define MATMUL(NAME, X, TT, MIN_BLOCKS)                                                                      \
    extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS)                                           \
        NAME(const X* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N, int add) {      \
        project<TT>(x, w, out, row0, T, K, N, add);                                                         \
    }
MATMUL(matmul_bf16, __nv_bfloat16, TOKEN_TILE, 1)
MATMUL(matmul_f32x, float, TOKEN_TILE, 1)
MATMUL(matmul_f32x_t1, float, 1, 1)

// The single-token bf16 projection streams each warp's weight row through a
// ring of RING_STAGES batches in shared memory (async_copy.cuh): up to
// three batches of a row in flight at no register cost, where registers
// held only one. Same sums, same order as dot_rows. Rows whose length is
// not a multiple of 8 take dot_rows.
#define RING_STAGES 3
#define RING_WARPS 4
extern "C" __global__ void __launch_bounds__(32 * RING_WARPS, 8)
    matmul_bf16_t1(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int row0, int T, int K, int N,
                   int add) {
    __shared__ __align__(16) uint4 ring[RING_WARPS][RING_STAGES][UNROLL][32];
    int n = blockIdx.x * blockDim.y + threadIdx.y;
    if (n >= N) return;
    if ((K & 7) != 0) {
        project<1>(x, w, out, row0, T, K, N, add);
        return;
    }
    int lane = threadIdx.x;
    const __nv_bfloat16* wr = w + (size_t)n * K;
    const __nv_bfloat16* xr = x + (size_t)row0 * K;
    uint4(*mine)[UNROLL][32] = ring[threadIdx.y];
    int chunks = K / 256, batches = (chunks + UNROLL - 1) / UNROLL;
    // Every batch commits a group, empty past the row's end, so that
    // "all but the newest RING_STAGES - 1 groups" is always batch b.
    auto issue = [&](int b) {
        if (b < batches) {
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                int c = b * UNROLL + u;
                if (c < chunks) copy16_async(&mine[b % RING_STAGES][u][lane], wr + (size_t)c * 256 + 8 * lane);
            }
        }
        copies_commit();
    };
#pragma unroll
    for (int b = 0; b < RING_STAGES - 1; b++) issue(b);
    wait_for_producers();
    start_dependents();
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < batches; b++) {
        issue(b + RING_STAGES - 1);
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
                widen8(mine[b % RING_STAGES][u][lane], wf);
                widen8(xv[u], xf);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = acc[e] + wf[e] * xf[e];
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int k = chunks * 256 + 8 * lane + e;
        if (k < K) acc[e] = acc[e] + bf(wr[k]) * bf(xr[k]);
    }
    float r = row_combine(acc);
    if (lane == 0) {
        size_t o = (size_t)row0 * N + n;
        out[o] = add ? out[o] + r : r;
    }
}

// Four normalised elements: bf16(w · (x · inv)), the spec's order.
__device__ __forceinline__ void norm4(__nv_bfloat16* d, float4 xv, float4 wv, float inv) {
    d[0] = __float2bfloat16_rn(wv.x * (xv.x * inv));
    d[1] = __float2bfloat16_rn(wv.y * (xv.y * inv));
    d[2] = __float2bfloat16_rn(wv.z * (xv.z * inv));
    d[3] = __float2bfloat16_rn(wv.w * (xv.w * inv));
}

// Fused RMSNorm + projection in one launch: the block normalises its tile
// of token rows into shared memory (exactly as rms_norm_bf16 does: f32
// norm, f32 weight, one rounding to bf16), then every warp projects its
// weight rows from there. Dynamic shared memory: TT * K bf16, and with one
// token the f32 row too (fused_smem in matmul.rs). With SILU, w holds
// N = 2I rows (gate, then up): a warp's unit u is the pair of rows u and
// I + u, and it writes the bf16 silu(gate)·up of activation.cu to out
// [T, I] instead of the f32 pair. Without SILU and with PAIRS, a warp takes
// its units two at a time. (Issuing a warp's first weight loads before the
// norm, held in registers across it, measured slower: 8B 155 -> 145 tok/s,
// at up to 160 registers a thread.)
#define NORM_LOADS 4
template <int TT, bool SILU, bool PAIRS>
__device__ __forceinline__ void rms_norm_matmul(const float* x, const float* norm_w, float eps,
                                                const __nv_bfloat16* w, void* out, int T, int K, int N,
                                                int rows_per_warp) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __shared__ float inv_s[TT];
    int t0 = blockIdx.y * TT;
    int tt = min(TT, T - t0);
    int warp = threadIdx.y, lane = threadIdx.x;
    int tid = warp * 32 + lane, nthreads = 32 * blockDim.y;
    int units = SILU ? N / 2 : N;
    bool vec4 = (K & 3) == 0;
    int k4 = K / 4;
    // The start of the warp's weight rows goes to L2 while the kernel
    // before finishes.
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
    // The norm weights do not depend on the kernel before either.
    // (With a tile of rows, w_pre[0] serves the thread's first element,
    // column (tid % k4) * 4.)
    float4 w_pre[NORM_LOADS];
#pragma unroll
    for (int j = 0; j < NORM_LOADS; j++) {
        int idx = TT == 1 ? tid + j * nthreads : (tid % max(k4, 1));
        if (vec4 && idx < k4 && (TT == 1 || j == 0)) w_pre[j] = reinterpret_cast<const float4*>(norm_w)[idx];
    }
    wait_for_producers();
    start_dependents();
    if constexpr (TT == 1) {
        // One row: the block copies it to shared memory with all its
        // loads in flight at once, one warp reduces it there in the
        // spec's order, and every thread writes normalised elements.
        float* xf = reinterpret_cast<float*>(smem_raw + ((size_t)K * 2 + 15) / 16 * 16);
        const float* xr = x + (size_t)t0 * K;
        if (vec4) {
            for (int i0 = tid; i0 < k4; i0 += NORM_LOADS * nthreads) {
                float4 v[NORM_LOADS];
#pragma unroll
                for (int j = 0; j < NORM_LOADS; j++)
                    if (i0 + j * nthreads < k4) v[j] = reinterpret_cast<const float4*>(xr)[i0 + j * nthreads];
#pragma unroll
                for (int j = 0; j < NORM_LOADS; j++)
                    if (i0 + j * nthreads < k4) reinterpret_cast<float4*>(xf)[i0 + j * nthreads] = v[j];
            }
        } else {
            for (int k = tid; k < K; k += nthreads) xf[k] = xr[k];
        }
        __syncthreads();
        if (warp == 0) {
            float inv = warp_inv_rms(xf, K, eps);
            if (lane == 0) inv_s[0] = inv;
        }
        __syncthreads();
        float inv = inv_s[0];
        if (vec4) {
#pragma unroll
            for (int j = 0; j < NORM_LOADS; j++) {
                int idx = tid + j * nthreads;
                if (idx < k4) norm4(xs + (size_t)idx * 4, reinterpret_cast<const float4*>(xf)[idx], w_pre[j], inv);
            }
            for (int idx = tid + NORM_LOADS * nthreads; idx < k4; idx += nthreads)
                norm4(xs + (size_t)idx * 4, reinterpret_cast<const float4*>(xf)[idx],
                      reinterpret_cast<const float4*>(norm_w)[idx], inv);
        } else {
            for (int k = tid; k < K; k += nthreads) xs[k] = __float2bfloat16_rn(norm_w[k] * (xf[k] * inv));
        }
    } else {
        // A tile of rows: a warp per row finds 1/rms from global
        // memory, then the whole block writes normalised elements; each
        // thread's first four are loaded before the reduction.
        float4 x_first = make_float4(0.f, 0.f, 0.f, 0.f);
        if (vec4 && tid < tt * k4) {
            int i = tid / k4, k = (tid % k4) * 4;
            x_first = *reinterpret_cast<const float4*>(x + (size_t)(t0 + i) * K + k);
        }
        for (int i = warp; i < tt; i += blockDim.y) {
            float inv = warp_inv_rms(x + (size_t)(t0 + i) * K, K, eps);
            if (lane == 0) inv_s[i] = inv;
        }
        __syncthreads();
        if (vec4) {
            for (int idx = tid; idx < tt * k4; idx += nthreads) {
                int i = idx / k4, k = (idx % k4) * 4;
                bool first = idx == tid;
                float4 xv = first ? x_first : *reinterpret_cast<const float4*>(x + (size_t)(t0 + i) * K + k);
                float4 wv = first ? w_pre[0] : *reinterpret_cast<const float4*>(norm_w + k);
                norm4(xs + (size_t)i * K + k, xv, wv, inv_s[i]);
            }
        } else {
            for (int idx = tid; idx < tt * K; idx += nthreads) {
                int i = idx / K, k = idx % K;
                xs[idx] = __float2bfloat16_rn(norm_w[k] * (x[(size_t)(t0 + i) * K + k] * inv_s[i]));
            }
        }
    }
    __syncthreads();
    bool pending = false;
    NoHook none;
    float* outf = static_cast<float*>(out);
    __nv_bfloat16* outb = static_cast<__nv_bfloat16*>(out);
    // Each warp takes rows_per_warp units, so the norm is paid once per
    // blockDim.y * rows_per_warp units.
    for (int r = 0; r < rows_per_warp; r++) {
        int u = (blockIdx.x * rows_per_warp + r) * blockDim.y + warp;
        if (u >= units) break;
        if constexpr (SILU) {
            float res[2][TT];
            if constexpr (TT == 1) {
                dot_rows<TT, 2>(xs, w + (size_t)u * K, (size_t)units * K, tt, K, pending, none, res);
            } else {
                dot_rows<TT, 1>(xs, w + (size_t)u * K, 0, tt, K, pending, none, res);
                dot_rows<TT, 1>(xs, w + (size_t)(units + u) * K, 0, tt, K, pending, none, res + 1);
            }
#pragma unroll
            for (int i = 0; i < TT; i++)
                if (i < tt && lane == 0)
                    outb[(size_t)(t0 + i) * units + u] = __float2bfloat16_rn(q_silu(res[0][i]) * res[1][i]);
            continue;
        }
        if constexpr (PAIRS) {
            int u2 = u + blockDim.y;
            if (r + 1 < rows_per_warp && u2 < units) {
                float res[2][TT];
                dot_rows<TT, 2>(xs, w + (size_t)u * K, (size_t)blockDim.y * K, tt, K, pending, none, res);
#pragma unroll
                for (int i = 0; i < TT; i++) {
                    if (i < tt && lane == 0) {
                        outf[(size_t)(t0 + i) * N + u] = res[0][i];
                        outf[(size_t)(t0 + i) * N + u2] = res[1][i];
                    }
                }
                r++;
                continue;
            }
        }
        project_rows<TT>(xs, w, outf, t0, tt, K, N, u, 0, pending, none);
    }
}

#define RMS_NORM_MATMUL(NAME, OUT, TT, SILU, PAIRS)                                                              \
    extern "C" __global__ void NAME(const float* x, const float* norm_w, float eps, const __nv_bfloat16* w,      \
                                    OUT* out, int T, int K, int N, int rows_per_warp) {                          \
        rms_norm_matmul<TT, SILU, PAIRS>(x, norm_w, eps, w, out, T, K, N, rows_per_warp);                       \
    }
RMS_NORM_MATMUL(rms_norm_matmul_bf16, float, TOKEN_TILE, false, false)
RMS_NORM_MATMUL(rms_norm_matmul_bf16_t1, float, 1, false, false)
RMS_NORM_MATMUL(rms_norm_matmul_bf16_t1_pairs, float, 1, false, true)
RMS_NORM_MATMUL(rms_norm_matmul_silu_bf16, __nv_bfloat16, TOKEN_TILE, true, false)
RMS_NORM_MATMUL(rms_norm_matmul_silu_bf16_t1, __nv_bfloat16, 1, true, false)

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
