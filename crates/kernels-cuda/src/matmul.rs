//! Launchers for matmul.cu, and the fused norm + projection ops built on it.

use cudarc::driver::PushKernelArg;
use qwen_tensor::{expect_2d, expect_shape, Backend, DType, Result};

use crate::device::{bf16s, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

/// Weight rows per block (one warp each); tokens per warp as in matmul.cu.
const ROWS: u32 = 4;
const TOKEN_TILE: u32 = 4;

impl CudaBackend {
    /// `out (+)= x · wᵀ`; x bf16 or f32 `[T, K]`, w bf16 `[N, K]`.
    pub(crate) fn project(
        &self,
        op: &'static str,
        x: &T,
        w: &T,
        out: &mut T,
        add: bool,
    ) -> Result<()> {
        let (t, k) = expect_2d(op, "x", x)?;
        let (n, kw) = expect_2d(op, "w", w)?;
        if k != kw {
            return Err(shape_err(op, format!("x has {k} columns but w has {kw}")));
        }
        expect_shape(op, "out", out, &[t, n])?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        let (ti, ki, ni, addi) = (int(op, t)?, int(op, k)?, int(op, n)?, add as i32);
        let cfg = grid(
            (
                (n as u32).div_ceil(ROWS),
                (t as u32).div_ceil(TOKEN_TILE),
                1,
            ),
            (32, ROWS, 1),
        );
        let f32_x = x.dtype() == DType::F32;
        let mut b = self.dev.stream.launch_builder(self.kernel(if f32_x {
            "matmul_f32x"
        } else {
            "matmul_bf16"
        }));
        if f32_x {
            b.arg(f32s(op, "x", x)?);
        } else {
            b.arg(bf16s(op, "x", x)?);
        }
        b.arg(bf16s(op, "w", w)?)
            .arg(f32s_mut(op, "out", out)?)
            .arg(&ti)
            .arg(&ki)
            .arg(&ni)
            .arg(&addi);
        // SAFETY: argument order and types match matmul_{bf16,f32x} in matmul.cu; shapes checked.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// Norm into a scratch tensor of `dtype`, then project.
    pub(crate) fn norm_project(
        &self,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        out: &mut T,
        dtype: DType,
    ) -> Result<()> {
        let (t, h) = expect_2d("rms_norm_matmul", "x", x)?;
        let mut normed = self.zeros(&[t, h], dtype)?;
        self.rms_norm_impl(x, norm_w, eps, &mut normed)?;
        self.project("rms_norm_matmul", &normed, w, out, false)
    }
}
