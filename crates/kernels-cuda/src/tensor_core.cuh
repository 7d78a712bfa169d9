// Tensor-core building blocks (sm_80 and later), prepended to every module:
// ldmatrix loads of 8x8 bf16 tiles from shared memory and the m16n8k16
// bf16 MMA with f32 accumulation. gemm.cu and attention_tc.cu use them.

// Four 8x8 bf16 matrices: lanes 8i..8i+7 give the row addresses of matrix i,
// whose fragment lands in r[i] (thread t: row t/4, columns 2(t%4), +1).
__device__ __forceinline__ void ldmatrix4(unsigned* r, const __nv_bfloat16* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// As ldmatrix4, each matrix transposed (thread t: rows 2(t%4), +1 of column t/4).
__device__ __forceinline__ void ldmatrix4_trans(unsigned* r, const __nv_bfloat16* p) {
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// d (16x8 f32) += a (16x16 bf16, row-major fragment) . b (16x8 bf16, column-major fragment).
// Not `volatile`: it reads only its operands, so the compiler may
// interleave it with the next step's fragment loads; d is an input too,
// so the products into one accumulator still run in program order.
__device__ __forceinline__ void mma16816(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 and packed as an MMA operand register (the
// first in the low half).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    unsigned b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return a | (b << 16);
}
