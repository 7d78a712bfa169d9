//! Downloads waited for later (`Backend::download_start`): overlapped
//! scheduling queues step k + 1 before it reads step k's sampled tokens, so
//! their copy lands in page-locked memory behind an event instead of
//! synchronising the stream. And a few small writes merged into one launch
//! (`Backend::write_many`, transfer.cu).

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, PinnedHostSlice};
use qwen_tensor::{Backend, DType, Download, HostSlice, HostVec, Result};

use crate::device::{dev, u32s, u32s_mut, CudaStorage, T};
use crate::launch::{grid, int};
use crate::CudaBackend;

/// Tensors and words `set_words` takes (its parameters).
const WORDS_DSTS: usize = 4;
const WORDS_MAX: usize = 16;

/// Page-locked buffers kept for reuse: allocating and freeing them costs
/// more than a step's copy.
pub(crate) type HostBuffers = Arc<Mutex<Vec<HostBuffer>>>;

/// A page-locked buffer mapped into the device's address space, and the
/// device's address of it (None where the driver would not map it: then
/// the copy engine fills it).
pub(crate) struct HostBuffer {
    buf: PinnedHostSlice<u32>,
    device_ptr: Option<u64>,
}

/// A copy into `buf` in flight until `event` completes.
struct PendingCopy {
    event: CudaEvent,
    buf: Option<HostBuffer>,
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
        let v = buf.buf.as_slice().map_err(dev)?[..self.len].to_vec();
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
    /// behind an event, by a `download_u32` launch where the buffer is
    /// mapped into the device's address space, else by the copy engine;
    /// other dtypes are downloaded at once.
    pub(crate) fn download_start_impl(&self, t: &T) -> Result<Download> {
        const OP: &str = "download_start";
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
                .position(|b| b.buf.len() >= n)
                .map(|i| pool.swap_remove(i))
        });
        let mut host = match reused {
            Some(b) => b,
            None => self.mapped_host_buffer(n.max(4096))?,
        };
        match host.device_ptr {
            Some(ptr) => {
                let ni = int(OP, n)?;
                let mut b = self.launch(self.kernel("download_u32"));
                b.arg(u32s(OP, "src", t)?).arg(&ptr).arg(&ni);
                let blocks = n.div_ceil(256).min(64) as u32;
                // SAFETY: argument order and types match `download_u32` in
                // transfer.cu; `ptr` is the device's address of the mapped
                // buffer, which holds at least n words and stays allocated
                // (in the pending copy or the pool) until the event below
                // has completed.
                unsafe { b.launch(grid((blocks, 1, 1), (256, 1, 1))) }.map_err(dev)?;
            }
            None => {
                let dst = host.buf.as_mut_slice().map_err(dev)?;
                s.memcpy_dtoh(&src.slice(0..n), &mut dst[..n])
                    .map_err(dev)?;
            }
        }
        let event = s.record_event(None).map_err(dev)?;
        let pending = PendingCopy {
            event,
            buf: Some(host),
            len: n,
            pool: self.host_buffers.clone(),
        };
        Ok(Download::later(move || Ok(HostVec::U32(pending.finish()?))))
    }

    /// A page-locked buffer of `len` words, mapped for the device where
    /// the driver allows it.
    fn mapped_host_buffer(&self, len: usize) -> Result<HostBuffer> {
        use cudarc::driver::sys;
        let ctx = &self.dev.ctx;
        // SAFETY: the memory is uninitialised; only a download writes it and
        // only the words it wrote are read, after its event.
        let mapped =
            unsafe { ctx.alloc_pinned_with_flags::<u32>(len, sys::CU_MEMHOSTALLOC_DEVICEMAP) };
        let mut buf = match mapped {
            Ok(b) => b,
            // Not mappable here: a plain page-locked buffer, which the copy
            // engine fills.
            Err(_) => {
                // SAFETY: as for the mapped buffer above.
                let buf = unsafe { ctx.alloc_pinned_with_flags::<u32>(len, 0) }.map_err(dev)?;
                return Ok(HostBuffer {
                    buf,
                    device_ptr: None,
                });
            }
        };
        let host_ptr = buf.as_mut_ptr().map_err(dev)?;
        let mut device_ptr: sys::CUdeviceptr = 0;
        // SAFETY: host_ptr is the start of a live allocation made with
        // CU_MEMHOSTALLOC_DEVICEMAP in this context (bound to this thread by
        // the allocation); the driver only writes device_ptr.
        let mapped =
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, host_ptr.cast(), 0) };
        let device_ptr =
            (mapped == sys::CUresult::CUDA_SUCCESS && device_ptr != 0).then_some(device_ptr);
        Ok(HostBuffer { buf, device_ptr })
    }

    /// `Backend::write_many`: up to WORDS_DSTS u32 tensors of at most
    /// WORDS_MAX words in all in one `set_words` launch, anything else one
    /// `write` at a time (which also checks every shape).
    pub(crate) fn write_many_impl(&self, writes: &mut [(&mut T, HostSlice<'_>)]) -> Result<()> {
        const OP: &str = "write_many";
        let mut words = [0u64; WORDS_MAX / 2];
        let mut total = 0;
        let few = writes.len() <= WORDS_DSTS
            && writes.iter().all(|(d, v)| {
                let ok = matches!(v, HostSlice::U32(_))
                    && d.dtype() == DType::U32
                    && d.numel() == v.len();
                total += v.len();
                ok
            })
            && total <= WORDS_MAX;
        if !few {
            for (dst, data) in writes.iter_mut() {
                self.write(dst, *data)?;
            }
            return Ok(());
        }
        if total == 0 {
            return Ok(());
        }
        let mut j = 0;
        for (_, data) in writes.iter() {
            if let HostSlice::U32(v) = data {
                for &x in v.iter() {
                    words[j / 2] |= (x as u64) << (32 * (j % 2));
                    j += 1;
                }
            }
        }
        let mut b = self.launch(self.kernel("set_words"));
        let none = 0u64;
        let mut counts = [0i32; WORDS_DSTS];
        for (i, n) in counts.iter_mut().enumerate() {
            match writes.get_mut(i) {
                Some((dst, data)) => {
                    *n = data.len() as i32;
                    b.arg(u32s_mut(OP, "dst", dst)?)
                }
                None => b.arg(&none),
            };
        }
        for n in &counts {
            b.arg(n);
        }
        for w in &words {
            b.arg(w);
        }
        // SAFETY: argument order and types match `set_words` in
        // transfer.cu: four u32 pointers (null past the writes, with a
        // count of zero), four counts, eight words; each count is its
        // tensor's length (checked above), at most WORDS_MAX in all, and the
        // block's WORDS_MAX threads cover them.
        unsafe { b.launch(grid((1, 1, 1), (WORDS_MAX as u32, 1, 1))) }.map_err(dev)
    }
}
