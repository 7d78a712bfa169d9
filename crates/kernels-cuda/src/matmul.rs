//! Launchers for matmul.cu, and the fused norm + projection ops built on it.

use cudarc::driver::PushKernelArg;
use qwen_tensor::{check_norm_projection, check_projection, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int};
use crate::{CudaBackend, Scratch};

/// Weight rows per block (one warp each); tokens per warp as in matmul.cu.
const ROWS: u32 = 4;
const TOKEN_TILE: u32 = 4;
/// Warps per block of the fused kernel, the most rows each warp takes, and
/// the number of blocks worth filling the GPU with (two per H100 SM).
const FUSED_WARPS: u32 = 8;
const FUSED_MAX_ROWS_PER_WARP: u32 = 4;
const FUSED_TARGET_BLOCKS: u32 = 264;
/// Shared memory a block may take without opting in to more.
const FUSED_SMEM_MAX: usize = 48 * 1024;

impl CudaBackend {
    /// `out (+)= x · wᵀ`; x bf16 or f32 `[T, K]`, w bf16 `[N, K]`. The
    /// leading [`tensor_core_rows`](Self::tensor_core_rows) rows of a bf16
    /// `x` run on the tensor cores, the rest on the exact kernel.
    pub(crate) fn project(
        &self,
        op: &'static str,
        x: &T,
        w: &T,
        out: &mut T,
        add: bool,
    ) -> Result<()> {
        let (t, k, n) = check_projection(op, x, w, out)?;
        if t == 0 || n == 0 {
            return Ok(());
        }
        let mut row0 = 0;
        if x.dtype() == DType::BF16 {
            row0 = self.tensor_core_rows(t);
            let (xs, ws) = (bf16s(op, "x", x)?, bf16s(op, "w", w)?);
            self.gemm_tc(op, xs, ws, f32s_mut(op, "out", out)?, row0, k, n, add)?;
        }
        self.project_exact(op, x, w, out, row0, add)
    }

    /// The exact kernel on rows `row0..` of a projection checked by the caller.
    fn project_exact(
        &self,
        op: &'static str,
        x: &T,
        w: &T,
        out: &mut T,
        row0: usize,
        add: bool,
    ) -> Result<()> {
        let (t, k, n) = check_projection(op, x, w, out)?;
        if row0 >= t || n == 0 {
            return Ok(());
        }
        let (r0, ti, ki, ni, addi) = (
            int(op, row0)?,
            int(op, t)?,
            int(op, k)?,
            int(op, n)?,
            add as i32,
        );
        let cfg = grid(
            (
                (n as u32).div_ceil(ROWS),
                ((t - row0) as u32).div_ceil(TOKEN_TILE),
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
            .arg(&r0)
            .arg(&ti)
            .arg(&ki)
            .arg(&ni)
            .arg(&addi);
        // SAFETY: argument order and types match matmul_{bf16,f32x} in matmul.cu; shapes checked.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// RMSNorm then projection: one fused launch for bf16 activations when
    /// every row is exact, else the norm into a scratch tensor of `dtype`
    /// and a projection (prompt rows on tensor cores, the f32 logits input,
    /// very wide rows). Both give the exact rows the same bits.
    pub(crate) fn norm_project(
        &self,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        out: &mut T,
        dtype: DType,
    ) -> Result<()> {
        const OP: &str = "rms_norm_matmul";
        let (t, h, n) = check_norm_projection(OP, x, norm_w, w, out)?;
        let smem = TOKEN_TILE as usize * h * 2;
        let fused = dtype == DType::BF16 && self.tensor_core_rows(t) == 0 && smem <= FUSED_SMEM_MAX;
        if fused && t > 0 && n > 0 {
            let (ti, ki, ni) = (int(OP, t)?, int(OP, h)?, int(OP, n)?);
            // More rows per warp amortise the block's norm, fewer keep two
            // blocks per SM busy on narrow projections.
            let rows_per_warp =
                (n as u32 / (FUSED_WARPS * FUSED_TARGET_BLOCKS)).clamp(1, FUSED_MAX_ROWS_PER_WARP);
            let rows_per_block = FUSED_WARPS * rows_per_warp;
            let rpw = rows_per_warp as i32;
            let mut cfg = grid(
                (
                    (n as u32).div_ceil(rows_per_block),
                    (t as u32).div_ceil(TOKEN_TILE),
                    1,
                ),
                (32, FUSED_WARPS, 1),
            );
            cfg.shared_mem_bytes = smem as u32;
            let mut b = self
                .dev
                .stream
                .launch_builder(self.kernel("rms_norm_matmul_bf16"));
            b.arg(f32s(OP, "x", x)?)
                .arg(f32s(OP, "norm_w", norm_w)?)
                .arg(&eps)
                .arg(bf16s(OP, "w", w)?)
                .arg(f32s_mut(OP, "out", out)?)
                .arg(&ti)
                .arg(&ki)
                .arg(&ni)
                .arg(&rpw);
            // SAFETY: argument order and types match rms_norm_matmul_bf16 in
            // matmul.cu; its dynamic shared memory holds TOKEN_TILE rows of K bf16.
            unsafe { b.launch(cfg) }.map_err(dev)?;
            return Ok(());
        }
        let slot = if dtype == DType::F32 {
            Scratch::NormF32
        } else {
            Scratch::NormBf16
        };
        self.with_scratch(slot, &[t, h], dtype, |normed| {
            self.rms_norm_impl(x, norm_w, eps, normed)?;
            self.project("rms_norm_matmul", normed, w, out, false)
        })
    }

    /// The logits op with prompt rows on the tensor cores: the f32
    /// normalised input of those rows is split as hi + lo in bf16 and
    /// projected twice, accumulating in f32, which keeps the input's
    /// precision to about 2⁻¹⁷; the other rows take the exact kernel.
    pub(crate) fn logits_tensor_cores(
        &self,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "logits";
        let (t, h, n) = check_norm_projection(OP, x, norm_w, w, out)?;
        let tc = self.tensor_core_rows(t);
        let len = tc * h;
        let li = int(OP, len)?;
        self.with_scratch(Scratch::NormF32, &[t, h], DType::F32, |normed| {
            self.rms_norm_impl(x, norm_w, eps, normed)?;
            self.project_exact(OP, normed, w, out, tc, false)?;
            self.with_scratch(Scratch::SplitHi, &[tc, h], DType::BF16, |hi| {
                self.with_scratch(Scratch::SplitLo, &[tc, h], DType::BF16, |lo| {
                    let mut b = self.dev.stream.launch_builder(self.kernel("split_hi_lo"));
                    b.arg(f32s(OP, "normed", normed)?)
                        .arg(bf16s_mut(OP, "hi", hi)?)
                        .arg(bf16s_mut(OP, "lo", lo)?)
                        .arg(&li);
                    // SAFETY: argument order and types match split_hi_lo in matmul.cu;
                    // normed holds t·h ≥ tc·h elements, hi and lo tc·h.
                    unsafe { b.launch(grid(((len as u32).div_ceil(256), 1, 1), (256, 1, 1))) }
                        .map_err(dev)?;
                    let ws = bf16s(OP, "w", w)?;
                    let o = f32s_mut(OP, "out", out)?;
                    self.gemm_tc(OP, bf16s(OP, "hi", hi)?, ws, o, tc, h, n, false)?;
                    self.gemm_tc(OP, bf16s(OP, "lo", lo)?, ws, o, tc, h, n, true)
                })
            })
        })
    }
}
