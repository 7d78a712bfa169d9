// Causal attention over the paged KV cache, split into fixed chunks of 64
// positions (twin of attention.rs). attn_chunk computes each chunk's max,
// sum and weighted values; attn_combine merges the chunks in order.

#define CHUNK 64
// Warps per block (the launcher uses 128 threads) and head_dim / 32 at most.
#define WARPS 4
#define MAX_PER 8

extern "C" __global__ void attn_chunk(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc,
                                      const u32* pos, const u32* seq, const u32* tables, int max_blocks, int bs,
                                      int Hq, int Hkv, int D, float scale, int max_chunks, float* part) {
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
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    // Each warp scores positions warp, warp + 4, ...: all its key loads are
    // issued before any shuffle, so they overlap instead of queueing.
    int per = D / 32;
    float qv[MAX_PER];
    for (int i = 0; i < per; i++) qv[i] = bf(qh[lane * per + i]);
    float dots[CHUNK / WARPS];
#pragma unroll
    for (int r = 0; r < CHUNK / WARPS; r++) {
        int j = warp + r * WARPS;
        float s = 0.0f;
        if (j < len) {
            const __nv_bfloat16* k = kc + ((size_t)slot_of[j] * Hkv + kvh) * D + lane * per;
            for (int i = 0; i < per; i++) s = s + qv[i] * bf(k[i]);
        }
        dots[r] = s;
    }
#pragma unroll
    for (int r = 0; r < CHUNK / WARPS; r++) {
        float s = head_combine(dots[r]);
        int j = warp + r * WARPS;
        if (lane == 0 && j < len) sc[j] = s * scale;
    }
    __syncthreads();
    float m = __int_as_float(0xff800000);
    for (int j = 0; j < len; j++) m = fmaxf(m, sc[j]);
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
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        // Loads of 8 positions go out together; the sum stays in position order.
        float o = 0.0f;
        int j = 0;
        for (; j + 8 <= len; j += 8) {
            float vv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) vv[u] = bf(vc[((size_t)slot_of[j + u] * Hkv + kvh) * D + i]);
#pragma unroll
            for (int u = 0; u < 8; u++) o = o + sc[j + u] * vv[u];
        }
        for (; j < len; j++) o = o + sc[j] * bf(vc[((size_t)slot_of[j] * Hkv + kvh) * D + i]);
        out[2 + i] = o;
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
