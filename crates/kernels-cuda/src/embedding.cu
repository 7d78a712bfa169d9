// Token embedding lookup and row gathers: exact copies (twin of embedding.rs).

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
