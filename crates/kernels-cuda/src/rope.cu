// Per-head q/k RMSNorm + rotate-half RoPE, writing q and the KV cache; one
// warp per (token, head) (twin of rope.rs; norm_rope_head in numerics.cuh).
// v heads are rounded and stored. ROPE_WARPS warps a block, each on its own
// (token, head): one-warp blocks left a 2,048-token prompt step waiting on
// block launches (65,536 blocks of one warp).

#define ROPE_WARPS 8

template <int PER>
__device__ __forceinline__ void norm_rope_store(const float* x, const float* w, const float* cs, float eps,
                                                __nv_bfloat16* dst) {
    const int D = PER * 32;
    int lane = threadIdx.x % 32;
    // Every load is issued before any is used: at batch 1 this kernel is a
    // chain of latencies.
    float xv[PER], wv[PER], c[PER], s[PER], y[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) {
        int k = lane * PER + e, i = (lane % 16) * PER + e;
        xv[e] = x[k];
        wv[e] = w[k];
        c[e] = cs[i];
        s[e] = cs[D / 2 + i];
    }
    norm_rope_head<PER>(xv, wv, c, s, eps, y);
#pragma unroll
    for (int e = 0; e < PER; e++) dst[lane * PER + e] = __float2bfloat16_rn(y[e]);
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
        for (int i = lane; i < D; i += 32) dst[i] = __float2bfloat16_rn(x[i]);
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
