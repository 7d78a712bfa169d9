//! The one error type every backend and op returns.

use crate::DType;

/// Errors raised by tensors and backend ops.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op got a tensor of the wrong shape.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// An op got a tensor of the wrong dtype.
    #[error("{op}: expected {expected:?} for {arg}, got {got:?}")]
    DType {
        op: &'static str,
        arg: &'static str,
        expected: DType,
        got: DType,
    },
    /// The device could not allocate memory.
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    /// A device runtime failure (driver, compiler, library).
    #[error("device error: {0}")]
    Device(String),
    /// Something the backend does not implement or the build does not include.
    #[error("{0}")]
    Unsupported(String),
}

/// Result alias used across the workspace's tensor layer.
pub type Result<T> = std::result::Result<T, Error>;
