// Causal attention over the paged KV cache, split into fixed chunks of 64
// positions (twin of attention.rs). Each block computes one chunk's max, sum
// and weighted values; the last block of a (token, kv head) to finish merges
// the chunks in order. Latency, not bandwidth, bounds a decode step's
// attention: few, wide loads and independent reductions, while every sum
// keeps the spec's order.

#define CHUNK 64

// The shared::cluster address of the shared variable at `p` in the
// cluster's block `rank` (sm_90).
__device__ __forceinline__ u32 cluster_peer_addr(const void* p, int rank) {
#if __CUDA_ARCH__ >= 900
    u32 r;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_u32(p)), "r"(rank));
    return r;
#else
    return smem_u32(p);
#endif
}

// The hand-over of a cluster's partials to its block 0 without a cluster
// barrier on the way: block 0 initialises an mbarrier (mbar_init) and every
// block arrives at a relaxed cluster barrier early (cluster_arrive), whose
// wait (cluster_wait) comes just before a block first touches another's
// shared memory. Each other block then stores its partials into block 0's
// shared memory with st.async (send_async), whose bytes the mbarrier
// counts; block 0 announces how many to expect (mbar_expect) and waits for
// them (mbar_wait<true>), then reads them from its own shared memory.
// A release-form cluster barrier (the earlier hand-over) costs a GPU-scope
// memory barrier (MEMBAR.ALL.GPU) in every thread; st.async needs none.
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
#else
__device__ __forceinline__ void cluster_arrive() {}
__device__ __forceinline__ void cluster_wait() {}
#endif
// Floats src[i] for i = tid, tid + step, ... below n to dst[i] (a shared
// array) in the cluster's block 0, counted by its mbarrier `mb` (at the
// same offsets there as here); the two addresses mapped once.
__device__ __forceinline__ void send_async(const float* dst, const float* src, int tid, int step, int n, u64* mb) {
#if __CUDA_ARCH__ >= 900
    u32 a = cluster_peer_addr(dst, 0), b = cluster_peer_addr(mb, 0);
#pragma unroll 1
    for (int i = tid; i < n; i += step)
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(a + 4 * i),
                     "r"(__float_as_uint(src[i])), "r"(b)
                     : "memory");
#endif
}

// One (token, q head)'s output from its `chunks` partials at `p`, merged
// in chunk order by one warp: M = max of the chunk maxima (exact in any
// order), f_c = exp(m_c - M), L = sum of l_c·f_c, o[i] = sum of o_c[i]·f_c,
// then o[i] / L rounded once. `f` holds `chunks` floats of shared memory;
// `part(c, i)` reads float i of chunk c's partials (m_c, l_c, o_c).
// LOCAL: the partials are in this block's shared memory (the cluster
// kernels), a few cycles away: plain rolled loops, without the early loads
// that hide L2's latency, and a fraction of their code on the path.
template <int PER, bool LOCAL = false, typename Part>
__device__ __forceinline__ void combine_head_from(Part part, int chunks, float* f, __nv_bfloat16* out) {
    const int D = PER * 32;
    int lane = threadIdx.x % 32;
    // The first chunks' values and sums are loaded with the maxima, so
    // that one round of L2 latency serves the usual short context.
    const int EARLY = LOCAL ? 1 : 32 / PER;
    float early[EARLY][PER];
    if (!LOCAL) {
#pragma unroll
        for (int c = 0; c < EARLY; c++)
#pragma unroll
            for (int e = 0; e < PER; e++) early[c][e] = c < chunks ? part(c, 2 + lane + 32 * e) : 0.0f;
    }
    float lc = !LOCAL && lane < chunks ? part(lane, 1) : 0.0f;
    float m = __int_as_float(0xff800000);
    // Loops over chunks stay rolled: the merge runs once per (token, kv
    // head) on a cold instruction cache, so its code size is its latency.
#pragma unroll 1
    for (int c = lane; c < chunks; c += 32) {
        f[c] = part(c, 0);
        m = fmaxf(m, f[c]);
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
#pragma unroll 1
    for (int c = lane; c < chunks; c += 32) f[c] = q_exp_branchy(f[c] - m);
    __syncwarp();
    // Every lane forms the same sums in the same order.
    float l = 0.0f;
#pragma unroll 1
    for (int c = 0; c < chunks; c++) {
        float lv = !LOCAL && c < 32 ? __shfl_sync(0xffffffffu, lc, c) : part(c, 1);
        l = l + lv * f[c];
    }
    float o[PER];
#pragma unroll
    for (int e = 0; e < PER; e++) o[e] = 0.0f;
    if constexpr (LOCAL) {
#pragma unroll 1
        for (int c = 0; c < chunks; c++) {
            float fc = f[c];
#pragma unroll
            for (int e = 0; e < PER; e++) o[e] = o[e] + part(c, 2 + lane + 32 * e) * fc;
        }
        // One division's code (with its slow path) in a rolled loop, the
        // outputs passed down the registers.
#pragma unroll 1
        for (int e = 0; e < PER; e++) {
            out[lane + 32 * e] = __float2bfloat16_rn(o[0] / l);
#pragma unroll
            for (int k = 0; k + 1 < PER; k++) o[k] = o[k + 1];
        }
    } else {
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
            for (int e = 0; e < PER; e++) o[e] = o[e] + part(c, 2 + lane + 32 * e) * fc;
        }
#pragma unroll
        for (int e = 0; e < PER; e++) out[lane + 32 * e] = __float2bfloat16_rn(o[e] / l);
    }
}

// combine_head_from with the partials at `p` (chunk c at p + c·(D + 2)),
// read from L2, where other blocks left them.
template <int PER>
__device__ __forceinline__ void combine_head(const float* p, int chunks, float* f, __nv_bfloat16* out) {
    const int D = PER * 32;
    combine_head_from<PER>([=](int c, int i) { return __ldcg(p + c * (D + 2) + i); }, chunks, f, out);
}

// The outputs of one (token, kv head)'s G q heads from their chunks, a warp
// per head; `fac` holds G·chunks floats (checked by the launcher).
template <int PER, int THREADS>
__device__ __forceinline__ void combine_chunks(const float* part, int th0, int G, int ctx, int max_chunks,
                                               float* fac, __nv_bfloat16* out) {
    const int D = PER * 32;
    int chunks = (ctx + CHUNK - 1) / CHUNK;
    for (int hh = threadIdx.x / 32; hh < G; hh += THREADS / 32)
        combine_head<PER>(part + (size_t)(th0 + hh) * max_chunks * (D + 2), chunks, fac + hh * chunks,
                          out + (size_t)(th0 + hh) * D);
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

// One score row of a chunk, by one warp: m_c = the max of sh[0, len)
// (exact in any order), sh[p] = exp(sh[p] - m_c), and l_c = the sum of
// those in increasing p from +0.0; lane 0 writes m_c and l_c to dst[0, 1].
__device__ __forceinline__ void softmax_row(float* sh, int len, float* dst) {
    int lane = threadIdx.x % 32;
    float m = __int_as_float(0xff800000);
    if (lane < len) m = sh[lane];
    if (lane + 32 < len) m = fmaxf(m, sh[lane + 32]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
#pragma unroll 1
    for (int j = lane; j < len; j += 32) sh[j] = q_exp_branchy(sh[j] - m);
    __syncwarp();
    if (lane == 0) {
        float l = 0.0f;
#pragma unroll 16
        for (int j = 0; j < len; j++) l = l + sh[j];
        dst[0] = m;
        dst[1] = l;
    }
}

// Rows [r0, r1) of a chunk's keys and values (cache slots in `slot_of`, kv
// head g) copied into shared memory rows `stride` bf16 apart, in 16-byte
// pieces (D is a multiple of 32), every copy in flight before any is
// waited for. A null `ks` or `vs` skips those.
template <int THREADS>
__device__ __forceinline__ void copy_kv_rows(__nv_bfloat16* ks, __nv_bfloat16* vs, int stride, const u32* slot_of,
                                             int r0, int r1, const __nv_bfloat16* kc, const __nv_bfloat16* vc,
                                             int Hkv, int g, int D) {
    const int pieces = D / 8;
    for (int i = r0 * pieces + threadIdx.x; i < r1 * pieces; i += THREADS) {
        int r = i / pieces, o = (i % pieces) * 8;
        size_t src = ((size_t)slot_of[r] * Hkv + g) * D + o;
        if (ks) copy16_async(ks + r * stride + o, kc + src);
        if (vs) copy16_async(vs + r * stride + o, vc + src);
    }
}

// copy_kv_rows for rows of one chunk (r1 <= CHUNK) of head width D, rows
// D apart, written out as a fixed number of predicated rounds instead of
// the compiler's unrolled loop and its remainder: a fraction of the code,
// for kernels that run once a layer on a cold instruction cache. The same
// copies: THREADS is a multiple of the D / 8 pieces of a row, so a thread
// keeps its piece and steps THREADS / (D / 8) rows a round.
template <int THREADS, int D>
__device__ __forceinline__ void copy_chunk_rows(__nv_bfloat16* ks, __nv_bfloat16* vs, const u32* slot_of, int r0,
                                                int r1, const __nv_bfloat16* kc, const __nv_bfloat16* vc, int Hkv,
                                                int g) {
    const int pieces = D / 8, STEP = THREADS / pieces, ROUNDS = (CHUNK + STEP - 1) / STEP;
    static_assert(THREADS % pieces == 0, "whole rows a round");
    int r = r0 + threadIdx.x / pieces, o = (threadIdx.x % pieces) * 8;
    const __nv_bfloat16* kg = kc + (size_t)g * D + o;
    const __nv_bfloat16* vg = vc + (size_t)g * D + o;
#pragma unroll
    for (int k = 0; k < ROUNDS; k++, r += STEP) {
        if (r < r1) {
            size_t src = (size_t)slot_of[r] * Hkv * D;
            copy16_async(ks + r * D + o, kg + src);
            copy16_async(vs + r * D + o, vg + src);
        }
    }
}

__device__ __forceinline__ void widen_pair(u32 w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
}

// PER consecutive bf16 from shared memory, aligned to their size, widened.
template <int PER>
__device__ __forceinline__ void widen_bf16s(const __nv_bfloat16* p, float* f) {
    if (PER == 8) {
        uint4 v = *reinterpret_cast<const uint4*>(p);
        widen_pair(v.x, f);
        widen_pair(v.y, f + 2);
        widen_pair(v.z, f + 4);
        widen_pair(v.w, f + 6);
    } else if (PER == 4) {
        uint2 v = *reinterpret_cast<const uint2*>(p);
        widen_pair(v.x, f);
        widen_pair(v.y, f + 2);
    } else if (PER == 2) {
        widen_pair(*reinterpret_cast<const u32*>(p), f);
    } else {
        f[0] = bf(p[0]);
    }
}

// NV sums (a power of two up to 32), each over the warp's lanes, as the
// head butterfly (head_combine) forms them: at each of its steps (lanes
// 16, 8, 4, 2, 1 apart) lane l adds its partner's value to its own, but of
// half the sums still open, the half its own bit of that distance selects,
// so NV - 1 shuffles serve all NV sums instead of 5 each. Returns sum
// `idx` = l >> (5 - log2 NV); lanes of a group of 32 / NV hold the same.
template <int N, int D>
__device__ __forceinline__ void reduce_scatter_step(float* v, int lane, int& idx) {
    if (N > 1) {
        const int H = N > 1 ? N / 2 : 1;
        bool up = (lane & D) != 0;
#pragma unroll
        for (int i = 0; i < H; i++) {
            float send = up ? v[i] : v[i + H];
            float keep = up ? v[i + H] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, D);
        }
        if (up) idx += H;
    } else {
        v[0] = v[0] + __shfl_xor_sync(0xffffffffu, v[0], D);
    }
}

template <int NV>
__device__ __forceinline__ float lanes_reduce_scatter(float (&v)[NV], int& idx) {
    int lane = threadIdx.x % 32;
    idx = 0;
    reduce_scatter_step<NV, 16>(v, lane, idx);
    reduce_scatter_step<(NV > 1 ? NV / 2 : 1), 8>(v, lane, idx);
    reduce_scatter_step<(NV > 3 ? NV / 4 : 1), 4>(v, lane, idx);
    reduce_scatter_step<(NV > 7 ? NV / 8 : 1), 2>(v, lane, idx);
    reduce_scatter_step<(NV > 15 ? NV / 16 : 1), 1>(v, lane, idx);
    return v[0];
}

// One chunk's partials for the G q heads of a (token, kv head), from its
// `len` keys and values in shared memory: m_c, l_c and o_c of head hh go to
// dst[hh·stride ..]. `qv` holds the first pass's q (HPASS heads);
// `next_q(h0, qv)` fetches the pass from head h0 on. `sc` holds G·CHUNK
// scores. Callers sync before reusing ks, vs or sc. With ONE_PASS the
// caller has no more than HPASS heads (G <= HPASS), and the code of later
// passes is left out: it sat in the middle of the path a block runs once
// on a cold instruction cache.
template <int PER, int THREADS, int HPASS, bool ONE_PASS, typename NextQ>
__device__ __forceinline__ void chunk_partials(const __nv_bfloat16* ks, const __nv_bfloat16* vs, float* sc, int len,
                                               int G, float scale, float (&qv)[HPASS][PER], NextQ next_q, float* dst,
                                               size_t stride) {
    const int D = PER * 32, WARPS = THREADS / 32;
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // Scores: warp w takes positions w, w + WARPS, ...; lane l owns elements
    // [l·PER, (l+1)·PER) of the head, summed in order, then the head
    // butterfly. Each key serves HPASS heads per pass.
    const int RPW = CHUNK / WARPS, NV = RPW * HPASS;
    static_assert(NV <= 32 && (NV & (NV - 1)) == 0, "a power of two of sums, at most one a lane");
    for (int h0 = 0; h0 < (ONE_PASS ? 1 : G); h0 += HPASS) {
        if (!ONE_PASS && h0 > 0) next_q(h0, qv);
        // Every (position, head) of the warp's share at once, then one
        // reduce-scatter (lanes_reduce_scatter: the butterfly's sums) instead
        // of a butterfly per score one after another.
        float v[NV];
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            int j = warp + r * WARPS;
            const __nv_bfloat16* k = ks + (j < len ? j : 0) * D + lane * PER;
            float kf[PER];
            widen_bf16s<PER>(k, kf);
#pragma unroll
            for (int hh = 0; hh < HPASS; hh++) {
                float a = 0.0f;
#pragma unroll
                for (int e = 0; e < PER; e++) a = a + qv[hh][e] * kf[e];
                v[r * HPASS + hh] = a;
            }
        }
        int idx;
        float a = lanes_reduce_scatter<NV>(v, idx);
        int r = idx / HPASS, hh = idx % HPASS, j = warp + r * WARPS;
        if ((lane & (32 / NV - 1)) == 0 && h0 + hh < G && j < len) sc[(h0 + hh) * CHUNK + j] = a * scale;
    }
    __syncthreads();
    // Per head: the max (exact in any order), e_p = exp(s_p - m), and l = sum
    // of e_p in increasing p.
    // With ONE_PASS (G <= HPASS <= WARPS) each loop below takes one round
    // where it can, which leaves the compiler no loop to unroll into code.
    for (int hh = warp; hh < G; hh += WARPS) {
        softmax_row(sc + hh * CHUNK, len, dst + hh * stride);
        if (ONE_PASS) break;
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
        dst[hh * stride + 2 + i] = a0;
        dst[hh * stride + 3 + i] = a1;
        if (ONE_PASS && HPASS * D / 2 <= THREADS) break;
    }
}

// One block per (token t, kv head g, chunk c), `done` counting the
// (t, g)'s finished chunks: the chunk's keys and values are read once, with wide loads all in flight together, into shared memory,
// and serve every q head of the GQA group. Dynamic shared memory:
// 2·CHUNK·D bf16 (keys, values), G·CHUNK f32 scores, HPASS·D f32 q heads,
// and with CLUSTER the partials' areas (attention.rs: chunk_smem,
// cluster_smem).
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
//
// CLUSTER (launched as one thread block cluster per (token, kv head), its
// blocks the chunks, ROPE only): each block makes its partials in shared
// memory after q (G·(D + 2) more floats) and stores them into chunk 0's
// block with st.async on its mbarrier (the hand-over above cluster_arrive),
// which merges them from its own shared memory: the same sums in the same
// order, without the fence, the counter and the partials' round trip
// through L2 (`part` and `done` are not used), and without a cluster
// barrier's GPU-scope memory barrier (0.6B batch 1: +2.1%).
// ONE_PASS: the group has at most HPASS q heads (chunk_partials).
template <int PER, int THREADS, int HPASS, bool ROPE, bool CLUSTER = false, bool ONE_PASS = false>
__device__ __forceinline__ void attn_chunk_body(const __nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc,
                                                const u32* pos, const u32* seq,
                                                const u32* tables, int max_blocks, int bs, int Hq, int Hkv,
                                                float scale, int max_chunks, float* part, int t, int g,
                                                u32* done, __nv_bfloat16* out, int decode, RopeIn ri, int c) {
    const int D = PER * 32, WARPS = THREADS / 32;
    static_assert(!ROPE || WARPS >= HPASS + 2, "a warp for each q head of a pass, the new key and the new value");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* vs = ks + CHUNK * D;
    float* sc = reinterpret_cast<float*>(vs + CHUNK * D);
    __shared__ u32 slot_of[CHUNK];
    int G = Hq / Hkv;
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // CLUSTER: block 0's mbarrier, initialised before every block's early
    // arrival (the hand-over above cluster_arrive).
    __shared__ __align__(8) u64 mb;
    if (CLUSTER) {
        if (c == 0 && tid == 0) {
            mbar_init(&mb, 1);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        cluster_arrive();
    }
    u32 pt = pos[t], st = seq[t];
    int ctx = (int)pt + 1;
    int start = c * CHUNK;
    if (start >= ctx) {
        start_dependents();
        if (CLUSTER) cluster_wait();
        return;
    }
    int len = min(CHUNK, ctx - start);
    const u32* table = tables + (size_t)st * max_blocks;
    // A thread a row (len <= CHUNK <= THREADS): no loop for the compiler
    // to unroll into code this block would fetch.
    static_assert(THREADS >= CHUNK, "a thread for each row of a chunk");
    if (tid < len) {
        int p = start + tid;
        slot_of[tid] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    // Rows of D bf16 in 16-byte pieces (D is a multiple of 32), copied
    // straight to shared memory: every copy is in flight before any is
    // waited for. Rows from `old` on may be this step's.
    int old = decode ? min(len, (int)pt - start) : 0;
    auto copy_rows = [&](int r0, int r1) { copy_chunk_rows<THREADS, D>(ks, vs, slot_of, r0, r1, kc, vc, Hkv, g); };
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
    // ROPE: the first HPASS q heads are made once a block, one warp a head,
    // into shared memory after the scores (qs), while two more warps store
    // the new key and value rows; each warp then loads its copy of q. (One
    // head's code a warp instead of every head's in every warp: this kernel
    // runs once per layer on cold instruction caches, and fetching its code
    // is what it waits on most; BENCHMARKS.md.)
    float* qs = sc + G * CHUNK;
    if (ROPE) {
        // Warp w < HPASS makes q head w; warp HPASS the new key row
        // (normalised and rotated), warp HPASS + 1 the new value row
        // (rounded). One inlined norm_rope_head serves q and the key.
        int kv = warp - HPASS;
        bool qw = warp < HPASS && warp < G, neww = old < len && (kv == 0 || kv == 1);
        if (qw || neww) {
            const float* x = xg + (size_t)(qw ? g * G + warp : Hq + (kv == 0 ? 0 : Hkv) + g) * D;
            float xv[PER], y[PER], w[PER];
#pragma unroll
            for (int e = 0; e < PER; e++) {
                xv[e] = x[e];
                w[e] = qw ? wq[e] : wk[e];
            }
            if (qw || kv == 0) norm_rope_head<PER>(xv, w, cv, sv, ri.eps, y);
            if (qw) {
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    __nv_bfloat16 b = __float2bfloat16_rn(y[e]);
                    qs[warp * D + lane * PER + e] = bf(b);
                    if (c == 0) qo[(size_t)warp * D + e] = b;
                }
            } else {
                // The cache slot's address only where a row goes there.
                size_t dst = ((size_t)ri.slots[t] * Hkv + g) * D + lane * PER;
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    __nv_bfloat16 b = __float2bfloat16_rn(kv == 0 ? y[e] : xv[e]);
                    (kv == 0 ? kc : vc)[dst + e] = b;
                    (kv == 0 ? ks : vs)[old * D + lane * PER + e] = b;
                }
            }
        }
    } else {
        load_q<PER, HPASS>(qg, 0, G, qv);
        copy_rows(old, len);
    }
    copies_wait();
    __syncthreads();
    if (ROPE) {
#pragma unroll
        for (int hh = 0; hh < HPASS; hh++)
#pragma unroll
            for (int e = 0; e < PER; e++) qv[hh][e] = hh < G ? qs[hh * D + lane * PER + e] : 0.0f;
    }
    // CLUSTER: the partials go to this block's shared memory after q
    // (mine), block 0's to its receiving area after that (recv: chunk cc's
    // at cc·G·(D + 2)), where the others send theirs.
    float* mine = qs + HPASS * D;
    float* recv = mine + G * (D + 2);
    float* dst = CLUSTER ? (c == 0 ? recv : mine) : part + (((size_t)t * Hq + g * G) * max_chunks + c) * (D + 2);
    auto next_q = [&](int h0, float (&qn)[HPASS][PER]) {
        if (ROPE)
            rope_q<PER, HPASS>(xg + (size_t)g * G * D, wq, cv, sv, ri.eps, h0, G, qo, c == 0 && warp == 0, qn);
        else
            load_q<PER, HPASS>(qg, h0, G, qn);
    };
    chunk_partials<PER, THREADS, HPASS, ONE_PASS>(ks, vs, sc, len, G, scale, qv, next_q, dst,
                                                  CLUSTER ? (size_t)(D + 2) : (size_t)max_chunks * (D + 2));
    if (CLUSTER) {
        const int n = G * (D + 2);
        int chunks = (ctx + CHUNK - 1) / CHUNK;
        __syncthreads();
        if (c != 0) {
            // Block 0's mbarrier is initialised once the early arrivals
            // are all in.
            cluster_wait();
            send_async(recv + c * n, mine, tid, THREADS, n, &mb);
            return;
        }
        if (tid == 0) mbar_expect(&mb, (u32)((chunks - 1) * n * 4));
        cluster_wait();
        // Chunk 0's block merges every chunk's partials from its own
        // shared memory, in chunk order as ever.
        float* fac = reinterpret_cast<float*>(smem_raw);
        for (int hh = warp; hh < G; hh += WARPS) {
            mbar_wait<true>(&mb, 0);
            const float* my = recv + hh * (D + 2);
            combine_head_from<PER, true>([=](int cc, int i) { return my[cc * n + i]; }, chunks, fac + hh * chunks,
                                         out + ((size_t)t * Hq + g * G + hh) * D);
            if (ONE_PASS) break;
        }
        return;
    }
    // The last of the token's chunks to finish merges them all: its
    // partials, and the others' (made visible by their fences), are read
    // from L2.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int chunks = (ctx + CHUNK - 1) / CHUNK;
        last = atomicAdd(done, 1u) == (u32)(chunks - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid == 0) *done = 0;
    // Keys and values are no longer needed: their shared memory holds the
    // chunk factors.
    combine_chunks<PER, THREADS>(part, t * Hq + g * G, G, ctx, max_chunks, reinterpret_cast<float*>(smem_raw), out);
}

// Grids of few blocks (small decode batches): 256 threads and the scores of
// four heads per pass over the keys, which shortens the chain of
// latencies. q as given (attn_chunk), or made here from the QKV output
// (attn_rope_chunk, whose q is null, as attn_chunk's RopeIn pointers are).
// Larger decode batches take attn_span, prompts attn_tile (below).
#define ATTN_CASE(DD, THREADS, HPASS, ROPE, CL, ONE)                                                                \
    case DD:                                                                                                        \
        attn_chunk_body<DD, THREADS, HPASS, ROPE, CL, ONE>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv,    \
                                                           scale, max_chunks, part, blockIdx.x / Hkv,               \
                                                           blockIdx.x % Hkv, done + blockIdx.x, out, decode, ri,    \
                                                           blockIdx.y);                                             \
        break;
#define ATTN_KERNEL(NAME, THREADS, HPASS, ROPE, CL, ONE)                                                            \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                           \
        NAME(const __nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc, const u32* pos,                          \
             const u32* seq, const u32* tables, int max_blocks, int bs, int Hq, int Hkv, int D, float scale,        \
             int max_chunks, float* part, u32* done, __nv_bfloat16* out, int decode, const float* qkv,              \
             const float* qn, const float* kn, float eps, const float* rope, const u32* slots,                      \
             __nv_bfloat16* q_out) {                                                                                \
        RopeIn ri = {qkv, qn, kn, eps, rope, slots, q_out};                                                         \
        switch (D / 32) {                                                                                           \
            ATTN_CASE(1, THREADS, HPASS, ROPE, CL, ONE)                                                             \
            ATTN_CASE(2, THREADS, HPASS, ROPE, CL, ONE)                                                             \
            ATTN_CASE(4, THREADS, HPASS, ROPE, CL, ONE)                                                             \
            ATTN_CASE(8, THREADS, HPASS, ROPE, CL, ONE)                                                             \
        }                                                                                                           \
    }
ATTN_KERNEL(attn_chunk, 256, 4, false, false, false)
ATTN_KERNEL(attn_rope_chunk, 256, 4, true, false, false)
// attn_rope_chunk launched as clusters of a (token, kv head)'s chunks: the
// partials reach chunk 0's block through shared memory, with no fence,
// counter or round trip through L2.
ATTN_KERNEL(attn_rope_cluster, 256, 4, true, true, false)
// The RoPE kernels for groups of at most two q heads a kv head (Qwen3-0.6B
// and 1.7B): two heads a pass over the keys instead of four, of which two
// would be padding, so half the score products and less code to fetch
// (0.6B batch 1: attention 7.58 -> 7.04 us a layer, +1.6%); and, as their
// groups never take a second pass (attention.rs picks them for at most two
// heads), none of its code (ONE_PASS: +1.2% more). The same sums: a
// score's butterfly does not depend on how many it serves at once.
ATTN_KERNEL(attn_rope_cluster_g2, 256, 2, true, true, true)
ATTN_KERNEL(attn_rope_chunk_g2, 256, 2, true, false, true)
// Groups of three or four (Qwen3-4B, 8B) take one pass of four heads, and
// these leave the later passes' code out too (8B batch 1: within the
// noise, 181.0 against 181.1 tok/s; less code to fetch).
ATTN_KERNEL(attn_rope_cluster_g4, 256, 4, true, true, true)
ATTN_KERNEL(attn_rope_chunk_g4, 256, 4, true, false, true)

// ---- large decode batches ---------------------------------------------------
// One token per sequence and many blocks: a block per (token, kv head) and
// SPAN consecutive chunks, 128 threads and one head a pass. Keys take two
// shared-memory stages and values one: the next chunk's keys copy while a
// chunk is summed, its values once this chunk's are used, and the layout
// is read once for SPAN chunks, q once for all. 48 KB of keys and values
// (head_dim 128) and at most 128 registers let four blocks share an SM.
// Each chunk's partials are attn_chunk_body's, as is the merge.

#define SPAN 4
#define SPAN_THREADS 128

// The merge, kept out of line: its registers would otherwise count
// against every block of the kernel, not only the one that merges.
template <int PER>
__device__ __noinline__ void span_merge(const float* part, int th0, int G, int ctx, int max_chunks, float* fac,
                                        __nv_bfloat16* out) {
    combine_chunks<PER, SPAN_THREADS>(part, th0, G, ctx, max_chunks, fac, out);
}

template <int PER>
__device__ __forceinline__ void attn_span_body(const __nv_bfloat16* q, const __nv_bfloat16* kc,
                                               const __nv_bfloat16* vc, const u32* pos, const u32* seq,
                                               const u32* tables, int max_blocks, int bs, int Hq, int Hkv,
                                               float scale, int max_chunks, float* part, u32* done,
                                               __nv_bfloat16* out) {
    const int D = PER * 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* kst = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // 2 stages of keys
    __nv_bfloat16* vst = kst + 2 * CHUNK * D;                          // values
    float* sc = reinterpret_cast<float*>(vst + CHUNK * D);
    float* qs = sc + (Hq / Hkv) * CHUNK;  // the group's q, widened once for every chunk
    __shared__ u32 slot_of[SPAN * CHUNK];
    int tg = blockIdx.x, t = tg / Hkv, g = tg % Hkv;
    int G = Hq / Hkv;
    int tid = threadIdx.x, lane = tid % 32;
    u32 pt = pos[t], st = seq[t];
    int ctx = (int)pt + 1;
    int chunks = (ctx + CHUNK - 1) / CHUNK;
    int c0 = blockIdx.y * SPAN;
    if (c0 >= chunks) {
        start_dependents();
        return;
    }
    int c1 = min(chunks, c0 + SPAN);
    int start = c0 * CHUNK, npos = min(ctx, c1 * CHUNK) - start;
    const u32* table = tables + (size_t)st * max_blocks;
    for (int j = tid; j < npos; j += SPAN_THREADS) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    __syncthreads();
    auto chunk_len = [&](int c) { return min(CHUNK, ctx - c * CHUNK); };
    auto keys = [&](int c) { return kst + ((c - c0) & 1) * CHUNK * D; };
    auto copy_rows = [&](int c, __nv_bfloat16* ks, __nv_bfloat16* vs, int r0, int r1) {
        copy_kv_rows<SPAN_THREADS>(ks, vs, D, slot_of + (c - c0) * CHUNK, r0, r1, kc, vc, Hkv, g, D);
    };
    // Rows before the token's own position are older than this step
    // (dependent_launch.cuh): the first chunk's are copied before the wait.
    int old = min(chunk_len(c0), (int)pt - start);
    copy_rows(c0, keys(c0), vst, 0, old);
    wait_for_producers();
    start_dependents();
    copy_rows(c0, keys(c0), vst, old, chunk_len(c0));
    copies_commit();
    const __nv_bfloat16* qg = q + ((size_t)t * Hq + g * G) * D;
    for (int i = tid; i < G * D; i += SPAN_THREADS) qs[i] = bf(qg[i]);
    auto next_q = [&](int h0, float (&qn)[1][PER]) {
#pragma unroll
        for (int e = 0; e < PER; e++) qn[0][e] = qs[h0 * D + lane * PER + e];
    };
    // Copy groups, oldest first: chunk c's keys (or c0's keys and values),
    // c's values, c + 1's keys; every group is committed, empty or not.
    for (int c = c0; c < c1; c++) {
        if (c + 1 < c1) copy_rows(c + 1, keys(c + 1), nullptr, 0, chunk_len(c + 1));
        copies_commit();
        copies_wait_groups<1>();
        __syncthreads();
        float qv[1][PER];
        next_q(0, qv);
        float* dst = part + (((size_t)t * Hq + g * G) * max_chunks + c) * (D + 2);
        chunk_partials<PER, SPAN_THREADS, 1, false>(keys(c), vst, sc, chunk_len(c), G, scale, qv, next_q, dst,
                                                    (size_t)max_chunks * (D + 2));
        // Every thread is done with these keys and values before they are
        // overwritten.
        __syncthreads();
        if (c + 1 < c1) copy_rows(c + 1, nullptr, vst, 0, chunk_len(c + 1));
        copies_commit();
    }
    // The last of the token's spans to finish merges every chunk.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int spans = (chunks + SPAN - 1) / SPAN;
        last = atomicAdd(done + tg, 1u) == (u32)(spans - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid == 0) done[tg] = 0;
    span_merge<PER>(part, t * Hq + g * G, G, ctx, max_chunks, reinterpret_cast<float*>(smem_raw), out);
}

#define SPAN_CASE(DD)                                                                                          \
    case DD:                                                                                                   \
        attn_span_body<DD>(q, kc, vc, pos, seq, tables, max_blocks, bs, Hq, Hkv, scale, max_chunks, part, done, \
                           out);                                                                               \
        break;
extern "C" __global__ void __launch_bounds__(SPAN_THREADS, 4)
    attn_span(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, const u32* pos,
              const u32* seq, const u32* tables, int max_blocks, int bs, int Hq, int Hkv, int D, float scale,
              int max_chunks, float* part, u32* done, __nv_bfloat16* out) {
    switch (D / 32) {
        SPAN_CASE(1)
        SPAN_CASE(2)
        SPAN_CASE(4)
        SPAN_CASE(8)
    }
}

// ---- query tiles -----------------------------------------------------------
// Batches that are not one token per sequence (prompts, chunks of them, and
// the decode tokens beside them) run by query tile (BatchMeta::query_tiles:
// up to TILE_TOKENS consecutive positions of one sequence): one block per
// (tile, kv head, chunk) copies the chunk's keys and values once for every
// (token, q head) row of the tile, in passes of TILE_ROWS rows, where the
// per-token kernel above read them once per token. Every row's sums are
// still the spec's, term by term: a score is the head_reduce tree of the 32
// lane partials, formed by one thread in the butterfly's order; e_p, m_c
// and l_c as above; o_c[i] summed in increasing p; the same merge.

#define TILE_TOKENS 16  // qwen_tensor::QUERY_TILE
#define TILE_ROWS 32
// Three blocks an SM (at most 85 registers a thread): prefill/T512 161 ->
// 141 us, the 2,048-token mixed step 1.45 -> 1.19 ms against two.
#define TILE_THREADS 256

// The lane whose partial is the i-th leaf of the butterfly tree (xor 16,
// then 8, 4, 2, 1): i with its five bits reversed (0, 16, 8, 24, 4, ...).
__device__ __forceinline__ constexpr int leaf_lane(int i) {
    return ((i & 1) << 4) | ((i & 2) << 2) | (i & 4) | ((i & 8) >> 2) | ((i & 16) >> 4);
}

// PER consecutive f32 from shared memory, aligned to their size.
template <int PER>
__device__ __forceinline__ void load_f32s(const float* p, float* f) {
#pragma unroll
    for (int e = 0; e + 4 <= PER; e += 4) {
        float4 v = *reinterpret_cast<const float4*>(p + e);
        f[e] = v.x;
        f[e + 1] = v.y;
        f[e + 2] = v.z;
        f[e + 3] = v.w;
    }
    if (PER == 2) {
        float2 v = *reinterpret_cast<const float2*>(p);
        f[0] = v.x;
        f[1] = v.y;
    } else if (PER == 1) {
        f[0] = p[0];
    }
}

// Dynamic shared memory: keys and values (CHUNK rows of D + 8 bf16, the
// padding spreading a thread-per-key read over the banks), TILE_ROWS q rows
// in f32, then TILE_ROWS x CHUNK scores; the merging block reuses it for
// 8·max_chunks factors (the launcher sizes it for these and for a token
// alone's attn_chunk_body).
template <int PER>
__device__ __forceinline__ void attn_tile_body(const __nv_bfloat16* q, const __nv_bfloat16* kc,
                                               const __nv_bfloat16* vc, const u32* pos, const u32* seq,
                                               const u32* tables, const u32* tiles, int max_blocks, int bs, int Hq,
                                               int Hkv, float scale, int max_chunks, float* part, u32* done,
                                               __nv_bfloat16* out, int row0) {
    const int D = PER * 32, KS = D + 8, WARPS = TILE_THREADS / 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* vs = ks + CHUNK * KS;
    float* qf = reinterpret_cast<float*>(vs + CHUNK * KS);
    float* sc = qf + TILE_ROWS * D;
    __shared__ u32 slot_of[CHUNK];
    __shared__ int len_of[TILE_TOKENS];
    int tile = blockIdx.x / Hkv, g = blockIdx.x % Hkv, c = blockIdx.y;
    int t0 = (int)tiles[2 * tile], n = (int)tiles[2 * tile + 1];
    // Rows before row0 are attn_tc's: a tile's later rows are a tile too.
    if (t0 + n <= row0) {
        start_dependents();
        return;
    }
    if (t0 < row0) {
        n -= row0 - t0;
        t0 = row0;
    }
    if (n == 1) {
        // A token alone (a decode token beside prompts): the per-token
        // kernel's body, 256 threads and four heads a pass, as attn_chunk.
        attn_chunk_body<PER, TILE_THREADS, 4, false>(q, const_cast<__nv_bfloat16*>(kc),
                                                     const_cast<__nv_bfloat16*>(vc), pos, seq, tables, max_blocks,
                                                     bs, Hq, Hkv, scale, max_chunks, part, t0, g, done + blockIdx.x,
                                                     out, 0, RopeIn{}, c);
        return;
    }
    int G = Hq / Hkv;
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int start = c * CHUNK;
    // A tile's positions are consecutive: its last token sees the most.
    int ctx_max = (int)pos[t0 + n - 1] + 1;
    if (start >= ctx_max) {
        start_dependents();
        return;
    }
    int len = min(CHUNK, ctx_max - start);
    // The layout is the host's (dependent_launch.cuh): read before the wait.
    const u32* table = tables + (size_t)seq[t0] * max_blocks;
    for (int j = tid; j < len; j += TILE_THREADS) {
        int p = start + j;
        slot_of[j] = table[p / bs] * (u32)bs + (u32)(p % bs);
    }
    if (tid < n) len_of[tid] = max(0, min(CHUNK, (int)pos[t0 + tid] + 1 - start));
    wait_for_producers();
    start_dependents();
    __syncthreads();
    copy_kv_rows<TILE_THREADS>(ks, vs, KS, slot_of, 0, len, kc, vc, Hkv, g, D);
    int R = n * G;  // rows: token-major, then the group's q heads
    for (int r0 = 0; r0 < R; r0 += TILE_ROWS) {
        int rows = min(TILE_ROWS, R - r0);
        for (int i = tid; i < rows * D; i += TILE_THREADS) {
            int r = r0 + i / D;
            qf[i] = bf(q[((size_t)(t0 + r / G) * Hq + g * G + r % G) * D + i % D]);
        }
        copies_wait();
        __syncthreads();
        // Scores: a thread per key, for eight rows at a time. The tree is
        // walked in subtrees of four leaves (lanes l, l^16, l^8, l^24: the
        // xor-16 and xor-8 levels), whose results meet in the last three
        // levels by the trailing one bits of their index k.
        {
            int p = tid % CHUNK, rb = (tid / CHUNK) * 8;
            if (rb < rows && p < len) {
                float s0[8], s1[8], s2[8], res[8];
#pragma unroll 1
                for (int k = 0; k < 8; k++) {
                    float sub[8], half[8];
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        int l = leaf_lane(4 * k + m);
                        float kf[PER];
                        widen_bf16s<PER>(ks + p * KS + l * PER, kf);
#pragma unroll
                        for (int j = 0; j < 8; j++) {
                            float qv[PER];
                            load_f32s<PER>(qf + (rb + j) * D + l * PER, qv);
                            float v = 0.0f;
#pragma unroll
                            for (int e = 0; e < PER; e++) v = v + qv[e] * kf[e];
                            if (m == 0) sub[j] = v;
                            if (m == 1) sub[j] = sub[j] + v;
                            if (m == 2) half[j] = v;
                            if (m == 3) sub[j] = sub[j] + (half[j] + v);
                        }
                    }
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        float v = sub[j];
                        if ((k & 1) == 0) {
                            s0[j] = v;
                        } else {
                            v = s0[j] + v;
                            if ((k & 2) == 0) {
                                s1[j] = v;
                            } else {
                                v = s1[j] + v;
                                if ((k & 4) == 0)
                                    s2[j] = v;
                                else
                                    res[j] = s2[j] + v;
                            }
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    int r = rb + j;
                    if (r < rows && p < len_of[(r0 + r) / G]) sc[r * CHUNK + p] = res[j] * scale;
                }
            }
        }
        __syncthreads();
        // Per row: m_c, e_p = exp(s_p - m_c), and l_c summed in increasing p.
        for (int r = warp; r < rows; r += WARPS) {
            int rr = r0 + r, lr = len_of[rr / G];
            if (lr > 0)
                softmax_row(sc + r * CHUNK, lr,
                            part + (((size_t)(t0 + rr / G) * Hq + g * G + rr % G) * max_chunks + c) * (D + 2));
        }
        __syncthreads();
        // o_c[i] = sum of e_p·v_p[i] in increasing p: a warp per four rows,
        // PER dimensions a lane.
        {
            int rb = warp * 4;
            if (rb < rows) {
                int lr[4], lmax = 0;
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    lr[j] = rb + j < rows ? len_of[(r0 + rb + j) / G] : 0;
                    lmax = max(lmax, lr[j]);
                }
                float acc[4][PER];
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < PER; e++) acc[j][e] = 0.0f;
                for (int p = 0; p < lmax; p++) {
                    float vf[PER];
                    widen_bf16s<PER>(vs + p * KS + lane * PER, vf);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        float e = sc[(rb + j) * CHUNK + p];
                        if (p < lr[j]) {
#pragma unroll
                            for (int x = 0; x < PER; x++) acc[j][x] = acc[j][x] + e * vf[x];
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (lr[j] > 0) {
                        int rr = r0 + rb + j;
                        float* dst =
                            part + (((size_t)(t0 + rr / G) * Hq + g * G + rr % G) * max_chunks + c) * (D + 2) + 2;
#pragma unroll
                        for (int x = 0; x < PER; x++) dst[lane * PER + x] = acc[j][x];
                    }
                }
            }
        }
        __syncthreads();
    }
    // The last of the tile's chunks to finish merges every row of the tile.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int chunks = (ctx_max + CHUNK - 1) / CHUNK;
        last = atomicAdd(done + blockIdx.x, 1u) == (u32)(chunks - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid == 0) done[blockIdx.x] = 0;
    float* fac = reinterpret_cast<float*>(smem_raw) + warp * max_chunks;
    for (int r = warp; r < R; r += WARPS) {
        int t = t0 + r / G, h = g * G + r % G;
        int chunks = ((int)pos[t] + CHUNK) / CHUNK;
        combine_head<PER>(part + ((size_t)t * Hq + h) * max_chunks * (D + 2), chunks, fac,
                          out + ((size_t)t * Hq + h) * D);
        __syncwarp();  // the next row's factors overwrite these
    }
}

#define TILE_CASE(DD)                                                                                          \
    case DD:                                                                                                   \
        attn_tile_body<DD>(q, kc, vc, pos, seq, tables, tiles, max_blocks, bs, Hq, Hkv, scale, max_chunks, part, \
                           done, out, row0);                                                                   \
        break;
extern "C" __global__ void __launch_bounds__(TILE_THREADS, 3)
    attn_tile(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, const u32* pos,
              const u32* seq, const u32* tables, int max_blocks, int bs, int Hq, int Hkv, int D, float scale,
              int max_chunks, float* part, u32* done, __nv_bfloat16* out, const u32* tiles, int row0) {
    switch (D / 32) {
        TILE_CASE(1)
        TILE_CASE(2)
        TILE_CASE(4)
        TILE_CASE(8)
    }
}
