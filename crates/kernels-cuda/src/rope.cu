// Per-head q/k RMSNorm + rotate-half RoPE, writing q and the KV cache; one
// warp per (token, head) (twin of rope.rs). v heads are rounded and stored.

#define MAX_HEAD_DIM 256

extern "C" __global__ void qk_norm_rope_store(const float* qkv, const float* qn, const float* kn, float eps,
                                              const float* rope, const u32* pos, const u32* slots,
                                              __nv_bfloat16* q_out, __nv_bfloat16* kc, __nv_bfloat16* vc,
                                              int Hq, int Hkv, int D) {
    wait_for_producers();
    start_dependents();
    __shared__ float nrm[MAX_HEAD_DIM];
    int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    size_t width = (size_t)(Hq + 2 * Hkv) * D;
    const float* x = qkv + (size_t)t * width + (size_t)h * D;
    if (h >= Hq + Hkv) {
        __nv_bfloat16* dst = vc + ((size_t)slots[t] * Hkv + (h - Hq - Hkv)) * D;
        for (int i = lane; i < D; i += 32) dst[i] = __float2bfloat16_rn(x[i]);
        return;
    }
    const float* w = h < Hq ? qn : kn;
    int per = D / 32;
    float s = 0.0f;
    for (int i = lane * per; i < (lane + 1) * per; i++) s = s + x[i] * x[i];
    s = head_combine(s);
    float inv = 1.0f / sqrtf(s / (float)D + eps);
    for (int i = lane; i < D; i += 32) nrm[i] = w[i] * (x[i] * inv);
    __syncwarp();
    const float* cs = rope + (size_t)pos[t] * D;
    int half = D / 2;
    __nv_bfloat16* dst = h < Hq ? q_out + (size_t)t * Hq * D + (size_t)h * D
                                : kc + ((size_t)slots[t] * Hkv + (h - Hq)) * D;
    for (int i = lane; i < half; i += 32) {
        float c = cs[i], sn = cs[half + i];
        float lo = nrm[i], hi = nrm[i + half];
        dst[i] = __float2bfloat16_rn(lo * c - hi * sn);
        dst[i + half] = __float2bfloat16_rn(hi * c + lo * sn);
    }
}
