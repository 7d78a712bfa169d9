// Causal attention over the paged KV cache, split into fixed chunks of 64
// positions (twin of attention.rs). attn_chunk computes each chunk's max,
// sum and weighted values; attn_combine merges the chunks in order.

#define CHUNK 64
// Fewest warps per block (the launcher uses max(128, head_dim) threads).
#define WARPS 4

// One block per (token, q head, chunk). Latency, not bandwidth, bounds a
// decode step's attention, so every load of the chunk's values and keys is
// issued before the arithmetic that needs them; the sums still run in the
// spec's order.
template <int PER>
__device__ __forceinline__ void attn_chunk_body(const __nv_bfloat16* q, const __nv_bfloat16* kc,
                                                const __nv_bfloat16* vc, const u32* pos, const u32* seq,
                                                const u32* tables, int max_blocks, int bs, int Hq, int Hkv,
                                                float scale, int max_chunks, float* part) {
    const int D = PER * 32;
    __shared__ float sc[CHUNK];
    __shared__ u32 slot_of[CHUNK];
    int th = blockIdx.x, c = blockIdx.y;
    int t = th / Hq, h = th % Hq;
    int ctx = (int)pos[t] + 1;
    int start = c * CHUNK;
    if (start >= ctx) return;
    int len = min(CHUNK, ctx - start);
    const u32* table = tables + (size_t)seq[t] * max_blocks;
    int kvh = h / (Hq / Hkv);
    const __nv_bfloat16* qh = q + (size_t)t * Hq * D + (size_t)h * D;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    // Thread i owns output dimension i (the launcher gives D <= blockDim.x threads).
    int i = threadIdx.x;
    float vv[CHUNK];
#pragma unroll
    for (int j = 0; j < CHUNK; j++)
        vv[j] = (i < D && j < len) ? bf(vc[((size_t)slot_of[j] * Hkv + kvh) * D + i]) : 0.0f;
    float qv[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) qv[e] = bf(qh[lane * PER + e]);
    // Warp w scores positions w, w + warps, ... (at most CHUNK / WARPS of them).
    float kv[CHUNK / WARPS][PER];
#pragma unroll
    for (int r = 0; r < CHUNK / WARPS; r++) {
        int j = warp + r * warps;
        const __nv_bfloat16* k = kc + ((size_t)slot_of[j < len ? j : 0] * Hkv + kvh) * D + lane * PER;
#pragma unroll
        for (int e = 0; e < PER; e++) kv[r][e] = j < len ? bf(k[e]) : 0.0f;
    }
#pragma unroll
    for (int r = 0; r < CHUNK / WARPS; r++) {
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < PER; e++) s = s + qv[e] * kv[r][e];
        s = head_combine(s);
        int j = warp + r * warps;
        if (lane == 0 && j < len) sc[j] = s * scale;
    }
    __syncthreads();
    // The max is exact in any order.
    float m = __int_as_float(0xff800000);
    if (lane < len) m = sc[lane];
    if (lane + 32 < len) m = fmaxf(m, sc[lane + 32]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __syncthreads();
    for (int j = threadIdx.x; j < len; j += blockDim.x) sc[j] = q_exp(sc[j] - m);
    __syncthreads();
    float* out = part + ((size_t)th * max_chunks + c) * (D + 2);
    if (threadIdx.x == 0) {
        float l = 0.0f;
        for (int j = 0; j < len; j++) l = l + sc[j];
        out[0] = m;
        out[1] = l;
    }
    if (i < D) {
        float o = 0.0f;
#pragma unroll
        for (int j = 0; j < CHUNK; j++)
            if (j < len) o = o + sc[j] * vv[j];
        out[2 + i] = o;
    }
}

extern "C" __global__ void attn_chunk(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc,
                                      const u32* pos, const u32* seq, const u32* tables, int max_blocks, int bs,
                                      int Hq, int Hkv, int D, float scale, int max_chunks, float* part) {
    switch (D / 32) {
        case 1: attn_chunk_body<1>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale, max_chunks, part); break;
        case 2: attn_chunk_body<2>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale, max_chunks, part); break;
        case 4: attn_chunk_body<4>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale, max_chunks, part); break;
        case 8: attn_chunk_body<8>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale, max_chunks, part); break;
    }
}

extern "C" __global__ void attn_combine(const float* part, const u32* pos, int Hq, int D, int max_chunks,
                                        __nv_bfloat16* out) {
    int th = blockIdx.x;
    int t = th / Hq;
    int chunks = ((int)pos[t] + CHUNK) / CHUNK;
    const float* p = part + (size_t)th * max_chunks * (D + 2);
    float big_m = __int_as_float(0xff800000);
    for (int c = 0; c < chunks; c++) big_m = fmaxf(big_m, p[c * (D + 2)]);
    float big_l = 0.0f;
    for (int c = 0; c < chunks; c++) big_l = big_l + p[c * (D + 2) + 1] * q_exp(p[c * (D + 2)] - big_m);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float o = 0.0f;
        for (int c = 0; c < chunks; c++) o = o + p[c * (D + 2) + 2 + i] * q_exp(p[c * (D + 2)] - big_m);
        out[(size_t)th * D + i] = __float2bfloat16_rn(o / big_l);
    }
}
