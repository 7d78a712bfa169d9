// Token embedding lookup, row gathers and fed ids: exact copies (twin of embedding.rs).

extern "C" __global__ void embedding(const __nv_bfloat16* table, const u32* ids, float* out, int V, int H) {
    wait_for_producers();
    start_dependents();
    int t = blockIdx.x;
    u32 id = ids[t];
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        out[(size_t)t * H + k] = id < (u32)V ? bf(table[(size_t)id * H + k]) : 0.0f;
    }
}

extern "C" __global__ void gather_rows(const float* src, const u32* rows, float* out, int H) {
    wait_for_producers();
    start_dependents();
    int r = blockIdx.x;
    size_t from = (size_t)rows[r] * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) out[(size_t)r * H + k] = src[from + k];
}

// ids[feed[2i]] = tokens[feed[2i + 1]]: a step's sampled tokens, still on the
// device, become the next step's input. The host checked the pairs: in range,
// no row twice.
extern "C" __global__ void feed_ids(const u32* tokens, const u32* feed, u32* ids, int n) {
    wait_for_producers();
    start_dependents();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ids[feed[2 * i]] = tokens[feed[2 * i + 1]];
}

// feed_ids with at most 8 pairs, passed by value (row | k << 32) instead of
// through a buffer: the pairs' copy (and the buffer's allocation and
// release) were stream operations of their own between two decode steps.
extern "C" __global__ void feed_ids_few(const u32* tokens, u32* ids, int n, unsigned long long p0,
                                        unsigned long long p1, unsigned long long p2, unsigned long long p3,
                                        unsigned long long p4, unsigned long long p5, unsigned long long p6,
                                        unsigned long long p7) {
    wait_for_producers();
    start_dependents();
    const unsigned long long p[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
    int i = threadIdx.x;
    if (i < n && i < 8) ids[(u32)p[i]] = tokens[(u32)(p[i] >> 32)];
}
