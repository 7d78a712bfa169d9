// RMSNorm, one warp per row, in the 256-lane row-reduction order
// (twin of norm.rs). `rms_norm_bf16` rounds once to bf16; `rms_norm_f32`
// keeps f32 for the logits projection.

template <typename Store>
__device__ __forceinline__ void rms_norm_row(const float* x, const float* w, float eps, int T, int H, Store store) {
    int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= T) return;
    const float* xr = x + (size_t)row * H;
    int lane = threadIdx.x;
    float inv = warp_inv_rms(xr, H, eps);
    for (int k = lane; k < H; k += 32) store((size_t)row * H + k, w[k] * (xr[k] * inv));
}

extern "C" __global__ void rms_norm_bf16(const float* x, const float* w, float eps, __nv_bfloat16* out, int T, int H) {
    wait_for_producers();
    start_dependents();
    rms_norm_row(x, w, eps, T, H, [&](size_t i, float y) { out[i] = __float2bfloat16_rn(y); });
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float eps, float* out, int T, int H) {
    wait_for_producers();
    start_dependents();
    rms_norm_row(x, w, eps, T, H, [&](size_t i, float y) { out[i] = y; });
}
