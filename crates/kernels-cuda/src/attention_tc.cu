// Causal attention on the tensor cores for the rows announced as prompt
// rows (Backend::set_tensor_core_rows), by query tile: a block per (tile of
// up to 16 consecutive positions of one sequence, kv head, span of TC_SPAN
// keys) takes the span's keys in steps of TC_KEYS positions, each warp a
// fixed quarter of every step, as mma.sync m16n8k16 (bf16 in, f32 out)
// with an online softmax, the warps merged in order at the end, and a
// row's spans (if it has more than one) by the tile's last block. Like
// gemm.cu it differs from the CPU spec (attention.rs) by summation order
// and the rounding of the weights p: p = hi + lo, both bf16 (|p - hi - lo|
// <= 2^-17 p), so the result stays within the bound
// qwen_kernels_cpu::attention_tc_magnitudes states (tests/twin.rs checks it).
//
// A row's result depends only on the row: the spans, steps and quarters
// are fixed by absolute position, a tensor-core product never mixes rows,
// a key past the row's
// position adds an exact zero, and a step with none of its keys leaves the
// row's max, sum and output untouched (factor exactly 1). So a prompt row
// gives the same bits in any tile, batch or chunking, and a generated
// token recomputed after a preemption (as a prompt-like row) equals itself.

#define TC_KEYS 64     // keys a step; fixed, as the partition of a row's sums
#define TC_SPAN 1024   // keys a block; fixed too (spans of one row merge in order)
// A span's partials of a row: m, l, two unused words, then D outputs (16-byte
// aligned for the merge's vector loads).
#define TC_SPAN_HEAD 4
#define TC_PAD 8       // bf16 of padding a shared row: ldmatrix without bank conflicts
// Warps come in fours: warp w takes keys [16(w % 4), 16(w % 4) + 16) of
// every step for the pass's rows [16(w / 4), 16(w / 4) + 16). A block has
// RGP such row groups a pass: one for decode tokens (a token's G rows fit
// 16), two for prompt tiles.

// A thread's weights of a step, p = exp(s − m) of its 2 x 4 scores (rows
// lane / 4 and lane / 4 + 8; the second only for NE = 4, else zeros), a
// masked key's (s = −inf) zero. Every exp as one straight line, the masked
// ones selected away afterwards, so that their chains interleave (as
// branches, each exp was its own basic block).
template <int NE>
__device__ __forceinline__ void step_weights(float (&sc)[2][4], const float (&m)[2]) {
    const float NEG_INF = __int_as_float(0xff800000);
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (e >= NE) {
                sc[j][e] = 0.0f;
                continue;
            }
            const float pe = q_exp_nonpos(sc[j][e] - m[e / 2]);
            sc[j][e] = sc[j][e] == NEG_INF ? 0.0f : pe;
        }
}

// ROPE (decode tokens only: one token per sequence, each its own tile, one
// row group): q and the token's new key and value rows are made here from
// the QKV projection's f32 output, as rope.cu's qk_norm_rope_store makes
// them (norm_rope_head; the same bits), instead of by a kernel of their own
// ahead of this one. Each block makes its token's q rows (span 0's block
// also writes them to q_out); the block of the span holding the token's
// position makes the new key and value rows, stores them in the caches and
// puts them into its own copy of that step over whatever the copy read
// from their slot (the copy may race the store). No other block reads a
// new row: with one token per sequence a row's keys before its position
// are earlier steps'.
struct TcRope {
    const float* qkv;  // [T, (Hq + 2·Hkv)·D]
    const float* qn;
    const float* kn;
    float eps;
    const float* rope;  // [positions, D]: cosines, then sines
    const u32* slots;
    __nv_bfloat16* q_out;
    __nv_bfloat16* kc;
    __nv_bfloat16* vc;
};

// ROPE's rows for the decode token t (position p) of kv head g, a warp a
// head: its G q heads into q rows 0..G-1 of `qs` (and, from span 0's
// block, q_out), and with `new_rows` the key (normalised and rotated) and
// value (rounded) into the caches and `nrow` (key, then value).
template <int D>
__device__ __forceinline__ void rope_rows(const TcRope& rp, int t, int g, int G, int Hq, int Hkv, int p,
                                          bool new_rows, __nv_bfloat16* qs, int ks_row, __nv_bfloat16* nrow) {
    constexpr int PER = D / 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* xt = rp.qkv + (size_t)t * (Hq + 2 * Hkv) * D;
    const float* cs = rp.rope + (size_t)p * D;
    for (int h = warp; h < G + (new_rows ? 2 : 0); h += 4) {
        const bool is_q = h < G, is_k = h == G;
        const float* x = xt + (size_t)(is_q ? g * G + h : Hq + (is_k ? 0 : Hkv) + g) * D;
        float xv[PER], y[PER];
        load_per<PER>(x + lane * PER, xv);
        if (is_q || is_k) {
            float wv[PER], c[PER], sn[PER];
            load_per<PER>((is_q ? rp.qn : rp.kn) + lane * PER, wv);
            load_per<PER>(cs + (lane % 16) * PER, c);
            load_per<PER>(cs + D / 2 + (lane % 16) * PER, sn);
            norm_rope_head<PER>(xv, wv, c, sn, rp.eps, y);
        } else {
#pragma unroll
            for (int e = 0; e < PER; e++) y[e] = xv[e];
        }
        if (is_q) {
            store_per<PER>(qs + h * ks_row + lane * PER, y);
            if (blockIdx.y == 0) store_per<PER>(rp.q_out + ((size_t)t * Hq + g * G + h) * D + lane * PER, y);
        } else {
            __nv_bfloat16* cache = is_k ? rp.kc : rp.vc;
            store_per<PER>(cache + ((size_t)rp.slots[t] * Hkv + g) * D + lane * PER, y);
            store_per<PER>(nrow + (is_k ? 0 : D) + lane * PER, y);
        }
    }
}

// Dynamic shared memory: 16·RGP q rows, then two stages of TC_KEYS keys and
// TC_KEYS values, every row D + TC_PAD bf16; the stages then hold the
// warps' partial results for the merge, and each row's merge weights. Rows
// r of a tile are token-major (token r / G, q head g·G + r % G), 16·RGP a
// pass over the keys.
//
// Each warp keeps, for its 16 rows, a running max, sum and output over its
// own quarter of every step's keys (online softmax); the four quarters are
// merged in order at the end: M = max m_w, f_w = exp(m_w − M),
// L = Σ l_w·f_w, O = Σ o_w·f_w, out = bf16(O / L).
template <int D, int RGP, bool ROPE = false>
__device__ __forceinline__ void attn_tc_body(const __nv_bfloat16* q, const __nv_bfloat16* kc,
                                             const __nv_bfloat16* vc, const u32* pos, const u32* seq,
                                             const u32* tables, const u32* tiles, int max_blocks, int bs, int Hq,
                                             int Hkv, float scale, int tc_rows, int max_spans, float* spans,
                                             u32* done, __nv_bfloat16* out, TcRope rp = TcRope{}) {
    static_assert(!ROPE || RGP == 1, "ROPE: decode tokens, one row group");
    const int THREADS = 128 * RGP, ROWS = 16 * RGP;
    const int KS = D + TC_PAD, DT = D / 8, PIECES = TC_KEYS * (D / 8) / THREADS;
    const float NEG_INF = __int_as_float(0xff800000);
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int kq = warp % 4, rg = warp / 4;  // key quarter, row group
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* ks = qs + ROWS * KS;
    __nv_bfloat16* vs = ks + 2 * TC_KEYS * KS;
    // After the keys: [quarter][row][D] outputs, then [quarter][row] m, l,
    // then the merge's per-row values (16 words a row in all).
    float* part = reinterpret_cast<float*>(ks);
    static_assert(4 * ROWS * D + 16 * ROWS <= 2 * TC_KEYS * (D + TC_PAD), "the merge fits the stages");
    int tile = blockIdx.x / Hkv, g = blockIdx.x % Hkv;
    int t0 = (int)tiles[2 * tile], n = (int)tiles[2 * tile + 1];
    // Only rows below tc_rows are this kernel's (the rest take attn_tile).
    if (t0 >= tc_rows) {
        start_dependents();
        return;
    }
    n = min(n, tc_rows - t0);
    int G = Hq / Hkv, R = n * G;
    int ctx = (int)pos[t0 + n - 1] + 1;  // the tile's last token sees the most
    // This block's span of keys [k_begin, k_end) (blockIdx.y).
    int k_begin = blockIdx.y * TC_SPAN;
    if (k_begin >= ctx) {
        start_dependents();
        return;
    }
    int k_end = min(ctx, k_begin + TC_SPAN), nspans = (ctx + TC_SPAN - 1) / TC_SPAN;
    int s0 = k_begin / TC_KEYS, steps = (k_end + TC_KEYS - 1) / TC_KEYS;
    const u32* table = tables + (size_t)seq[t0] * max_blocks;
    // This step's rows (and q) are written by the kernel ahead.
    wait_for_producers();
    start_dependents();

    // Keys and values of step s into stage st; rows past the span are zeroed
    // (a weight of zero must not meet a stale NaN). Block-table entries and
    // offsets are advanced from step to step (and row to row) without a
    // division: the runtime division by the block size was most of a step's
    // instructions (Nsight Compute, one sequence at 4,096 keys: 559 of about
    // 860 a warp). (Loading the next step's slots into registers a step
    // early measured slower, 84 vs 81 us at B64 ctx512; the entries now come
    // through the shared ring below, by copies that hold no register.)
    const int q_step = TC_KEYS / bs, c_step = TC_KEYS % bs;
    const size_t kv_row = (size_t)Hkv * D;
    // This thread copies 16-byte chunk `o` of rows r_lo + RSTEP·x of every
    // step.
    constexpr int CH = D / 8, RSTEP = THREADS / CH;
    static_assert(THREADS % CH == 0 && RSTEP * PIECES == TC_KEYS, "a step's rows split evenly");
    const int r_lo = tid / CH, o = (tid % CH) * 8;
    const int q_row = RSTEP / bs, c_row = RSTEP % bs;
    // Byte addresses: this thread's 16 bytes of kv head g in cache slot 0,
    // a slot's bytes, and the value cache's distance from the key cache, so
    // that a row costs one multiply-add for its key and one add for its
    // value (Nsight Compute: the copies were 337 of a step's ~720
    // instructions a warp).
    const char* k_col = reinterpret_cast<const char*>(kc + g * D + o);
    const long long v_off = reinterpret_cast<const char*>(vc) - reinterpret_cast<const char*>(kc);
    const unsigned slot_bytes = (unsigned)kv_row * 2u;
    // The thread's first row in stage 0 (shared addresses); stage st and
    // row x are constant offsets from it.
    const unsigned k_dst0 = (unsigned)__cvta_generic_to_shared(ks + r_lo * KS + o);
    constexpr unsigned STAGE_BYTES = TC_KEYS * KS * 2, V_BYTES = 2 * STAGE_BYTES;
    // The block-table entries of a step's 64 rows reach shared memory three
    // steps ahead, by 4-byte asynchronous copies (rows tid < TC_KEYS, one
    // each): a step's copies then find their slots without waiting on a
    // global load, which Nsight Compute showed each step's copies stalled
    // on (the entries of a step are read by no earlier step).
    __shared__ u32 ring[3][TC_KEYS];
    const unsigned ring0 = (unsigned)__cvta_generic_to_shared(&ring[0][0]);
    int fill_blk = 0, fill_off = 0;  // row tid of the next step fill_ring fetches: its table entry and offset
    auto fill_ring = [&](int s) {
        if (tid < TC_KEYS) {
            const bool ok = s * TC_KEYS + tid < k_end;
            copy4_async_zfill(ring0 + ((s % 3) * TC_KEYS + tid) * 4, ok ? table + fill_blk : table, ok);
            fill_blk += q_step;
            fill_off += c_step;
            if (fill_off >= bs) {
                fill_off -= bs;
                fill_blk++;
            }
        }
    };
    // A one-token tile's keys and values are read by no other block of the
    // launch (decode tokens: one a sequence), and not again before the next
    // step: evicted from L2 first, so that what later blocks read again
    // (their q, the block tables) stays there. A prompt tile's keys are read
    // by the sequence's later tiles too.
    const unsigned long long kv_policy = n == 1 ? l2_evict_first() : l2_evict_normal();
    int blk0 = 0, off0 = 0;  // row r_lo of the next step copy_step copies: its table entry and offset
    // Copies step s into stage st, its table entries read from global memory
    // (a pass's first step) or from the ring.
    auto copy_step = [&](int s, int st, bool from_ring) {
        const int len = min(TC_KEYS, k_end - s * TC_KEYS);
        const unsigned kd = k_dst0 + st * STAGE_BYTES;
        const u32* ent = &ring[s % 3][r_lo];
        int b = blk0, f = off0;
#pragma unroll
        for (int x = 0; x < PIECES; x++) {
            // A row past the span is zero-filled (a weight of zero must not
            // meet a stale NaN): the copy reads no byte of its source.
            const bool ok = r_lo + RSTEP * x < len;
            const u32 entry = !ok ? 0u : from_ring ? ent[RSTEP * x] : table[b];
            const u32 slot = entry * (u32)bs + (u32)f;
            const char* src = k_col + (unsigned long long)slot * slot_bytes;
            const unsigned dst = kd + x * (RSTEP * KS * 2);
            copy16_async_zfill_hint(dst, src, ok, kv_policy);
            copy16_async_zfill_hint(dst + V_BYTES, src + v_off, ok, kv_policy);
            b += q_row;
            f += c_row;
            if (f >= bs) {
                f -= bs;
                b++;
            }
        }
        blk0 += q_step;
        off0 += c_step;
        if (off0 >= bs) {
            off0 -= bs;
            blk0++;
        }
    };
    auto start_pass = [&]() {
        blk0 = (s0 * TC_KEYS + r_lo) / bs;
        off0 = (s0 * TC_KEYS + r_lo) % bs;
        fill_blk = ((s0 + 1) * TC_KEYS + tid) / bs;
        fill_off = ((s0 + 1) * TC_KEYS + tid) % bs;
    };

    // ROPE: the new rows (key, then value) and the step that holds them in
    // this block (-1: not this span's).
    __shared__ __align__(16) __nv_bfloat16 nrow[ROPE ? 2 * D : 8];
    const int new_step = ROPE && k_end == ctx ? (ctx - 1) / TC_KEYS : -1;
    for (int r_base = 0; r_base < R; r_base += ROWS) {
        for (int i = tid; i < ROWS * (D / 8); i += THREADS) {
            int r = i / (D / 8), o = (i % (D / 8)) * 8, rr = r_base + r;
            __nv_bfloat16* dst = qs + r * KS + o;
            if (rr >= R)
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            else if (!ROPE)
                copy16_async(dst, q + ((size_t)(t0 + rr / G) * Hq + g * G + rr % G) * D + o);
        }
        start_pass();
        // The ring's first two steps, with q (a group of their own, waited
        // for below while the first step's keys and values are in flight).
        fill_ring(s0 + 1);
        fill_ring(s0 + 2);
        copies_commit();
        copy_step(s0, 0, false);
        copies_commit();
        // ROPE: q's rows and (the span holding the position) the new key
        // and value rows, while the first step's copies are in flight.
        if constexpr (ROPE) rope_rows<D>(rp, t0, g, G, Hq, Hkv, ctx - 1, new_step >= 0, qs, KS, nrow);
        copies_wait_groups<1>();
        __syncthreads();
        // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's
        // 16): their positions; a padding row takes the tile's last one and
        // is never stored.
        int prow[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int rr = r_base + rg * 16 + lane / 4 + 8 * i;
            prow[i] = (int)pos[t0 + (rr < R ? rr / G : n - 1)];
        }
        // Whether rows 8..15 of the warp's 16 (its threads' second row) hold
        // any of the tile's rows: not in a decode token's tile (G <= 8
        // rows), whose second rows then skip their exps (their results are
        // never stored).
        const bool upper = r_base + rg * 16 + 8 < R;
        // Rows of the tile among the warp's first 8. At most 4 (a decode
        // token's tile for G <= 4) and none in the second 8: those rows'
        // 16·vr weights of a step are spread over the warp, at most two a
        // thread, instead of four exps a thread where most lanes hold
        // padding rows.
        const int vr = min(max(R - (r_base + rg * 16), 0), 8);
        const bool spread = !upper && vr <= 4;
        float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
        // Keys below this every row of the tile sees (rows past the tile
        // take its last position).
        const int all_see = (int)pos[t0] + 1;
        constexpr bool QREG = RGP == 1 && D <= 128;
        unsigned qa[QREG ? D / 16 : 1][4];
        float o[DT][4];
#pragma unroll
        for (int j = 0; j < DT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[j][e] = 0.0f;

        for (int s = s0; s < steps; s++) {
            int st = (s - s0) & 1;
            // Every step commits a group (empty at the end), so that "all
            // but the newest" always means step s has landed.
            if (s + 1 < steps) copy_step(s + 1, st ^ 1, true);
            // Step s's entries, which copy_step(s) read in the step before
            // (a barrier ago), make room for step s + 3's.
            if (s + 3 < steps) fill_ring(s + 3);
            copies_commit();
            copies_wait_groups<1>();
            // ROPE: the new rows over what this thread's copies of their
            // chunks read (those have landed: its own group).
            if constexpr (ROPE) {
                const int rn = ctx - 1 - s * TC_KEYS, ch = (tid % CH) * 8;
                if (s == new_step && rn % RSTEP == r_lo) {
                    __nv_bfloat16* kd = ks + (st * TC_KEYS + rn) * KS + ch;
                    *reinterpret_cast<uint4*>(kd) = *reinterpret_cast<const uint4*>(nrow + ch);
                    *reinterpret_cast<uint4*>(kd + 2 * TC_KEYS * KS) = *reinterpret_cast<const uint4*>(nrow + D + ch);
                }
            }
            __syncthreads();
            const __nv_bfloat16* kst = ks + (st * TC_KEYS + kq * 16) * KS;
            const __nv_bfloat16* vst = vs + (st * TC_KEYS + kq * 16) * KS;
            // One row group (decode tokens) keeps the pass's q fragments in
            // registers, loaded once (q landed with the first step); two
            // reload them from shared memory each step (no registers left).
            if (QREG && s == s0) {
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++)
                    ldmatrix4(qa[kk], qs + (rg * 16 + lane % 16) * KS + kk * 16 + (lane / 16) * 8);
            }
            // Scores of the warp's 16 keys: S = q . k over D in 16-wide steps.
            float sc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                unsigned b[4];
                if (!QREG) ldmatrix4(qa[0], qs + (rg * 16 + lane % 16) * KS + kk * 16 + (lane / 16) * 8);
                ldmatrix4(b, kst + ((lane / 16) * 8 + lane % 8) * KS + kk * 16 + ((lane / 8) % 2) * 8);
                const unsigned* a = QREG ? qa[kk] : qa[0];
                mma16816(sc[0], a, b[0], b[1]);
                mma16816(sc[1], a, b[2], b[3]);
            }
            // Scale, mask keys past each row's position, and the maxima
            // (exact in any order; a row's 4 threads meet).
            int key0 = s * TC_KEYS + kq * 16 + 2 * (lane % 4);
            float mb[2] = {NEG_INF, NEG_INF};
            // Prompt tiles (two row groups): a step whose keys every row of
            // the tile sees (its positions are consecutive, the first the
            // least) masks nothing, and skips the comparisons.
            if (RGP == 1 || (s + 1) * TC_KEYS > all_see) {
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float v = sc[j][e] * scale;
                        v = key0 + j * 8 + (e % 2) <= prow[e / 2] ? v : NEG_INF;
                        sc[j][e] = v;
                        mb[e / 2] = fmaxf(mb[e / 2], v);
                    }
            } else {
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float v = sc[j][e] * scale;
                        sc[j][e] = v;
                        mb[e / 2] = fmaxf(mb[e / 2], v);
                    }
            }
            float mn[2] = {m[0], m[1]};
#pragma unroll
            for (int i = 0; i < 2; i++) {
                if (i == 1 && !upper) continue;
                mb[i] = fmaxf(mb[i], __shfl_xor_sync(0xffffffffu, mb[i], 1));
                mb[i] = fmaxf(mb[i], __shfl_xor_sync(0xffffffffu, mb[i], 2));
                mn[i] = fmaxf(m[i], mb[i]);
            }
            // An unchanged max (no key of the row here) scales by exactly 1
            // (selected after the exp, so that the code stays a straight
            // line). A row's four lanes hold the same max before and after:
            // with both rows in use each lane works out one of the two
            // factors (even lanes the first row's, odd lanes the second's),
            // handed round by two shuffles, instead of every lane both.
            float f[2];
            if (upper) {
                const float fe = q_exp_nonpos((lane & 1) ? m[1] - mn[1] : m[0] - mn[0]);
                const float f0 = __shfl_sync(0xffffffffu, fe, lane & ~3);
                const float f1 = __shfl_sync(0xffffffffu, fe, (lane & ~3) | 1);
                f[0] = mn[0] == m[0] ? 1.0f : f0;
                f[1] = mn[1] == m[1] ? 1.0f : f1;
            } else {
                const float fe = q_exp_nonpos(m[0] - mn[0]);
                f[0] = mn[0] == m[0] ? 1.0f : fe;
                f[1] = 1.0f;
            }
            bool rescale = false;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                m[i] = mn[i];
                rescale = rescale || f[i] != 1.0f;
            }
            // Multiplying by exactly 1 changes no bit (the accumulators only
            // ever hold results of arithmetic, so no NaN payload to lose):
            // a step that leaves every max of the warp's rows unchanged, the
            // usual case once a few steps are in, skips the 66 products.
            if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    l[i] = l[i] * f[i];
#pragma unroll
                    for (int j = 0; j < DT; j++) {
                        o[j][2 * i] = o[j][2 * i] * f[i];
                        o[j][2 * i + 1] = o[j][2 * i + 1] * f[i];
                    }
                }
            }
            // p = exp(s − m), zero for masked keys; this thread's share of
            // the row sums in a fixed order.
            if (spread) {
                // Weight v = 16·row + key (row < vr) is worked out by lane
                // v % 32 (slot v / 32) from its owner's score and max, then
                // handed back; the same exps, the same sums.
                float ps[2] = {0.0f, 0.0f};
#pragma unroll
                for (int sl = 0; sl < 2; sl++) {
                    if (2 * sl >= vr) continue;  // warp-uniform
                    const int v = 32 * sl + lane, r = v >> 4, key = v & 15;
                    const bool valid = r < vr;
                    const int src = valid ? 4 * r + ((key & 7) >> 1) : lane;
                    const float x00 = __shfl_sync(0xffffffffu, sc[0][0], src);
                    const float x01 = __shfl_sync(0xffffffffu, sc[0][1], src);
                    const float x10 = __shfl_sync(0xffffffffu, sc[1][0], src);
                    const float x11 = __shfl_sync(0xffffffffu, sc[1][1], src);
                    const float mr = __shfl_sync(0xffffffffu, m[0], src);
                    const float x = key < 8 ? ((key & 1) ? x01 : x00) : ((key & 1) ? x11 : x10);
                    const float pe = q_exp_nonpos(x - mr);
                    ps[sl] = (!valid || x == NEG_INF) ? 0.0f : pe;
                }
                const int r = lane >> 2;
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int from = ((r & 1) << 4) + 8 * j + 2 * (lane & 3) + e;
                        const float y0 = __shfl_sync(0xffffffffu, ps[0], from);
                        const float y1 = __shfl_sync(0xffffffffu, ps[1], from);
                        const float p = (r >> 1) ? y1 : y0;
                        sc[j][e] = p;
                        l[0] = l[0] + p;
                        sc[j][e + 2] = 0.0f;
                    }
            } else {
                // Every weight first (step_weights; `upper` is warp-uniform),
                // then the sums in the order they always had.
                if (upper)
                    step_weights<4>(sc, m);
                else
                    step_weights<2>(sc, m);
                const int ne = upper ? 4 : 2;
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (e < ne) l[e / 2] = l[e / 2] + sc[j][e];
            }
            // o += (p_hi + p_lo) . v: the two score tiles are the A fragment
            // of the warp's 16 keys.
            unsigned ph[4], pl[4];
#pragma unroll
            for (int x = 0; x < 4; x++) {
                const float* c = sc[x / 2] + 2 * (x % 2);
                ph[x] = pack_bf16x2(c[0], c[1]);
                float h0 = __bfloat162float(__float2bfloat16_rn(c[0]));
                float h1 = __bfloat162float(__float2bfloat16_rn(c[1]));
                pl[x] = pack_bf16x2(c[0] - h0, c[1] - h1);
            }
#pragma unroll
            for (int j = 0; j < DT; j += 2) {
                unsigned b[4];
                ldmatrix4_trans(b, vst + (((lane / 8) % 2) * 8 + lane % 8) * KS + j * 8 + (lane / 16) * 8);
                mma16816(o[j], ph, b[0], b[1]);
                mma16816(o[j], pl, b[0], b[1]);
                mma16816(o[j + 1], ph, b[2], b[3]);
                mma16816(o[j + 1], pl, b[2], b[3]);
            }
            // Every warp is done with the stage the next step refills.
            __syncthreads();
        }
        // The warps' partials to shared memory (the stages are free now).
        float* pm = part + 4 * ROWS * D;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            if (i == 1 && !upper) continue;  // padding rows only: the merge skips them
            int r = rg * 16 + lane / 4 + 8 * i;
            float li = l[i];
            li = li + __shfl_xor_sync(0xffffffffu, li, 1);
            li = li + __shfl_xor_sync(0xffffffffu, li, 2);
            if (lane % 4 == 0) {
                pm[(kq * ROWS + r) * 2] = m[i];
                pm[(kq * ROWS + r) * 2 + 1] = li;
            }
#pragma unroll
            for (int j = 0; j < DT; j++) {
                float* dst = part + (kq * ROWS + r) * D + j * 8 + 2 * (lane % 4);
                dst[0] = o[j][2 * i];
                dst[1] = o[j][2 * i + 1];
            }
        }
        __syncthreads();
        // The quarters' merge. Each row's weights f_w = exp(m_w − M), its sum
        // L = Σ l_w·f_w, output offset and context, once a row (a thread
        // each: they do not depend on the output element; recomputed for
        // every element they were about half a prompt tile's instructions).
        float* rf = pm + 4 * ROWS * 2;  // [row][quarter] f_w
        float* rl = rf + 4 * ROWS;      // [row] L
        float* rm = rl + ROWS;          // [row] M
        int* r_out = reinterpret_cast<int*>(rm + ROWS);  // [row] t·Hq + h
        int* r_ctx = r_out + ROWS;                       // [row] the row's context
        for (int r = tid; r < ROWS; r += THREADS) {
            int rr = r_base + r;
            if (rr >= R) continue;
            int t = t0 + rr / G;
            r_out[r] = t * Hq + g * G + rr % G;
            r_ctx[r] = (int)pos[t] + 1;
            float mw[4], mx = NEG_INF;
#pragma unroll
            for (int w = 0; w < 4; w++) {
                mw[w] = pm[(w * ROWS + r) * 2];
                mx = fmaxf(mx, mw[w]);
            }
            float L = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; w++) {
                float f = q_exp_nonpos(mw[w] - mx);  // a quarter that saw no key: exp(-inf) = 0
                rf[4 * r + w] = f;
                L = L + pm[(w * ROWS + r) * 2 + 1] * f;
            }
            rl[r] = L;
            rm[r] = mx;
        }
        __syncthreads();
        // Then an output element a thread at a time, O = Σ o_w·f_w: the
        // row's output if this span is all it has, else the span's partials.
        for (int e = tid; e < ROWS * D; e += THREADS) {
            int r = e / D, i = e % D, rr = r_base + r;
            if (rr >= R) continue;
            int row_ctx = r_ctx[r];
            if (row_ctx <= k_begin) continue;  // no key of the row here
            float O = 0.0f;
#pragma unroll
            for (int w = 0; w < 4; w++) O = O + part[(w * ROWS + r) * D + i] * rf[4 * r + w];
            if (row_ctx <= TC_SPAN) {
                out[(size_t)r_out[r] * D + i] = __float2bfloat16_rn(O / rl[r]);
            } else {
                float* dst = spans + ((size_t)r_out[r] * max_spans + blockIdx.y) * (D + TC_SPAN_HEAD);
                dst[TC_SPAN_HEAD + i] = O;
                if (i == 0) {
                    dst[0] = rm[r];
                    dst[1] = rl[r];
                }
            }
        }
        // The next pass refills q and the stages.
        __syncthreads();
    }
    if (nspans == 1) return;
    // The last of the tile's span blocks to finish merges the spans of every
    // row that has more than one, in span order: M = max m_c, f_c =
    // exp(m_c − M), L = Σ l_c·f_c, O = Σ o_c·f_c, out = bf16(O / L).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(done + blockIdx.x, 1u) == (u32)(nspans - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (tid == 0) done[blockIdx.x] = 0;
    // Each row's factors f_c and sum L once a row (a thread each), then the
    // outputs four at a time, every span's loads issued before the sums:
    // the same sums as one element at a time (recomputing the factors for
    // every element, with dependent loads from L2, took a prompt tile's
    // merging block tens of microseconds). The stages hold [row][span]
    // factors and [row] sums for RC rows at a time (at least one: checked by
    // the launcher).
    constexpr int SH = TC_SPAN_HEAD, D4 = D / 4;
    constexpr int SMEM_FLOATS = (16 * RGP + 4 * TC_KEYS) * KS / 2;
    const int RC = SMEM_FLOATS / (max_spans + 1);
    float* mf = reinterpret_cast<float*>(smem_raw);
    float* ml = mf + RC * max_spans;
    auto row_at = [&](int rr) {
        int t = t0 + rr / G, h = g * G + rr % G;
        return spans + ((size_t)t * Hq + h) * max_spans * (D + SH);
    };
    auto spans_of = [&](int rr) { return ((int)pos[t0 + rr / G] + TC_SPAN) / TC_SPAN; };
    for (int r0 = 0; r0 < R; r0 += RC) {
        const int rn = min(RC, R - r0);
        for (int r = tid; r < rn; r += THREADS) {
            const int rr = r0 + r, ns = spans_of(rr);
            if (ns == 1) continue;
            const float* p = row_at(rr);
            float mx = NEG_INF;
            for (int c = 0; c < ns; c++) mx = fmaxf(mx, __ldcg(p + c * (D + SH)));
            float L = 0.0f;
            for (int c = 0; c < ns; c++) {
                float f = q_exp_nonpos(__ldcg(p + c * (D + SH)) - mx);
                mf[r * max_spans + c] = f;
                L = L + __ldcg(p + c * (D + SH) + 1) * f;
            }
            ml[r] = L;
        }
        __syncthreads();
        for (int e = tid; e < rn * D4; e += THREADS) {
            const int r = e / D4, rr = r0 + r, i = (e % D4) * 4;
            const int ns = spans_of(rr);
            if (ns == 1) continue;
            const float* p = row_at(rr) + SH + i;
            const float* f = mf + r * max_spans;
            float O[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int c = 0;
            for (; c + 4 <= ns; c += 4) {
                float4 v[4];
#pragma unroll
                for (int u = 0; u < 4; u++) v[u] = __ldcg(reinterpret_cast<const float4*>(p + (c + u) * (D + SH)));
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    const float fc = f[c + u];
                    O[0] = O[0] + v[u].x * fc;
                    O[1] = O[1] + v[u].y * fc;
                    O[2] = O[2] + v[u].z * fc;
                    O[3] = O[3] + v[u].w * fc;
                }
            }
            for (; c < ns; c++) {
                const float4 v = __ldcg(reinterpret_cast<const float4*>(p + c * (D + SH)));
                const float fc = f[c];
                O[0] = O[0] + v.x * fc;
                O[1] = O[1] + v.y * fc;
                O[2] = O[2] + v.z * fc;
                O[3] = O[3] + v.w * fc;
            }
            const float L = ml[r];
            const int t = t0 + rr / G, h = g * G + rr % G;
            __nv_bfloat16* o = out + ((size_t)t * Hq + h) * D + i;
#pragma unroll
            for (int u = 0; u < 4; u++) o[u] = __float2bfloat16_rn(O[u] / L);
        }
        // The next rows' factors overwrite these.
        __syncthreads();
    }
}

// One kernel per head width and row groups, so that each gets the
// registers its own body needs (one switch over all of them took 254 for
// every width, one block an SM). Bounds: at most 128 registers a thread,
// four blocks of one row group or two of two an SM, except for head_dim
// 256, whose output tile alone is 128 registers, and head_dim 128 with one
// row group, which keeps q's fragments in registers (168) and whose shared
// memory allows three blocks an SM anyway.
#define TC_KERNEL(DD, RG, MINB)                                                                                \
    extern "C" __global__ void __launch_bounds__(128 * RG, MINB)                                                \
        attn_tc_d##DD##_r##RG(const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc,        \
                              const u32* pos, const u32* seq, const u32* tables, const u32* tiles,             \
                              int max_blocks, int bs, int Hq, int Hkv, float scale, int tc_rows,               \
                              int max_spans, float* spans, u32* done, __nv_bfloat16* out) {                    \
        attn_tc_body<DD, RG>(q, kc, vc, pos, seq, tables, tiles, max_blocks, bs, Hq, Hkv, scale, tc_rows,        \
                             max_spans, spans, done, out);                                                     \
    }
// The ROPE variant (decode tokens, one row group): qkv, the norm weights,
// eps, the rotation table and the new rows' slots, then q_out and the
// caches (written), then attn_tc's parameters from pos on.
#define TC_ROPE_KERNEL(DD, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(128, MINB)                                                     \
        attn_tc_rope_d##DD(const float* qkv, const float* qn, const float* kn, float eps, const float* rope,     \
                           const u32* slots, __nv_bfloat16* q_out, __nv_bfloat16* kc, __nv_bfloat16* vc,       \
                           const u32* pos, const u32* seq, const u32* tables, const u32* tiles, int max_blocks, \
                           int bs, int Hq, int Hkv, float scale, int tc_rows, int max_spans, float* spans,     \
                           u32* done, __nv_bfloat16* out) {                                                    \
        const TcRope rp = {qkv, qn, kn, eps, rope, slots, q_out, kc, vc};                                      \
        attn_tc_body<DD, 1, true>(q_out, kc, vc, pos, seq, tables, tiles, max_blocks, bs, Hq, Hkv, scale,       \
                                  tc_rows, max_spans, spans, done, out, rp);                                   \
    }
TC_ROPE_KERNEL(32, 4)
TC_ROPE_KERNEL(64, 4)
TC_ROPE_KERNEL(128, 3)
TC_ROPE_KERNEL(256, 1)
TC_KERNEL(32, 1, 4)
TC_KERNEL(32, 2, 2)
TC_KERNEL(64, 1, 4)
TC_KERNEL(64, 2, 2)
TC_KERNEL(128, 1, 3)
TC_KERNEL(128, 2, 2)
TC_KERNEL(256, 1, 1)
TC_KERNEL(256, 2, 1)
