//! # qwen-kernels-cuda
//!
//! The CUDA backend. Not built yet: [`CudaBackend::new`] reports that
//! clearly, so `--backend cuda` fails with one line instead of a crash.
//!
//! ```
//! assert!(qwen_kernels_cuda::CudaBackend::new(0).is_err());
//! ```

use qwen_tensor::{Error, Result};

/// Handle to one GPU.
#[derive(Debug)]
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Opens GPU `ordinal`.
    pub fn new(ordinal: usize) -> Result<Self> {
        Err(Error::Unsupported(format!(
            "the CUDA backend is not built yet (asked for GPU {ordinal}); use --backend cpu"
        )))
    }
}
