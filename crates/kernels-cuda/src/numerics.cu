// The shared numerics of numerics.cuh as a kernel of their own, so that the
// twin tests can hold both forms of q_exp, which every kernel's exps and
// SiLUs go through, against kernels-cpu's numerics::exp bit for bit on any
// input.

// out[0, n): q_exp, out[n, 2n): q_exp_branchy.
extern "C" __global__ void numerics_exp(const float* x, float* out, int n) {
    wait_for_producers();
    start_dependents();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = q_exp(x[i]);
        out[n + i] = q_exp_branchy(x[i]);
    }
}
