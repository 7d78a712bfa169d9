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
    // Every load that depends on no other is issued before any is used:
    // this kernel is a chain of latencies at batch 1.
    u32 p = pos[t], slot = slots[t];
    size_t width = (size_t)(Hq + 2 * Hkv) * D;
    const float* x = qkv + (size_t)t * width + (size_t)h * D;
    if (h >= Hq + Hkv) {
        __nv_bfloat16* dst = vc + ((size_t)slot * Hkv + (h - Hq - Hkv)) * D;
        for (int i = lane; i < D; i += 32) dst[i] = __float2bfloat16_rn(x[i]);
        return;
    }
    const float* w = h < Hq ? qn : kn;
    // Lane l holds elements [l·per, (l+1)·per) of the head, per = D/32 ≤ 8.
    int per = D / 32, half = D / 2;
    float xv[MAX_HEAD_DIM / 32], wv[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++) {
        if (e < per) {
            xv[e] = x[lane * per + e];
            wv[e] = w[lane * per + e];
        }
    }
    // Rotation pairs (i, i + D/2) for i = lane + 32j.
    const float* cs = rope + (size_t)p * D;
    float c[MAX_HEAD_DIM / 64], sn[MAX_HEAD_DIM / 64];
#pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 64; j++) {
        int i = lane + 32 * j;
        if (i < half) {
            c[j] = cs[i];
            sn[j] = cs[half + i];
        }
    }
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++)
        if (e < per) s = s + xv[e] * xv[e];
    s = head_combine(s);
    float inv = 1.0f / sqrtf(s / (float)D + eps);
#pragma unroll
    for (int e = 0; e < MAX_HEAD_DIM / 32; e++)
        if (e < per) nrm[lane * per + e] = wv[e] * (xv[e] * inv);
    __syncwarp();
    __nv_bfloat16* dst = h < Hq ? q_out + (size_t)t * Hq * D + (size_t)h * D
                                : kc + ((size_t)slot * Hkv + (h - Hq)) * D;
#pragma unroll
    for (int j = 0; j < MAX_HEAD_DIM / 64; j++) {
        int i = lane + 32 * j;
        if (i < half) {
            float lo = nrm[i], hi = nrm[i + half];
            dst[i] = __float2bfloat16_rn(lo * c[j] - hi * sn[j]);
            dst[i + half] = __float2bfloat16_rn(hi * c[j] + lo * sn[j]);
        }
    }
}
