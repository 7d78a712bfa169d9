// RMSNorm, one block per row, in the 256-lane row-reduction order (twin of
// norm.rs; block_norm_row below). `rms_norm_bf16` rounds once to
// bf16; `rms_norm_f32` keeps f32 for the logits projection. Dynamic shared
// memory: the row in f32.

// 1 / sqrt(row_reduce(x^2) / H + eps) of one row, computed by one warp.
__device__ __forceinline__ float warp_inv_rms(const float* xr, int H, float eps) {
    int lane = threadIdx.x & 31;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int full = H / 256 * 256;
    // Unrolled so several chunks' loads are in flight at once; each lane
    // still adds its elements in increasing order.
    // Two 16-byte loads per lane and chunk where the row is aligned.
    bool vec = (reinterpret_cast<size_t>(xr) & 15) == 0;
#pragma unroll 4
    for (int base = 0; base < full; base += 256) {
        float v[8];
        if (vec) {
            float4 a = *reinterpret_cast<const float4*>(xr + base + 8 * lane);
            float4 b = *reinterpret_cast<const float4*>(xr + base + 8 * lane + 4);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) v[e] = xr[base + 8 * lane + e];
        }
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = acc[e] + v[e] * v[e];
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
        int k = full + 8 * lane + e;
        if (k < H) {
            float v = xr[k];
            acc[e] = acc[e] + v * v;
        }
    }
    float ss = row_combine(acc);
    return 1.0f / sqrtf(ss / (float)H + eps);
}

// One row of RMSNorm by a whole block (`tid` of `nthreads`): the row is
// staged in shared memory `xf` (H floats, 16-byte aligned) with every load
// in flight at once, one warp finds 1/rms there (warp_inv_rms: the spec's
// order), and every thread stores w[k] · (x[k] · inv) through store(k, y),
// four at a time where the row is 16-byte aligned. `w_pre` holds the
// thread's first NORM_LOADS float4 of w (load_norm_weights), which callers
// load before they wait for the kernel that wrote x.
#define NORM_LOADS 4

__device__ __forceinline__ void load_norm_weights(const float* w, int H, int tid, int nthreads,
                                                  float4 w_pre[NORM_LOADS]) {
    bool vec4 = (H & 3) == 0 && (reinterpret_cast<size_t>(w) & 15) == 0;
#pragma unroll
    for (int j = 0; j < NORM_LOADS; j++) {
        int idx = tid + j * nthreads;
        if (vec4 && idx < H / 4) w_pre[j] = reinterpret_cast<const float4*>(w)[idx];
    }
}

template <typename Store>
__device__ __forceinline__ void block_norm_row(const float* xr, const float* w, const float4 w_pre[NORM_LOADS],
                                               float eps, int H, float* xf, float* inv_s, int tid, int nthreads,
                                               Store store) {
    bool vec4 = (H & 3) == 0 && (reinterpret_cast<size_t>(w) & 15) == 0 && (reinterpret_cast<size_t>(xr) & 15) == 0;
    int h4 = H / 4;
    if (vec4) {
        for (int i0 = tid; i0 < h4; i0 += NORM_LOADS * nthreads) {
            float4 v[NORM_LOADS];
#pragma unroll
            for (int j = 0; j < NORM_LOADS; j++)
                if (i0 + j * nthreads < h4) v[j] = reinterpret_cast<const float4*>(xr)[i0 + j * nthreads];
#pragma unroll
            for (int j = 0; j < NORM_LOADS; j++)
                if (i0 + j * nthreads < h4) reinterpret_cast<float4*>(xf)[i0 + j * nthreads] = v[j];
        }
    } else {
        for (int k = tid; k < H; k += nthreads) xf[k] = xr[k];
    }
    __syncthreads();
    if (tid < 32) {
        float inv = warp_inv_rms(xf, H, eps);
        if (tid == 0) *inv_s = inv;
    }
    __syncthreads();
    float inv = *inv_s;
    if (vec4) {
        auto put = [&](int idx, float4 wv) {
            float4 xv = reinterpret_cast<const float4*>(xf)[idx];
            int k = idx * 4;
            store(k, wv.x * (xv.x * inv));
            store(k + 1, wv.y * (xv.y * inv));
            store(k + 2, wv.z * (xv.z * inv));
            store(k + 3, wv.w * (xv.w * inv));
        };
#pragma unroll
        for (int j = 0; j < NORM_LOADS; j++)
            if (tid + j * nthreads < h4) put(tid + j * nthreads, w_pre[j]);
        for (int idx = tid + NORM_LOADS * nthreads; idx < h4; idx += nthreads)
            put(idx, reinterpret_cast<const float4*>(w)[idx]);
    } else {
        for (int k = tid; k < H; k += nthreads) store(k, w[k] * (xf[k] * inv));
    }
}

template <typename Out, typename Round>
__device__ __forceinline__ void rms_norm_rows(const float* x, const float* w, float eps, Out* out, int H,
                                              Round round) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ float inv_s;
    int tid = threadIdx.x, nthreads = blockDim.x;
    size_t row = blockIdx.x;
    float4 w_pre[NORM_LOADS];
    load_norm_weights(w, H, tid, nthreads, w_pre);
    wait_for_producers();
    start_dependents();
    Out* o = out + row * H;
    block_norm_row(x + row * H, w, w_pre, eps, H, reinterpret_cast<float*>(smem_raw), &inv_s, tid, nthreads,
                   [&](int k, float y) { o[k] = round(y); });
}

extern "C" __global__ void rms_norm_bf16(const float* x, const float* w, float eps, __nv_bfloat16* out, int H) {
    rms_norm_rows(x, w, eps, out, H, [](float y) { return __float2bfloat16_rn(y); });
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float eps, float* out, int H) {
    rms_norm_rows(x, w, eps, out, H, [](float y) { return y; });
}

// Rows of up to WARP_ROW_CHUNKS·256 elements (Qwen3-0.6B's 1,024), a warp
// each: lane l holds elements 8l..8l+7 of every chunk of 256, which is the
// spec's lane order, so the row is summed in registers (warp_inv_rms's
// sums) with no shared memory, no block barrier and no idle warps. At batch
// 1 a norm is a link in the step's chain, and this one is the shortest.
#define WARP_ROW_CHUNKS 4
__device__ __forceinline__ void load8_f32(const float* p, float* f) {
    float4 a = *reinterpret_cast<const float4*>(p);
    float4 b = *reinterpret_cast<const float4*>(p + 4);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// `pre(row, chunks, xv)` may change the row as loaded (xv[c][e] is element
// c·256 + 8·lane + e) before it is normalised.
struct NoPre {
    __device__ __forceinline__ void operator()(int, int, float (&)[WARP_ROW_CHUNKS][8]) const {}
};

// LAUNCH_LATE: the next kernel may launch only once this one has its
// row's sum, not right after the wait. At batch 1 the next kernel is a
// projection that issues megabytes of weight copies as it starts, and the
// norm's own loads of x would queue behind them (H100, 0.6B batch 1: +3.4%
// decode; BENCHMARKS.md).
template <bool LAUNCH_LATE, typename Out, typename Store8, typename Pre = NoPre>
__device__ __forceinline__ void rms_norm_warp_rows(const float* x, const float* w, float eps, Out* out, int T, int H,
                                                   Store8 store8, Pre pre = Pre()) {
    int lane = threadIdx.x, row = blockIdx.x * blockDim.y + threadIdx.y;
    int chunks = H / 256;
    float wv[WARP_ROW_CHUNKS][8], xv[WARP_ROW_CHUNKS][8];
#pragma unroll
    for (int c = 0; c < WARP_ROW_CHUNKS; c++)
        if (c < chunks) load8_f32(w + c * 256 + 8 * lane, wv[c]);
    wait_for_producers();
    if (!LAUNCH_LATE) start_dependents();
    if (row >= T) return;
    const float* xr = x + (size_t)row * H;
#pragma unroll
    for (int c = 0; c < WARP_ROW_CHUNKS; c++)
        if (c < chunks) load8_f32(xr + c * 256 + 8 * lane, xv[c]);
    pre(row, chunks, xv);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int c = 0; c < WARP_ROW_CHUNKS; c++)
        if (c < chunks)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = acc[e] + xv[c][e] * xv[c][e];
    float inv = 1.0f / sqrtf(row_combine(acc) / (float)H + eps);
    if (LAUNCH_LATE) start_dependents();
#pragma unroll
    for (int c = 0; c < WARP_ROW_CHUNKS; c++) {
        if (c < chunks) {
            float y[8];
#pragma unroll
            for (int e = 0; e < 8; e++) y[e] = wv[c][e] * (xv[c][e] * inv);
            store8(out + (size_t)row * H + c * 256 + 8 * lane, y);
        }
    }
}

__device__ __forceinline__ void store8_bf16(__nv_bfloat16* o, const float* y) {
    uint4 v;
    u32* p = reinterpret_cast<u32*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __nv_bfloat162 b = __floats2bfloat162_rn(y[2 * i], y[2 * i + 1]);
        p[i] = *reinterpret_cast<u32*>(&b);
    }
    *reinterpret_cast<uint4*>(o) = v;
}

extern "C" __global__ void __launch_bounds__(128) rms_norm_warp_bf16(const float* x, const float* w, float eps,
                                                                    __nv_bfloat16* out, int T, int H) {
    rms_norm_warp_rows<true>(x, w, eps, out, T, H, store8_bf16);
}

#define SPLITS_MAX 4
// A split-K projection's residual add and the RMSNorm after it, as one
// kernel: x[t] += ((part[0][t] + part[1][t]) + ...) (the shares in z order,
// as gemm_splits_sum adds them), then out[t] = rms_norm_warp_bf16 of the new
// x[t]; the same bits as the two kernels. Rows as rms_norm_warp_bf16's.
extern "C" __global__ void __launch_bounds__(128)
    splits_add_rms_norm_warp_bf16(const float* part, int splits, float* x, const float* w, float eps,
                                  __nv_bfloat16* out, int T, int H) {
    const size_t len = (size_t)T * H;
    auto add_shares = [&](int row, int chunks, float (&xv)[WARP_ROW_CHUNKS][8]) {
        // Every share's loads issued before any is added
        // (at most SPLITS_MAX shares: gemm.rs's k_splits).
        const int lane = threadIdx.x;
        float sh[WARP_ROW_CHUNKS][SPLITS_MAX][8];
#pragma unroll
        for (int c = 0; c < WARP_ROW_CHUNKS; c++)
#pragma unroll
            for (int z = 0; z < SPLITS_MAX; z++)
                if (c < chunks && z < splits)
                    load8_f32(part + z * len + (size_t)row * H + c * 256 + 8 * lane, sh[c][z]);
#pragma unroll
        for (int c = 0; c < WARP_ROW_CHUNKS; c++) {
            if (c >= chunks) continue;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float total = sh[c][0][e];
#pragma unroll
                for (int z = 1; z < SPLITS_MAX; z++)
                    if (z < splits) total = total + sh[c][z][e];
                xv[c][e] = xv[c][e] + total;
            }
            float* xr = x + (size_t)row * H + c * 256 + 8 * lane;
            *reinterpret_cast<float4*>(xr) = make_float4(xv[c][0], xv[c][1], xv[c][2], xv[c][3]);
            *reinterpret_cast<float4*>(xr + 4) = make_float4(xv[c][4], xv[c][5], xv[c][6], xv[c][7]);
        }
    };
    rms_norm_warp_rows<false>(x, w, eps, out, T, H, store8_bf16, add_shares);
}

extern "C" __global__ void __launch_bounds__(128) rms_norm_warp_f32(const float* x, const float* w, float eps,
                                                                   float* out, int T, int H) {
    rms_norm_warp_rows<true>(x, w, eps, out, T, H, [](float* o, const float* y) {
        *reinterpret_cast<float4*>(o) = make_float4(y[0], y[1], y[2], y[3]);
        *reinterpret_cast<float4*>(o + 4) = make_float4(y[4], y[5], y[6], y[7]);
    });
}
