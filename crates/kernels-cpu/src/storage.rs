//! Host memory behind a CPU tensor, its allocation, and typed access to it.

use half::{bf16, f16};
use qwen_tensor::{DType, Error, Result, Tensor};

use crate::CpuBackend;

/// A CPU tensor's buffer: one typed vector.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    U32(Vec<u32>),
}

pub(crate) type T = Tensor<CpuBackend>;

fn wrong(op: &'static str, arg: &'static str, want: DType, t: &T) -> Error {
    Error::DType {
        op,
        arg,
        expected: want,
        got: t.dtype(),
    }
}

pub(crate) fn f32s<'a>(op: &'static str, arg: &'static str, t: &'a T) -> Result<&'a [f32]> {
    match t.storage() {
        CpuStorage::F32(v) => Ok(v),
        _ => Err(wrong(op, arg, DType::F32, t)),
    }
}

pub(crate) fn f32s_mut<'a>(
    op: &'static str,
    arg: &'static str,
    t: &'a mut T,
) -> Result<&'a mut [f32]> {
    let e = wrong(op, arg, DType::F32, t);
    match t.storage_mut() {
        CpuStorage::F32(v) => Ok(v),
        _ => Err(e),
    }
}

pub(crate) fn bf16s<'a>(op: &'static str, arg: &'static str, t: &'a T) -> Result<&'a [bf16]> {
    match t.storage() {
        CpuStorage::BF16(v) => Ok(v),
        _ => Err(wrong(op, arg, DType::BF16, t)),
    }
}

pub(crate) fn bf16s_mut<'a>(
    op: &'static str,
    arg: &'static str,
    t: &'a mut T,
) -> Result<&'a mut [bf16]> {
    let e = wrong(op, arg, DType::BF16, t);
    match t.storage_mut() {
        CpuStorage::BF16(v) => Ok(v),
        _ => Err(e),
    }
}

pub(crate) fn u32s<'a>(op: &'static str, arg: &'static str, t: &'a T) -> Result<&'a [u32]> {
    match t.storage() {
        CpuStorage::U32(v) => Ok(v),
        _ => Err(wrong(op, arg, DType::U32, t)),
    }
}

pub(crate) fn u32s_mut<'a>(
    op: &'static str,
    arg: &'static str,
    t: &'a mut T,
) -> Result<&'a mut [u32]> {
    let e = wrong(op, arg, DType::U32, t);
    match t.storage_mut() {
        CpuStorage::U32(v) => Ok(v),
        _ => Err(e),
    }
}

pub(crate) fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

/// An empty vector with room for `n` values, whose memory the kernel is
/// asked to back with 2 MB pages before anything touches it (Linux,
/// buffers of 4 MB or more: weights and the KV cache). A decode step
/// streams every weight once; with 4 KB pages every other 2 KB weight row
/// starts a new page and takes a TLB miss (0.6B CPU decode about +5% with
/// them; BENCHMARKS.md).
fn huge_page_alloc<V>(n: usize) -> Vec<V> {
    let mut v: Vec<V> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n * std::mem::size_of::<V>();
        if bytes >= 2 * HUGE {
            let base = v.as_mut_ptr() as usize;
            let (start, end) = (base.next_multiple_of(HUGE), (base + bytes) / HUGE * HUGE);
            if end > start {
                // SAFETY: [start, end) lies inside v's allocation; the advice
                // only changes how the kernel backs those pages, not their
                // contents (untouched so far). Failure leaves 4 KB pages.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
                };
            }
        }
    }
    v
}

/// `s` copied into [`huge_page_alloc`]'s memory.
pub(crate) fn huge_page_copy<V: Copy>(s: &[V]) -> Vec<V> {
    let mut v = huge_page_alloc(s.len());
    v.extend_from_slice(s);
    v
}

/// `n` copies of `fill` in [`huge_page_alloc`]'s memory.
pub(crate) fn huge_page_fill<V: Copy>(n: usize, fill: V) -> Vec<V> {
    let mut v = huge_page_alloc(n);
    v.resize(n, fill);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_buffers_hold_what_they_were_given() {
        // Past the 4 MB threshold, with a length that ends mid-page.
        let n = (5 << 20) + 3;
        let src: Vec<u32> = (0..n as u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        assert_eq!(huge_page_copy(&src), src);
        let z = huge_page_fill(n, 7u32);
        assert!(z.len() == n && z.iter().all(|&v| v == 7));
        // Below it, and empty.
        assert_eq!(huge_page_copy(&src[..10]), src[..10]);
        assert!(huge_page_fill::<f32>(0, 1.0).is_empty());
    }
}
