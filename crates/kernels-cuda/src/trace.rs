//! Kernel trace, a diagnostic for where a step's time goes inside a CUDA
//! graph (where host timers see nothing and no profiler may be at hand).
//! With `QWEN_CUDA_TRACE=FILE`, every module is compiled with `QWEN_TRACE`
//! (dependent_launch.cuh): the first block of each kernel records when it
//! got past its wait for the kernel before, which is when that kernel
//! completed. The records go to FILE when the backend is dropped, a line
//! each: `nanoseconds grid_x grid_y threads_per_block`, in the order they
//! were claimed. `scripts/trace-summary.py` turns them into each kernel's
//! share of the critical path. Tracing still slows a 0.6B batch-1 step by
//! about 9% (its records' stores and the atomics that claim their slots,
//! issued before each wait), so read a trace for proportions and let the
//! bench decide (BENCHMARKS.md).

use std::sync::Arc;

use cudarc::driver::{CudaModule, CudaSlice, CudaStream, DevicePtr};
use qwen_tensor::Result;

use crate::device::dev;

/// Records a trace buffer holds (QWEN_TRACE in the kernels).
const CAPACITY: usize = 1 << 20;

/// Where the trace goes and the device buffer it collects in: a count,
/// then (time, shape) pairs.
pub(crate) struct Trace {
    path: String,
    buf: CudaSlice<u64>,
}

fn path() -> Option<String> {
    std::env::var("QWEN_CUDA_TRACE")
        .ok()
        .filter(|p| !p.is_empty())
}

/// The line compile.rs puts in front of every module.
pub(crate) fn define() -> String {
    match path() {
        Some(_) => format!("#define QWEN_TRACE {CAPACITY}ull\n"),
        None => String::new(),
    }
}

impl Trace {
    /// A buffer when `QWEN_CUDA_TRACE` is set.
    pub(crate) fn from_env(stream: &Arc<CudaStream>) -> Result<Option<Trace>> {
        let Some(path) = path() else { return Ok(None) };
        let buf = stream
            .alloc_zeros::<u64>(1 + 2 * CAPACITY + 16)
            .map_err(dev)?;
        Ok(Some(Trace { path, buf }))
    }

    /// Points a freshly loaded module's `qwen_trace` at the buffer.
    pub(crate) fn attach(&self, module: &Arc<CudaModule>, stream: &Arc<CudaStream>) -> Result<()> {
        let (ptr, _sync) = self.buf.device_ptr(stream);
        let mut sym = module.get_global("qwen_trace", stream).map_err(dev)?;
        // SAFETY: `qwen_trace` is one 8-byte device pointer in every module
        // compiled with QWEN_TRACE (dependent_launch.cuh).
        let mut slot = unsafe { sym.transmute_mut::<u64>(1) }
            .ok_or_else(|| qwen_tensor::Error::Device("qwen_trace is not 8 bytes".into()))?;
        stream.memcpy_htod(&[ptr], &mut slot).map_err(dev)
    }

    /// Writes the records taken so far to the trace file.
    pub(crate) fn write(&self, stream: &Arc<CudaStream>) -> std::result::Result<(), String> {
        let v = stream.clone_dtoh(&self.buf).map_err(|e| e.to_string())?;
        let n = (v[0] as usize).min(CAPACITY);
        let mut out = String::with_capacity(n * 32);
        for r in v[1..1 + 2 * n].chunks(2) {
            let (t, s) = (r[0], r[1]);
            out += &format!(
                "{t} {} {} {}\n",
                s & 0xff_ffff,
                (s >> 24) & 0xff_ffff,
                s >> 48
            );
        }
        out += &format!("# attn {:?}\n", &v[1 + 2 * CAPACITY..]);
        std::fs::write(&self.path, out).map_err(|e| format!("{}: {e}", self.path))
    }
}
