// RMSNorm, one block per row, in the 256-lane row-reduction order (twin of
// norm.rs; block_norm_row in numerics.cuh). `rms_norm_bf16` rounds once to
// bf16; `rms_norm_f32` keeps f32 for the logits projection. Dynamic shared
// memory: the row in f32.

template <typename Out, typename Round>
__device__ __forceinline__ void rms_norm_rows(const float* x, const float* w, float eps, Out* out, int H,
                                              Round round) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ float inv_s;
    int tid = threadIdx.x, nthreads = blockDim.x;
    size_t row = blockIdx.x;
    float4 w_pre[NORM_LOADS];
    load_norm_weights(w, H, tid, nthreads, w_pre);
    wait_for_producers();
    start_dependents();
    Out* o = out + row * H;
    block_norm_row(x + row * H, w, w_pre, eps, H, reinterpret_cast<float*>(smem_raw), &inv_s, tid, nthreads,
                   [&](int k, float y) { o[k] = round(y); });
}

extern "C" __global__ void rms_norm_bf16(const float* x, const float* w, float eps, __nv_bfloat16* out, int H) {
    rms_norm_rows(x, w, eps, out, H, [](float y) { return __float2bfloat16_rn(y); });
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float eps, float* out, int H) {
    rms_norm_rows(x, w, eps, out, H, [](float y) { return y; });
}
