//! Host memory behind a CPU tensor, and typed access to it.

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
