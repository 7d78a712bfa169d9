// Host data written to device tensors (twin of the CPU's plain copies):
// a few u32 words passed as kernel parameters, so that a decode step's
// small writes (positions, slots) are one stream operation instead of a
// copy each.

// Words d_i[0 .. n_i) of up to four tensors, in order, from w: word j is
// the low (j even) or high (j odd) half of w[j / 2]; at most 16 in all.
extern "C" __global__ void set_words(u32* d0, u32* d1, u32* d2, u32* d3, int n0, int n1, int n2, int n3,
                                     unsigned long long w0, unsigned long long w1, unsigned long long w2,
                                     unsigned long long w3, unsigned long long w4, unsigned long long w5,
                                     unsigned long long w6, unsigned long long w7) {
    // Earlier kernels may still read what this overwrites.
    wait_for_producers();
    start_dependents();
    const unsigned long long w[8] = {w0, w1, w2, w3, w4, w5, w6, w7};
    int j = threadIdx.x;
    if (j >= n0 + n1 + n2 + n3 || j >= 16) return;
    u32 v = (u32)(w[j / 2] >> (32 * (j % 2)));
    if (j < n0)
        d0[j] = v;
    else if (j < n0 + n1)
        d1[j - n0] = v;
    else if (j < n0 + n1 + n2)
        d2[j - n0 - n1] = v;
    else
        d3[j - n0 - n1 - n2] = v;
}

// A u32 tensor (a step's sampled tokens) copied by the SMs into mapped
// page-locked host memory: between two decode steps this launch holds the
// stream about 1.5 us, where a copy-engine transfer held it about 11 (the
// kernel trace of 2026-11-27).
extern "C" __global__ void download_u32(const u32* src, u32* host_dst, int n) {
    // The kernels after this one wait for it to complete before they write.
    wait_for_producers();
    start_dependents();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        host_dst[i] = src[i];
}
