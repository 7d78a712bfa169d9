//! Token embedding lookup and row gathers.

use qwen_tensor::Result;
use rayon::prelude::*;

use crate::storage::{bf16s, f32s, f32s_mut, shape_err, u32s, T};

/// **Spec.** `out[t, h] = f32(table[ids[t], h])`: an exact widening of the
/// bf16 table row; the residual stream is f32 from here on.
/// table bf16 `[V, H]`, ids u32 `[T]`, out f32 `[T, H]`. An id `>= V` is an error.
pub fn embedding(table: &T, ids: &T, out: &mut T) -> Result<()> {
    const OP: &str = "embedding";
    let tab = bf16s(OP, "table", table)?;
    let ids = u32s(OP, "ids", ids)?;
    let (v, h) = qwen_tensor::expect_2d(OP, "table", table)?;
    qwen_tensor::expect_shape(OP, "out", out, &[ids.len(), h])?;
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
        return Err(shape_err(
            OP,
            format!("token id {bad} is outside the vocabulary of {v}"),
        ));
    }
    let out = f32s_mut(OP, "out", out)?;
    out.par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let src = &tab[id as usize * h..(id as usize + 1) * h];
            for (o, s) in row.iter_mut().zip(src) {
                *o = s.to_f32();
            }
        });
    Ok(())
}

/// **Spec.** `out[r] = src[rows[r]]`, an exact copy. src f32 `[T, H]`,
/// rows u32 `[R]`, out f32 `[R, H]`.
pub fn gather_rows(src: &T, rows: &T, out: &mut T) -> Result<()> {
    const OP: &str = "gather_rows";
    let (t, h) = qwen_tensor::expect_2d(OP, "src", src)?;
    let s = f32s(OP, "src", src)?;
    let rows = u32s(OP, "rows", rows)?;
    qwen_tensor::expect_shape(OP, "out", out, &[rows.len(), h])?;
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= t) {
        return Err(shape_err(
            OP,
            format!("row {bad} out of range for {t} rows"),
        ));
    }
    let out = f32s_mut(OP, "out", out)?;
    for (dst, &r) in out.chunks_mut(h).zip(rows) {
        dst.copy_from_slice(&s[r as usize * h..(r as usize + 1) * h]);
    }
    Ok(())
}
