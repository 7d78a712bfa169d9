//! Downloads waited for later (`Backend::download_start`): overlapped
//! scheduling queues step k + 1 before it reads step k's sampled tokens, so
//! their copy lands in page-locked memory behind an event instead of
//! synchronising the stream.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, PinnedHostSlice};
use qwen_tensor::{Download, HostVec, Result};

use crate::device::{dev, CudaStorage, T};
use crate::CudaBackend;

/// Page-locked buffers kept for reuse: allocating and freeing them costs
/// more than a step's copy.
pub(crate) type HostBuffers = Arc<Mutex<Vec<PinnedHostSlice<u32>>>>;

/// A copy into `buf` in flight until `event` completes.
struct PendingCopy {
    event: CudaEvent,
    buf: Option<PinnedHostSlice<u32>>,
    len: usize,
    pool: HostBuffers,
}

impl PendingCopy {
    fn finish(mut self) -> Result<Vec<u32>> {
        self.event.synchronize().map_err(dev)?;
        let buf = self.buf.take().expect("a pending copy holds its buffer");
        // The event completed, so the copy into buf[..len] has landed; the
        // slice's own event is never recorded (event tracking is off), so
        // as_slice does not wait again.
        let v = buf.as_slice().map_err(dev)?[..self.len].to_vec();
        if let Ok(mut pool) = self.pool.lock() {
            pool.push(buf);
        }
        Ok(v)
    }
}

impl Drop for PendingCopy {
    /// Dropped unwaited: the copy may still be writing the buffer, so wait
    /// for it before the buffer can be reused or freed.
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            if self.event.synchronize().is_ok() {
                if let Ok(mut pool) = self.pool.lock() {
                    pool.push(buf);
                }
            } else {
                // The context is broken; leak rather than free memory a copy
                // might still target.
                std::mem::forget(buf);
            }
        }
    }
}

impl CudaBackend {
    /// U32 tensors (sampled tokens) are copied into a page-locked buffer
    /// behind an event; other dtypes are downloaded at once.
    pub(crate) fn download_start_impl(&self, t: &T) -> Result<Download> {
        use qwen_tensor::Backend;
        let CudaStorage::U32(src) = t.storage() else {
            return Ok(Download::ready(self.download(t)?));
        };
        let n = t.numel();
        if n == 0 {
            return Ok(Download::ready(HostVec::U32(Vec::new())));
        }
        let s = &self.dev.stream;
        let reused = self.host_buffers.lock().ok().and_then(|mut pool| {
            pool.iter()
                .position(|b| b.len() >= n)
                .map(|i| pool.swap_remove(i))
        });
        let mut buf = match reused {
            Some(b) => b,
            // SAFETY: the memory is uninitialised; only the copy below writes
            // it and only its first n elements are read, after the copy.
            None => unsafe { self.dev.ctx.alloc_pinned_with_flags::<u32>(n.max(4096), 0) }
                .map_err(dev)?,
        };
        {
            let dst = buf.as_mut_slice().map_err(dev)?;
            s.memcpy_dtoh(&src.slice(0..n), &mut dst[..n])
                .map_err(dev)?;
        }
        let event = s.record_event(None).map_err(dev)?;
        let pending = PendingCopy {
            event,
            buf: Some(buf),
            len: n,
            pool: self.host_buffers.clone(),
        };
        Ok(Download::later(move || Ok(HostVec::U32(pending.finish()?))))
    }
}
