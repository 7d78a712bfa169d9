//! Launcher for numerics.cu: the shared exp of numerics.cuh over a tensor,
//! the twin of `qwen_kernels_cpu::numerics::exp`.

use qwen_tensor::{DType, Result};

use crate::device::{dev, f32s, f32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

impl CudaBackend {
    /// `out[i] = exp(x[i])` with the exp every kernel uses (numerics.cuh),
    /// which must equal `qwen_kernels_cpu::numerics::exp` bit for bit on
    /// every input, NaN, infinities and the overflow and underflow bounds
    /// included. Not a model op: it lets a test check that promise directly.
    /// x and out f32 of the same number of elements.
    pub fn numerics_exp(&self, x: &T, out: &mut T) -> Result<()> {
        const OP: &str = "numerics_exp";
        let n = x.shape().iter().product::<usize>();
        if x.dtype() != DType::F32
            || out.dtype() != DType::F32
            || out.shape().iter().product::<usize>() != n
        {
            return Err(shape_err(
                OP,
                format!(
                    "x {:?} {:?} and out {:?} {:?}: f32 of one size expected",
                    x.shape(),
                    x.dtype(),
                    out.shape(),
                    out.dtype()
                ),
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let ni = int(OP, n)?;
        let mut b = self.launch(self.kernel("numerics_exp"));
        b.arg(f32s(OP, "x", x)?)
            .arg(f32s_mut(OP, "out", out)?)
            .arg(&ni);
        // SAFETY: argument order and types match numerics_exp in
        // numerics.cu; both buffers hold n f32 (checked above) and the
        // kernel touches only indices below n.
        unsafe { b.launch(grid(((n as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}
