//! Launcher for activation.cu.

use cudarc::driver::PushKernelArg;
use qwen_tensor::{expect_2d, expect_shape, Result};

use crate::device::{bf16s_mut, dev, f32s, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

impl CudaBackend {
    pub(crate) fn silu_mul_impl(&self, gate_up: &T, out: &mut T) -> Result<()> {
        const OP: &str = "silu_mul";
        let (t, two_i) = expect_2d(OP, "gate_up", gate_up)?;
        if two_i % 2 != 0 {
            return Err(shape_err(OP, format!("gate_up width {two_i} is odd")));
        }
        let i = two_i / 2;
        expect_shape(OP, "out", out, &[t, i])?;
        let n = t * i;
        if n == 0 {
            return Ok(());
        }
        let (ti, ii) = (int(OP, t)?, int(OP, i)?);
        let mut b = self.dev.stream.launch_builder(self.kernel("silu_mul"));
        b.arg(f32s(OP, "gate_up", gate_up)?)
            .arg(bf16s_mut(OP, "out", out)?)
            .arg(&ti)
            .arg(&ii);
        // SAFETY: argument order and types match silu_mul in activation.cu.
        unsafe { b.launch(grid(((n as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}
