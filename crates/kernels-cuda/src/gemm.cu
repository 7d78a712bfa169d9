// Batch-invariant tensor-core GEMM for prompt rows: out[t, n] (+)= x[t, :] . w[n, :]
// with bf16 inputs and f32 accumulation (mma.sync m16n8k16). Every output
// element sums its K in the same fixed sequence of 16-wide steps (tile by
// tile in increasing k, within each of a number of K shares that depends on
// the weight's shape alone, the shares then added in order), and a row's
// products never meet another row's, so a row's result depends only on
// that row and w: not on how many
// rows the batch has nor where the row sits in it. This is the one matmul
// that differs from the CPU spec (the tensor cores' own accumulation); the
// twin tests bound the difference.

// Tiles: BM rows of x by BN rows of w (output columns) a block, by kernel (GEMM_KERNEL below).
#define GK 64      // k per shared-memory stage (32: 3% less throughput, small batches slower)
#define GPAD 8     // bf16 of padding per shared row: rows 16 bytes off a bank line, no ldmatrix conflicts
#define GS (GK + GPAD)
#define GSTAGES 3  // stages in flight: a tile's k loop waits on bandwidth, not latency

__device__ __forceinline__ void cp16(void* smem, const void* gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0;  // 0 bytes read: the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

// Loads rows [r0, r0 + R) x columns [k0, k0 + GK) of a row-major [rows, K]
// matrix into smem[R][GS], zero outside the matrix. Vector path: K % 8 == 0.
template <int R, bool VEC>
__device__ __forceinline__ void load_tile(__nv_bfloat16* smem, const __nv_bfloat16* g, int rows, int K, int r0,
                                          int k0) {
    if (VEC) {
        // R rows x GK / 8 chunks of 8 bf16.
#pragma unroll
        for (int c = threadIdx.x; c < R * (GK / 8); c += 128) {
            int r = c / (GK / 8), kk = (c % (GK / 8)) * 8;
            bool ok = r0 + r < rows && k0 + kk < K;
            const __nv_bfloat16* src = ok ? g + (size_t)(r0 + r) * K + k0 + kk : g;
            cp16(smem + r * GS + kk, src, ok);
        }
    } else {
        for (int c = threadIdx.x; c < R * GK; c += 128) {
            int r = c / GK, kk = c % GK;
            bool ok = r0 + r < rows && k0 + kk < K;
            smem[r * GS + kk] = ok ? g[(size_t)(r0 + r) * K + k0 + kk] : __float2bfloat16_rn(0.0f);
        }
    }
}

// 4 warps, 2 x 2, each owning BM/2 rows x BN/2 columns of the block's tile.
// The tile's width changes which block computes an element, and the stages
// only when its operands arrive, never the sequence of k-steps that sums it.
// Shared memory (dynamic): GSTAGES stages of BM + BN rows of GS bf16.
//
// Split K (gridDim.z > 1, fixed by K and N, never by T): block z sums its
// share of the k-tiles from +0.0 and stores them in part[z]; gemm_splits_sum
// then adds the shares in z order. One row's sums still never meet another
// row's, and their order does not depend on the batch.
template <bool VEC, int BM, int BN>
__device__ __forceinline__ void gemm_body(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K,
                                          int N, int add, float* part, __nv_bfloat16* smem) {
    const int MI = BM / 32;  // 16-row mma tiles per warp
    const int NT = BN / 16;  // 8-column mma tiles per warp
    const int STAGE = (BM + BN) * GS;
    // Row tiles vary fastest: the blocks of one weight tile run together,
    // so a weight larger than L2 (the vocabulary projection) is read from
    // memory once, not once per row tile.
    int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int wm = (warp / 2) * (BM / 2), wn = (warp % 2) * (BN / 2);
    float acc[MI][NT][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    int all_tiles = (K + GK - 1) / GK, per = (all_tiles + gridDim.z - 1) / gridDim.z;
    int kt0 = blockIdx.z * per, tiles = min(all_tiles, kt0 + per);
    // Every stage commits a group, empty past the end, so that "all but
    // the newest GSTAGES - 2" always means tile kt has landed.
    auto issue = [&](int kt) {
        if (kt < tiles) {
            __nv_bfloat16* st = smem + (kt % GSTAGES) * STAGE;
            load_tile<BM, VEC>(st, x, T, K, m0, kt * GK);
            load_tile<BN, VEC>(st + BM * GS, w, N, K, n0, kt * GK);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };
#pragma unroll
    for (int s = 0; s < GSTAGES - 1; s++) issue(kt0 + s);
    for (int kt = kt0; kt < tiles; kt++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(GSTAGES - 2));
        // Also: every warp is done with the stage the next issue refills.
        __syncthreads();
        issue(kt + GSTAGES - 1);
        const __nv_bfloat16* a_s = smem + (kt % GSTAGES) * STAGE;
        const __nv_bfloat16* b_s = a_s + BM * GS;
#pragma unroll
        for (int ks = 0; ks < GK; ks += 16) {
            unsigned a[MI][4];
#pragma unroll
            for (int i = 0; i < MI; i++)
                ldmatrix4(a[i], a_s + (wm + i * 16 + lane % 16) * GS + ks + (lane / 16) * 8);
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                unsigned b[4];
                ldmatrix4(b, b_s + (wn + j * 8 + (lane / 16) * 8 + lane % 8) * GS + ks + ((lane / 8) % 2) * 8);
#pragma unroll
                for (int i = 0; i < MI; i++) {
                    mma16816(acc[i][j], a[i], b[0], b[1]);
                    mma16816(acc[i][j + 1], a[i], b[2], b[3]);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = m0 + wm + i * 16 + lane / 4 + (e / 2) * 8;
                int c = n0 + wn + j * 8 + (lane % 4) * 2 + e % 2;
                if (r < T && c < N) {
                    size_t o = (size_t)r * N + c;
                    if (part)
                        part[(size_t)blockIdx.z * T * N + o] = acc[i][j][e];
                    else
                        out[o] = add ? out[o] + acc[i][j][e] : acc[i][j][e];
                }
            }
}

template <int BM, int BN>
__device__ __forceinline__ void gemm_entry(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K,
                                           int N, int add, float* part) {
    extern __shared__ __align__(16) unsigned char gemm_smem[];
    __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(gemm_smem);
    if ((K & 7) == 0)
        gemm_body<true, BM, BN>(x, w, out, T, K, N, add, part, smem);
    else
        gemm_body<false, BM, BN>(x, w, out, T, K, N, add, part, smem);
}

// One kernel per tile shape: narrow tiles for GEMMs too small to fill the
// GPU with wide ones, wide ones where they cut the re-reads of x and w.
#define GEMM_KERNEL(NAME, BM, BN)                                                                               \
    extern "C" __global__ void __launch_bounds__(128) NAME(const __nv_bfloat16* x, const __nv_bfloat16* w,       \
                                                           float* out, int T, int K, int N, int add, float* part) { \
        wait_for_producers();                                                                                   \
        start_dependents();                                                                                     \
        gemm_entry<BM, BN>(x, w, out, T, K, N, add, part);                                                      \
    }
GEMM_KERNEL(gemm_tc, 64, 128)
GEMM_KERNEL(gemm_tc_n64, 64, 64)
GEMM_KERNEL(gemm_tc_n32, 64, 32)
GEMM_KERNEL(gemm_tc_m128, 128, 128)

// out[i] (+)= ((part[0][i] + part[1][i]) + ...) + part[splits - 1][i]: the
// split shares of gemm_body, added in split order.
extern "C" __global__ void __launch_bounds__(256) gemm_splits_sum(const float* part, float* out, int splits, int len,
                                                                  int add) {
    wait_for_producers();
    start_dependents();
    int i = blockIdx.x * 256 + threadIdx.x;
    if (i >= len) return;
    float total = part[i];
    for (int z = 1; z < splits; z++) total = total + part[(size_t)z * len + i];
    out[i] = add ? out[i] + total : total;
}
