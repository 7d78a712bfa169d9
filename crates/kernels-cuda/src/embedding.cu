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
