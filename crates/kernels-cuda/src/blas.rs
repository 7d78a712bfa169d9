//! Tensor-core GEMMs through cuBLAS, for prefill and large batches. These
//! are the one place the CUDA backend may differ from the CPU spec: the
//! tensor cores' accumulation order is their own. The twin tests bound the
//! difference; `CudaBackend::set_exact(true)` turns this path off.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use qwen_tensor::{Error, Result};

use crate::CudaBackend;

/// Fewest tokens for which a projection goes to the tensor cores: below it
/// the exact kernel reads the weights once per four tokens and is
/// bandwidth-bound anyway.
pub const TENSOR_CORE_MIN_TOKENS: usize = 64;

pub(crate) fn new_blas(stream: std::sync::Arc<cudarc::driver::CudaStream>) -> Result<CudaBlas> {
    CudaBlas::new(stream).map_err(|e| Error::Device(format!("cuBLAS: {e}")))
}

impl CudaBackend {
    /// `out[t, n] (+)= Σ_k x[t, k]·w[n, k]`, bf16 inputs, f32 accumulation
    /// and output, row-major, on the tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
        t: usize,
        k: usize,
        n: usize,
        add: bool,
    ) -> Result<()> {
        let stream = &self.dev.stream;
        let alpha = 1.0f32;
        let beta = if add { 1.0f32 } else { 0.0 };
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        // Row-major out[T, N] is column-major outᵀ[N, T] = wᵀ-as-stored (N×K
        // after transposing the column-major K×N view) times xᵀ (K×T).
        // SAFETY: the pointers come from live slices of at least T·K, N·K and
        // T·N elements (checked by the caller), on the stream the handle uses.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                t as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                wp as *const _,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                xp as *const _,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                op as *mut _,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Device(format!("cuBLAS GEMM {t}x{k}x{n}: {e}")))
    }
}
