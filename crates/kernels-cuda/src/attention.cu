// Causal attention over the paged KV cache, split into fixed chunks of 64
// positions (twin of attention.rs). Each block computes one chunk's max, sum
// and weighted values; the last block of a (token, kv head) to finish merges
// the chunks in order. Latency, not bandwidth, bounds a decode step's
// attention: few, wide loads and independent reductions, while every sum
// keeps the spec's order.

#define CHUNK 64

// The outputs of one (token, kv head)'s G q heads from their chunks, a warp
// per head, merged in chunk order: M = max of the chunk maxima (exact in any
// order), f_c = exp(m_c - M), L = sum of l_c·f_c, o[i] = sum of o_c[i]·f_c,
// then o[i] / L rounded once. `fac` holds G·chunks floats (checked by the
// launcher); partials are read from L2, where the other blocks left them.
template <int PER, int THREADS>
__device__ __forceinline__ void combine_chunks(const float* part, int th0, int G, int ctx, int max_chunks,
                                               float* fac, __nv_bfloat16* out) {
    const int D = PER * 32;
    const int WARPS = THREADS / 32;
    int chunks = (ctx + CHUNK - 1) / CHUNK;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int hh = warp; hh < G; hh += WARPS) {
        const float* p = part + (size_t)(th0 + hh) * max_chunks * (D + 2);
        float* f = fac + hh * chunks;
        // The first chunks' values and sums are loaded with the maxima, so
        // that one round of L2 latency serves the usual short context.
        const int EARLY = 32 / PER;
        float early[EARLY][PER];
#pragma unroll
        for (int c = 0; c < EARLY; c++)
#pragma unroll
            for (int e = 0; e < PER; e++) early[c][e] = c < chunks ? __ldcg(p + c * (D + 2) + 2 + lane + 32 * e) : 0.0f;
        float lc = lane < chunks ? __ldcg(p + lane * (D + 2) + 1) : 0.0f;
        float m = __int_as_float(0xff800000);
        for (int c = lane; c < chunks; c += 32) {
            f[c] = __ldcg(p + c * (D + 2));
            m = fmaxf(m, f[c]);
        }
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        for (int c = lane; c < chunks; c += 32) f[c] = q_exp(f[c] - m);
        __syncwarp();
        // Every lane forms the same sums in the same order.
        float l = 0.0f;
        for (int c = 0; c < chunks; c++) {
            float lv = c < 32 ? __shfl_sync(0xffffffffu, lc, c) : __ldcg(p + c * (D + 2) + 1);
            l = l + lv * f[c];
        }
        float o[PER];
#pragma unroll
        for (int e = 0; e < PER; e++) o[e] = 0.0f;
#pragma unroll
        for (int c = 0; c < EARLY; c++) {
            if (c < chunks) {
                float fc = f[c];
#pragma unroll
                for (int e = 0; e < PER; e++) o[e] = o[e] + early[c][e] * fc;
            }
        }
#pragma unroll 4
        for (int c = EARLY; c < chunks; c++) {
            float fc = f[c];
#pragma unroll
            for (int e = 0; e < PER; e++) o[e] = o[e] + __ldcg(p + c * (D + 2) + 2 + lane + 32 * e) * fc;
        }
#pragma unroll
        for (int e = 0; e < PER; e++) out[(size_t)(th0 + hh) * D + lane + 32 * e] = __float2bfloat16_rn(o[e] / l);
    }
}

// This lane's PER elements of the query heads [h0, h0 + HPASS) of the group
// (zeros past the group's G heads).
template <int PER, int HPASS>
__device__ __forceinline__ void load_q(const __nv_bfloat16* q, int h0, int G, float qv[HPASS][PER]) {
#pragma unroll
    for (int hh = 0; hh < HPASS; hh++)
#pragma unroll
        for (int e = 0; e < PER; e++) qv[hh][e] = h0 + hh < G ? bf(q[(size_t)(h0 + hh) * PER * 32 + e]) : 0.0f;
}

// What attn_rope_chunk takes instead of q: the fused QKV output of the
// step, the q/k norm weights, the rotation table and the new rows' slots;
// q is also written out (by each kv head's first chunk), as
// qk_norm_rope_store writes it.
struct RopeIn {
    const float* qkv;
    const float* qn;
    const float* kn;
    float eps;
    const float* rope;
    const u32* slots;
    __nv_bfloat16* q_out;
};

// qk_norm_rope_store's q for the query heads [h0, h0 + HPASS) of the group at `x`
// (this lane's elements), rounded to bf16 as attention reads it; written
// out too when `store`.
template <int PER, int HPASS>
__device__ __forceinline__ void rope_q(const float* x, const float w[PER], const float c[PER], const float s[PER],
                                       float eps, int h0, int G, __nv_bfloat16* q_out, bool store,
                                       float qv[HPASS][PER]) {
    const int D = PER * 32;
    float xv[HPASS][PER];
#pragma unroll
    for (int hh = 0; hh < HPASS; hh++)
#pragma unroll
        for (int e = 0; e < PER; e++) xv[hh][e] = h0 + hh < G ? x[(size_t)(h0 + hh) * D + e] : 0.0f;
#pragma unroll
    for (int hh = 0; hh < HPASS; hh++) {
        float y[PER];
        norm_rope_head<PER>(xv[hh], w, c, s, eps, y);
#pragma unroll
        for (int e = 0; e < PER; e++) {
            __nv_bfloat16 b = __float2bfloat16_rn(y[e]);
            qv[hh][e] = h0 + hh < G ? bf(b) : 0.0f;
            if (store && h0 + hh < G) q_out[(size_t)(h0 + hh) * D + e] = b;
        }
    }
}

// One block per (token, kv head, chunk): the chunk's keys and values are
// read once, with wide loads all in flight together, into shared memory,
// and serve every q head of the GQA group. Dynamic shared memory:
// 2·CHUNK·D bf16 (keys, values), then G·CHUNK f32 scores.
//
// The batch layout (positions, sequences, block tables) is written by the
// host before a step's first kernel, and no kernel writes a cache row but
// its own tokens' (rope.cu). So the layout is read, and with `decode` (one
// token per sequence: every row before the token's own position is older
// than this step) those rows' copies are issued, before the wait for the
// kernel that wrote q and the new rows.
//
// ROPE (one token per sequence, grids of the 256-thread shape only): q and the token's new key and value
// rows come from the QKV projection's output instead, normalised and
// rotated here as rope.cu does it; the block whose chunk holds the token's
// position stores the new rows in the cache and uses them.
template <int PER, int THREADS, int HPASS, bool ROPE>
__device__ __forceinline__ void attn_chunk_body(const __nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc,
                                                const u32* pos, const u32* seq,
                                                const u32* tables, int max_blocks, int bs, int Hq, int Hkv,
                                                float scale, int max_chunks, float* part, u32* done,
                                                __nv_bfloat16* out, int decode, RopeIn ri) {
    const int D = PER * 32, WARPS = THREADS / 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* vs = ks + CHUNK * D;
    float* sc = reinterpret_cast<float*>(vs + CHUNK * D);
    __shared__ u32 slot_of[CHUNK];
    int tg = blockIdx.x, c = blockIdx.y;
    int t = tg / Hkv, g = tg % Hkv;
    int G = Hq / Hkv;
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    u32 pt = pos[t], st = seq[t];
    int ctx = (int)pt + 1;
    int start = c * CHUNK;
    if (start >= ctx) {
        start_dependents();
        return;
    }
    int len = min(CHUNK, ctx - start);
    const u32* table = tables + (size_t)st * max_blocks;
    for (int j = tid; j < len; j += THREADS) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    // Rows of D bf16 in 16-byte pieces (D is a multiple of 32), copied
    // straight to shared memory: every copy is in flight before any is
    // waited for. Rows from `old` on may be this step's.
    const int pieces = D / 8;
    int old = decode ? min(len, (int)pt - start) : 0;
    auto copy_rows = [&](int r0, int r1) {
        for (int i = r0 * pieces + tid; i < r1 * pieces; i += THREADS) {
            int r = i / pieces, o = (i % pieces) * 8;
            size_t src = ((size_t)slot_of[r] * Hkv + g) * D + o;
            copy16_async(ks + r * D + o, kc + src);
            copy16_async(vs + r * D + o, vc + src);
        }
    };
    copy_rows(0, old);
    // This lane's norm weights and rotation pairs' cosines and sines.
    float wq[PER], wk[PER], cv[PER], sv[PER];
    if (ROPE) {
        const float* cs = ri.rope + (size_t)pt * D;
#pragma unroll
        for (int e = 0; e < PER; e++) {
            int k = lane * PER + e, i = (lane % 16) * PER + e;
            wq[e] = ri.qn[k];
            wk[e] = ri.kn[k];
            cv[e] = cs[i];
            sv[e] = cs[D / 2 + i];
        }
    }
    wait_for_producers();
    start_dependents();
    const __nv_bfloat16* qg = q + ((size_t)t * Hq + g * G) * D + lane * PER;
    const float* xg = ROPE ? ri.qkv + (size_t)t * (Hq + 2 * Hkv) * D + lane * PER : nullptr;
    __nv_bfloat16* qo = ROPE ? ri.q_out + ((size_t)t * Hq + g * G) * D + lane * PER : nullptr;
    float qv[HPASS][PER];
    if (ROPE) {
        rope_q<PER, HPASS>(xg + (size_t)g * G * D, wq, cv, sv, ri.eps, 0, G, qo, c == 0 && warp == 0, qv);
        // The new row: its key normalised and rotated, its value rounded.
        if (old < len && warp < 2) {
            size_t dst = ((size_t)ri.slots[t] * Hkv + g) * D + lane * PER;
            const float* x = xg + (size_t)(Hq + (warp == 0 ? 0 : Hkv) + g) * D;
            float xv[PER], y[PER];
#pragma unroll
            for (int e = 0; e < PER; e++) xv[e] = x[e];
            if (warp == 0) norm_rope_head<PER>(xv, wk, cv, sv, ri.eps, y);
#pragma unroll
            for (int e = 0; e < PER; e++) {
                __nv_bfloat16 b = __float2bfloat16_rn(warp == 0 ? y[e] : xv[e]);
                (warp == 0 ? kc : vc)[dst + e] = b;
                (warp == 0 ? ks : vs)[old * D + lane * PER + e] = b;
            }
        }
    } else {
        load_q<PER, HPASS>(qg, 0, G, qv);
        copy_rows(old, len);
    }
    copies_wait();
    __syncthreads();
    // Scores: warp w takes positions w, w + WARPS, ...; lane l owns elements
    // [l·PER, (l+1)·PER) of the head, summed in order, then the head
    // butterfly. Each key serves HPASS heads per pass.
    for (int h0 = 0; h0 < G; h0 += HPASS) {
        if (h0 > 0) {
            if (ROPE)
                rope_q<PER, HPASS>(xg + (size_t)g * G * D, wq, cv, sv, ri.eps, h0, G, qo, c == 0 && warp == 0, qv);
            else
                load_q<PER, HPASS>(qg, h0, G, qv);
        }
        float s[HPASS][CHUNK / WARPS];
#pragma unroll
        for (int r = 0; r < CHUNK / WARPS; r++) {
            int j = warp + r * WARPS;
            const __nv_bfloat16* k = ks + (j < len ? j : 0) * D + lane * PER;
            float kf[PER];
#pragma unroll
            for (int e = 0; e < PER; e++) kf[e] = bf(k[e]);
#pragma unroll
            for (int hh = 0; hh < HPASS; hh++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < PER; e++) a = a + qv[hh][e] * kf[e];
                s[hh][r] = a;
            }
        }
#pragma unroll
        for (int hh = 0; hh < HPASS; hh++) {
            if (h0 + hh < G) {
#pragma unroll
                for (int r = 0; r < CHUNK / WARPS; r++) s[hh][r] = head_combine(s[hh][r]);
                if (lane == 0) {
#pragma unroll
                    for (int r = 0; r < CHUNK / WARPS; r++) {
                        int j = warp + r * WARPS;
                        if (j < len) sc[(h0 + hh) * CHUNK + j] = s[hh][r] * scale;
                    }
                }
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
#pragma unroll 16
            for (int j = 0; j < len; j++) l = l + sh[j];
            float* dst = part + (((size_t)t * Hq + g * G + hh) * max_chunks + c) * (D + 2);
            dst[0] = m;
            dst[1] = l;
        }
    }
    __syncthreads();
    // o[i] = sum of e_p * v_p[i] in increasing p: each thread two adjacent
    // dimensions of one head at a time.
    for (int o = tid; o < G * D / 2; o += THREADS) {
        int hh = o / (D / 2), i = (o % (D / 2)) * 2;
        const float* sh = sc + hh * CHUNK;
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll 8
        for (int j = 0; j < len; j++) {
            __nv_bfloat162 v = *reinterpret_cast<const __nv_bfloat162*>(vs + j * D + i);
            float e = sh[j];
            a0 = a0 + e * __low2float(v);
            a1 = a1 + e * __high2float(v);
        }
        float* dst = part + (((size_t)t * Hq + g * G + hh) * max_chunks + c) * (D + 2);
        dst[2 + i] = a0;
        dst[3 + i] = a1;
    }
    // The last of the token's chunks to finish merges them all: its
    // partials, and the others' (made visible by their fences), are read
    // from L2.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int chunks = (ctx + CHUNK - 1) / CHUNK;
        last = atomicAdd(done + tg, 1u) == (u32)(chunks - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid == 0) done[tg] = 0;
    // Keys and values are no longer needed: their shared memory holds the
    // chunk factors.
    combine_chunks<PER, THREADS>(part, t * Hq + g * G, G, ctx, max_chunks, reinterpret_cast<float*>(smem_raw), out);
}

// Two shapes of block: for a grid of few blocks (batch-1 decode), 256
// threads and the scores of four heads per pass over the keys, which
// shortens the chain of latencies; for many blocks, 128 threads and one
// head per pass, fewer registers and more blocks per SM. q as given
// (attn_chunk*), or, in the few-block shape, made here from the QKV output
// (attn_rope_chunk, whose q is null, as the others' RopeIn pointers are).
#define ATTN_CASE(DD, THREADS, HPASS, ROPE)                                                                     \
    case DD:                                                                                                    \
        attn_chunk_body<DD, THREADS, HPASS, ROPE>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale,  \
                                                  max_chunks, part, done, out, decode, ri);                     \
        break;
#define ATTN_KERNEL(NAME, THREADS, HPASS, ROPE)                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                       \
        NAME(const __nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc, const u32* pos,                      \
             const u32* seq, const u32* tables, int max_blocks, int bs, int Hq, int Hkv, int D, float scale,    \
             int max_chunks, float* part, u32* done, __nv_bfloat16* out, int decode, const float* qkv,          \
             const float* qn, const float* kn, float eps, const float* rope, const u32* slots,                  \
             __nv_bfloat16* q_out) {                                                                            \
        RopeIn ri = {qkv, qn, kn, eps, rope, slots, q_out};                                                     \
        switch (D / 32) {                                                                                       \
            ATTN_CASE(1, THREADS, HPASS, ROPE)                                                                  \
            ATTN_CASE(2, THREADS, HPASS, ROPE)                                                                  \
            ATTN_CASE(4, THREADS, HPASS, ROPE)                                                                  \
            ATTN_CASE(8, THREADS, HPASS, ROPE)                                                                  \
        }                                                                                                       \
    }
ATTN_KERNEL(attn_chunk, 256, 4, false)
ATTN_KERNEL(attn_chunk_many, 128, 1, false)
ATTN_KERNEL(attn_rope_chunk, 256, 4, true)
