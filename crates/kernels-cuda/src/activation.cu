// The gated SiLU of the MLP (twin of activation.rs).

extern "C" __global__ void silu_mul(const float* gate_up, __nv_bfloat16* out, int T, int I) {
    wait_for_producers();
    start_dependents();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * I) return;
    size_t t = idx / I, i = idx % I;
    float g = gate_up[t * 2 * I + i];
    float u = gate_up[t * 2 * I + I + i];
    out[idx] = __float2bfloat16_rn(q_silu(g) * u);
}
