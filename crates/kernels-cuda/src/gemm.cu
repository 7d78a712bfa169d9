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

// A block's share of one stage's copies: rows [r0, r0 + R) x columns
// [k0, k0 + GK) of a row-major [rows, K] matrix into smem[R][GS], zero
// outside the matrix. The vector path (K % 8 == 0) works out each of the
// thread's chunks once (row, offset, pointer) and then only moves k0.
template <int R, int THREADS, bool VEC>
struct TileLoader {
    static constexpr int CHUNKS = R * (GK / 8);
    static constexpr int PER = (CHUNKS + THREADS - 1) / THREADS;
    const __nv_bfloat16* src[PER];
    int dst[PER];
    int kk[PER];
    bool row_ok[PER];
    const __nv_bfloat16* g;
    int rows, K, r0;

    __device__ __forceinline__ TileLoader(const __nv_bfloat16* g_, int rows_, int K_, int r0_)
        : g(g_), rows(rows_), K(K_), r0(r0_) {
        if (VEC) {
#pragma unroll
            for (int x = 0; x < PER; x++) {
                int c = threadIdx.x + x * THREADS, r = c / (GK / 8);
                kk[x] = (c % (GK / 8)) * 8;
                row_ok[x] = c < CHUNKS && r0 + r < rows;
                dst[x] = r * GS + kk[x];
                src[x] = row_ok[x] ? g + (size_t)(r0 + r) * K + kk[x] : g;
            }
        }
    }

    __device__ __forceinline__ void load(__nv_bfloat16* smem, int k0) const {
        if (VEC) {
#pragma unroll
            for (int x = 0; x < PER; x++) {
                if (CHUNKS % THREADS != 0 && threadIdx.x + x * THREADS >= CHUNKS) continue;
                bool ok = row_ok[x] && k0 + kk[x] < K;
                cp16(smem + dst[x], ok ? src[x] + k0 : g, ok);
            }
        } else {
            for (int c = threadIdx.x; c < R * GK; c += THREADS) {
                int r = c / GK, k = c % GK;
                bool ok = r0 + r < rows && k0 + k < K;
                smem[r * GS + k] = ok ? g[(size_t)(r0 + r) * K + k0 + k] : __float2bfloat16_rn(0.0f);
            }
        }
    }
};

// A 2 x 2 grid of warps, each owning BM/2 rows x BN/2 columns of the block's
// tile. The tile's shape changes which block and warp compute an element,
// and the stages only when its operands arrive, never the sequence of
// k-steps that sums it: every output adds its 16-wide k-steps in
// increasing k into one f32 accumulator from +0.0.
// Shared memory (dynamic): GSTAGES stages of BM + BN rows of GS bf16.
//
// Split K (gridDim.z > 1, fixed by K and N, never by T): block z sums its
// share of the k-tiles from +0.0 and stores them in part[z]; gemm_splits_sum
// then adds the shares in z order. One row's sums still never meet another
// row's, and their order does not depend on the batch.
#define GEMM_WM 2
#define GEMM_WN 2
#define GEMM_THREADS (32 * GEMM_WM * GEMM_WN)
template <bool VEC, int BM, int BN>
__device__ __forceinline__ void gemm_body(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K,
                                          int N, int add, float* part, __nv_bfloat16* smem) {
    constexpr int WM = GEMM_WM, WN = GEMM_WN, THREADS = GEMM_THREADS;
    constexpr int MI = BM / WM / 16;  // 16-row mma tiles per warp
    constexpr int NT = BN / WN / 8;   // 8-column mma tiles per warp (even)
    constexpr int STAGE = (BM + BN) * GS;
    // Row tiles vary fastest: the blocks of one weight tile run together,
    // so a weight larger than L2 (the vocabulary projection) is read from
    // memory once, not once per row tile.
    int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int wm = (warp / WN) * (BM / WM), wn = (warp % WN) * (BN / WN);
    int all_tiles = (K + GK - 1) / GK, per = (all_tiles + gridDim.z - 1) / gridDim.z;
    int kt0 = blockIdx.z * per, tiles = min(all_tiles, kt0 + per);
    TileLoader<BN, THREADS, VEC> wl(w, N, K, n0);
    // The weight's first stages need nothing from the kernel ahead: they
    // are copied before the wait, x's after it. Group s then holds stage
    // s's x (and, for s = 0, every early weight stage), so "all but the
    // newest GSTAGES - 2 groups" still means tile kt has landed.
#pragma unroll
    for (int s = 0; s < GSTAGES - 1; s++)
        if (kt0 + s < tiles) wl.load(smem + ((kt0 + s) % GSTAGES) * STAGE + BM * GS, (kt0 + s) * GK);
    wait_for_producers();
    start_dependents();
    TileLoader<BM, THREADS, VEC> xl(x, T, K, m0);
#pragma unroll
    for (int s = 0; s < GSTAGES - 1; s++) {
        if (kt0 + s < tiles) xl.load(smem + ((kt0 + s) % GSTAGES) * STAGE, (kt0 + s) * GK);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    float acc[MI][NT][4];
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    for (int kt = kt0; kt < tiles; kt++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(GSTAGES - 2));
        // Also: every warp is done with the stage the next copies refill.
        __syncthreads();
        {
            int nk = kt + GSTAGES - 1;
            if (nk < tiles) {
                __nv_bfloat16* st = smem + (nk % GSTAGES) * STAGE;
                xl.load(st, nk * GK);
                wl.load(st + BM * GS, nk * GK);
            }
            asm volatile("cp.async.commit_group;\n" ::);
        }
        const __nv_bfloat16* a_s = smem + (kt % GSTAGES) * STAGE;
        const __nv_bfloat16* b_s = a_s + BM * GS;
        // Fragments of k-step ks + 1 load while ks multiplies.
        unsigned a[2][MI][4], b[2][NT / 2][4];
        auto frags = [&](int ks, int buf) {
#pragma unroll
            for (int i = 0; i < MI; i++)
                ldmatrix4(a[buf][i], a_s + (wm + i * 16 + lane % 16) * GS + ks + (lane / 16) * 8);
#pragma unroll
            for (int j = 0; j < NT / 2; j++)
                ldmatrix4(b[buf][j], b_s + (wn + j * 16 + (lane / 16) * 8 + lane % 8) * GS + ks + ((lane / 8) % 2) * 8);
        };
        frags(0, 0);
#pragma unroll
        for (int ks = 0; ks < GK / 16; ks++) {
            if (ks + 1 < GK / 16) frags((ks + 1) * 16, (ks + 1) % 2);
#pragma unroll
            for (int i = 0; i < MI; i++)
#pragma unroll
                for (int j = 0; j < NT / 2; j++) {
                    mma16816(acc[i][2 * j], a[ks % 2][i], b[ks % 2][j][0], b[ks % 2][j][1]);
                    mma16816(acc[i][2 * j + 1], a[ks % 2][i], b[ks % 2][j][2], b[ks % 2][j][3]);
                }
        }
    }
    // Each thread holds column pairs (c, c + 1): stored as one float2 where
    // both fit and the address is 8-byte aligned.
    float* dst_base = part ? part + (size_t)blockIdx.z * T * N : out;
    bool pairs = (N % 2) == 0 && (reinterpret_cast<size_t>(dst_base) & 7) == 0;
#pragma unroll
    for (int i = 0; i < MI; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int r = m0 + wm + i * 16 + lane / 4 + h * 8;
                int c = n0 + wn + j * 8 + (lane % 4) * 2;
                if (r >= T) continue;
                float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                float* d = dst_base + (size_t)r * N + c;
                bool acc_out = add && !part;
                if (pairs && c + 1 < N) {
                    float2 v = make_float2(v0, v1);
                    if (acc_out) {
                        float2 o = *reinterpret_cast<float2*>(d);
                        v = make_float2(o.x + v0, o.y + v1);
                    }
                    *reinterpret_cast<float2*>(d) = v;
                } else {
                    if (c < N) d[0] = acc_out ? d[0] + v0 : v0;
                    if (c + 1 < N) d[1] = acc_out ? d[1] + v1 : v1;
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
// The body waits for the kernel ahead itself (after its first weight copies).
#define GEMM_KERNEL(NAME, BM, BN)                                                                              \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS)                                                  \
        NAME(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K, int N, int add,          \
             float* part) {                                                                                     \
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
