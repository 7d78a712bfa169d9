//! Device-side timing for benchmarks and profiling: CUDA events recorded on
//! the backend's stream around queued work, and the device-to-device copy
//! bandwidth that kernel throughput is judged against.
//!
//! Host timers would measure launch and queueing overhead rather than the
//! GPU, and would need a synchronise after every call; events bracket
//! exactly the work queued on the stream, and the host only waits once.

use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use qwen_tensor::{Error, Result};

use crate::device::dev;
use crate::CudaBackend;

/// Size of each buffer in [`CudaBackend::measure_copy_bandwidth`]: far larger
/// than any GPU's L2 cache (50 MiB on H100), so the copy streams from DRAM.
const COPY_BYTES: usize = 1 << 30;
/// Timed copies after the untimed first one.
const COPY_REPS: u64 = 10;

impl CudaBackend {
    /// Queues `f` `iters` times and returns the GPU time from an event
    /// recorded on the backend's stream before the first call to one
    /// recorded after the last, waiting for both.
    ///
    /// `f` should only queue work on this backend (every op does). The time
    /// includes any gap where the GPU waited for the host to launch more
    /// work, as a real forward pass without CUDA graphs would. Ops that copy
    /// results to the host (`argmax`, `sample`) synchronise inside `f`, so
    /// their time includes the host side too.
    pub fn time_gpu<F: FnMut() -> Result<()>>(&self, iters: u64, mut f: F) -> Result<Duration> {
        let stream = &self.dev.stream;
        // `None` would create events with timing disabled.
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(timed).map_err(dev)?;
        for _ in 0..iters {
            f()?;
        }
        let end = stream.record_event(timed).map_err(dev)?;
        // elapsed_ms waits for both events before reading them.
        let ms = start.elapsed_ms(&end).map_err(dev)?;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    /// Measures the device memory bandwidth, in bytes per second, as a
    /// device-to-device copy of 1 GiB (less on a GPU with under 4 GiB free)
    /// timed with events. Both the bytes read and the bytes written are
    /// counted, as kernel benchmarks count theirs, so a kernel that moves
    /// its data as well as `cuMemcpy` reports 100% of this figure.
    pub fn measure_copy_bandwidth(&self) -> Result<f64> {
        let (free, _) = self.memory_info()?;
        // Two buffers plus headroom; keep whole 1 MiB units.
        let bytes = COPY_BYTES.min(free / 4) & !((1 << 20) - 1);
        if bytes == 0 {
            return Err(Error::OutOfMemory(format!(
                "{free} bytes free: too little to measure copy bandwidth"
            )));
        }
        let stream = &self.dev.stream;
        let src = stream.alloc_zeros::<u8>(bytes).map_err(dev)?;
        let mut dst = stream.alloc_zeros::<u8>(bytes).map_err(dev)?;
        // One untimed copy so first-touch costs stay out of the timing.
        stream.memcpy_dtod(&src, &mut dst).map_err(dev)?;
        let elapsed = self.time_gpu(COPY_REPS, || {
            stream.memcpy_dtod(&src, &mut dst).map_err(dev)
        })?;
        Ok(2.0 * bytes as f64 * COPY_REPS as f64 / elapsed.as_secs_f64())
    }
}
