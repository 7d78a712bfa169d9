// Asynchronous global -> shared copies (sm_80 and later), prepended to every
// module. Bytes in flight this way cost no registers, so a kernel can keep
// many loads outstanding: attention.cu copies a chunk's keys and values,
// matmul.cu streams single-token weight rows through a ring of stages.

// 16 bytes from `gmem` to `smem`, both 16-byte aligned.
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

// copy16_async to a shared address, reading `bytes` (16 or 0) of `gmem` and
// zero-filling the rest (a row past the data reads nothing).
__device__ __forceinline__ void copy16_async_bytes(unsigned smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(bytes) : "memory");
}

// copy16_async_bytes of all 16 bytes where `valid`, else none.
__device__ __forceinline__ void copy16_async_zfill(unsigned smem, const void* gmem, bool valid) {
    copy16_async_bytes(smem, gmem, valid ? 16 : 0);
}

// 4 bytes to a shared address, reading `valid ? 4 : 0` bytes of `gmem`.
__device__ __forceinline__ void copy4_async_zfill(unsigned smem, const void* gmem, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0)
                 : "memory");
}

// An L2 policy for data read once a step (weights): evicted first, so that
// streaming a layer's weights through L2 leaves the small things every
// kernel needs again there (the kernels' code, activations, the KV cache).
__device__ __forceinline__ unsigned long long l2_evict_first() {
    unsigned long long p;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// copy16_async for data read once, under `policy` (l2_evict_first).
__device__ __forceinline__ void copy16_async_once(void* smem, const void* gmem, unsigned long long policy) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "l"(policy)
                 : "memory");
}

// copy16_async_zfill under `policy`.
__device__ __forceinline__ void copy16_async_zfill_hint(unsigned smem, const void* gmem, bool valid,
                                                        unsigned long long policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem), "l"(gmem),
                 "r"(valid ? 16 : 0), "l"(policy)
                 : "memory");
}

// The default L2 policy, as a policy operand.
__device__ __forceinline__ unsigned long long l2_evict_normal() {
    unsigned long long p;
    asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// Closes this thread's group of copies issued since the last commit.
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void copies_wait_groups() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Waits for every copy this thread issued.
__device__ __forceinline__ void copies_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Transaction barriers in shared memory (mbarrier, sm_90): bytes of bulk
// copies (layer.cu) or of another cluster block's st.async stores
// (attention.cu) land on them.
typedef unsigned long long u64;

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// The issuing thread's arrival, expecting `bytes` of copies to land.
__device__ __forceinline__ void mbar_expect(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
                 : "memory");
}

// Waits for the phase of `bar` with this parity to complete. CLUSTER:
// acquiring at cluster scope, for bytes that other blocks of the cluster
// stored with st.async.
template <bool CLUSTER = false>
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    u32 ok = 0;
    while (!ok) {
        if constexpr (CLUSTER)
            asm volatile(
                "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                " selp.u32 %0, 1, 0, p;\n}"
                : "=r"(ok)
                : "r"(smem_u32(bar)), "r"(parity)
                : "memory");
        else
            asm volatile(
                "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                : "=r"(ok)
                : "r"(smem_u32(bar)), "r"(parity)
                : "memory");
    }
}
