//! Small helpers shared by the kernel launchers.

use cudarc::driver::{CudaFunction, LaunchConfig};
use qwen_tensor::{Error, Result};

use crate::CudaBackend;

pub(crate) fn grid(g: (u32, u32, u32), b: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: g,
        block_dim: b,
        shared_mem_bytes: 0,
    }
}

pub(crate) fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

/// A size as the `int` kernels take.
pub(crate) fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape_err(op, format!("size {v} does not fit a 32-bit int")))
}

impl CudaBackend {
    pub(crate) fn kernel(&self, name: &str) -> &CudaFunction {
        // Every name used by a launcher is listed in device::MODULES.
        &self.dev.kernels[name]
    }
}
