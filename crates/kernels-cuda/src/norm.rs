//! Launchers for norm.cu.

use qwen_tensor::{expect_2d, expect_shape, DType, Result};

use crate::device::{bf16s_mut, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int};
use crate::CudaBackend;

/// Rows per block (one warp each).
const ROWS: u32 = 4;

impl CudaBackend {
    /// RMSNorm into `out`, bf16 (rounded once) or f32 (not rounded).
    pub(crate) fn rms_norm_impl(&self, x: &T, w: &T, eps: f32, out: &mut T) -> Result<()> {
        const OP: &str = "rms_norm";
        let (t, h) = expect_2d(OP, "x", x)?;
        expect_shape(OP, "w", w, &[h])?;
        expect_shape(OP, "out", out, &[t, h])?;
        let (ti, hi) = (int(OP, t)?, int(OP, h)?);
        let cfg = grid(((t as u32).div_ceil(ROWS), 1, 1), (32, ROWS, 1));
        let f32_out = out.dtype() == DType::F32;
        let name = if f32_out {
            "rms_norm_f32"
        } else {
            "rms_norm_bf16"
        };
        let mut b = self.launch(self.kernel(name));
        b.arg(f32s(OP, "x", x)?).arg(f32s(OP, "w", w)?).arg(&eps);
        if f32_out {
            b.arg(f32s_mut(OP, "out", out)?);
        } else {
            b.arg(bf16s_mut(OP, "out", out)?);
        }
        b.arg(&ti).arg(&hi);
        // SAFETY: argument order and types match rms_norm_{bf16,f32} in norm.cu.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }
}
