// Sampling on the GPU (twin of kernels-cpu sampling.rs): argmax per row, the
// repetition penalty, and filtered sampling (temperature, top-k, top-p,
// min-p, one uniform per row) that picks exactly the CPU spec's token.

// Argmax in two launches: ARGMAX_SLICES blocks per row each reduce a
// contiguous slice to (max, index), then one warp per row reduces the
// slices. Strictly greater keeps the lowest index among a thread's equal
// values and never lets NaN win, as the CPU's scan does; across threads and
// slices equal maxima go to the lower index. An all -inf/NaN row gives 0.
#define ARGMAX_SLICES 32
#define ARGMAX_THREADS 256

__device__ __forceinline__ void argmax_merge(float& v, u32& i, float ov, u32 oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

extern "C" __global__ void argmax_slices(const float* logits, int V, float* part_v, u32* part_i) {
    wait_for_producers();
    start_dependents();
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ u32 si[ARGMAX_THREADS / 32];
    const float* row = logits + (size_t)blockIdx.x * V;
    int per = (V + ARGMAX_SLICES - 1) / ARGMAX_SLICES;
    int lo = blockIdx.y * per, hi = min(V, lo + per);
    float bv = __int_as_float(0xff800000);
    u32 bi = 0;
    for (int i = lo + threadIdx.x; i < hi; i += ARGMAX_THREADS) {
        float x = row[i];
        if (x > bv) { bv = x; bi = (u32)i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_merge(bv, bi, ov, oi);
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < ARGMAX_THREADS / 32; w++) argmax_merge(bv, bi, sv[w], si[w]);
        part_v[blockIdx.x * ARGMAX_SLICES + blockIdx.y] = bv;
        part_i[blockIdx.x * ARGMAX_SLICES + blockIdx.y] = bi;
    }
}

extern "C" __global__ void argmax_finish(const float* part_v, const u32* part_i, u32* out) {
    wait_for_producers();
    start_dependents();
    int lane = threadIdx.x;
    float bv = part_v[blockIdx.x * ARGMAX_SLICES + lane];
    u32 bi = part_i[blockIdx.x * ARGMAX_SLICES + lane];
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_merge(bv, bi, ov, oi);
    }
    if (lane == 0) out[blockIdx.x] = bi;
}

// pairs[2j] = row, pairs[2j+1] = token id; each pair distinct.
extern "C" __global__ void repetition_penalty(float* logits, int V, const u32* pairs, const float* penalty, int n) {
    wait_for_producers();
    start_dependents();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    u32 row = pairs[2 * j], id = pairs[2 * j + 1];
    float p = penalty[row];
    float* x = logits + (size_t)row * V + id;
    *x = *x > 0.0f ? *x / p : *x * p;
}

// ---------------------------------------------------------------------------
// Filtered sampling (twin of kernels-cpu `sample`), one block per row.
//
// Exact in any parallel order because:
// * every filter keeps a set defined by a threshold on the rank key (z
//   descending, then index ascending) - top-k and top-p keep a prefix - or by
//   a per-token predicate (min-p: e >= min_p), and
// * every sum is an integer sum of the quantised weights q (u64), so the
//   order in which threads add them cannot change a bit.
// "First candidate in rank order whose inclusive prefix sum of w exceeds t"
// (top-k with w = 1, top-p's cut and the draw with w = q) is found by a
// most-significant-digit radix descent over the rank keys: per pass, a
// histogram of the summed weights of each 8-bit digit among the candidates
// that share the prefix fixed so far; the digit whose bucket holds t is
// appended and t made relative to it.
//
// Tokens with z - z_max < -30 have q = 0 (exp(-30) * 2^40 < 0.1); they form
// a suffix in rank order and can change neither a sum nor a draw, and a
// top-k cut that reaches them keeps every other token, so only the other,
// "live" tokens are candidates. A pass over the whole row reads the logits
// themselves and works out each token's liveness, key and e again (a few
// instructions against the 12 bytes a stored key and weight would cost to
// write and read back each pass): the row is read, never written. Once at
// most SHARED_CAP candidates are left (after top-k, or within the digit a
// descent has fixed so far), they are copied to shared memory and the
// remaining passes stay on chip.
//
// A row without a top-k or top-p cut skips all of that: the spec then draws
// in index order, which nested block-wide sums find (draw_in_index_order).
// ---------------------------------------------------------------------------

typedef unsigned long long u64;

#define SAMPLE_THREADS 1024
#define RADIX_BITS 8
#define RADIX (1 << RADIX_BITS)
#define CACHE 4
#define SHARED_CAP 2048
#define FULL_MASK 0xffffffffu

// 2^40, the fixed-point scale of q.
#define Q_SCALE 1099511627776.0f

// How the first pass of a select turns the total weight into its target.
#define T_FIXED 0  // the given target (top-k: k - 1)
#define T_TOP_P 1  // tau = (top_p * S) truncated; target tau - 1 (0 if tau = 0)
#define T_DRAW 2   // (u * K) truncated

// The CPU's rank_key with the index packed into `nb` bits instead of 32
// (nb = bit length of V - 1): ascending order = z descending, then index
// ascending; -0 folds into +0 because IEEE comparison ties them.
__device__ __forceinline__ u64 rank_key(float z, int i, int nb) {
    if (z == 0.0f) z = 0.0f;
    u32 b = __float_as_uint(z);
    u32 ascending = (b >> 31) ? ~b : (b | 0x80000000u);
    return ((u64)(~ascending) << nb) | (u64)(u32)i;
}

// Step 3's fixed-point weight: exact power-of-two scaling, truncation.
__device__ __forceinline__ u64 quantise(float e) { return __float2ull_rz(e * Q_SCALE); }

// One radix pass's histogram and the scan's verdict. Weight sums are kept
// as two 32-bit words because 32-bit shared atomics are native while
// 64-bit adds are compare-and-swap loops, which starve under contention.
struct Hist {
    u32 count[RADIX];  // candidates per digit
    u32 lo[RADIX];     // summed weight per digit, low word
    u32 hi[RADIX];     // ... high word (carries out of `lo` land here)
    u64 warp_total[RADIX / 32];
    u64 t_next;        // target within the chosen digit
    u64 key;           // the fetched key of a single-candidate digit
    int digit;         // chosen digit, -1 if the total is <= the target
    int n_copied;      // candidates copied to shared memory so far
};

// Adds a thread's accumulated (weight, count) of one digit to the histogram.
// The carry test is exact: each add that wraps the low word carries one.
__device__ __forceinline__ void flush(Hist& s, bool by_count, u32 d, u64 w, u32 c) {
    if (c == 0) return;
    atomicAdd(&s.count[d], c);
    if (by_count) return;
    u32 wl = (u32)w, wh = (u32)(w >> 32);
    u32 old = atomicAdd(&s.lo[d], wl);
    if (old + wl < old) wh += 1u;
    if (wh != 0) atomicAdd(&s.hi[d], wh);
}

// This lane's slot when the warp's lanes with `in` set append to a list
// whose length is the shared counter `n`: one atomic a warp, the lanes in
// lane order. Every lane of the warp must call it together.
__device__ __forceinline__ int warp_append(int* n, bool in) {
    const int lane = threadIdx.x & 31;
    const u32 mask = __ballot_sync(FULL_MASK, in);
    int base = 0;
    if (mask != 0) {
        const int leader = __ffs(mask) - 1;
        if (lane == leader) base = atomicAdd(n, __popc(mask));
        base = __shfl_sync(FULL_MASK, base, leader);
    }
    return base + __popc(mask & ((1u << lane) - 1u));
}

// A thread's live candidates so far: how many, and the smallest and
// largest rank key among them.
struct LiveStats {
    int n = 0;
    u64 lo = ~0ull, hi = 0;
    __device__ __forceinline__ void add(u64 key) {
        n += 1;
        lo = key < lo ? key : lo;
        hi = key > hi ? key : hi;
    }
};

// Folds each thread's LiveStats into the block's shared totals (zeroed, and
// ~0 for the minimum, before): a warp reduction, then one atomic each a
// warp. Every lane of the warp must call it together; the caller syncs
// before reading the totals.
__device__ __forceinline__ void add_live_stats(LiveStats s, int* live_n, u64* kmin_s, u64* kmax_s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 a = __shfl_xor_sync(FULL_MASK, s.lo, o), b = __shfl_xor_sync(FULL_MASK, s.hi, o);
        s.lo = a < s.lo ? a : s.lo;
        s.hi = b > s.hi ? b : s.hi;
        s.n += __shfl_xor_sync(FULL_MASK, s.n, o);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(live_n, s.n);
        atomicMin(kmin_s, s.lo);
        atomicMax(kmax_s, s.hi);
    }
}

// A row of logits as the sampler's candidates: token i's z, whether it is
// live, its rank key and weight e, all computed from the logit on every read
// exactly as the spec computes them once.
struct Row {
    const float* x;
    float temp, z_max;
    int V, nb;
    // z of token i (NaN counts as -inf) and whether the token is live (for
    // the infinite cases, where z - z_max is NaN, it is).
    __device__ __forceinline__ bool live(int i, float& z) const { return live_x(x[i], z); }
    // live() of a token whose logit xi is already loaded.
    __device__ __forceinline__ bool live_x(float xi, float& z) const {
        z = xi / temp;
        if (isnan(z)) z = __int_as_float(0xff800000);
        return live_z(z);
    }
    __device__ __forceinline__ bool live_z(float z) const { return !(z - z_max < -30.0f); }
    // The exp worked out either way and selected (straight-line code).
    __device__ __forceinline__ float weight(float z) const {
        const float e = q_exp(z - z_max);
        return z == z_max ? 1.0f : e;
    }
};

// Reads candidate j of the current source: the row (j a token index, dead
// tokens skipped) or the n_sh candidates copied to shared memory. Returns
// false for a token that is not a candidate of the pass: dead, outside the
// digits fixed so far (key >> hi != high), above kmax, or (when the weight
// counts) below min_p.
__device__ __forceinline__ bool candidate(const Row& row, bool in_sh, const u64* sh_keys,
                                          const float* sh_es, int j, int hi, u64 high,
                                          u64 kmax, float min_p, bool by_count, u64& key,
                                          float& e) {
    if (in_sh) {
        key = sh_keys[j];
        if ((key >> hi) != high || key > kmax) return false;
        if (!by_count) e = sh_es[j];
    } else {
        float z;
        if (!row.live(j, z)) return false;
        key = rank_key(z, j, row.nb);
        if ((key >> hi) != high || key > kmax) return false;
        if (!by_count) e = row.weight(z);
    }
    return by_count || e >= min_p;
}

// Among the candidates (the row's live tokens, or the n_sh already in
// shared memory when n_sh >= 0) with key <= kmax (kmin: the smallest, the
// top token) and, unless by_count, e >= min_p, weighted by 1 (by_count) or
// q: finds the first in key order whose inclusive prefix sum of weights
// exceeds the target (see T_*; `frac` is top_p or u, `fixed` the T_FIXED
// target). A descent over the row copies its candidates to sh_keys/sh_es
// once at most SHARED_CAP remain. All threads of the block must call it
// together; returns whether such a candidate exists and, if so, its key in
// *out.
__device__ bool select_key(const Row& row, u64* sh_keys, float* sh_es, int n_sh, u64 kmin,
                           u64 kmax, float min_p, bool by_count, int mode, float frac, u64 fixed,
                           Hist& s, u64* out) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    bool in_sh = n_sh >= 0;
    // Bits above the highest one where kmin and kmax differ are shared by
    // every candidate: the descent starts below them. Keys are < 2^63, so
    // hi <= 63 and the shifts below are defined.
    u64 diff = kmin ^ kmax;
    int hi = diff == 0 ? 0 : 64 - __clzll((long long)diff);
    u64 prefix = (kmin >> hi) << hi;
    u64 t = fixed;
    bool first = true;
    for (;;) {
        // Each warp reads a contiguous segment, its lanes side by side:
        // loads coalesce, and a thread's successive keys lie close in index
        // order, so runs of one digit are long.
        const int n = in_sh ? n_sh : row.V;
        const int seg = (n + nwarps - 1) / nwarps;
        const int j_end = min(n, (warp + 1) * seg);
        // Digit bits [lo, hi); hi == 0 (one key left) gives a 0-bit digit.
        const int lo = hi > RADIX_BITS ? hi - RADIX_BITS : 0;
        const u32 dmask = (1u << (hi - lo)) - 1u;
        const u64 high = prefix >> hi;
        for (int d = tid; d < RADIX; d += blockDim.x) {
            s.count[d] = 0;
            s.lo[d] = 0;
            s.hi[d] = 0;
        }
        if (tid == 0) s.digit = -1;
        __syncthreads();

        // A small per-thread cache of digits absorbs the few hot buckets of
        // a skewed pass, so most candidates cost no atomic at all.
        u32 cd[CACHE], cc[CACHE];
        u64 cw[CACHE];
#pragma unroll
        for (int e = 0; e < CACHE; e++) {
            cd[e] = 0xffffffffu;
            cc[e] = 0;
            cw[e] = 0;
        }
        int victim = 0;
        for (int j = warp * seg + lane; j < j_end; j += 32) {
            u64 ck;
            float e = 0.0f;
            if (!candidate(row, in_sh, sh_keys, sh_es, j, hi, high, kmax, min_p, by_count, ck, e))
                continue;
            const u64 w = by_count ? 1 : quantise(e);
            u32 d = (u32)(ck >> lo) & dmask;
            bool hit = false;
#pragma unroll
            for (int e = 0; e < CACHE; e++) {
                if (cd[e] == d) {
                    cc[e] += 1;
                    cw[e] += w;
                    hit = true;
                }
            }
            if (!hit) {
#pragma unroll
                for (int e = 0; e < CACHE; e++) {
                    if (e == victim) {
                        flush(s, by_count, cd[e], cw[e], cc[e]);
                        cd[e] = d;
                        cc[e] = 1;
                        cw[e] = w;
                    }
                }
                victim = (victim + 1) & (CACHE - 1);
            }
        }
#pragma unroll
        for (int e = 0; e < CACHE; e++) flush(s, by_count, cd[e], cw[e], cc[e]);
        __syncthreads();

        // Inclusive scan of the 256 bucket sums: per warp, then warp totals.
        u64 v = 0, incl = 0;
        if (tid < RADIX) {
            v = by_count ? (u64)s.count[tid] : ((u64)s.hi[tid] << 32) | s.lo[tid];
            incl = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                u64 y = __shfl_up_sync(FULL_MASK, incl, o);
                if (lane >= o) incl += y;
            }
            if (lane == 31) s.warp_total[warp] = incl;
        }
        __syncthreads();
        if (tid < RADIX) {
            u64 before = 0, total = 0;
            for (int w = 0; w < RADIX / 32; w++) {
                if (w < warp) before += s.warp_total[w];
                total += s.warp_total[w];
            }
            incl += before;
            u64 tt = t;
            if (first && mode != T_FIXED) {
                // u64 -> f64 rounded to nearest, one f64 multiplication,
                // truncated: exactly as the spec computes tau and target.
                u64 x = __double2ull_rz((double)frac * __ull2double_rn(total));
                tt = (mode == T_TOP_P) ? (x == 0 ? 0 : x - 1) : x;
            }
            // Prefix sums ascend with the digit, so exactly one bucket holds
            // tt when total > tt.
            u64 excl = incl - v;
            if (excl <= tt && tt < incl) {
                s.digit = tid;
                s.t_next = tt - excl;
            }
        }
        __syncthreads();
        const int d = s.digit;
        if (d < 0) {  // total <= target
            __syncthreads();
            return false;
        }
        prefix |= (u64)d << lo;
        t = s.t_next;
        first = false;
        if (lo == 0) {
            *out = prefix;  // every bit fixed
            __syncthreads();
            return true;
        }
        const u32 left = s.count[d];
        if (left == 1) {
            // One candidate left: fetch its key in one plain pass instead
            // of descending through the remaining digits.
            for (int j = warp * seg + lane; j < j_end; j += 32) {
                u64 ck;
                float e = 0.0f;
                if (candidate(row, in_sh, sh_keys, sh_es, j, lo, prefix >> lo, kmax, min_p,
                              by_count, ck, e))
                    s.key = ck;
            }
            __syncthreads();
            *out = s.key;
            __syncthreads();
            return true;
        }
        if (!in_sh && left <= SHARED_CAP) {
            // The fixed digits leave few candidates: one more pass over the
            // row copies them to shared memory for the rest of the descent.
            if (tid == 0) s.n_copied = 0;
            __syncthreads();
            for (int j0 = warp * seg; j0 < j_end; j0 += 32) {
                const int j = j0 + lane;
                u64 ck = 0;
                float e = 0.0f;
                const bool in = j < j_end && candidate(row, false, sh_keys, sh_es, j, lo,
                                                       prefix >> lo, kmax, min_p, by_count, ck, e);
                const int pos = warp_append(&s.n_copied, in);
                if (in) {
                    sh_keys[pos] = ck;
                    sh_es[pos] = e;
                }
            }
            __syncthreads();
            n_sh = s.n_copied;  // == left
            in_sh = true;
        }
        hi = lo;
        __syncthreads();  // everyone has read s before it is reset
    }
}

// Larger than any token index.
#define NO_TOKEN 0x7fffffff

// The draw's target in fixed point: u64 -> f64 rounded to nearest, one f64
// multiplication, truncated, exactly as the spec computes it.
__device__ __forceinline__ u64 draw_target(float u, u64 total) {
    return __double2ull_rz((double)u * __ull2double_rn(total));
}

// One token's share of warp_range_sum: its quantised weight added to
// `sum` if it is live and at least min_p, and (find_top) the lowest token
// at z_max kept in `top`.
__device__ __forceinline__ void range_term(const Row& row, float min_p, int j, float xj, bool find_top, u64& sum,
                                           int& top) {
    float z;
    if (!row.live_x(xj, z)) return;
    if (find_top && z == row.z_max && j < top) top = j;
    const float e = row.weight(z);
    if (e >= min_p) sum += quantise(e);
}

// The warp's total of `sum` and least `top`, in every lane.
__device__ __forceinline__ void warp_sum_top(u64& sum, int& top) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        sum += __shfl_xor_sync(FULL_MASK, sum, o);
        top = min(top, __shfl_xor_sync(FULL_MASK, top, o));
    }
}

// The warp's sum of q (exact u64, so the order is free) over the live
// tokens j = from, from + step, ... below `to` (each lane its own `from`)
// whose weight passes min_p, and with `find_top` its first token at z_max
// (NO_TOKEN if none); every lane gets both.
__device__ __forceinline__ void warp_range_sum(const Row& row, float min_p, int from, int to, int step,
                                               bool find_top, u64& sum, int& top) {
    sum = 0;
    top = NO_TOKEN;
#pragma unroll 2
    for (int j = from; j < to; j += step) range_term(row, min_p, j, row.x[j], find_top, sum, top);
    warp_sum_top(sum, top);
}

// The state the index-order draw shares across its block.
struct IndexDraw {
    u64 sum[32];  // q summed over each warp's segment of the current range
    u64 t;        // the target within the chosen segment
    int lo, hi;   // the chosen segment
    int top;      // the first token at z_max (the spec's fallback)
    int found;    // whether some segment holds the target
};

// Step 6 in index order, for a row without a top-k or top-p cut (the spec
// allows it there): nested block-wide sums. Each level splits the range
// into one contiguous segment a warp (lanes side by side, so loads
// coalesce), sums each segment's q (exact u64, so the order is free), and
// keeps the segment holding the target, until one token is left: the
// first whose inclusive prefix in index order exceeds the target. With
// `first`, the first level is over the whole row [lo, hi) and also finds
// the total K (hence the target from u) and the top token; without, the
// target t within [lo, hi) is given (draw_finish). s.top must be NO_TOKEN
// on entry.
__device__ u32 index_levels(const Row& row, float min_p, float u, int lo, int hi, u64 t, bool first,
                            IndexDraw& s) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    while (hi - lo > 1) {
        const int seg = (hi - lo + nwarps - 1) / nwarps;
        const int a = lo + warp * seg, b = min(hi, a + seg);
        u64 sum;
        int top;
        warp_range_sum(row, min_p, a + lane, b, 32, first, sum, top);
        if (lane == 0) {
            s.sum[warp] = sum;
            if (first) atomicMin(&s.top, top);
        }
        __syncthreads();
        if (warp == 0) {
            const u64 v = lane < nwarps ? s.sum[lane] : 0;
            u64 incl = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u64 y = __shfl_up_sync(FULL_MASK, incl, o);
                if (lane >= o) incl += y;
            }
            const u64 total = __shfl_sync(FULL_MASK, incl, 31);
            const u64 tt = first ? draw_target(u, total) : t;
            const u64 excl = incl - v;
            // Prefix sums ascend with the lane, so at most one holds tt.
            const bool hit = excl <= tt && tt < incl;
            if (hit) {
                s.lo = lo + lane * seg;
                s.hi = min(hi, s.lo + seg);
                s.t = tt - excl;
            }
            const u32 any = __ballot_sync(FULL_MASK, hit);
            if (lane == 0) s.found = any != 0;
        }
        __syncthreads();
        if (!s.found) return (u32)s.top;  // target >= K: the top token
        lo = s.lo;
        hi = s.hi;
        t = s.t;
        first = false;
        __syncthreads();  // everyone has read s before the next level writes it
    }
    return (u32)lo;
}

__device__ u32 draw_in_index_order(const Row& row, float min_p, float u, IndexDraw& s) {
    return index_levels(row, min_p, u, 0, row.V, 0, true, s);
}

// params: 5 words per row, [temperature, k, top_p, min_p, u], f32 bits
// except k = min(top_k, V) (V when top_k is 0). nb: bit length of V - 1.
// Needs blockDim.x = SAMPLE_THREADS (at least RADIX, a multiple of 32).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_rows(const float* logits, int V, int nb, const u32* params, u32* out) {
    wait_for_producers();
    start_dependents();
    __shared__ Hist s;
    __shared__ u64 sh_keys[SHARED_CAP];
    __shared__ float sh_es[SHARED_CAP];
    __shared__ float warp_max[32];
    __shared__ u64 kmin_s, kmax_s;
    __shared__ int live_n;
    __shared__ IndexDraw ix;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = blockDim.x >> 5;
    const float* x = logits + (size_t)blockIdx.x * V;
    const u32* p = params + 5 * (size_t)blockIdx.x;
    const float temp = __uint_as_float(p[0]);
    const u32 k = p[1];
    const float top_p = __uint_as_float(p[2]);
    const float min_p = __uint_as_float(p[3]);
    const float u = __uint_as_float(p[4]);
    const float neg_inf = __int_as_float(0xff800000);

    // Step 1: z_max. A NaN z never compares greater, i.e. counts as -inf.
    // The sign of a zero maximum cannot matter: it is only compared with
    // ==, or subtracted from a non-zero z.
    float m = neg_inf;
    for (int i = tid; i < V; i += blockDim.x) {
        float z = x[i] / temp;
        if (z > m) m = z;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(FULL_MASK, m, o);
        if (y > m) m = y;
    }
    if (lane == 0) warp_max[warp] = m;
    if (tid == 0) {
        live_n = 0;
        kmin_s = ~0ull;
        kmax_s = 0;
        ix.top = NO_TOKEN;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nwarps ? warp_max[lane] : neg_inf;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float y = __shfl_xor_sync(FULL_MASK, m, o);
            if (y > m) m = y;
        }
        if (lane == 0) warp_max[0] = m;
    }
    __syncthreads();
    const Row row = {x, temp, warp_max[0], V, nb};
    if (k == (u32)V && !(top_p < 1.0f)) {
        // No top-k or top-p cut: the spec draws in index order.
        const u32 tok = draw_in_index_order(row, min_p, u, ix);
        if (tid == 0) out[blockIdx.x] = tok;
        return;
    }

    // Step 2: the live tokens (z - z_max >= -30, or z == z_max for the
    // infinite cases where the difference is NaN): how many, and the
    // smallest and largest rank key among them.
    LiveStats live;
    for (int i = tid; i < V; i += blockDim.x) {
        float z;
        if (row.live(i, z)) live.add(rank_key(z, i, nb));
    }
    add_live_stats(live, &live_n, &kmin_s, &kmax_s);
    __syncthreads();
    const int n = live_n;
    const u64 kmin = kmin_s, kmax = kmax_s;  // kmin: the top candidate

    // Step 2's top-k: the k-th smallest key bounds the candidates. With
    // k >= n the cut keeps every live token (and possibly some q = 0 ones).
    u64 kcut = kmax;
    int cand = n;
    if (k < (u32)n) {
        select_key(row, sh_keys, sh_es, -1, kmin, kmax, 0.0f, true, T_FIXED, 0.0f, (u64)k - 1,
                   s, &kcut);
        cand = (int)k;
    }
    // Few candidates (the usual top_k, or a peaked row): copy them to
    // shared memory, so the remaining passes stay on chip.
    int n_sh = -1;
    if (cand <= SHARED_CAP) {
        if (tid == 0) s.n_copied = 0;
        __syncthreads();
        for (int i0 = 0; i0 < V; i0 += blockDim.x) {
            const int i = i0 + tid;
            float z = 0.0f;
            u64 ck = 0;
            bool in = i < V && row.live(i, z);
            if (in) {
                ck = rank_key(z, i, nb);
                in = ck <= kcut;
            }
            const int pos = warp_append(&s.n_copied, in);
            if (in) {
                sh_keys[pos] = ck;
                sh_es[pos] = row.weight(z);
            }
        }
        __syncthreads();
        n_sh = s.n_copied;  // == cand
    }
    // Step 4: top-p keeps the prefix up to the first candidate whose
    // inclusive sum reaches tau (all if none does).
    u64 pcut = kcut;
    if (top_p < 1.0f)
        select_key(row, sh_keys, sh_es, n_sh, kmin, kcut, 0.0f, false, T_TOP_P, top_p, 0, s,
                   &pcut);
    // Steps 5 and 6: min-p is a per-token filter applied inside the draw
    // (e >= 0 always holds, so min_p = 0 filters nothing); the top token is
    // the fallback.
    u64 tok = kmin;
    select_key(row, sh_keys, sh_es, n_sh, kmin, pcut, min_p, false, T_DRAW, u, 0, s, &tok);
    if (tid == 0) out[blockIdx.x] = (u32)(tok & ((1ull << nb) - 1ull));
}

// ---------------------------------------------------------------------------
// Rows with a small top-k (every row's k with ceil(V / SHARED_CAP) · k <=
// SHARED_CAP, e.g. Qwen3's recommended top-k 20), spread over the GPU in two
// launches instead of a block a row:
// * sample_slices: block (slice, row) reads its slice of the row once (at
//   most SHARED_CAP tokens, kept in shared memory as rank keys), and writes
//   the slice's z maximum and its best min(k, slice) rank keys. The row's k
//   best keys are among the slices' best: a token outside its slice's k
//   best has k better tokens in its row.
// * sample_merge: a block a row takes the slices' keys (at most SHARED_CAP)
//   and z maxima and finishes exactly as sample_rows does once its
//   candidates are in shared memory: the row's z_max is the largest slice
//   maximum; the live candidates (dead tokens rank after every live one,
//   so the live tokens of the row's k best are among them), top-k's cut by
//   count among them, then top-p and the draw.
// ---------------------------------------------------------------------------

#define SLICE_THREADS 256

// The z a rank_key (index in nb bits) was built from (-0 comes back as +0,
// which compares and subtracts like -0 wherever the sampler uses z).
__device__ __forceinline__ float key_z(u64 key, int nb) {
    const u32 ascending = ~(u32)(key >> nb);
    return __uint_as_float((ascending >> 31) ? (ascending & 0x7fffffffu) : ~ascending);
}

// params as sample_rows'. Grid (S, rows); keys_out holds kout keys a
// (row, slice), n_out and zmax_out one entry a (row, slice).
extern "C" __global__ void __launch_bounds__(SLICE_THREADS)
sample_slices(const float* logits, int V, int nb, const u32* params, int slice, int kout, u64* keys_out,
              u32* n_out, float* zmax_out) {
    wait_for_producers();
    start_dependents();
    __shared__ Hist s;
    __shared__ u64 sh_keys[SHARED_CAP];
    __shared__ float warp_max[SLICE_THREADS / 32];
    __shared__ u64 kmin_s, kmax_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.y, S = gridDim.x;
    const float* x = logits + (size_t)row * V;
    const u32* p = params + 5 * (size_t)row;
    const float temp = __uint_as_float(p[0]);
    const u32 k = p[1];
    const int lo = blockIdx.x * slice, n = max(min(V, lo + slice) - lo, 0);
    if (tid == 0) {
        kmin_s = ~0ull;
        kmax_s = 0;
        s.n_copied = 0;
    }
    float m = __int_as_float(0xff800000);
    u64 kmn = ~0ull, kmx = 0;
    for (int j = tid; j < n; j += blockDim.x) {
        // Step 1's z (NaN counts as -inf) and step 2's rank key.
        float z = x[lo + j] / temp;
        if (isnan(z)) z = __int_as_float(0xff800000);
        if (z > m) m = z;
        const u64 key = rank_key(z, lo + j, nb);
        sh_keys[j] = key;
        kmn = key < kmn ? key : kmn;
        kmx = key > kmx ? key : kmx;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(FULL_MASK, m, o);
        if (y > m) m = y;
        const u64 a = __shfl_xor_sync(FULL_MASK, kmn, o), b = __shfl_xor_sync(FULL_MASK, kmx, o);
        kmn = a < kmn ? a : kmn;
        kmx = b > kmx ? b : kmx;
    }
    __syncthreads();  // kmin_s, kmax_s set; every key stored
    if (lane == 0) {
        warp_max[warp] = m;
        atomicMin(&kmin_s, kmn);
        atomicMax(&kmax_s, kmx);
    }
    __syncthreads();
    const u64 kmin = kmin_s, kmax = kmax_s;
    u64 kcut = kmax;
    if (k < (u32)n) {
        const Row none = {x, temp, 0.0f, V, nb};
        select_key(none, sh_keys, nullptr, n, kmin, kmax, 0.0f, true, T_FIXED, 0.0f, (u64)k - 1, s, &kcut);
    }
    // The slice's best keys, in any order.
    const size_t slot = (size_t)row * S + blockIdx.x;
    u64* dst = keys_out + slot * kout;
    for (int j0 = 0; j0 < n; j0 += blockDim.x) {
        const int j = j0 + tid;
        const bool in = j < n && sh_keys[j] <= kcut;
        const int pos = warp_append(&s.n_copied, in);
        if (in) dst[pos] = sh_keys[j];
    }
    __syncthreads();
    if (tid == 0) {
        float mm = warp_max[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (warp_max[w] > mm) mm = warp_max[w];
        n_out[slot] = (u32)s.n_copied;
        zmax_out[slot] = mm;
    }
}

// One block (SAMPLE_THREADS) a row: see above. params as sample_rows'.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_merge(int V, int nb, const u32* params, int S, int kout, const u64* keys_in, const u32* n_in,
             const float* zmax_in, u32* out) {
    wait_for_producers();
    start_dependents();
    __shared__ Hist s;
    __shared__ u64 all_keys[SHARED_CAP];
    __shared__ u64 sh_keys[SHARED_CAP];
    __shared__ float sh_es[SHARED_CAP];
    __shared__ float zmax_s;
    __shared__ int n_all, live_n;
    __shared__ u64 kmin_s, kmax_s;
    const int tid = threadIdx.x, lane = tid & 31;
    const int row = blockIdx.x;
    const u32* p = params + 5 * (size_t)row;
    const float temp = __uint_as_float(p[0]);
    const u32 k = p[1];
    const float top_p = __uint_as_float(p[2]);
    const float min_p = __uint_as_float(p[3]);
    const float u = __uint_as_float(p[4]);
    const size_t first = (size_t)row * S;
    if (tid == 0) {
        n_all = 0;
        live_n = 0;
        kmin_s = ~0ull;
        kmax_s = 0;
    }
    if (tid < 32) {
        // z_max: the largest slice maximum (NaN never appears: each slice's
        // starts at -inf and only grows by strictly greater z).
        float m = __int_as_float(0xff800000);
        for (int i = lane; i < S; i += 32) {
            const float y = zmax_in[first + i];
            if (y > m) m = y;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float y = __shfl_xor_sync(FULL_MASK, m, o);
            if (y > m) m = y;
        }
        if (lane == 0) zmax_s = m;
    }
    __syncthreads();
    // Gather the slices' keys: slice i's n_in[i] keys, a warp a slice.
    for (int i = tid >> 5; i < S; i += blockDim.x >> 5) {
        const int cnt = (int)n_in[first + i];
        int base = 0;
        if (lane == 0) base = atomicAdd(&n_all, cnt);
        base = __shfl_sync(FULL_MASK, base, 0);
        for (int j = lane; j < cnt; j += 32) all_keys[base + j] = keys_in[(first + i) * kout + j];
    }
    __syncthreads();
    const int na = n_all;
    const Row row_z = {nullptr, temp, zmax_s, V, nb};
    // The live candidates: how many, the smallest and largest key.
    LiveStats live;
    for (int j = tid; j < na; j += blockDim.x) {
        const u64 key = all_keys[j];
        if (row_z.live_z(key_z(key, nb))) live.add(key);
    }
    add_live_stats(live, &live_n, &kmin_s, &kmax_s);
    __syncthreads();
    const int n = live_n;
    const u64 kmin = kmin_s, kmax = kmax_s;  // kmin: the top candidate
    // Step 2's top-k among the live candidates (dead keys lie above kmax).
    u64 kcut = kmax;
    if (k < (u32)n)
        select_key(row_z, all_keys, nullptr, na, kmin, kmax, 0.0f, true, T_FIXED, 0.0f, (u64)k - 1, s, &kcut);
    // The kept live candidates with their weights, as sample_rows copies them.
    if (tid == 0) s.n_copied = 0;
    __syncthreads();
    for (int j0 = 0; j0 < na; j0 += blockDim.x) {
        const int j = j0 + tid;
        u64 key = 0;
        float z = 0.0f;
        bool in = false;
        if (j < na) {
            key = all_keys[j];
            z = key_z(key, nb);
            in = row_z.live_z(z) && key <= kcut;
        }
        const int pos = warp_append(&s.n_copied, in);
        if (in) {
            sh_keys[pos] = key;
            sh_es[pos] = row_z.weight(z);
        }
    }
    __syncthreads();
    const int n_sh = s.n_copied;
    u64 pcut = kcut;
    if (top_p < 1.0f)
        select_key(row_z, sh_keys, sh_es, n_sh, kmin, kcut, 0.0f, false, T_TOP_P, top_p, 0, s, &pcut);
    u64 tok = kmin;
    select_key(row_z, sh_keys, sh_es, n_sh, kmin, pcut, min_p, false, T_DRAW, u, 0, s, &tok);
    if (tid == 0) out[row] = (u32)(tok & ((1ull << nb) - 1ull));
}

// ---------------------------------------------------------------------------
// Rows without a top-k or top-p cut (temperature and min-p only), all of
// them, spread over the GPU in three launches instead of a block a row; the
// same token as draw_in_index_order, which any segmentation finds (the
// first token whose inclusive prefix of q exceeds the target):
// * draw_slice_max: block (slice, row) writes its slice's z maximum.
// * draw_slice_sum: block (slice, row) takes the row's z_max (the largest
//   slice maximum) and writes its slice's sum of q (exact u64) and its
//   first token at z_max (NO_TOKEN if none).
// * draw_finish: a block a row finds K and the target from the slices'
//   sums, the slice holding it, and the token within it by index_levels;
//   a target past K takes the row's first token at z_max, as the spec.
// ---------------------------------------------------------------------------

// The row's z_max: the largest of its S slice maxima (each starts at -inf
// and only grows by strictly greater z, so NaN never appears). A warp's
// work; every lane gets it.
__device__ __forceinline__ float slices_max(const float* zmax_in, int S) {
    const int lane = threadIdx.x & 31;
    float m = __int_as_float(0xff800000);
    for (int i = lane; i < S; i += 32) {
        const float y = zmax_in[i];
        if (y > m) m = y;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(FULL_MASK, m, o);
        if (y > m) m = y;
    }
    return m;
}

// Calls f(i, x[i]) for every token i of [lo, hi), this thread's share: 8
// neighbouring tokens at a time, read as two 16-byte loads issued together
// where the row allows (16-byte aligned: V % 4 == 0), else one token at a
// time. The draw's max and sums do not depend on the order (a max, and
// integer sums), only on which tokens are visited: every one, once.
template <typename F>
__device__ __forceinline__ void slice_visit(const float* x, int V, int lo, int hi, F f) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if ((V & 3) != 0) {
        for (int i = lo + tid; i < hi; i += nt) f(i, x[i]);
        return;
    }
    for (int i = lo + 8 * tid; i < hi; i += 8 * nt) {
        if (i + 8 <= hi) {
            const float4 a = *reinterpret_cast<const float4*>(x + i);
            const float4 b = *reinterpret_cast<const float4*>(x + i + 4);
            const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int e = 0; e < 8; e++) f(i + e, v[e]);
        } else {
            for (int j = i; j < hi; j++) f(j, x[j]);
        }
    }
}

// params as sample_rows'. Grid (S, rows), SLICE_THREADS threads; slices
// start at multiples of 8 tokens (SHARED_CAP).
extern "C" __global__ void __launch_bounds__(SLICE_THREADS)
draw_slice_max(const float* logits, int V, const u32* params, int slice, float* zmax_out) {
    wait_for_producers();
    start_dependents();
    __shared__ float warp_max[SLICE_THREADS / 32];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.y;
    const float* x = logits + (size_t)row * V;
    const float temp = __uint_as_float(params[5 * (size_t)row]);
    const int lo = blockIdx.x * slice, hi = min(V, lo + slice);
    float m = __int_as_float(0xff800000);
    slice_visit(x, V, lo, hi, [&](int, float xi) {
        const float z = xi / temp;
        if (z > m) m = z;
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(FULL_MASK, m, o);
        if (y > m) m = y;
    }
    if (lane == 0) warp_max[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < (int)(blockDim.x >> 5) ? warp_max[lane] : __int_as_float(0xff800000);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float y = __shfl_xor_sync(FULL_MASK, m, o);
            if (y > m) m = y;
        }
        if (lane == 0) zmax_out[(size_t)row * gridDim.x + blockIdx.x] = m;
    }
}

// Grid (S, rows), SLICE_THREADS threads.
extern "C" __global__ void __launch_bounds__(SLICE_THREADS)
draw_slice_sum(const float* logits, int V, int nb, const u32* params, int slice, const float* zmax_in,
               u64* sum_out, u32* top_out) {
    wait_for_producers();
    start_dependents();
    __shared__ float zmax_s;
    __shared__ u64 warp_sum[SLICE_THREADS / 32];
    __shared__ int top_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.y, S = gridDim.x;
    const u32* p = params + 5 * (size_t)row;
    const float temp = __uint_as_float(p[0]), min_p = __uint_as_float(p[3]);
    if (warp == 0) {
        const float m = slices_max(zmax_in + (size_t)row * S, S);
        if (lane == 0) {
            zmax_s = m;
            top_s = NO_TOKEN;
        }
    }
    __syncthreads();
    const Row r = {logits + (size_t)row * V, temp, zmax_s, V, nb};
    const int lo = blockIdx.x * slice, hi = min(V, lo + slice);
    // warp_range_sum's sums over this thread's tokens (slice_visit's).
    u64 sum = 0;
    int top = NO_TOKEN;
    slice_visit(r.x, V, lo, hi, [&](int j, float xj) { range_term(r, min_p, j, xj, true, sum, top); });
    warp_sum_top(sum, top);
    if (lane == 0) {
        warp_sum[warp] = sum;
        atomicMin(&top_s, top);
    }
    __syncthreads();
    if (tid == 0) {
        u64 total = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += warp_sum[w];
        const size_t slot = (size_t)row * S + blockIdx.x;
        sum_out[slot] = total;
        top_out[slot] = (u32)top_s;
    }
}

// One block (SLICE_THREADS) a row; S slices of `slice` tokens.
extern "C" __global__ void __launch_bounds__(SLICE_THREADS)
draw_finish(const float* logits, int V, int nb, const u32* params, int slice, int S, const float* zmax_in,
            const u64* sum_in, const u32* top_in, u32* out) {
    wait_for_producers();
    start_dependents();
    __shared__ IndexDraw ix;
    __shared__ float zmax_s;
    __shared__ int slice_s, top_s;
    __shared__ u64 t_s;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int row = blockIdx.x;
    const u32* p = params + 5 * (size_t)row;
    const float temp = __uint_as_float(p[0]), min_p = __uint_as_float(p[3]), u = __uint_as_float(p[4]);
    const size_t first = (size_t)row * S;
    if (warp == 0) {
        const float m = slices_max(zmax_in + first, S);
        // K, then the slice whose inclusive prefix first exceeds the
        // target: prefix sums over the slices 32 at a time, in order.
        u64 total = 0;
        for (int i = lane; i < S; i += 32) total += sum_in[first + i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(FULL_MASK, total, o);
        const u64 tt = draw_target(u, total);
        u64 carry = 0;
        int hit_slice = -1;
        u64 t_in = 0;
        for (int base = 0; base < S && hit_slice < 0; base += 32) {
            const int i = base + lane;
            const u64 v = i < S ? sum_in[first + i] : 0;
            u64 incl = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u64 y = __shfl_up_sync(FULL_MASK, incl, o);
                if (lane >= o) incl += y;
            }
            incl += carry;
            const u64 excl = incl - v;
            const bool hit = i < S && excl <= tt && tt < incl;
            const u32 any = __ballot_sync(FULL_MASK, hit);
            if (any) {
                const int src = __ffs(any) - 1;
                hit_slice = base + src;
                t_in = __shfl_sync(FULL_MASK, tt - excl, src);
            }
            carry = __shfl_sync(FULL_MASK, incl, 31);
        }
        // The fallback: the row's first token at z_max.
        int top = NO_TOKEN;
        for (int i = lane; i < S; i += 32) top = min(top, (int)top_in[first + i]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) top = min(top, __shfl_xor_sync(FULL_MASK, top, o));
        if (lane == 0) {
            zmax_s = m;
            slice_s = hit_slice;
            t_s = t_in;
            top_s = top;
            ix.top = NO_TOKEN;
        }
    }
    __syncthreads();
    if (slice_s < 0) {
        if (tid == 0) out[row] = (u32)top_s;
        return;
    }
    const Row r = {logits + (size_t)row * V, temp, zmax_s, V, nb};
    const int lo = slice_s * slice, hi = min(V, lo + slice);
    const u32 tok = index_levels(r, min_p, 0.0f, lo, hi, t_s, false, ix);
    if (tid == 0) out[row] = tok;
}
