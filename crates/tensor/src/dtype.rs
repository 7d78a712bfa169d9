//! Element types and host-side buffers that carry them.

use half::{bf16, f16};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    /// Token ids, positions, cache slots and block tables.
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

/// Borrowed host data to upload.
#[derive(Debug, Clone, Copy)]
pub enum HostSlice<'a> {
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    F32(&'a [f32]),
    U32(&'a [u32]),
}

/// Owned host data, as downloaded from a device.
#[derive(Debug, Clone, PartialEq)]
pub enum HostVec {
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    U32(Vec<u32>),
}

impl HostSlice<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::BF16(_) => DType::BF16,
            HostSlice::F16(_) => DType::F16,
            HostSlice::F32(_) => DType::F32,
            HostSlice::U32(_) => DType::U32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostSlice::BF16(s) => s.len(),
            HostSlice::F16(s) => s.len(),
            HostSlice::F32(s) => s.len(),
            HostSlice::U32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl HostVec {
    pub fn dtype(&self) -> DType {
        match self {
            HostVec::BF16(_) => DType::BF16,
            HostVec::F16(_) => DType::F16,
            HostVec::F32(_) => DType::F32,
            HostVec::U32(_) => DType::U32,
        }
    }
    /// Every element widened to f32 (ids converted as numbers).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostVec::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostVec::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostVec::F32(v) => v.clone(),
            HostVec::U32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
    /// Raw bit patterns, for bitwise comparisons between backends.
    pub fn to_bits(&self) -> Vec<u32> {
        match self {
            HostVec::BF16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            HostVec::F16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            HostVec::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
            HostVec::U32(v) => v.clone(),
        }
    }
    pub fn as_slice(&self) -> HostSlice<'_> {
        match self {
            HostVec::BF16(v) => HostSlice::BF16(v),
            HostVec::F16(v) => HostSlice::F16(v),
            HostVec::F32(v) => HostSlice::F32(v),
            HostVec::U32(v) => HostSlice::U32(v),
        }
    }
}
