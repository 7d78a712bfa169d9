// Sampling primitives on the GPU (twin of sampling.rs): argmax per row and
// the repetition penalty.

extern "C" __global__ void argmax_rows(const float* logits, int V, u32* out) {
    __shared__ float best_v[1024];
    __shared__ u32 best_i[1024];
    const float* row = logits + (size_t)blockIdx.x * V;
    float bv = __int_as_float(0xff800000);
    u32 bi = 0;
    // Strictly greater keeps the lowest index among a thread's equal values
    // and never lets NaN win, as the CPU's scan does.
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float x = row[i];
        if (x > bv) { bv = x; bi = (u32)i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float ov = best_v[threadIdx.x + s];
            u32 oi = best_i[threadIdx.x + s];
            float mv = best_v[threadIdx.x];
            u32 mi = best_i[threadIdx.x];
            if (ov > mv || (ov == mv && oi < mi)) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0];
}

// pairs[2j] = row, pairs[2j+1] = token id; each pair distinct.
extern "C" __global__ void repetition_penalty(float* logits, int V, const u32* pairs, const float* penalty, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    u32 row = pairs[2 * j], id = pairs[2 * j + 1];
    float p = penalty[row];
    float* x = logits + (size_t)row * V + id;
    *x = *x > 0.0f ? *x / p : *x * p;
}
