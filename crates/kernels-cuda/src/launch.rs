//! Small helpers shared by the kernel launchers, and the launch itself:
//! every kernel goes out through [`Launch`], which asks the driver for
//! programmatic dependent launch (see dependent_launch.cuh) where the GPU
//! has it.

use std::ffi::c_void;

use cudarc::driver::sys::{self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig, CUresult};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError, LaunchConfig,
};
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

/// The most parameters any kernel of ours takes.
const MAX_ARGS: usize = 40;

/// One kernel parameter as the 8 bytes the driver copies it from: a device
/// pointer, or a 4-byte scalar in the low bytes (x86-64 is little-endian,
/// and the driver reads only the parameter's own size).
pub(crate) trait KernelArg {
    fn bits(self, stream: &CudaStream) -> u64;
}

impl<T> KernelArg for &CudaSlice<T> {
    fn bits(self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

impl<T> KernelArg for &mut CudaSlice<T> {
    fn bits(self, stream: &CudaStream) -> u64 {
        self.device_ptr_mut(stream).0
    }
}

impl KernelArg for &i32 {
    fn bits(self, _: &CudaStream) -> u64 {
        *self as u32 as u64
    }
}

impl KernelArg for &u32 {
    fn bits(self, _: &CudaStream) -> u64 {
        *self as u64
    }
}

/// A raw 8-byte value, such as a null pointer for a pointer parameter the
/// kernel does not read.
impl KernelArg for &u64 {
    fn bits(self, _: &CudaStream) -> u64 {
        *self
    }
}

impl KernelArg for &f32 {
    fn bits(self, _: &CudaStream) -> u64 {
        self.to_bits() as u64
    }
}

/// The arguments of one launch, pushed in the kernel's parameter order.
pub(crate) struct Launch<'a> {
    func: &'a CudaFunction,
    stream: &'a CudaStream,
    dependent: bool,
    cluster: Option<(u32, u32, u32)>,
    vals: [u64; MAX_ARGS],
    n: usize,
}

impl Launch<'_> {
    pub(crate) fn arg(&mut self, a: impl KernelArg) -> &mut Self {
        let bits = a.bits(self.stream);
        if let Some(v) = self.vals.get_mut(self.n) {
            *v = bits;
        }
        self.n += 1;
        self
    }

    /// Launches the grid as thread block clusters of `dims` blocks (each
    /// dimension dividing the grid's; at most 8 blocks, or 16 for a kernel
    /// that opted in to non-portable sizes).
    pub(crate) fn cluster(&mut self, dims: (u32, u32, u32)) -> &mut Self {
        self.cluster = Some(dims);
        self
    }

    /// Launches on the backend's stream. With dependent launch on, the
    /// kernel may be scheduled before the one ahead of it has finished; it
    /// waits for it in `wait_for_producers()`.
    ///
    /// # Safety
    /// The arguments pushed must match the kernel's parameters in number,
    /// order and type, and the grid must keep every access in bounds.
    pub(crate) unsafe fn launch(
        &mut self,
        cfg: LaunchConfig,
    ) -> std::result::Result<(), DriverError> {
        if self.n > MAX_ARGS {
            return Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE));
        }
        self.stream.context().bind_to_thread()?;
        let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        for (p, v) in ptrs.iter_mut().zip(self.vals.iter_mut()).take(self.n) {
            *p = (v as *mut u64).cast();
        }
        // SAFETY: an all-zero attribute is a valid plain-data value; the
        // union member written next is the one its id selects.
        let mut attrs: [CUlaunchAttribute; 2] = std::mem::zeroed();
        let mut n_attrs = 0;
        if self.dependent {
            let a = &mut attrs[n_attrs];
            a.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            a.value.programmaticStreamSerializationAllowed = 1;
            n_attrs += 1;
        }
        if let Some((x, y, z)) = self.cluster {
            let a = &mut attrs[n_attrs];
            a.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            a.value.clusterDim.x = x;
            a.value.clusterDim.y = y;
            a.value.clusterDim.z = z;
            n_attrs += 1;
        }
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: n_attrs as u32,
        };
        // SAFETY: `ptrs` points at `self.n` live 8-byte values in `self.vals`
        // for the call's duration; the caller vouches for their meaning.
        sys::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            ptrs.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()
    }
}

impl CudaBackend {
    pub(crate) fn kernel(&self, name: &str) -> &CudaFunction {
        // Every name used by a launcher is listed in device::MODULES.
        &self.dev.kernels[name]
    }

    /// A launch of `func` on the backend's stream.
    pub(crate) fn launch<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            func,
            stream: &self.dev.stream,
            dependent: self.dev.dependent_launch,
            cluster: None,
            vals: [0; MAX_ARGS],
            n: 0,
        }
    }
}
