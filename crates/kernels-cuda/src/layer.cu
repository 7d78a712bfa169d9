// One decoder layer of a batch-1 decode step in one kernel (twin: the
// composition `decoder_layer_ops` of the per-op specs). Compiled after
// norm.cu and attention.cu, whose device functions it calls, so
// every sum keeps their order: dot products are dot_rows' (lane l, element e
// of each 256-wide chunk, chunks in order, then row_combine), the norms
// block_norm_row's, attention attn_chunk_body's.
//
// Why one kernel: at batch 1 the layer's eight kernels each cost a few
// microseconds of launch and dependent round trips for 2-12 MB of weights.
// Here one block per SM runs the layer's phases (norm + qkv, q/k-norm +
// RoPE + attention, o_proj + residual, norm + gate/up + SiLU, down +
// residual) with a grid barrier between them, and each block streams its
// share of every weight matrix through a ring of shared-memory stages with
// bulk copies issued as soon as a stage is free. Weights are never written,
// so the copies run ahead across barriers and attention.
//
// Opt-in (layer.rs): on the H100 it is slower than the kernels one by one
// (0.6B 1.50 against 1.10 ms a token). Timestamps per phase showed every
// step of the chain slowed by the weight copies in flight (a grid barrier
// 1-1.3 us at best, the one attention block of a chunk 10 us); see
// BENCHMARKS.md before building on it.

#define LAYER_THREADS 256
#define LAYER_WARPS (LAYER_THREADS / 32)
#define LAYER_RING_MAX 8
#define LAYER_D 128

// `bytes` (a multiple of 16, both ends 16-byte aligned) from global to
// shared memory by the copy engine, completing on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(dst)),
                 "l"(src), "r"(bytes), "r"(smem_u32(bar))
                 : "memory");
}

// Every block of the grid (all resident: one per SM, grid = SM count).
// bar holds an arrival count (low 32 bits) and a generation (high 32):
// each block adds one arrival; the last one takes the count back to zero
// and bumps the generation in one add, which the others wait to see. The
// word carries over between launches with its count at zero.
__device__ __forceinline__ void grid_barrier(u64* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        u64 old, one = 1, bump = (1ull << 32) - gridDim.x;
        asm volatile("atom.add.release.gpu.global.u64 %0, [%1], %2;" : "=l"(old) : "l"(bar), "l"(one) : "memory");
        if ((u32)old == gridDim.x - 1) {
            asm volatile("red.release.gpu.global.add.u64 [%0], %1;" ::"l"(bar), "l"(bump) : "memory");
        } else {
            u64 now = old;
            while ((now >> 32) == (old >> 32))
                asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(bar) : "memory");
        }
    }
    __syncthreads();
}

// One weight matrix of the layer: rows of K bf16; `pair` > 0 pairs row r
// with row pair + r (gate/up), 0 for none.
struct LayerMat {
    const __nv_bfloat16* w;
    int K, N, pair;
};

// A block's rows [r0, r0 + rows) of one matrix, in `stages` stages of
// nearly equal size.
struct LayerShare {
    int r0, rows, stages;
};

__device__ __forceinline__ LayerShare layer_share(LayerMat m, int stage_bytes) {
    int G = gridDim.x, b = blockIdx.x;
    int r0 = m.N * b / G, r1 = m.N * (b + 1) / G;
    int unit = m.K * 2 * (m.pair ? 2 : 1);
    int per = max(1, stage_bytes / unit);
    LayerShare s = {r0, r1 - r0, (r1 - r0 + per - 1) / per};
    return s;
}

__device__ __forceinline__ void stage_rows(LayerShare s, int st, int& a, int& n) {
    a = s.r0 + s.rows * st / s.stages;
    n = s.r0 + s.rows * (st + 1) / s.stages - a;
}

// Issues the block's stage `gi` (counted over the layer's matrices in
// order) into ring slot gi % nring (`nring` slots of `stage_bytes`). One thread.
__device__ __forceinline__ void issue_stage(const LayerMat* mats, const LayerShare* shares, int gi,
                                            unsigned char* ring, u64* full, int nring, int stage_bytes) {
    int slot = gi % nring, p = 0, st = gi;
    while (st >= shares[p].stages) st -= shares[p++].stages;
    int a, n;
    stage_rows(shares[p], st, a, n);
    LayerMat m = mats[p];
    u32 bytes = (u32)n * (u32)m.K * 2u;
    unsigned char* dst = ring + (size_t)slot * stage_bytes;
    // Generic reads of the slot's last stage are done (the caller synced);
    // order them before the copy engine's writes.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mbar_expect(full + slot, m.pair ? 2 * bytes : bytes);
    bulk_load(dst, m.w + (size_t)a * m.K, bytes, full + slot);
    if (m.pair) bulk_load(dst + bytes, m.w + (size_t)(m.pair + a) * m.K, bytes, full + slot);
}

// dot_rows' sum for one weight row in shared memory against x in shared
// memory (f32, K a multiple of 256), by one warp; every lane gets it.
__device__ __forceinline__ float smem_dot(const __nv_bfloat16* wr, const float* xs, int K) {
    int lane = threadIdx.x & 31;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.0f;
#pragma unroll 4
    for (int base = 0; base < K; base += 256) {
        uint4 u = *reinterpret_cast<const uint4*>(wr + base + 8 * lane);
        float4 xa = *reinterpret_cast<const float4*>(xs + base + 8 * lane);
        float4 xb = *reinterpret_cast<const float4*>(xs + base + 8 * lane + 4);
        float wf[8], xf[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        widen8(u, wf);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = acc[e] + wf[e] * xf[e];
    }
    return row_combine(acc);
}

// The block's rows of matrix p against xs, stage by stage: emit(row, r, r2)
// from lane 0 of the warp that summed it (r2 the paired row's sum). After a
// stage every warp is done with its slot, and the stage nring ahead is
// issued into it.
template <typename Emit>
__device__ __forceinline__ void layer_phase(int p, int& gi, int total, const LayerMat* mats,
                                            const LayerShare* shares, const float* xs, unsigned char* ring,
                                            u64* full, int nring, int stage_bytes, Emit emit) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    LayerMat m = mats[p];
    LayerShare s = shares[p];
    for (int st = 0; st < s.stages; st++, gi++) {
        int slot = gi % nring;
        mbar_wait(full + slot, (u32)(gi / nring) & 1u);
        int a, n;
        stage_rows(s, st, a, n);
        const __nv_bfloat16* base = reinterpret_cast<const __nv_bfloat16*>(ring + (size_t)slot * stage_bytes);
        for (int j = warp; j < n; j += LAYER_WARPS) {
            float r = smem_dot(base + (size_t)j * m.K, xs, m.K);
            float r2 = m.pair ? smem_dot(base + (size_t)(n + j) * m.K, xs, m.K) : 0.0f;
            if (lane == 0) emit(a + j, r, r2);
        }
        __syncthreads();
        if (threadIdx.x == 0 && gi + nring < total)
            issue_stage(mats, shares, gi + nring, ring, full, nring, stage_bytes);
    }
}

// xs[k] = f32(src[k]) for k < n: bf16 activations another block wrote
// (read at L2, past this SM's L1).
__device__ __forceinline__ void stage_bf16(const __nv_bfloat16* src, int n, float* xs) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(src);
    for (int k = threadIdx.x; k < n; k += LAYER_THREADS) xs[k] = __uint_as_float((u32)__ldcg(h + k) << 16);
    __syncthreads();
}

// xs = bf16(rmsnorm(x) * w) widened back to f32 (rms_norm_bf16's bits),
// x read at L2 first: other blocks wrote it in this launch.
__device__ __forceinline__ void stage_norm(const float* x, const float* w, float eps, int H, float* xs,
                                           float* inv_s) {
    int tid = threadIdx.x;
    float4 w_pre[NORM_LOADS];
    load_norm_weights(w, H, tid, LAYER_THREADS, w_pre);
    for (int k = tid; k < H; k += LAYER_THREADS) xs[k] = __ldcg(x + k);
    __syncthreads();
    // block_norm_row stages its row into xf first: here the row is already
    // there (xr == xf), and each output overwrites the element it came from.
    block_norm_row(xs, w, w_pre, eps, H, xs, inv_s, tid, LAYER_THREADS,
                   [&](int k, float y) { xs[k] = bf(__float2bfloat16_rn(y)); });
    __syncthreads();
}

// Dynamic shared memory: attention's region first (attn_chunk_body uses
// it from offset 0: a chunk's keys and values, then the group's scores),
// then xs (the widest activation in f32), then the ring.
extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 1)
    decoder_layer_t1(float* x, const float* in_norm, float eps, const __nv_bfloat16* w_qkv, float* qkv,
                     const float* qn, const float* kn, const float* rope, const u32* slots, const u32* pos,
                     const u32* seq, const u32* tables, int max_blocks, int bs, __nv_bfloat16* kc,
                     __nv_bfloat16* vc, float* part, u32* done, int max_chunks, float scale,
                     __nv_bfloat16* q_out, __nv_bfloat16* attn, const __nv_bfloat16* w_o, const float* post_norm,
                     const __nv_bfloat16* w_gu, __nv_bfloat16* act, const __nv_bfloat16* w_down, u64* bar, int H,
                     int Hq, int Hkv, int I, int att_bytes, int xs_bytes, int nring, int stage_bytes) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ __align__(8) u64 full[LAYER_RING_MAX];
    __shared__ LayerMat mats[4];
    __shared__ LayerShare shares[4];
    __shared__ float inv_s;
    float* xs = reinterpret_cast<float*>(smem_raw + att_bytes);
    unsigned char* ring = smem_raw + att_bytes + xs_bytes;
    int tid = threadIdx.x;
    int qw = Hq * LAYER_D, nqkv = (Hq + 2 * Hkv) * LAYER_D;
    if (tid == 0) {
        mats[0] = {w_qkv, H, nqkv, 0};
        mats[1] = {w_o, qw, H, 0};
        mats[2] = {w_gu, H, I, I};
        mats[3] = {w_down, I, H, 0};
        for (int p = 0; p < 4; p++) shares[p] = layer_share(mats[p], stage_bytes);
        for (int i = 0; i < nring; i++) mbar_init(full + i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    int total = shares[0].stages + shares[1].stages + shares[2].stages + shares[3].stages;
    // Weights first: they do not depend on the kernel before.
    if (tid == 0)
        for (int gi = 0; gi < min(nring, total); gi++) issue_stage(mats, shares, gi, ring, full, nring, stage_bytes);
    wait_for_producers();
    int gi = 0;

    // RMSNorm + qkv.
    stage_norm(x, in_norm, eps, H, xs, &inv_s);
    layer_phase(0, gi, total, mats, shares, xs, ring, full, nring, stage_bytes, [&](int n, float r, float) { qkv[n] = r; });
    grid_barrier(bar);
    // Every block is resident now: the next kernel may be scheduled.
    start_dependents();

    // q/k-norm, RoPE, the new rows stored, attention: a (kv head, chunk)
    // at a time, merged by the last chunk of each kv head to finish.
    RopeIn ri = {qkv, qn, kn, eps, rope, slots, q_out};
    for (int u = blockIdx.x; u < Hkv * max_chunks; u += gridDim.x) {
        attn_chunk_body<LAYER_D / 32, LAYER_THREADS, 4, true>(nullptr, kc, vc, pos, seq, tables, max_blocks, bs, Hq,
                                                              Hkv, scale, max_chunks, part, 0, u % Hkv,
                                                              done + u % Hkv, attn, 1, ri, u / Hkv);
        __syncthreads();
    }
    grid_barrier(bar);

    // o_proj + residual.
    stage_bf16(attn, qw, xs);
    layer_phase(1, gi, total, mats, shares, xs, ring, full, nring, stage_bytes,
                [&](int n, float r, float) { x[n] = __ldcg(x + n) + r; });
    grid_barrier(bar);

    // RMSNorm + gate/up + SiLU.
    stage_norm(x, post_norm, eps, H, xs, &inv_s);
    layer_phase(2, gi, total, mats, shares, xs, ring, full, nring, stage_bytes,
                [&](int i, float g, float u) { act[i] = __float2bfloat16_rn(q_silu(g) * u); });
    grid_barrier(bar);

    // down + residual.
    stage_bf16(act, I, xs);
    layer_phase(3, gi, total, mats, shares, xs, ring, full, nring, stage_bytes,
                [&](int n, float r, float) { x[n] = __ldcg(x + n) + r; });
}
