//! Launcher for numerics.cu: both forms of the shared exp of numerics.cuh
//! over a tensor, each the twin of `qwen_kernels_cpu::numerics::exp`.

use qwen_tensor::Result;

use crate::device::{dev, f32s, f32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

impl CudaBackend {
    /// `out[0][i] = exp(x[i])` by the exp most kernels use (numerics.cuh's
    /// straight-line `q_exp`) and `out[1][i]` by its branching form
    /// (`q_exp_branchy`, the exact decode attention's), both of which must
    /// equal `qwen_kernels_cpu::numerics::exp` bit for bit on every input,
    /// NaN, infinities and the overflow and underflow bounds included. Not
    /// a model op: it lets a test check that promise directly.
    /// x f32 of n elements, out f32 `[2, n]`.
    pub fn numerics_exp(&self, x: &T, out: &mut T) -> Result<()> {
        const OP: &str = "numerics_exp";
        let n = x.shape().iter().product::<usize>();
        if out.shape() != [2, n] {
            return Err(shape_err(
                OP,
                format!(
                    "out {:?} for x of {n} elements: [2, {n}] expected",
                    out.shape()
                ),
            ));
        }
        // The accessors check that both are f32.
        let (xs, os) = (f32s(OP, "x", x)?, f32s_mut(OP, "out", out)?);
        if n == 0 {
            return Ok(());
        }
        let ni = int(OP, n)?;
        let mut b = self.launch(self.kernel("numerics_exp"));
        b.arg(xs).arg(os).arg(&ni);
        // SAFETY: argument order and types match numerics_exp in
        // numerics.cu; x holds n f32 and out 2n (checked above), and the
        // kernel reads x below n and writes out below 2n.
        unsafe { b.launch(grid(((n as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}
