// Per-head q/k RMSNorm + rotate-half RoPE, writing q and the KV cache; one
// warp per (token, head) (twin of rope.rs; norm_rope_head in numerics.cuh).
// v heads are rounded and stored. ROPE_WARPS warps a block, each on its own
// (token, head): one-warp blocks left a 2,048-token prompt step waiting on
// block launches (65,536 blocks of one warp).

#define ROPE_WARPS 8

// PER consecutive floats from p (16-byte loads where PER is a multiple of
// 4, 8-byte ones for 2; p is aligned to PER floats: heads of D floats
// start at multiples of D, and a lane's share at multiples of PER).
template <int PER>
__device__ __forceinline__ void load_per(const float* p, float (&v)[PER]) {
    if constexpr (PER % 4 == 0) {
#pragma unroll
        for (int e = 0; e < PER; e += 4) {
            float4 a = *reinterpret_cast<const float4*>(p + e);
            v[e] = a.x; v[e + 1] = a.y; v[e + 2] = a.z; v[e + 3] = a.w;
        }
    } else if constexpr (PER == 2) {
        float2 a = *reinterpret_cast<const float2*>(p);
        v[0] = a.x; v[1] = a.y;
    } else {
#pragma unroll
        for (int e = 0; e < PER; e++) v[e] = p[e];
    }
}

// bf16(y[e]) to dst[e] for e < PER in one store of 2·PER bytes (at most
// 16: dst is aligned like load_per's p).
template <int PER>
__device__ __forceinline__ void store_per(__nv_bfloat16* dst, const float (&y)[PER]) {
    if constexpr (PER == 1) {
        dst[0] = __float2bfloat16_rn(y[0]);
    } else {
#pragma unroll
        for (int e = 0; e < PER; e += 8 < PER ? 8 : PER) {
            constexpr int N = PER < 8 ? PER : 8;  // bf16 a store
            u32 w[N / 2];
#pragma unroll
            for (int i = 0; i < N / 2; i++) {
                __nv_bfloat162 b = __floats2bfloat162_rn(y[e + 2 * i], y[e + 2 * i + 1]);
                w[i] = *reinterpret_cast<u32*>(&b);
            }
            if constexpr (N == 8) *reinterpret_cast<uint4*>(dst + e) = make_uint4(w[0], w[1], w[2], w[3]);
            if constexpr (N == 4) *reinterpret_cast<uint2*>(dst + e) = make_uint2(w[0], w[1]);
            if constexpr (N == 2) *reinterpret_cast<u32*>(dst + e) = w[0];
        }
    }
}

template <int PER>
__device__ __forceinline__ void norm_rope_store(const float* x, const float* w, const float* cs, float eps,
                                                __nv_bfloat16* dst) {
    const int D = PER * 32;
    int lane = threadIdx.x % 32;
    // Every load is issued before any is used: at batch 1 this kernel is a
    // chain of latencies.
    float xv[PER], wv[PER], c[PER], s[PER], y[PER];
    load_per<PER>(x + lane * PER, xv);
    load_per<PER>(w + lane * PER, wv);
    load_per<PER>(cs + (lane % 16) * PER, c);
    load_per<PER>(cs + D / 2 + (lane % 16) * PER, s);
    norm_rope_head<PER>(xv, wv, c, s, eps, y);
    store_per<PER>(dst + lane * PER, y);
}

// A v head: rounded and stored, PER elements a lane.
template <int PER>
__device__ __forceinline__ void round_store(const float* x, __nv_bfloat16* dst) {
    int lane = threadIdx.x % 32;
    float v[PER];
    load_per<PER>(x + lane * PER, v);
    store_per<PER>(dst + lane * PER, v);
}

extern "C" __global__ void qk_norm_rope_store(const float* qkv, const float* qn, const float* kn, float eps,
                                              const float* rope, const u32* pos, const u32* slots,
                                              __nv_bfloat16* q_out, __nv_bfloat16* kc, __nv_bfloat16* vc,
                                              int T, int Hq, int Hkv, int D) {
    wait_for_producers();
    start_dependents();
    // Warp gw of the grid takes (token gw / heads, head gw % heads).
    const int heads = Hq + 2 * Hkv;
    const long long gw = (long long)blockIdx.x * ROPE_WARPS + threadIdx.x / 32;
    if (gw >= (long long)T * heads) return;
    int t = (int)(gw / heads), h = (int)(gw % heads), lane = threadIdx.x % 32;
    u32 p = pos[t], slot = slots[t];
    size_t width = (size_t)heads * D;
    const float* x = qkv + (size_t)t * width + (size_t)h * D;
    if (h >= Hq + Hkv) {
        __nv_bfloat16* dst = vc + ((size_t)slot * Hkv + (h - Hq - Hkv)) * D;
        switch (D / 32) {
        case 1: round_store<1>(x, dst); break;
        case 2: round_store<2>(x, dst); break;
        case 4: round_store<4>(x, dst); break;
        case 8: round_store<8>(x, dst); break;
        }
        return;
    }
    const float* w = h < Hq ? qn : kn;
    const float* cs = rope + (size_t)p * D;
    __nv_bfloat16* dst = h < Hq ? q_out + (size_t)t * Hq * D + (size_t)h * D
                                : kc + ((size_t)slot * Hkv + (h - Hq)) * D;
    // D is 32, 64, 128 or 256 (rope.rs checks).
    switch (D / 32) {
    case 1: norm_rope_store<1>(x, w, cs, eps, dst); break;
    case 2: norm_rope_store<2>(x, w, cs, eps, dst); break;
    case 4: norm_rope_store<4>(x, w, cs, eps, dst); break;
    case 8: norm_rope_store<8>(x, w, cs, eps, dst); break;
    }
}
