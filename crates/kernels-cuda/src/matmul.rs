//! Launchers for matmul.cu, and the fused norm + projection ops built on it.

use qwen_tensor::{check_norm_projection, check_projection, check_silu_mul, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int, KernelArg};
use crate::{CudaBackend, Scratch};

/// Weight rows per block (one warp each; RING_WARPS in matmul.cu); tokens
/// per warp as in matmul.cu.
const ROWS: u32 = 4;
const TOKEN_TILE: u32 = 4;
/// Warps per block of the fused kernel, the most rows each warp takes, and
/// the number of blocks worth filling the GPU with (two per H100 SM).
const FUSED_WARPS: u32 = 8;
const FUSED_MAX_ROWS_PER_WARP: u32 = 4;
const FUSED_TARGET_BLOCKS: u32 = 264;
/// Shared memory a block may take without opting in to more.
const FUSED_SMEM_MAX: usize = 48 * 1024;

/// Token rows per block of the fused kernels: one row (batch-1 decode)
/// takes the single-token kernels (see `project_exact`).
fn fused_tile(t: usize) -> usize {
    if t == 1 {
        1
    } else {
        TOKEN_TILE as usize
    }
}

/// Dynamic shared memory of a fused kernel's block: the tile of normalised
/// bf16 rows, and with one token the f32 row it is normalised from (placed
/// at the next 16-byte boundary, as matmul.cu expects).
fn fused_smem(t: usize, h: usize) -> usize {
    let tile = fused_tile(t);
    let normed = tile * h * 2;
    if tile == 1 {
        normed.div_ceil(16) * 16 + h * 4
    } else {
        normed
    }
}

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
        // One row (batch-1 decode) takes the kernel with a single token's
        // accumulators: the same sums, fewer registers.
        let single = t - row0 == 1;
        let cfg = grid(
            (
                (n as u32).div_ceil(ROWS),
                ((t - row0) as u32).div_ceil(TOKEN_TILE),
                1,
            ),
            (32, ROWS, 1),
        );
        let f32_x = x.dtype() == DType::F32;
        let mut b = self.launch(self.kernel(match (f32_x, single) {
            (true, false) => "matmul_f32x",
            (true, true) => "matmul_f32x_t1",
            (false, false) => "matmul_bf16",
            (false, true) => "matmul_bf16_t1",
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
        // SAFETY: argument order and types match matmul_{bf16,f32x}{,_t1} in matmul.cu; shapes checked.
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
        if dtype == DType::BF16 && self.fusable(t, h, n) {
            return self.launch_norm_project(
                OP,
                x,
                norm_w,
                eps,
                w,
                f32s_mut(OP, "out", out)?,
                n,
                false,
            );
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

    /// RMSNorm, gate/up projection and SiLU gate: one fused launch when
    /// every row is exact (the projection never leaves the GPU's
    /// registers), else [`norm_project`](Self::norm_project) into `gate_up`
    /// and the silu_mul kernel.
    pub(crate) fn norm_project_silu(
        &self,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        gate_up: &mut T,
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "rms_norm_matmul_silu";
        let (t, h, n) = check_norm_projection(OP, x, norm_w, w, gate_up)?;
        check_silu_mul(OP, gate_up, out)?;
        if self.fusable(t, h, n) {
            return self.launch_norm_project(
                OP,
                x,
                norm_w,
                eps,
                w,
                bf16s_mut(OP, "out", out)?,
                n,
                true,
            );
        }
        self.norm_project(x, norm_w, eps, w, gate_up, DType::BF16)?;
        self.silu_mul_impl(gate_up, out)
    }

    /// Whether a norm + projection of `t` rows of width `h` into `n`
    /// outputs can run as one fused launch: every row exact, and what the
    /// block normalises fits its shared memory.
    fn fusable(&self, t: usize, h: usize, n: usize) -> bool {
        t > 0 && n > 0 && self.tensor_core_rows(t) == 0 && fused_smem(t, h) <= FUSED_SMEM_MAX
    }

    /// The fused kernel of matmul.cu on shapes the caller checked; `out` is
    /// f32 `[T, N]`, or with `silu` bf16 `[T, N/2]`.
    #[allow(clippy::too_many_arguments)]
    fn launch_norm_project(
        &self,
        op: &'static str,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        out: impl KernelArg,
        n: usize,
        silu: bool,
    ) -> Result<()> {
        let (t, h) = (x.shape()[0], x.shape()[1]);
        let tile = fused_tile(t);
        let (ti, ki, ni) = (int(op, t)?, int(op, h)?, int(op, n)?);
        // A warp's unit is one weight row, or with silu a gate/up pair.
        let units = if silu { n / 2 } else { n } as u32;
        // More units per warp amortise the block's norm, fewer keep two
        // blocks per SM busy on narrow projections.
        let per_warp =
            (units / (FUSED_WARPS * FUSED_TARGET_BLOCKS)).clamp(1, FUSED_MAX_ROWS_PER_WARP);
        let mut cfg = grid(
            (
                units.div_ceil(FUSED_WARPS * per_warp),
                (t as u32).div_ceil(tile as u32),
                1,
            ),
            (32, FUSED_WARPS, 1),
        );
        cfg.shared_mem_bytes = fused_smem(t, h) as u32;
        // At one token a warp with two or more rows streams them in pairs
        // (a gate/up unit is always a pair): twice the loads in flight, at
        // a register cost that would crowd the kernel's one-row blocks.
        let name = match (silu, tile == 1) {
            (false, false) => "rms_norm_matmul_bf16",
            (false, true) if per_warp >= 2 => "rms_norm_matmul_bf16_t1_pairs",
            (false, true) => "rms_norm_matmul_bf16_t1",
            (true, false) => "rms_norm_matmul_silu_bf16",
            (true, true) => "rms_norm_matmul_silu_bf16_t1",
        };
        let mut b = self.launch(self.kernel(name));
        b.arg(f32s(op, "x", x)?)
            .arg(f32s(op, "norm_w", norm_w)?)
            .arg(&eps)
            .arg(bf16s(op, "w", w)?)
            .arg(out)
            .arg(&ti)
            .arg(&ki)
            .arg(&ni)
            .arg(&(per_warp as i32));
        // SAFETY: argument order and types match rms_norm_matmul{,_silu}_bf16{,_t1,_t1_pairs}
        // in matmul.cu, out typed by the caller for the variant; the dynamic
        // shared memory is what fused_smem says the kernel uses.
        unsafe { b.launch(cfg) }.map_err(dev)
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
                    let mut b = self.launch(self.kernel("split_hi_lo"));
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
