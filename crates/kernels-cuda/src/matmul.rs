//! Launchers for matmul.cu, and the norm + projection ops built on it.

use qwen_tensor::{check_norm_projection, check_projection, check_silu_mul, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int};
use crate::{CudaBackend, Scratch};

/// Weight rows per block (one warp each); tokens per warp as in matmul.cu.
const ROWS: u32 = 4;
const TOKEN_TILE: u32 = 4;
/// The tiled kernel's rows (warps) and tokens a block, and the k of one
/// staged slab: TILE_WARPS, TILE_TOKENS and TILE_SLAB in matmul.cu.
const TILED_ROWS: u32 = 8;
const TILED_TOKENS: u32 = 8;
const TILED_SLAB: usize = 1024;
/// Gate/up weights from which one token takes matmul_silu_t1 (register
/// loads, a gate and an up warp a unit) rather than matmul_silu_ring_t1
/// (a warp a unit, both rows through the ring). Measured on the H100
/// (BENCHMARKS.md): matmul_silu_t1 gains 1.6% on 8B (201 MB of gate/up)
/// over the projection then silu_mul, and the ring kernel loses 0.6% there;
/// on 0.6B (12.6 MB, a step that is a chain of short kernels)
/// matmul_silu_t1 loses 2.3% and the ring kernel gains 1.2-2.2%.
const SILU_KERNEL_MIN_BYTES: usize = 64 << 20;
/// Weights below which one token takes the three-stage ring
/// (matmul_bf16_t1_deep): 0.6B's (4-13 MB) +2% on the H100, 8B's (34 MB
/// and up) -1.6%.
const DEEP_RING_MAX_BYTES: usize = 32 << 20;

/// The exact projection kernel for x of f32 or bf16, one row or several,
/// and row length `k`, with the weight rows (warps) and tokens a block
/// takes. One row (batch-1 decode) takes the kernel with a single token's
/// accumulators: the same sums, fewer registers. Several rows take the
/// tiled kernel where K is whole slabs: x staged once a block.
fn exact_kernel(f32_x: bool, single: bool, k: usize, n: usize) -> (&'static str, u32, u32) {
    match (f32_x, single) {
        (true, false) if k.is_multiple_of(TILED_SLAB) => {
            ("matmul_f32x_tiled", TILED_ROWS, TILED_TOKENS)
        }
        (false, false) if k.is_multiple_of(TILED_SLAB) => {
            ("matmul_bf16_tiled", TILED_ROWS, TILED_TOKENS)
        }
        (true, false) => ("matmul_f32x", ROWS, TOKEN_TILE),
        (true, true) => ("matmul_f32x_t1", ROWS, TOKEN_TILE),
        (false, false) => ("matmul_bf16", ROWS, TOKEN_TILE),
        // The single-token ring kernels take whole 16-byte pieces only.
        (false, true) if !k.is_multiple_of(8) => ("matmul_bf16", ROWS, TOKEN_TILE),
        (false, true) if k * n * 2 < DEEP_RING_MAX_BYTES => {
            ("matmul_bf16_t1_deep", ROWS, TOKEN_TILE)
        }
        (false, true) => ("matmul_bf16_t1", ROWS, TOKEN_TILE),
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
        let (name, rows, tokens) = exact_kernel(x.dtype() == DType::F32, t - row0 == 1, k, n);
        let cfg = grid(
            (
                (n as u32).div_ceil(rows),
                ((t - row0) as u32).div_ceil(tokens),
                1,
            ),
            (32, rows, 1),
        );
        let mut b = self.launch(self.kernel(name));
        if x.dtype() == DType::F32 {
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
        // SAFETY: argument order and types match matmul_{bf16,f32x}{,_t1,_tiled}
        // in matmul.cu; shapes checked; the tiled kernels only get K in whole
        // slabs (every load in bounds and 16-byte aligned in the
        // whole-allocation tensors).
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// RMSNorm into a scratch tensor of `dtype`, then the projection.
    /// (One kernel per step measured faster than a kernel fusing them: the
    /// norm is a block per row, and the projection's first weights are on
    /// the way while it runs.)
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
        let (t, h, _) = check_norm_projection(OP, x, norm_w, w, out)?;
        let slot = if dtype == DType::F32 {
            Scratch::NormF32
        } else {
            Scratch::NormBf16
        };
        self.with_scratch(slot, &[t, h], dtype, |normed| {
            self.rms_norm_impl(x, norm_w, eps, normed)?;
            self.project(OP, normed, w, out, false)
        })
    }

    /// RMSNorm, gate/up projection and SiLU gate. One exact token takes
    /// matmul_silu_t1 (large gate/up weights) or matmul_silu_ring_t1, which
    /// never write the f32 pair; otherwise the projection goes through
    /// `gate_up` and the silu_mul kernel.
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
        if t > 0
            && self.tensor_core_rows(t) == t
            && w.dtype() == DType::BF16
            && self.wg_fused_applies(h, n)
        {
            // Every row on the tensor cores: the GEMM applies the gate itself
            // where it can (gemm_wgmma.cu), and gate_up is left untouched.
            let done = self.with_scratch(Scratch::NormBf16, &[t, h], DType::BF16, |normed| {
                self.rms_norm_impl(x, norm_w, eps, normed)?;
                let (xs, ws) = (bf16s(OP, "normed", normed)?, bf16s(OP, "w", w)?);
                self.gemm_tc_silu(OP, xs, ws, bf16s_mut(OP, "out", out)?, t, h, n / 2)
            })?;
            if done {
                return Ok(());
            }
        }
        // The one-token kernel and the units a block covers: two
        // (matmul_silu_t1) or four (the ring's warps; rows a multiple of 8).
        let fused = match (n * h * 2 >= SILU_KERNEL_MIN_BYTES, h.is_multiple_of(8)) {
            (true, _) => Some(("matmul_silu_t1", 2)),
            (false, true) => Some(("matmul_silu_ring_t1", 4)),
            (false, false) => None,
        };
        let Some((name, units)) = fused.filter(|_| t == 1 && self.tensor_core_rows(t) == 0) else {
            self.norm_project(x, norm_w, eps, w, gate_up, DType::BF16)?;
            return self.silu_mul_impl(gate_up, out);
        };
        let i = n / 2;
        let (ki, ii) = (int(OP, h)?, int(OP, i)?);
        self.with_scratch(Scratch::NormBf16, &[t, h], DType::BF16, |normed| {
            self.rms_norm_impl(x, norm_w, eps, normed)?;
            let mut b = self.launch(self.kernel(name));
            b.arg(bf16s(OP, "normed", normed)?)
                .arg(bf16s(OP, "w", w)?)
                .arg(bf16s_mut(OP, "out", out)?)
                .arg(&ki)
                .arg(&ii);
            let cfg = grid(((i as u32).div_ceil(units), 1, 1), (32, 4, 1));
            // SAFETY: argument order and types match matmul_silu_t1 and
            // matmul_silu_ring_t1 in matmul.cu; normed is [1, h], w [2i, h],
            // out [1, i]; a block covers `units` units; the ring kernel gets
            // h a multiple of 8.
            unsafe { b.launch(cfg) }.map_err(dev)
        })
    }

    /// The logits op with prompt rows on the tensor cores: the f32
    /// normalised input of those rows is split as hi + lo in bf16 and
    /// projected accumulating in f32 (one kernel and one accumulator, hi's
    /// and lo's 16 k in turn, where gemm_wg_hilo applies; else two GEMMs,
    /// the second adding to the first), which keeps the input's precision
    /// to about 2⁻¹⁷; the other rows take the exact kernel.
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
                    let (his, los) = (bf16s(OP, "hi", hi)?, bf16s(OP, "lo", lo)?);
                    let o = f32s_mut(OP, "out", out)?;
                    if self.gemm_tc_hilo(OP, his, los, ws, o, tc, h, n)? {
                        return Ok(());
                    }
                    self.gemm_tc(OP, his, ws, o, tc, h, n, false)?;
                    self.gemm_tc(OP, los, ws, o, tc, h, n, true)
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::exact_kernel;

    #[test]
    fn each_shape_takes_its_exact_kernel() {
        // (f32 x, one token, k, n) and the kernel with its rows and tokens a block.
        let cases = [
            ((false, false, 3072, 1024), ("matmul_bf16_tiled", 8, 8)),
            ((true, false, 1024, 4096), ("matmul_f32x_tiled", 8, 8)),
            ((false, false, 1000, 9), ("matmul_bf16", 4, 4)),
            ((true, false, 37, 9), ("matmul_f32x", 4, 4)),
            ((false, true, 1024, 4096), ("matmul_bf16_t1_deep", 4, 4)),
            ((false, true, 4096, 4096), ("matmul_bf16_t1", 4, 4)),
            ((false, true, 37, 9), ("matmul_bf16", 4, 4)),
            ((false, true, 4100, 4096), ("matmul_bf16", 4, 4)),
            ((true, true, 4096, 151_936), ("matmul_f32x_t1", 4, 4)),
        ];
        for ((f32_x, single, k, n), want) in cases {
            assert_eq!(
                exact_kernel(f32_x, single, k, n),
                want,
                "{f32_x} {single} {k} {n}"
            );
        }
    }
}
