// The tensor-core GEMM of gemm.cu on Hopper's warpgroup MMA (wgmma, sm_90a):
// out[t, n] (+)= x[t, :] . w[n, :], bf16 in, f32 accumulation. Same contract
// as gemm.cu: every output element adds its K in 16-wide steps in
// increasing k into one f32 accumulator from +0.0 (within each K share of
// k_splits, which depends on the weight's shape alone; the shares are added
// in order by gemm_splits_sum), and a row never meets another row, so a
// row's bits depend only on the row and w. Used for every tensor-core GEMM
// on sm_90 (K a multiple of 8), whatever the batch, so one device never
// mixes the two instruction families in one row's history.
//
// A block is one warpgroup (4 warps) and takes 64 rows of x by BN = 64·NB
// columns, or (MW = 2, prompt-sized row counts) two warpgroups and 128 rows,
// each warpgroup its own 64 against the same stage of w: its operands stream through STAGES shared-memory stages of 64
// k each (one 128-byte row of bf16 per matrix row, in the 128-byte swizzle
// wgmma reads without bank conflicts), copied with cp.async WG_AHEAD tiles
// ahead; wgmma reads them straight from shared memory (no ldmatrix), one
// m64n64k16 per 64 columns and 16 k (the SiLU tiles and every
// two-warpgroup tile: one m64n128k16, m64n192k16 or m64n256k16 for all
// their columns). Two variants store something else
// than the f32 product: the gate/up projection followed by the SiLU gate
// (gemm_wg_silu, the same bits as the two ops), and the logits' GEMM of a
// hi/lo split input (gemm_wg_hilo, see WG_HILO).

#define WG_K 64
#define WG_STAGES 4
// Stages of the kernels for grids that fit the GPU in one wave (decode
// sizes, a few row tiles): they are bound by how many bytes a block keeps in
// flight, not by the tensor cores (gemm.rs picks them; six stages also
// exist, for two blocks an SM).
#define WG_STAGES_DEEP 8
// Tiles in flight ahead of the one multiplied: the stage refilled at step kt
// held tile kt - 2, whose wgmma the previous step has waited for.
#define WG_AHEAD (STAGES - 2)
#define WG_THREADS 128

// Byte offset of 16-byte chunk c (0..7) of row r in a [rows][64] bf16 tile
// stored in the 128-byte swizzle: chunk c of row r goes to c ^ (r % 8).
__device__ __forceinline__ unsigned wg_swizzle(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Shared-memory matrix descriptor of a K-major tile in the 128-byte swizzle
// starting at shared address `addr` (1024-byte aligned, or offset along k
// within its rows): rows in groups of 8 are 1,024 bytes apart (SBO); the
// leading offset is unused in this mode.
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// The descriptor of the tile `bytes` (a multiple of 16) past the one `desc`
// describes: the address field is the low bits, and every shared address
// stays below 2^18, so adding to it never carries into the other fields.
// (Worked out from the address instead, each of a k-tile's descriptors cost
// about six instructions.)
__device__ __forceinline__ unsigned long long wg_desc_at(unsigned long long desc, unsigned bytes) {
    return desc + (bytes >> 4);
}

// Where this thread's accumulators land (the m64nNk16 layout below):
// acc[j][4q + 2h] and acc[j][4q + 2h + 1] are row wg_acc_row(r0, wg, warp,
// lane, h) and columns wg_acc_col(c0 + 64j, q, lane) and + 1 of a tile
// whose first row and column are r0 and c0 (wg: the warpgroup, warp: its
// warp in it).
__device__ __forceinline__ int wg_acc_row(int r0, int wg, int warp, int lane, int h) {
    return r0 + wg * 64 + warp * 16 + lane / 4 + h * 8;
}
__device__ __forceinline__ int wg_acc_col(int c0, int q, int lane) { return c0 + q * 8 + (lane % 4) * 2; }

// d (+)= A . B for one 64 x 64 x 16 step: d is this thread's 32 floats of
// the 64 x 64 tile (warp w: rows 16w + lane/4 and + 8; columns 8j +
// 2(lane % 4) and + 1 in d[4j..4j+1] and d[4j+2..4j+3]).
__device__ __forceinline__ void wgmma_64x64(float* d, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(1));
}

// The same step over 128, 192 or 256 columns in one instruction, the
// accumulators of each 64 columns in d0, d1, ... (the m64n64 layout): the
// gate/up + SiLU tiles take them (a 64 x 128 tile reads its 64 rows of x
// from shared memory once per 16 k instead of twice: 16.7 -> 14.8 us at 256
// rows of the 0.6B shape), and so do the two-warpgroup tiles of prompt-
// sized row counts (a prompt step 33.73 -> 33.04 ms; the one-warpgroup
// plain tiles of decode sizes measured no better or slower with them:
// BENCHMARKS.md). Each output element is the same k16 step into the same
// accumulator whatever the instruction's width (tests/twin.rs: the fused
// gate equal to the plain projection + gate, rows equal across row counts,
// the logits equal to the plain GEMM of their interleaved halves).
__device__ __forceinline__ void wgmma_64x128(float* d0, float* d1, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d0[0]), "+f"(d0[1]), "+f"(d0[2]), "+f"(d0[3]), "+f"(d0[4]), "+f"(d0[5]), "+f"(d0[6]), "+f"(d0[7]), "+f"(d0[8]), "+f"(d0[9]), "+f"(d0[10]), "+f"(d0[11]), "+f"(d0[12]), "+f"(d0[13]), "+f"(d0[14]), "+f"(d0[15]), "+f"(d0[16]), "+f"(d0[17]), "+f"(d0[18]), "+f"(d0[19]), "+f"(d0[20]), "+f"(d0[21]), "+f"(d0[22]), "+f"(d0[23]), "+f"(d0[24]), "+f"(d0[25]), "+f"(d0[26]), "+f"(d0[27]), "+f"(d0[28]), "+f"(d0[29]), "+f"(d0[30]), "+f"(d0[31]), "+f"(d1[0]), "+f"(d1[1]), "+f"(d1[2]), "+f"(d1[3]), "+f"(d1[4]), "+f"(d1[5]), "+f"(d1[6]), "+f"(d1[7]), "+f"(d1[8]), "+f"(d1[9]), "+f"(d1[10]), "+f"(d1[11]), "+f"(d1[12]), "+f"(d1[13]), "+f"(d1[14]), "+f"(d1[15]), "+f"(d1[16]), "+f"(d1[17]), "+f"(d1[18]), "+f"(d1[19]), "+f"(d1[20]), "+f"(d1[21]), "+f"(d1[22]), "+f"(d1[23]), "+f"(d1[24]), "+f"(d1[25]), "+f"(d1[26]), "+f"(d1[27]), "+f"(d1[28]), "+f"(d1[29]), "+f"(d1[30]), "+f"(d1[31])
        : "l"(da), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_64x192(float* d0, float* d1, float* d2, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, %96, %97, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d0[0]), "+f"(d0[1]), "+f"(d0[2]), "+f"(d0[3]), "+f"(d0[4]), "+f"(d0[5]), "+f"(d0[6]), "+f"(d0[7]), "+f"(d0[8]), "+f"(d0[9]), "+f"(d0[10]), "+f"(d0[11]), "+f"(d0[12]), "+f"(d0[13]), "+f"(d0[14]), "+f"(d0[15]), "+f"(d0[16]), "+f"(d0[17]), "+f"(d0[18]), "+f"(d0[19]), "+f"(d0[20]), "+f"(d0[21]), "+f"(d0[22]), "+f"(d0[23]), "+f"(d0[24]), "+f"(d0[25]), "+f"(d0[26]), "+f"(d0[27]), "+f"(d0[28]), "+f"(d0[29]), "+f"(d0[30]), "+f"(d0[31]), "+f"(d1[0]), "+f"(d1[1]), "+f"(d1[2]), "+f"(d1[3]), "+f"(d1[4]), "+f"(d1[5]), "+f"(d1[6]), "+f"(d1[7]), "+f"(d1[8]), "+f"(d1[9]), "+f"(d1[10]), "+f"(d1[11]), "+f"(d1[12]), "+f"(d1[13]), "+f"(d1[14]), "+f"(d1[15]), "+f"(d1[16]), "+f"(d1[17]), "+f"(d1[18]), "+f"(d1[19]), "+f"(d1[20]), "+f"(d1[21]), "+f"(d1[22]), "+f"(d1[23]), "+f"(d1[24]), "+f"(d1[25]), "+f"(d1[26]), "+f"(d1[27]), "+f"(d1[28]), "+f"(d1[29]), "+f"(d1[30]), "+f"(d1[31]), "+f"(d2[0]), "+f"(d2[1]), "+f"(d2[2]), "+f"(d2[3]), "+f"(d2[4]), "+f"(d2[5]), "+f"(d2[6]), "+f"(d2[7]), "+f"(d2[8]), "+f"(d2[9]), "+f"(d2[10]), "+f"(d2[11]), "+f"(d2[12]), "+f"(d2[13]), "+f"(d2[14]), "+f"(d2[15]), "+f"(d2[16]), "+f"(d2[17]), "+f"(d2[18]), "+f"(d2[19]), "+f"(d2[20]), "+f"(d2[21]), "+f"(d2[22]), "+f"(d2[23]), "+f"(d2[24]), "+f"(d2[25]), "+f"(d2[26]), "+f"(d2[27]), "+f"(d2[28]), "+f"(d2[29]), "+f"(d2[30]), "+f"(d2[31])
        : "l"(da), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_64x256(float* d0, float* d1, float* d2, float* d3, unsigned long long da, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d0[0]), "+f"(d0[1]), "+f"(d0[2]), "+f"(d0[3]), "+f"(d0[4]), "+f"(d0[5]), "+f"(d0[6]), "+f"(d0[7]), "+f"(d0[8]), "+f"(d0[9]), "+f"(d0[10]), "+f"(d0[11]), "+f"(d0[12]), "+f"(d0[13]), "+f"(d0[14]), "+f"(d0[15]), "+f"(d0[16]), "+f"(d0[17]), "+f"(d0[18]), "+f"(d0[19]), "+f"(d0[20]), "+f"(d0[21]), "+f"(d0[22]), "+f"(d0[23]), "+f"(d0[24]), "+f"(d0[25]), "+f"(d0[26]), "+f"(d0[27]), "+f"(d0[28]), "+f"(d0[29]), "+f"(d0[30]), "+f"(d0[31]), "+f"(d1[0]), "+f"(d1[1]), "+f"(d1[2]), "+f"(d1[3]), "+f"(d1[4]), "+f"(d1[5]), "+f"(d1[6]), "+f"(d1[7]), "+f"(d1[8]), "+f"(d1[9]), "+f"(d1[10]), "+f"(d1[11]), "+f"(d1[12]), "+f"(d1[13]), "+f"(d1[14]), "+f"(d1[15]), "+f"(d1[16]), "+f"(d1[17]), "+f"(d1[18]), "+f"(d1[19]), "+f"(d1[20]), "+f"(d1[21]), "+f"(d1[22]), "+f"(d1[23]), "+f"(d1[24]), "+f"(d1[25]), "+f"(d1[26]), "+f"(d1[27]), "+f"(d1[28]), "+f"(d1[29]), "+f"(d1[30]), "+f"(d1[31]), "+f"(d2[0]), "+f"(d2[1]), "+f"(d2[2]), "+f"(d2[3]), "+f"(d2[4]), "+f"(d2[5]), "+f"(d2[6]), "+f"(d2[7]), "+f"(d2[8]), "+f"(d2[9]), "+f"(d2[10]), "+f"(d2[11]), "+f"(d2[12]), "+f"(d2[13]), "+f"(d2[14]), "+f"(d2[15]), "+f"(d2[16]), "+f"(d2[17]), "+f"(d2[18]), "+f"(d2[19]), "+f"(d2[20]), "+f"(d2[21]), "+f"(d2[22]), "+f"(d2[23]), "+f"(d2[24]), "+f"(d2[25]), "+f"(d2[26]), "+f"(d2[27]), "+f"(d2[28]), "+f"(d2[29]), "+f"(d2[30]), "+f"(d2[31]), "+f"(d3[0]), "+f"(d3[1]), "+f"(d3[2]), "+f"(d3[3]), "+f"(d3[4]), "+f"(d3[5]), "+f"(d3[6]), "+f"(d3[7]), "+f"(d3[8]), "+f"(d3[9]), "+f"(d3[10]), "+f"(d3[11]), "+f"(d3[12]), "+f"(d3[13]), "+f"(d3[14]), "+f"(d3[15]), "+f"(d3[16]), "+f"(d3[17]), "+f"(d3[18]), "+f"(d3[19]), "+f"(d3[20]), "+f"(d3[21]), "+f"(d3[22]), "+f"(d3[23]), "+f"(d3[24]), "+f"(d3[25]), "+f"(d3[26]), "+f"(d3[27]), "+f"(d3[28]), "+f"(d3[29]), "+f"(d3[30]), "+f"(d3[31])
        : "l"(da), "l"(db), "r"(1));
}

// Keeps the compiler from moving reads or writes of an accumulator across
// the wgmma fences and waits (the registers belong to the async unit
// in between).
__device__ __forceinline__ void wg_fence_acc(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <int N>
__device__ __forceinline__ void wg_fence_accs(float (&acc)[N][32]) {
#pragma unroll
    for (int j = 0; j < N; j++)
#pragma unroll
        for (int e = 0; e < 32; e++) wg_fence_acc(acc[j][e]);
}

// What the block stores (MODE):
#define WG_PLAIN 0  // out (+)= x . w, or the K share into part
// w is a gate/up pair [2N, K] (gate rows, then up rows): the block's first
// 32·NB columns are gate columns n0.., its next 32·NB the same up columns,
// and instead of the f32 pair it stores silu_out[t, n] = bf16(silu(gate) *
// up) (activation.cu's silu_mul on the values the plain GEMM would have
// stored, so the same bits). A column's gate and up land in the same
// thread: the accumulator layout repeats every 8 columns.
#define WG_SILU 1
// x is the hi half and x_lo the lo half of a split f32 input (the logits'
// tensor-core rows): out = x . w + x_lo . w in one accumulator, each 16 k
// of the hi half then the same 16 k of the lo half: the bits of this
// kernel's plain GEMM of the halves interleaved 16 k at a time against w's
// rows repeated likewise (K' = 2K; tests/twin.rs). One accumulator instead
// of a sum of two leaves the registers for wider tiles (128 x 192), which
// read the halves from L2 two thirds as often (they were most of the
// projection's L2-to-SM traffic: 1.8 GB a step at 256 rows of the 0.6B
// vocabulary with 128 x 128).
#define WG_HILO 2
// The QKV projection (w the fused [(Hq + 2·Hkv)·D, K] rows) followed by
// rope.cu's qk_norm_rope_store: instead of the f32 row pieces, the block
// stages its product tile in shared memory and makes each (row, head) of
// it there as that kernel's warps do from the stored output (norm_rope_head
// for q and k heads, a rounding for v heads; the same functions on the same
// f32 values, so the same bits), writing q_out and the caches: the f32 QKV
// output never goes through memory and the RoPE kernel is not launched.
// Tiles of 128 x 256 with D = 128: a tile holds two whole heads.
#define WG_ROPE 3
struct WgRope {
    const float* qn;
    const float* kn;
    float eps;
    const float* rope;  // [positions, D]: cosines, then sines
    const u32* pos;
    const u32* slots;
    __nv_bfloat16* q_out;  // [T, Hq·D]
    __nv_bfloat16* kc;     // [slots, Hkv, D]
    __nv_bfloat16* vc;
    int Hq;
    int Hkv;
};
// Slots of two units (a row's head each, one a half-warp) a warp takes at
// once: each is a chain of dependent steps (the norm's butterfly, the
// division).
#define WG_ROPE_UNITS 4
// Shared memory of the WG_ROPE epilogue past the alignment: the BM x BN
// product tile in rows of BN + 8 floats (a half-warp's float2 stores of 8
// rows by 8 columns hit 32 banks), then each row's rotation row (D floats).
#define WG_ROPE_SMEM(BM, BN, D) ((BM) * ((BN) + 8) * 4 + (BM) * (D) * 4)

// The WG_ROPE epilogue: the block's tile (this thread's acc) into shared
// memory at `sm` (shared address `sm_addr`), its rows' rotation rows and
// cache slots beside it, all copied at once (read unit by unit they were a
// chain of dependent loads from L2 per unit: the epilogue took longer than
// the product), then the (row, head) units, 2·WG_ROPE_UNITS a warp at a
// time (norm_rope_pair), from shared memory alone.
template <int NB, int MW, int D>
__device__ __forceinline__ void wg_rope_epilogue(const float (&acc)[NB][32], unsigned char* sm, unsigned sm_addr,
                                                 int m0, int n0, int T, int N, const WgRope& rp) {
    constexpr int BN = 64 * NB, BM = 64 * MW, TS = BN + 8, PER = D / 32, HEADS = BN / D, U = WG_ROPE_UNITS;
    constexpr int THREADS = WG_THREADS * MW, CH = D / 4;  // 16-byte chunks of a rotation row
    static_assert(BN % D == 0 && THREADS % CH == 0 && BM % (THREADS / CH) == 0, "whole heads a tile");
    const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128, warp = (tid / 32) % 4;
    float* tile = reinterpret_cast<float*>(sm);
    const float* csr = tile + BM * TS;
    __shared__ u32 rslot[BM];
    // Every warpgroup's wgmma has read its last stage (each waited for its
    // own): the stages are free.
    __syncthreads();
    {
        // Chunk c of rows r0, r0 + THREADS / CH, ...: every position read
        // before any copy needs it. Rows past T take row T - 1's (unused).
        constexpr int RS = THREADS / CH, PIECES = BM / RS;
        const int c = tid % CH, r0 = tid / CH;
        u32 p[PIECES];
#pragma unroll
        for (int i = 0; i < PIECES; i++) p[i] = rp.pos[min(m0 + r0 + RS * i, T - 1)];
        const unsigned dst = sm_addr + BM * TS * 4 + (r0 * D + c * 4) * 4;
#pragma unroll
        for (int i = 0; i < PIECES; i++)
            copy16_async_bytes(dst + RS * i * D * 4, rp.rope + (size_t)p[i] * D + c * 4, 16);
        copies_commit();
        for (int r = tid; r < BM; r += THREADS) rslot[r] = rp.slots[min(m0 + r, T - 1)];
    }
#pragma unroll
    for (int j = 0; j < NB; j++)
#pragma unroll
        for (int q = 0; q < 8; q++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = wg_acc_row(0, wg, warp, lane, h), col = wg_acc_col(j * 64, q, lane);
                *reinterpret_cast<float2*>(tile + r * TS + col) =
                    make_float2(acc[j][4 * q + 2 * h], acc[j][4 * q + 2 * h + 1]);
            }
    copies_wait();
    __syncthreads();
    // Two units a warp (norm_rope_pair): lanes 16h.. take unit 2i + h of a
    // slot, lane p of them a head's elements p·PER.. (lo) and (p + 16)·PER..
    // (hi). The norm weights: the same for every unit of a kind.
    const int hw = lane / 16, p = lane % 16;
    float wql[PER], wqh[PER], wkl[PER], wkh[PER];
    load_per<PER>(rp.qn + p * PER, wql);
    load_per<PER>(rp.qn + (p + 16) * PER, wqh);
    load_per<PER>(rp.kn + p * PER, wkl);
    load_per<PER>(rp.kn + (p + 16) * PER, wkh);
    for (int u0 = (tid / 32) * 2 * U; u0 < BM * HEADS; u0 += THREADS / 32 * 2 * U) {
        // kind: 0 a q head, 1 a k head, 2 a v head, -1 none (a row past T
        // or a head past N), as in qk_norm_rope_store; a half-warp's.
        int kind[U];
        __nv_bfloat16* dst[U];
        float xl[U][PER], xh[U][PER], c[U][PER], s[U][PER], yl[U][PER], yh[U][PER];
#pragma unroll
        for (int i = 0; i < U; i++) {
            const int u = u0 + 2 * i + hw, r = u / HEADS, hh = u % HEADS, t = m0 + r, h = (n0 + hh * D) / D;
            kind[i] = u >= BM * HEADS || t >= T || n0 + hh * D >= N ? -1
                      : h < rp.Hq                                    ? 0
                      : h < rp.Hq + rp.Hkv                           ? 1
                                                                     : 2;
            const int rr = min(r, BM - 1);  // a unit past the tile: any row, not stored
            load_per<PER>(tile + rr * TS + hh * D + p * PER, xl[i]);
            load_per<PER>(tile + rr * TS + hh * D + (p + 16) * PER, xh[i]);
            load_per<PER>(csr + rr * D + p * PER, c[i]);
            load_per<PER>(csr + rr * D + D / 2 + p * PER, s[i]);
            const size_t slot = rslot[rr];
            dst[i] = kind[i] == 0   ? rp.q_out + ((size_t)t * rp.Hq + h) * D
                     : kind[i] == 1 ? rp.kc + (slot * rp.Hkv + (h - rp.Hq)) * D
                                    : rp.vc + (slot * rp.Hkv + (h - rp.Hq - rp.Hkv)) * D;
        }
        // Every unit normalised and rotated, a v head's result then
        // replaced by its rounding: one straight line, so that the units'
        // chains interleave (as branches, each was a block of its own); a
        // warp with v heads only just rounds.
        bool qk = false;
#pragma unroll
        for (int i = 0; i < U; i++) qk = qk || kind[i] == 0 || kind[i] == 1;
        if (__any_sync(0xffffffffu, qk)) {
#pragma unroll
            for (int i = 0; i < U; i++) {
                // Selected by element: a selected array would live in local memory.
                float wl[PER], wh[PER];
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    wl[e] = kind[i] == 0 ? wql[e] : wkl[e];
                    wh[e] = kind[i] == 0 ? wqh[e] : wkh[e];
                }
                norm_rope_pair<PER>(xl[i], xh[i], wl, wh, c[i], s[i], rp.eps, yl[i], yh[i]);
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    yl[i][e] = kind[i] == 2 ? xl[i][e] : yl[i][e];
                    yh[i][e] = kind[i] == 2 ? xh[i][e] : yh[i][e];
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < U; i++)
#pragma unroll
                for (int e = 0; e < PER; e++) {
                    yl[i][e] = xl[i][e];
                    yh[i][e] = xh[i][e];
                }
        }
#pragma unroll
        for (int i = 0; i < U; i++)
            if (kind[i] >= 0) {
                store_per<PER>(dst[i] + p * PER, yl[i]);
                store_per<PER>(dst[i] + (p + 16) * PER, yh[i]);
            }
    }
}

// ISPLIT: the block makes all `splits` K shares of its outputs itself, one
// after another, each from +0.0 into the accumulators, and adds them in z
// order as gemm_splits_sum does (the first share, then + each next one)
// before the epilogue adds the total to out: the bits of the split grid and
// gemm_splits_sum, without the shares' round trip through memory. Costs a
// second set of accumulators, so only narrower tiles take it.
template <int NB, int MODE, int STAGES, int MW = 1, bool ISPLIT = false>
__device__ __forceinline__ void gemm_wg_body(const __nv_bfloat16* x, const __nv_bfloat16* x_lo,
                                             const __nv_bfloat16* w, float* out, int T, int K, int N, int add,
                                             float* part, __nv_bfloat16* silu_out, int splits = 1,
                                             WgRope rp = WgRope{}) {
    constexpr bool SILU = MODE == WG_SILU, HILO = MODE == WG_HILO, ROPE = MODE == WG_ROPE;
    // One wgmma for all of a warpgroup's columns a 16 k step (the SiLU
    // tiles, and the two-warpgroup tiles of prompt-sized row counts), else
    // one per 64 columns.
    constexpr bool WIDE = SILU || MW == 2;
    // MW warpgroups a block, each 64 rows of x against the same BN columns
    // of w (one stage of w serves them all).
    static_assert(MW == 1 || (MW == 2 && (4 * NB) % MW == 0), "one or two warpgroups");
    constexpr int BM = 64 * MW, ROWS_STEP = 16 * MW;
    // A stage: x's BM rows (then x_lo's), then w's BN rows, 128 bytes each.
    constexpr int NA = HILO ? 2 : 1, BN = 64 * NB, A_BYTES = NA * BM * 128, STAGE = A_BYTES + BN * 128;
    extern __shared__ __align__(1024) unsigned char wg_smem[];
    const unsigned base = ((unsigned)__cvta_generic_to_shared(wg_smem) + 1023u) & ~1023u;
    const unsigned long long d_base = wg_desc(base);
    // wg: this thread's warpgroup; warp: its warp in the warpgroup.
    const int tid = threadIdx.x, lane = tid % 32, wg = MW == 1 ? 0 : tid / 128, warp = MW == 1 ? tid / 32 : (tid / 32) % 4;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * (SILU ? BN / 2 : BN);
    static_assert(!ISPLIT || MODE == WG_PLAIN, "shares in a block: plain tiles");
    const int all_tiles = (K + WG_K - 1) / WG_K;
    const int per = ISPLIT ? (all_tiles + splits - 1) / splits : (all_tiles + gridDim.z - 1) / gridDim.z;
    const int kt0 = ISPLIT ? 0 : blockIdx.z * per, kt_end = ISPLIT ? all_tiles : min(all_tiles, kt0 + per);
    // This thread copies chunk c of rows r0 + ROWS_STEP·i (every row's 8
    // chunks are 8 neighbouring threads: 128 contiguous bytes of global
    // memory). Each copy's source row is worked out once, as a pointer that
    // then moves on by a k-tile at each of its (in-order) tiles. A row of x
    // past T reads nothing (zeros); a column of w past N copies row N - 1
    // instead: a row of w only ever meets x in its own output column, which
    // is not stored, so the stored outputs are the same, and only the last
    // column tile has such rows. (Rows of x past T copied from row T - 1
    // instead would be most of a small batch's reads, all of one row: 2.7x
    // slower logits at one row.) A chunk past K, which every output would
    // meet, reads as zeros. (Bounds checked and addresses multiplied out at
    // every copy were most of a k-tile's ~270 instructions a warp: Nsight
    // Compute and the SASS of the 0.6B qkv at 256 rows, BENCHMARKS.md.)
    const int c = tid & 7, r0 = tid >> 3;
    constexpr int NW = 4 * NB / MW;
    // Where chunk c of rows r0 + ROWS_STEP·i lands in a stage: the swizzle's
    // row pattern repeats every 8 rows, and ROWS_STEP is a multiple of 8.
    const unsigned sw = wg_swizzle(r0, c);
    static_assert(ROWS_STEP % 8 == 0, "one swizzle pattern for all of a thread's rows");
    const __nv_bfloat16* w_src[NW];
    const __nv_bfloat16* x_src[4];
    const __nv_bfloat16* xlo_src[HILO ? 4 : 1];
    int x_bytes[4];
#pragma unroll
    for (int i = 0; i < NW; i++) {
        const int r = r0 + ROWS_STEP * i;
        // SILU: tile rows BN / 2.. are the up rows of the same columns.
        const int col = min(SILU ? n0 + (r & (BN / 2 - 1)) : n0 + r, N - 1);  // BN / 2: a power of 2
        const int wrow = SILU && r >= BN / 2 ? N + col : col;
        w_src[i] = w + (size_t)wrow * K + kt0 * WG_K + c * 8;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int row = m0 + r0 + ROWS_STEP * i;
        const size_t off = row < T ? (size_t)row * K + kt0 * WG_K + c * 8 : 0;
        x_bytes[i] = row < T ? 16 : 0;
        x_src[i] = x + off;
        if (HILO) xlo_src[i] = x_lo + off;
    }
    // Tile kt of w, `ahead` tiles past the sources' current one (the
    // unrolled prologue: a constant, so an offset in the copy's address), or
    // (ahead < 0) the current one, each source then moved on by a tile.
    auto load_w = [&](int kt, int ahead) {
        const unsigned st = base + (kt % STAGES) * STAGE + A_BYTES + sw;
        const int k_bytes = kt * WG_K + c * 8 < K ? 16 : 0;
#pragma unroll
        for (int i = 0; i < NW; i++) {
            copy16_async_bytes(st + i * ROWS_STEP * 128, w_src[i] + max(ahead, 0) * WG_K, k_bytes);
            if (ahead < 0) w_src[i] += WG_K;
        }
    };
    auto load_x = [&](int kt, int ahead) {
        const unsigned st = base + (kt % STAGES) * STAGE + sw;
        const int k_bytes = kt * WG_K + c * 8 < K ? 16 : 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            copy16_async_bytes(st + i * ROWS_STEP * 128, x_src[i] + max(ahead, 0) * WG_K, x_bytes[i] & k_bytes);
            if (ahead < 0) x_src[i] += WG_K;
            if (HILO) {
                copy16_async_bytes(st + BM * 128 + i * ROWS_STEP * 128, xlo_src[i] + max(ahead, 0) * WG_K,
                                   x_bytes[i] & k_bytes);
                if (ahead < 0) xlo_src[i] += WG_K;
            }
        }
    };
    // The weight's first tiles need nothing from the kernel ahead; x's wait
    // for it. Group s holds tile kt0 + s's x (and, for s = 0, the early
    // weight tiles), so "all but the newest WG_AHEAD - 1 groups" still
    // means tile kt has landed. The narrow tiles (decode sizes, whose
    // prologue is much of their run) copy these tiles at constant offsets
    // and move the sources on once (ptxas: 676 -> 428 prologue instructions
    // for 64 x 128); in the wider ones that made ptxas's k loop longer.
    constexpr bool AT_OFFSETS = NA * NB <= 2;
#pragma unroll
    for (int s = 0; s < WG_AHEAD; s++)
        if (kt0 + s < kt_end) load_w(kt0 + s, AT_OFFSETS ? s : -1);
    wait_for_producers();
    start_dependents();
#pragma unroll
    for (int s = 0; s < WG_AHEAD; s++) {
        if (kt0 + s < kt_end) load_x(kt0 + s, AT_OFFSETS ? s : -1);
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    if (AT_OFFSETS) {
#pragma unroll
        for (int i = 0; i < NW; i++) w_src[i] += WG_AHEAD * WG_K;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            x_src[i] += WG_AHEAD * WG_K;
            if (HILO) xlo_src[i] += WG_AHEAD * WG_K;
        }
    }
    // HILO: the lo half's products go into the same accumulators.
    float acc[NB][32];
#pragma unroll
    for (int j = 0; j < NB; j++)
#pragma unroll
        for (int e = 0; e < 32; e++) acc[j][e] = 0.0f;
    // ISPLIT: the shares before the current one, added in order.
    float total[ISPLIT ? NB : 1][32];
    // ISPLIT: the first tile of the next share (counted, not kt % per: the
    // division was a fifth of a tile's instructions).
    int next_share = per;
    // Not unrolled: unrolled, the first tile's wgmma, whose accumulators
    // ptxas knows are zero, becomes one that does not add them (and
    // +0.0 + (-0.0) is +0.0 where the product alone is -0.0); made opaque
    // instead, the zeros made ptxas serialise every wgmma (C7514).
#pragma unroll 1
    for (int kt = kt0; kt < kt_end; kt++) {
        if (ISPLIT && kt == next_share) {
            next_share += per;
            // Share kt / per starts: the one before is whole in acc.
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            wg_fence_accs(acc);
#pragma unroll
            for (int j = 0; j < NB; j++)
#pragma unroll
                for (int e = 0; e < 32; e++) {
                    total[j][e] = kt == per ? acc[j][e] : total[j][e] + acc[j][e];
                    acc[j][e] = 0.0f;
                }
        }
        asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_AHEAD - 1) : "memory");
        // This thread's copies of tile kt are visible to the async proxy
        // wgmma reads through, and after the barrier everyone's are; every
        // warp has also waited for tile kt - 2's wgmma, whose stage the
        // copies below refill.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        {
            const int nk = kt + WG_AHEAD;
            if (nk < kt_end) {
                load_x(nk, -1);
                load_w(nk, -1);
            }
            asm volatile("cp.async.commit_group;\n" ::: "memory");
        }
        // This warpgroup's 64 rows of x (1,024-byte aligned: the swizzle's
        // pattern repeats every 8 rows), then w.
        const unsigned long long d_st = wg_desc_at(d_base, (kt % STAGES) * STAGE);
        wg_fence_accs(acc);
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int ks = 0; ks < WG_K / 16; ks++) {
#pragma unroll
            for (int a = 0; a < NA; a++) {
                const unsigned long long da = wg_desc_at(d_st, wg * 64 * 128 + a * BM * 128 + ks * 32);
                const unsigned long long db = wg_desc_at(d_st, A_BYTES + ks * 32);
                if constexpr (WIDE && NB == 4) {
                    wgmma_64x256(acc[0], acc[1], acc[2], acc[3], da, db);
                } else if constexpr (WIDE && NB == 3) {
                    wgmma_64x192(acc[0], acc[1], acc[2], da, db);
                } else if constexpr (WIDE && NB == 2) {
                    wgmma_64x128(acc[0], acc[1], da, db);
                } else {
#pragma unroll
                    for (int j = 0; j < NB; j++)
                        wgmma_64x64(acc[j], da, wg_desc_at(d_st, A_BYTES + j * 64 * 128 + ks * 32));
                }
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        wg_fence_accs(acc);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    wg_fence_accs(acc);
    if (ISPLIT && all_tiles > per) {
#pragma unroll
        for (int j = 0; j < NB; j++)
#pragma unroll
            for (int e = 0; e < 32; e++) acc[j][e] = total[j][e] + acc[j][e];
    }

    if constexpr (ROPE) {
        // The launcher gives the block the larger of its stages and
        // WG_ROPE_SMEM (past the 1,024-byte alignment).
        unsigned char* sm = wg_smem + (base - (unsigned)__cvta_generic_to_shared(wg_smem));
        wg_rope_epilogue<NB, MW, 128>(acc, sm, base, m0, n0, T, N, rp);
        return;
    }
    if (SILU) {
        // The gate's 8-column blocks q and the up's q + 4·NB.
#pragma unroll
        for (int q = 0; q < 4 * NB; q++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = wg_acc_row(m0, wg, warp, lane, h);
                const int col = wg_acc_col(n0, q, lane);
                if (r >= T) continue;
                const int qu = q + 4 * NB;
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float g = acc[q / 8][4 * (q % 8) + 2 * h + e];
                    const float u = acc[qu / 8][4 * (qu % 8) + 2 * h + e];
                    if (col + e < N) silu_out[(size_t)r * N + col + e] = __float2bfloat16_rn(q_silu(g) * u);
                }
            }
        return;
    }
    // Each thread holds column pairs (col, col + 1): stored as one float2
    // where both fit and the address is 8-byte aligned.
    float* dst_base = part ? part + (size_t)blockIdx.z * T * N : out;
    const bool pairs = (N % 2) == 0 && (reinterpret_cast<size_t>(dst_base) & 7) == 0;
    const bool acc_out = add && !part;
#pragma unroll
    for (int j = 0; j < NB; j++)
#pragma unroll
        for (int q = 0; q < 8; q++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = wg_acc_row(m0, wg, warp, lane, h);
                const int col = wg_acc_col(n0 + j * 64, q, lane);
                if (r >= T) continue;
                const float v0 = acc[j][4 * q + 2 * h], v1 = acc[j][4 * q + 2 * h + 1];
                float* d = dst_base + (size_t)r * N + col;
                if (pairs && col + 1 < N) {
                    float2 v = make_float2(v0, v1);
                    if (acc_out) {
                        const float2 o = *reinterpret_cast<float2*>(d);
                        v = make_float2(o.x + v0, o.y + v1);
                    }
                    *reinterpret_cast<float2*>(d) = v;
                } else {
                    if (col < N) d[0] = acc_out ? d[0] + v0 : v0;
                    if (col + 1 < N) d[1] = acc_out ? d[1] + v1 : v1;
                }
            }
}

// One kernel per tile width and stage count; the arguments are gemm.cu's
// GEMM_KERNEL's. Needs K % 8 == 0 (16-byte copies) and STAGES stages of
// dynamic shared memory plus 1,024 bytes for the alignment.
#define GEMM_WG_KERNEL(NAME, NB, STAGES, MW)                                                                   \
    extern "C" __global__ void __launch_bounds__(WG_THREADS * MW)                                               \
        NAME(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K, int N, int add,          \
             float* part) {                                                                                     \
        gemm_wg_body<NB, WG_PLAIN, STAGES, MW>(x, nullptr, w, out, T, K, N, add, part, nullptr);               \
    }
GEMM_WG_KERNEL(gemm_wg_n64, 1, WG_STAGES, 1)
GEMM_WG_KERNEL(gemm_wg_n128, 2, WG_STAGES, 1)
GEMM_WG_KERNEL(gemm_wg_n256, 4, WG_STAGES, 1)
GEMM_WG_KERNEL(gemm_wg_n64_deep, 1, WG_STAGES_DEEP, 1)
GEMM_WG_KERNEL(gemm_wg_n64_s6, 1, 6, 1)
GEMM_WG_KERNEL(gemm_wg_n128_deep, 2, WG_STAGES_DEEP, 1)
// Two warpgroups (128 rows) against 256 columns: large row counts (prompt
// steps), where a stage of w then serves twice the rows.
GEMM_WG_KERNEL(gemm_wg_m128_n256, 4, WG_STAGES, 2)
// 128 rows by 128 columns with a K-split weight's `splits` shares made in
// the block (ISPLIT): prompt-sized row counts, whose grid fills the GPU
// without splitting K across blocks. Six stages (one block an SM by
// registers: two sets of accumulators).
extern "C" __global__ void __launch_bounds__(WG_THREADS * 2)
    gemm_wg_m128_n128_shares(const __nv_bfloat16* x, const __nv_bfloat16* w, float* out, int T, int K, int N,
                             int add, float* part, int splits) {
    gemm_wg_body<2, WG_PLAIN, 6, 2, true>(x, nullptr, w, out, T, K, N, add, nullptr, nullptr, splits);
}

// The QKV projection into q/k-norm, RoPE and the cache store (WG_ROPE):
// x [T, K] (the normed input), w [(Hq + 2·Hkv)·128, K], then
// qk_norm_rope_store's parameters from q_norm on; 128 x 256 tiles, no split K.
extern "C" __global__ void __launch_bounds__(WG_THREADS * 2)
    gemm_wg_m128_n256_rope_d128(const __nv_bfloat16* x, const __nv_bfloat16* w, int T, int K, int N,
                                const float* qn, const float* kn, float eps, const float* rope, const u32* pos,
                                const u32* slots, __nv_bfloat16* q_out, __nv_bfloat16* kc, __nv_bfloat16* vc,
                                int Hq, int Hkv) {
    const WgRope rp = {qn, kn, eps, rope, pos, slots, q_out, kc, vc, Hq, Hkv};
    gemm_wg_body<4, WG_ROPE, WG_STAGES, 2>(x, nullptr, w, nullptr, T, K, N, 0, nullptr, nullptr, 1, rp);
}

// The gate/up projection with the SiLU gate behind it: x [T, K], w [2N, K]
// (gate, then up), out [T, N] bf16; no split K.
// Grid (T / 64, N / (32·NB)): 64 columns of each half a block, or 32 (and
// twice the blocks) with six or eight stages where that grid fits in one
// wave (gemm.rs).
#define GEMM_WG_SILU_KERNEL(NAME, NB, STAGES, MW)                                                              \
    extern "C" __global__ void __launch_bounds__(WG_THREADS * MW)                                               \
        NAME(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* out, int T, int K, int N) {          \
        gemm_wg_body<NB, WG_SILU, STAGES, MW>(x, nullptr, w, nullptr, T, K, N, 0, nullptr, out);               \
    }
GEMM_WG_SILU_KERNEL(gemm_wg_silu, 2, WG_STAGES, 1)
GEMM_WG_SILU_KERNEL(gemm_wg_silu_deep, 1, WG_STAGES_DEEP, 1)
GEMM_WG_SILU_KERNEL(gemm_wg_silu_s6, 1, 6, 1)
// 128 rows by 128 gate and 128 up columns (large row counts).
GEMM_WG_SILU_KERNEL(gemm_wg_silu_m128, 4, WG_STAGES, 2)
// 128 rows by 64 gate and 64 up columns, six stages (one block an SM): a
// few row tiles (129-256 rows at the 0.6B shape), whose 64-row grid would
// put two blocks on some SMs and none on others.
GEMM_WG_SILU_KERNEL(gemm_wg_silu_m128_n64, 2, 6, 2)

// out = x_hi . w + x_lo . w (see WG_HILO), f32 [T, N]; no split K.
// Grid (T / (64·MW), N / (64·NB)).
#define GEMM_WG_HILO_KERNEL(NAME, NB, MW, STAGES)                                                              \
    extern "C" __global__ void __launch_bounds__(WG_THREADS * MW)                                               \
        NAME(const __nv_bfloat16* x_hi, const __nv_bfloat16* x_lo, const __nv_bfloat16* w, float* out, int T,   \
             int K, int N) {                                                                                    \
        gemm_wg_body<NB, WG_HILO, STAGES, MW>(x_hi, x_lo, w, out, T, K, N, 0, nullptr, nullptr);               \
    }
GEMM_WG_HILO_KERNEL(gemm_wg_hilo, 1, 1, WG_STAGES)
// 128 rows (two warpgroups) by 128 columns: a stage of w serves twice the
// rows, so more than 64 rows move half the vocabulary's weight tiles from
// L2 to the SMs (the projection's 311 MB at 0.6B, read once per row tile).
GEMM_WG_HILO_KERNEL(gemm_wg_hilo_m128, 2, 2, WG_STAGES)
// The wide tile: 128 rows by 192 columns (four stages of both halves' 128
// rows and 192 of w fill the shared memory; 128 x 256 with three stages
// measured no faster, and 64-row tiles 192 or 256 wide no faster than 64:
// BENCHMARKS.md).
GEMM_WG_HILO_KERNEL(gemm_wg_hilo_m128_n192, 3, 2, WG_STAGES)
