// Programmatic dependent launch (sm_90 and later), prepended to every module.
// Kernels are launched so that the next one in the stream may be scheduled
// while this one still runs (launch.rs). The rules that keep this correct:
// every kernel calls `wait_for_producers()` before it touches memory that
// another kernel writes or reads; before the wait it may only read what no
// kernel of the step writes: weights, the batch layout (written by the host
// before the step's first kernel), and KV cache rows of earlier steps
// (attention.cu). Kernels call `start_dependents()` right after their wait:
// letting the next one launch earlier than that measured slower (a big
// projection then streams its weights beside the kernel before it;
// BENCHMARKS.md). The batch-1 RMSNorm calls it later, once its row's sum
// is made, for the same reason (norm.cu).
// `griddepcontrol.wait` returns once every earlier grid has completed and
// its writes are visible, and is a no-op for a kernel launched normally.

__device__ __forceinline__ void start_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// With QWEN_TRACE (trace.rs, `QWEN_CUDA_TRACE`), block (0, 0, 0) of every
// kernel records the time it got past its wait, its grid and its block's
// threads: the time the kernel before completed (kernels never wait twice).
// The record's slot is claimed by an atomic issued just before the wait, so
// that its round trip (about a microsecond under a step's weight copies)
// overlaps the wait instead of following it: after the wait the thread only
// reads the clock and stores, and a trigger right after the wait
// (start_dependents) is not held back. (Claimed after the wait, the atomic
// delayed every such trigger; BENCHMARKS.md, 2026-11-27 from 20:50 UTC.)
#ifdef QWEN_TRACE
__device__ unsigned long long* qwen_trace;
__device__ __forceinline__ void trace_record(unsigned long long i) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (i < QWEN_TRACE) {
        qwen_trace[1 + 2 * i] = t;
        qwen_trace[2 + 2 * i] = (unsigned long long)gridDim.x | ((unsigned long long)gridDim.y << 24) |
                                ((unsigned long long)(blockDim.x * blockDim.y * blockDim.z) << 48);
    }
}
#endif

__device__ __forceinline__ void wait_for_producers() {
#ifdef QWEN_TRACE
    const bool tracer = (threadIdx.x | threadIdx.y | threadIdx.z | blockIdx.x | blockIdx.y | blockIdx.z) == 0 && qwen_trace;
    unsigned long long slot = 0;
    if (tracer) slot = atomicAdd(qwen_trace, 1ull);
#endif
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#ifdef QWEN_TRACE
    if (tracer) trace_record(slot);
#endif
}
