//! Launcher for activation.cu.

use qwen_tensor::{check_silu_mul, Result};

use crate::device::{bf16s_mut, dev, f32s, T};
use crate::launch::{grid, int};
use crate::CudaBackend;

impl CudaBackend {
    pub(crate) fn silu_mul_impl(&self, gate_up: &T, out: &mut T) -> Result<()> {
        const OP: &str = "silu_mul";
        let (t, i) = check_silu_mul(OP, gate_up, out)?;
        let n = t * i;
        if n == 0 {
            return Ok(());
        }
        let (ti, ii) = (int(OP, t)?, int(OP, i)?);
        let mut b = self.launch(self.kernel("silu_mul"));
        b.arg(f32s(OP, "gate_up", gate_up)?)
            .arg(bf16s_mut(OP, "out", out)?)
            .arg(&ti)
            .arg(&ii);
        // SAFETY: argument order and types match silu_mul in activation.cu.
        unsafe { b.launch(grid(((n as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}
