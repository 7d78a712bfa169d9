// Host stand-ins for the CUDA names the kernels use, so that g++ can parse
// and type-check them where NVRTC is not installed (scripts/cuda-syntax.sh).
// Nothing here computes what the GPU computes: it only has the right types.
#pragma once
#include <cmath>
#include <cstddef>
using std::isnan;
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__
struct __nv_bfloat16 { unsigned short x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float2 { float x, y; };
struct dim3_ { unsigned x, y, z; };
extern dim3_ threadIdx, blockIdx, blockDim, gridDim;
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
__nv_bfloat16 __float2bfloat16_rn(float);
__nv_bfloat162 __floats2bfloat162_rn(float, float);
float __bfloat162float(__nv_bfloat16);
unsigned short __bfloat16_as_ushort(__nv_bfloat16);
float __low2float(__nv_bfloat162);
float __high2float(__nv_bfloat162);
float __int_as_float(int);
int __float_as_int(float);
float __uint_as_float(unsigned);
unsigned __float_as_uint(float);
unsigned long long __float2ull_rz(float);
unsigned long long __double2ull_rz(double);
double __ull2double_rn(unsigned long long);
int __popc(unsigned);
int __ffs(int);
int __clzll(long long);
template <class T> T __shfl_xor_sync(unsigned, T, int);
template <class T> T __shfl_sync(unsigned, T, int);
template <class T> T __shfl_up_sync(unsigned, T, int);
unsigned __ballot_sync(unsigned, int);
int __any_sync(unsigned, int);
void __syncthreads();
void __syncwarp(unsigned = 0xffffffffu);
void __threadfence();
template <class T> T atomicAdd(T*, T);
template <class T> T atomicMin(T*, T);
template <class T> T atomicMax(T*, T);
template <class T> T __ldcg(const T*);
size_t __cvta_generic_to_shared(const void*);
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
