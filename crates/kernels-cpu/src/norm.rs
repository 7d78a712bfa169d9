//! RMSNorm over hidden-size rows.

use half::bf16;
use qwen_tensor::Result;
use rayon::prelude::*;

use crate::numerics::row_reduce;
use crate::storage::{bf16s_mut, f32s, T};

/// **Spec.** For each row `x` of length `H` (all f32):
/// `ss = row_reduce(x[k] * x[k])` (256-lane order, see `numerics`),
/// `inv = 1 / sqrt(ss / H + eps)` (IEEE division and sqrt),
/// `y[k] = bf16_rne(w[k] * (x[k] * inv))`: the norm and the weight in f32,
/// one rounding to bf16 at the end. x f32 `[T, H]`, w f32 `[H]`, out bf16 `[T, H]`.
pub fn rms_norm(x: &T, w: &T, eps: f32, out: &mut T) -> Result<()> {
    const OP: &str = "rms_norm";
    let (t, h) = qwen_tensor::expect_2d(OP, "x", x)?;
    qwen_tensor::expect_shape(OP, "w", w, &[h])?;
    qwen_tensor::expect_shape(OP, "out", out, &[t, h])?;
    let xs = f32s(OP, "x", x)?;
    let ws = f32s(OP, "w", w)?;
    let out = bf16s_mut(OP, "out", out)?;
    out.par_chunks_mut(h)
        .zip(xs.par_chunks(h))
        .for_each(|(o, row)| rms_norm_row(row, ws, eps, o));
    Ok(())
}

/// One row of [`rms_norm`]; the fused norm+matmul uses it too.
pub fn rms_norm_row(row: &[f32], w: &[f32], eps: f32, out: &mut [bf16]) {
    let inv = inv_rms(row, eps);
    for ((o, &x), &wk) in out.iter_mut().zip(row).zip(w) {
        *o = bf16::from_f32(wk * (x * inv));
    }
}

/// `1 / sqrt(row_reduce(x²) / H + eps)`: the scale of one row in
/// [`rms_norm`] and in `logits`, whose normalised row `w_k · (x_k · inv)`
/// stays f32.
#[inline]
pub fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss = row_reduce(row.len(), |k| row[k] * row[k]);
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}
