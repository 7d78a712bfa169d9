//! The device-agnostic tensor handle: a backend buffer plus shape and dtype.

use crate::{Backend, DType, Error, Result};

/// A dense, row-major tensor living on backend `B`.
///
/// The handle owns its buffer; ops read tensors by reference and write into
/// tensors the caller allocated, so a forward pass allocates nothing per step.
pub struct Tensor<B: Backend> {
    storage: B::Storage,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B: Backend> Tensor<B> {
    /// Wraps a backend buffer. Backends call this; users go through
    /// [`Backend::zeros`] and [`Backend::upload`].
    pub fn from_parts(storage: B::Storage, shape: Vec<usize>, dtype: DType) -> Self {
        Tensor {
            storage,
            shape,
            dtype,
        }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }
    pub fn storage_mut(&mut self) -> &mut B::Storage {
        &mut self.storage
    }
    /// Size of dimension `i`; panics only on a programming error (bad `i`).
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }
    /// Reinterprets the shape; the element count must not change.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::Shape {
                op: "reshape",
                msg: format!("cannot view {:?} as {:?}", self.shape, shape),
            });
        }
        Ok(Tensor {
            storage: self.storage,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }
}

impl<B: Backend> Clone for Tensor<B> {
    /// A copy of the data on the same device.
    fn clone(&self) -> Self {
        Tensor {
            storage: self.storage.clone(),
            shape: self.shape.clone(),
            dtype: self.dtype,
        }
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor<{}>({:?}, {:?})",
            std::any::type_name::<B>(),
            self.shape,
            self.dtype
        )
    }
}

/// Checks that `t` has dtype `want`.
pub fn expect_dtype<B: Backend>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<B>,
    want: DType,
) -> Result<()> {
    if t.dtype() != want {
        return Err(Error::DType {
            op,
            arg,
            expected: want,
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Checks that `t` has exactly `shape`.
pub fn expect_shape<B: Backend>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<B>,
    shape: &[usize],
) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::Shape {
            op,
            msg: format!("{arg} has shape {:?}, expected {:?}", t.shape(), shape),
        });
    }
    Ok(())
}

/// Checks that `t` is 2-D and returns (rows, cols).
pub fn expect_2d<B: Backend>(
    op: &'static str,
    arg: &'static str,
    t: &Tensor<B>,
) -> Result<(usize, usize)> {
    match *t.shape() {
        [r, c] => Ok((r, c)),
        _ => Err(Error::Shape {
            op,
            msg: format!("{arg} must be 2-D, got {:?}", t.shape()),
        }),
    }
}
