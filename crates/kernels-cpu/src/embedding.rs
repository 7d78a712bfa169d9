//! Token embedding lookup, row gathers and the ids fed from sampled tokens.

use qwen_tensor::Result;
use rayon::prelude::*;

use crate::storage::{bf16s, f32s, f32s_mut, shape_err, u32s, u32s_mut, T};

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

/// **Spec.** `ids[row] = tokens[k]` for each `(row, k)` of `feed`; other
/// ids are left as they are. ids u32 `[T]`, tokens u32 `[N]`. A row `>= T`,
/// a `k >= N` or a row named twice is an error, checked before anything is
/// written (so the pairs can be applied in any order).
pub fn feed_ids(tokens: &T, feed: &[(usize, usize)], ids: &mut T) -> Result<()> {
    const OP: &str = "feed_ids";
    let src = u32s(OP, "tokens", tokens)?;
    let (n, t) = (src.len(), ids.numel());
    check_feed(OP, feed, n, t)?;
    let dst = u32s_mut(OP, "ids", ids)?;
    for &(row, k) in feed {
        dst[row] = src[k];
    }
    Ok(())
}

/// The checks [`feed_ids`] makes, for every backend: `n` tokens to take
/// from, `t` ids to write.
pub fn check_feed(op: &'static str, feed: &[(usize, usize)], n: usize, t: usize) -> Result<()> {
    if let Some(&(row, k)) = feed.iter().find(|&&(row, k)| row >= t || k >= n) {
        return Err(shape_err(
            op,
            format!("feed ({row}, {k}) out of range for {t} ids and {n} tokens"),
        ));
    }
    let mut rows: Vec<usize> = feed.iter().map(|&(row, _)| row).collect();
    rows.sort_unstable();
    match rows.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(shape_err(op, format!("row {} is fed twice", w[0]))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use qwen_tensor::{Backend, HostSlice, HostVec};

    use crate::CpuBackend;

    #[test]
    fn fed_ids_replace_only_their_rows_and_bad_feeds_write_nothing() {
        let b = CpuBackend;
        let tokens = b.upload(HostSlice::U32(&[100, 200, 300]), &[3]).unwrap();
        let mut ids = b.upload(HostSlice::U32(&[1, 2, 3, 4]), &[4]).unwrap();
        b.feed_ids(&tokens, &[(3, 0), (1, 2)], &mut ids).unwrap();
        assert_eq!(
            b.download(&ids).unwrap(),
            HostVec::U32(vec![1, 300, 3, 100])
        );
        for bad in [&[(4, 0)][..], &[(0, 3)], &[(2, 0), (0, 1), (2, 1)]] {
            assert!(b.feed_ids(&tokens, bad, &mut ids).is_err(), "{bad:?}");
        }
        assert_eq!(
            b.download(&ids).unwrap(),
            HostVec::U32(vec![1, 300, 3, 100])
        );
    }
}
