// Shared numerics of every kernel: the twin of kernels-cpu/src/numerics.rs,
// operation for operation. Compiled with --fmad=false, IEEE sqrt/division,
// no flush-to-zero, so each product and sum rounds exactly as on the CPU.
#include <cuda_bf16.h>

typedef unsigned int u32;

__device__ __forceinline__ float pow2i(int k) { return __int_as_float((k + 127) << 23); }

// exp(x) = 2^n * e^r, n = rint(x log2 e), two-part Cody-Waite r, degree-7
// Taylor polynomial in Horner form, 2^n applied in two exact steps; for x
// in [EXP_LO, EXP_HI] (numerics.rs), which q_exp and q_exp_branchy see to.
//
// rint(y) and its integer by the shifter 1.5·2^23 instead of conversion
// instructions (a quarter-rate pipe, under a software exp that is most of a
// prompt step's attention): y + 1.5·2^23 lands in [2^23, 2^24), whose floats
// are the integers, so the sum is 1.5·2^23 + rint(y) rounded to nearest even
// (1.5·2^23 is even: the same tie as rint's) for |y| < 2^22, and both the
// difference back and the bit patterns' difference are exact. Here |y| <=
// 151. A zero n may come out +0 where rint gives -0 (y in [-0.5, -0]): r
// and the result are the same either way (x - n·C1 - n·C2 with C2 < 0).
__device__ __forceinline__ float q_exp_in_range(float x) {
    const float SHIFT = __int_as_float(0x4b400000);  // 1.5·2^23
    const float t = x * __int_as_float(0x3fb8aa3b) + SHIFT;
    float n = t - SHIFT;
    float r = (x - n * __int_as_float(0x3f318000)) - n * __int_as_float(0xb95e8083);
    float p = __int_as_float(0x39500d01);
    p = p * r + __int_as_float(0x3ab60b61);
    p = p * r + __int_as_float(0x3c088889);
    p = p * r + __int_as_float(0x3d2aaaab);
    p = p * r + __int_as_float(0x3e2aaaab);
    p = p * r + __int_as_float(0x3f000000);
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int ni = __float_as_int(t) - __float_as_int(SHIFT);
    int n1 = ni >> 1;
    int n2 = ni - n1;
    return (p * pow2i(n1)) * pow2i(n2);
}

#define Q_EXP_HI __int_as_float(0x42b17218)
#define Q_EXP_LO __int_as_float(0xc2cff1b5)

// exp as the CPU's numerics::exp: NaN returned as it is, +inf above EXP_HI,
// 0 below EXP_LO. Branch-free: the polynomial is worked out for x clamped
// into its range (the same x there, so the same bits) and the specials are
// selected at the end. Early returns made every call its own basic block,
// so the 8 exps of a tensor-core attention step ran one after another; as
// straight-line code they interleave (BENCHMARKS.md).
__device__ __forceinline__ float q_exp(float x) {
    const float xc = fminf(fmaxf(x, Q_EXP_LO), Q_EXP_HI);  // NaN -> EXP_LO
    float e = q_exp_in_range(xc);
    e = x < Q_EXP_LO ? 0.0f : e;
    e = x > Q_EXP_HI ? __int_as_float(0x7f800000) : e;
    return isnan(x) ? x : e;
}

// q_exp for x <= 0 or NaN (x - max in a softmax, the max taken over x's own
// set): there the upper clamp and the +inf case never apply, so the same
// bits with three instructions fewer.
__device__ __forceinline__ float q_exp_nonpos(float x) {
    const float xc = fmaxf(x, Q_EXP_LO);  // NaN -> EXP_LO, as in q_exp
    float e = q_exp_in_range(xc);
    e = x < Q_EXP_LO ? 0.0f : e;
    return isnan(x) ? x : e;
}

// The same function with the specials returned early, for the exact decode
// attention (attention.cu), which batch-1 decode runs: each of its blocks
// runs its code once with a cold instruction cache, where a loop around one
// smaller copy beats interleaved straight-line code (BENCHMARKS.md).
__device__ __forceinline__ float q_exp_branchy(float x) {
    if (isnan(x)) return x;
    if (x > Q_EXP_HI) return __int_as_float(0x7f800000);
    if (x < Q_EXP_LO) return 0.0f;
    return q_exp_in_range(x);
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

// Eight consecutive bf16, as one 16-byte load holds them, widened to f32.
__device__ __forceinline__ void widen8(uint4 u, float* f) {
    u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
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

// One head's RMSNorm and rotate-half RoPE (twin of rope.rs), a warp per
// head of D = 32·PER, lane l holding elements [l·PER, (l+1)·PER): x raw,
// w the norm weight, c and s the cosine and sine of each element's rotation
// pair (i, i + D/2); the partner of element k, k ± D/2, is lane l ± 16's.
// Sum of squares in element order per lane, then the head butterfly;
// y[k] = n[k]·c − n[k + D/2]·s for k < D/2, n[k]·c + n[k − D/2]·s above,
// n = w·(x·inv). rope.cu and attention.cu both use it.
template <int PER>
__device__ __forceinline__ void norm_rope_head(const float x[PER], const float w[PER], const float c[PER],
                                               const float s[PER], float eps, float y[PER]) {
    float ss = 0.0f;
#pragma unroll
    for (int e = 0; e < PER; e++) ss = ss + x[e] * x[e];
    ss = head_combine(ss);
    float inv = 1.0f / sqrtf(ss / (float)(PER * 32) + eps);
    bool low = (threadIdx.x & 31) < 16;
#pragma unroll
    for (int e = 0; e < PER; e++) {
        float n = w[e] * (x[e] * inv);
        float other = __shfl_xor_sync(0xffffffffu, n, 16);
        y[e] = low ? n * c[e] - other * s[e] : n * c[e] + other * s[e];
    }
}

// norm_rope_head for two heads a warp, the same bits: lanes 16h..16h+15
// take head h, and lane p of them the elements that lanes p (xl) and p + 16
// (xh) hold in norm_rope_head. There every lane ends head_combine with the
// same total (each pairing adds two values that are equal across the pair,
// and a + b == b + a), and lane p's is ((ss_p + ss_p+16) + ...) with the
// later pairings inside its 16 lanes: here the first pairing is the lane's
// own sum of its halves, the rest the same shuffles. The rotation's partner
// value (lane p + 16's for lane p, and back) is then the lane's other half.
template <int PER>
__device__ __forceinline__ void norm_rope_pair(const float (&xl)[PER], const float (&xh)[PER],
                                               const float (&wl)[PER], const float (&wh)[PER],
                                               const float (&c)[PER], const float (&s)[PER], float eps,
                                               float (&yl)[PER], float (&yh)[PER]) {
    float sl = 0.0f, sh = 0.0f;
#pragma unroll
    for (int e = 0; e < PER; e++) sl = sl + xl[e] * xl[e];
#pragma unroll
    for (int e = 0; e < PER; e++) sh = sh + xh[e] * xh[e];
    float ss = sl + sh;
    ss = ss + __shfl_xor_sync(0xffffffffu, ss, 8);
    ss = ss + __shfl_xor_sync(0xffffffffu, ss, 4);
    ss = ss + __shfl_xor_sync(0xffffffffu, ss, 2);
    ss = ss + __shfl_xor_sync(0xffffffffu, ss, 1);
    float inv = 1.0f / sqrtf(ss / (float)(PER * 32) + eps);
#pragma unroll
    for (int e = 0; e < PER; e++) {
        float nl = wl[e] * (xl[e] * inv);
        float nh = wh[e] * (xh[e] * inv);
        yl[e] = nl * c[e] - nh * s[e];
        yh[e] = nh * c[e] + nl * s[e];
    }
}
