// Shared numerics of every kernel: the twin of kernels-cpu/src/numerics.rs,
// operation for operation. Compiled with --fmad=false, IEEE sqrt/division,
// no flush-to-zero, so each product and sum rounds exactly as on the CPU.
#include <cuda_bf16.h>

typedef unsigned int u32;

__device__ __forceinline__ float pow2i(int k) { return __int_as_float((k + 127) << 23); }

// exp(x) = 2^n * e^r, n = rint(x log2 e), two-part Cody-Waite r, degree-7
// Taylor polynomial in Horner form, 2^n applied in two exact steps.
__device__ __forceinline__ float q_exp(float x) {
    if (isnan(x)) return x;
    if (x > __int_as_float(0x42b17218)) return __int_as_float(0x7f800000);
    if (x < __int_as_float(0xc2cff1b5)) return 0.0f;
    float n = rintf(x * __int_as_float(0x3fb8aa3b));
    float r = (x - n * __int_as_float(0x3f318000)) - n * __int_as_float(0xb95e8083);
    float p = __int_as_float(0x39500d01);
    p = p * r + __int_as_float(0x3ab60b61);
    p = p * r + __int_as_float(0x3c088889);
    p = p * r + __int_as_float(0x3d2aaaab);
    p = p * r + __int_as_float(0x3e2aaaab);
    p = p * r + __int_as_float(0x3f000000);
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int ni = (int)n;
    int n1 = ni >> 1;
    int n2 = ni - n1;
    return (p * pow2i(n1)) * pow2i(n2);
}

__device__ __forceinline__ float q_silu(float x) { return x / (1.0f + q_exp(-x)); }

__device__ __forceinline__ float bf(__nv_bfloat16 v) { return __bfloat162float(v); }

// Row reduction: thread `t` of a warp holds lanes 8t..8t+7 in acc[]; pair
// lanes at offsets 4, 2, 1 inside the thread, then 128..8 across threads.
__device__ __forceinline__ float row_combine(float acc[8]) {
#pragma unroll
    for (int e = 0; e < 4; e++) acc[e] = acc[e] + acc[e + 4];
    acc[0] = acc[0] + acc[2];
    acc[1] = acc[1] + acc[3];
    acc[0] = acc[0] + acc[1];
    float v = acc[0];
    v = v + __shfl_xor_sync(0xffffffffu, v, 16);
    v = v + __shfl_xor_sync(0xffffffffu, v, 8);
    v = v + __shfl_xor_sync(0xffffffffu, v, 4);
    v = v + __shfl_xor_sync(0xffffffffu, v, 2);
    v = v + __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

// Head reduction: lane sums already formed; pair lanes 16, 8, 4, 2, 1.
__device__ __forceinline__ float head_combine(float v) {
    v = v + __shfl_xor_sync(0xffffffffu, v, 16);
    v = v + __shfl_xor_sync(0xffffffffu, v, 8);
    v = v + __shfl_xor_sync(0xffffffffu, v, 4);
    v = v + __shfl_xor_sync(0xffffffffu, v, 2);
    v = v + __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

// Eight consecutive bf16 widened to f32; one 16-byte load when aligned.
__device__ __forceinline__ void load8_bf16(const __nv_bfloat16* p, float* f, bool vec) {
    if (vec) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            f[2 * i] = __uint_as_float(w[i] << 16);
            f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = bf(p[e]);
    }
}

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
