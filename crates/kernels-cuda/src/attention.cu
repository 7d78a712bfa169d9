// Causal attention over the paged KV cache, split into fixed chunks of 64
// positions (twin of attention.rs). attn_chunk computes each chunk's max,
// sum and weighted values; attn_combine merges the chunks in order.
// Latency, not bandwidth, bounds a decode step's attention: few, wide loads
// and independent reductions, while every sum keeps the spec's order.

#define CHUNK 64
#define THREADS 128
#define WARPS (THREADS / 32)

// One block per (token, kv head, chunk): the chunk's keys and values are
// read once, with wide loads all in flight together, into shared memory,
// and serve every q head of the GQA group. Dynamic shared memory:
// 2·CHUNK·D bf16 (keys, values), then G·CHUNK f32 scores.
template <int PER>
__device__ __forceinline__ void attn_chunk_body(const __nv_bfloat16* q, const __nv_bfloat16* kc,
                                                const __nv_bfloat16* vc, const u32* pos, const u32* seq,
                                                const u32* tables, int max_blocks, int bs, int Hq, int Hkv,
                                                float scale, int max_chunks, float* part) {
    const int D = PER * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* vs = ks + CHUNK * D;
    float* sc = reinterpret_cast<float*>(vs + CHUNK * D);
    __shared__ u32 slot_of[CHUNK];
    int tg = blockIdx.x, c = blockIdx.y;
    int t = tg / Hkv, g = tg % Hkv;
    int G = Hq / Hkv;
    int ctx = (int)pos[t] + 1;
    int start = c * CHUNK;
    if (start >= ctx) return;
    int len = min(CHUNK, ctx - start);
    const u32* table = tables + (size_t)seq[t] * max_blocks;
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    for (int j = tid; j < len; j += THREADS) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    // Rows of D bf16 in 16-byte pieces (D is a multiple of 32).
    const int pieces = D / 8;
    for (int i = tid; i < len * pieces; i += THREADS) {
        int r = i / pieces, o = (i % pieces) * 8;
        size_t src = ((size_t)slot_of[r] * Hkv + g) * D + o;
        *reinterpret_cast<uint4*>(ks + r * D + o) = *reinterpret_cast<const uint4*>(kc + src);
        *reinterpret_cast<uint4*>(vs + r * D + o) = *reinterpret_cast<const uint4*>(vc + src);
    }
    __syncthreads();
    // Scores: warp w takes positions w, w + WARPS, ...; lane l owns elements
    // [l·PER, (l+1)·PER) of the head, summed in order, then the head butterfly.
    for (int hh = 0; hh < G; hh++) {
        const __nv_bfloat16* qh = q + ((size_t)t * Hq + g * G + hh) * D + lane * PER;
        float qv[PER];
#pragma unroll
        for (int e = 0; e < PER; e++) qv[e] = bf(qh[e]);
        float s[CHUNK / WARPS];
#pragma unroll
        for (int r = 0; r < CHUNK / WARPS; r++) {
            int j = warp + r * WARPS;
            const __nv_bfloat16* k = ks + (j < len ? j : 0) * D + lane * PER;
            float a = 0.0f;
#pragma unroll
            for (int e = 0; e < PER; e++) a = a + qv[e] * bf(k[e]);
            s[r] = a;
        }
#pragma unroll
        for (int r = 0; r < CHUNK / WARPS; r++) s[r] = head_combine(s[r]);
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < CHUNK / WARPS; r++) {
                int j = warp + r * WARPS;
                if (j < len) sc[hh * CHUNK + j] = s[r] * scale;
            }
        }
    }
    __syncthreads();
    // Per head: the max (exact in any order), e_p = exp(s_p - m), and l = sum
    // of e_p in increasing p.
    for (int hh = warp; hh < G; hh += WARPS) {
        float* sh = sc + hh * CHUNK;
        float m = __int_as_float(0xff800000);
        if (lane < len) m = sh[lane];
        if (lane + 32 < len) m = fmaxf(m, sh[lane + 32]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane < len) sh[lane] = q_exp(sh[lane] - m);
        if (lane + 32 < len) sh[lane + 32] = q_exp(sh[lane + 32] - m);
        __syncwarp();
        if (lane == 0) {
            float l = 0.0f;
            for (int j = 0; j < len; j++) l = l + sh[j];
            float* out = part + (((size_t)t * Hq + g * G + hh) * max_chunks + c) * (D + 2);
            out[0] = m;
            out[1] = l;
        }
    }
    __syncthreads();
    // o[i] = sum of e_p * v_p[i] in increasing p: each thread two adjacent
    // dimensions of one head at a time.
    for (int o = tid; o < G * D / 2; o += THREADS) {
        int hh = o / (D / 2), i = (o % (D / 2)) * 2;
        const float* sh = sc + hh * CHUNK;
        float a0 = 0.0f, a1 = 0.0f;
        for (int j = 0; j < len; j++) {
            __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(vs + j * D + i);
            float e = sh[j];
            a0 = a0 + e * __low2float(v);
            a1 = a1 + e * __high2float(v);
        }
        float* out = part + (((size_t)t * Hq + g * G + hh) * max_chunks + c) * (D + 2);
        out[2 + i] = a0;
        out[3 + i] = a1;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    attn_chunk(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, const u32* pos,
               const u32* seq, const u32* tables, int max_blocks, int bs, int Hq, int Hkv, int D, float scale,
               int max_chunks, float* part) {
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
