// Programmatic dependent launch (sm_90 and later), prepended to every module.
// Kernels are launched so that the next one in the stream may be scheduled
// while this one still runs (launch.rs). The rules that keep this correct:
// every kernel calls `start_dependents()` and then `wait_for_producers()`
// before it touches memory that another kernel writes or reads; before the
// wait it may only read what no kernel of the step writes: weights, the
// batch layout (written by the host before the step's first kernel), and
// KV cache rows of earlier steps (attention.cu).
// `griddepcontrol.wait` returns once every earlier grid has completed and
// its writes are visible, and is a no-op for a kernel launched normally.

__device__ __forceinline__ void start_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_producers() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
