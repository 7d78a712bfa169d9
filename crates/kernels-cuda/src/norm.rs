//! Launchers for norm.cu.

use cudarc::driver::CudaSlice;
use qwen_tensor::{expect_2d, expect_shape, DType, Result};

use crate::device::{bf16s_mut, dev, f32s, f32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

/// Threads per block; a block normalises one row.
const THREADS: u32 = 256;
/// Rows of at most this many elements (and a multiple of 256) take the
/// warp-per-row kernel (WARP_ROW_CHUNKS · 256 in norm.cu), four rows a block.
const WARP_ROW_MAX: usize = 1024;
const WARP_ROWS: u32 = 4;

impl CudaBackend {
    /// RMSNorm into `out`, bf16 (rounded once) or f32 (not rounded).
    pub(crate) fn rms_norm_impl(&self, x: &T, w: &T, eps: f32, out: &mut T) -> Result<()> {
        const OP: &str = "rms_norm";
        let (t, h) = expect_2d(OP, "x", x)?;
        expect_shape(OP, "w", w, &[h])?;
        expect_shape(OP, "out", out, &[t, h])?;
        if t == 0 || h == 0 {
            return Ok(());
        }
        let (ti, hi) = (int(OP, t)?, int(OP, h)?);
        let f32_out = out.dtype() == DType::F32;
        let warp = Self::warp_row_norm(h);
        let (name, cfg) = if warp {
            let cfg = grid(((t as u32).div_ceil(WARP_ROWS), 1, 1), (32, WARP_ROWS, 1));
            let name = if f32_out {
                "rms_norm_warp_f32"
            } else {
                "rms_norm_warp_bf16"
            };
            (name, cfg)
        } else {
            let mut cfg = grid((ti as u32, 1, 1), (THREADS, 1, 1));
            // The block holds its row in f32.
            cfg.shared_mem_bytes = int(OP, h * 4)? as u32;
            let name = if f32_out {
                "rms_norm_f32"
            } else {
                "rms_norm_bf16"
            };
            (name, cfg)
        };
        let mut b = self.launch(self.kernel(name));
        b.arg(f32s(OP, "x", x)?).arg(f32s(OP, "w", w)?).arg(&eps);
        if f32_out {
            b.arg(f32s_mut(OP, "out", out)?);
        } else {
            b.arg(bf16s_mut(OP, "out", out)?);
        }
        if warp {
            b.arg(&ti);
        }
        b.arg(&hi);
        // SAFETY: argument order and types match rms_norm_{bf16,f32} (x, w,
        // eps, out, H: a block per row, h floats of shared memory) and
        // rms_norm_warp_{bf16,f32} (the same and T before H: a warp per row,
        // h a multiple of 256 of at most WARP_ROW_MAX, whole 16-byte pieces)
        // in norm.cu; x and out are [t, h], w [h].
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// Whether rows of `h` take the warp-per-row norm (and so
    /// [`Self::splits_add_rms_norm`] applies).
    pub(crate) fn warp_row_norm(h: usize) -> bool {
        h > 0 && h.is_multiple_of(256) && h <= WARP_ROW_MAX
    }

    /// `x += Σ_z part[z]` (the `splits` K shares of a projection into the
    /// residual, in z order) and `out = bf16(rms_norm(x))`: gemm_splits_sum
    /// then `rms_norm_impl`, the same bits, in one kernel. `x` is [t, h] f32
    /// with h a warp-norm row ([`Self::warp_row_norm`]), `part` holds
    /// splits · t · h floats, `out` [t, h] bf16 (the caller checked all).
    pub(crate) fn splits_add_rms_norm(
        &self,
        part: &CudaSlice<f32>,
        splits: u32,
        x: &mut T,
        w: &T,
        eps: f32,
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "splits_add_rms_norm";
        let (t, h) = expect_2d(OP, "x", x)?;
        expect_shape(OP, "w", w, &[h])?;
        expect_shape(OP, "out", out, &[t, h])?;
        // At most SPLITS_MAX (norm.cu) shares, as k_splits makes.
        if t == 0
            || !Self::warp_row_norm(h)
            || !(1..=crate::gemm::MAX_K_SPLITS).contains(&splits)
            || part.len() < splits as usize * t * h
        {
            return Err(crate::launch::shape_err(OP, format!("{t} rows of {h}")));
        }
        let (ti, hi, si) = (int(OP, t)?, int(OP, h)?, splits as i32);
        let mut b = self.launch(self.kernel("splits_add_rms_norm_warp_bf16"));
        b.arg(part)
            .arg(&si)
            .arg(f32s_mut(OP, "x", x)?)
            .arg(f32s(OP, "w", w)?)
            .arg(&eps)
            .arg(bf16s_mut(OP, "out", out)?)
            .arg(&ti)
            .arg(&hi);
        let cfg = grid(((t as u32).div_ceil(WARP_ROWS), 1, 1), (32, WARP_ROWS, 1));
        // SAFETY: argument order and types match splits_add_rms_norm_warp_bf16
        // in norm.cu: a warp per row of h (a multiple of 256, at most
        // WARP_ROW_MAX, checked above); part holds splits·t·h floats, x and
        // out t·h, w h.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }
}

/// An RMSNorm's weight f32 `[h]` and bf16 output `[t, h]` for `t` rows of
/// `h`, as a fused kernel that writes the norm takes them.
pub(crate) fn check_norm_out(
    op: &'static str,
    (t, h): (usize, usize),
    w: &T,
    out: &T,
) -> Result<()> {
    if w.shape() != [h]
        || w.dtype() != DType::F32
        || out.shape() != [t, h]
        || out.dtype() != DType::BF16
    {
        return Err(shape_err(
            op,
            format!(
                "norm weight {:?} {:?} and output {:?} {:?} for {t} rows of {h}",
                w.shape(),
                w.dtype(),
                out.shape(),
                out.dtype()
            ),
        ));
    }
    Ok(())
}
