//! Projections with bf16 weights and f32 accumulation, plain, with the
//! residual add fused, and with RMSNorm fused in front (the QKV and
//! gate/up projections).

use half::bf16;
use qwen_tensor::Result;
use rayon::prelude::*;

use crate::norm::{inv_rms, rms_norm_row};
use crate::numerics::ROW_LANES;
use crate::storage::{bf16s, f32s, f32s_mut, T};

/// Tokens that share one pass over a weight row.
const TOKEN_TILE: usize = 4;

/// **Spec.** `out[t, n] = row_reduce_k(f32(x[t, k]) * f32(w[n, k]))`: the
/// product of two bf16 values is exact in f32, so only the 256-lane sum
/// order (see `numerics`) decides the bits. Each output depends on its own
/// token and weight row only, so results do not depend on the batch.
/// x bf16 `[T, K]`, w bf16 `[N, K]`, out f32 `[T, N]`.
pub fn matmul(x: &T, w: &T, out: &mut T) -> Result<()> {
    let (xs, t, k, ws, n) = operands("matmul", x, w, out)?;
    let xf: Vec<f32> = xs.iter().map(|&v| widen(v)).collect();
    let out = f32s_mut("matmul", "out", out)?;
    project(&xf, t, k, ws, n, out, false);
    Ok(())
}

/// **Spec.** `acc[t, n] = acc[t, n] + dot`, with `dot` exactly as in
/// [`matmul`] and one f32 add: the residual add of the down and output
/// projections. Shapes as in [`matmul`], acc f32 `[T, N]`.
pub fn matmul_add(x: &T, w: &T, acc: &mut T) -> Result<()> {
    let (xs, t, k, ws, n) = operands("matmul_add", x, w, acc)?;
    let xf: Vec<f32> = xs.iter().map(|&v| widen(v)).collect();
    let acc = f32s_mut("matmul_add", "acc", acc)?;
    project(&xf, t, k, ws, n, acc, true);
    Ok(())
}

/// **Spec.** Fused RMSNorm + projection: each row of x is normalised exactly
/// as `rms_norm` does (norm in f32, weight applied in f32, one rounding to
/// bf16), then projected exactly as [`matmul`] does.
/// x f32 `[T, H]`, norm_w f32 `[H]`, w bf16 `[N, H]`, out f32 `[T, N]`.
pub fn rms_norm_matmul(x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
    const OP: &str = "rms_norm_matmul";
    let (t, h, n) = qwen_tensor::check_norm_projection(OP, x, norm_w, w, out)?;
    let xs = f32s(OP, "x", x)?;
    let nw = f32s(OP, "norm_w", norm_w)?;
    let ws = bf16s(OP, "w", w)?;
    let mut normed = vec![bf16::ZERO; t * h];
    normed
        .par_chunks_mut(h)
        .zip(xs.par_chunks(h))
        .for_each(|(o, row)| rms_norm_row(row, nw, eps, o));
    let xf: Vec<f32> = normed.iter().map(|&v| widen(v)).collect();
    let out = f32s_mut(OP, "out", out)?;
    project(&xf, t, h, ws, n, out, false);
    Ok(())
}

/// **Spec.** The logits projection: each row of x is RMS-normalised in f32
/// exactly as `rms_norm` does but *not* rounded to bf16, then projected onto
/// the bf16 rows of w: `out[t, n] = row_reduce_k(y[t, k] * f32(w[n, k]))`,
/// each product rounded to f32, the 256-lane order of [`matmul`].
///
/// Why f32 here: a bf16 rounding of the final hidden state adds about 1e-3
/// relative noise straight onto the logits that choose tokens (enough to
/// flip near-ties), while the projection is bound by reading the bf16
/// weights, so an f32 input costs nothing.
/// x f32 `[T, H]`, norm_w f32 `[H]`, w bf16 `[V, H]`, out f32 `[T, V]`.
pub fn logits(x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
    const OP: &str = "logits";
    let (t, h, n) = qwen_tensor::check_norm_projection(OP, x, norm_w, w, out)?;
    let xs = f32s(OP, "x", x)?;
    let nw = f32s(OP, "norm_w", norm_w)?;
    let ws = bf16s(OP, "w", w)?;
    let mut normed = vec![0.0f32; t * h];
    normed
        .par_chunks_mut(h)
        .zip(xs.par_chunks(h))
        .for_each(|(o, row)| {
            let inv = inv_rms(row, eps);
            for ((o, &x), &wk) in o.iter_mut().zip(row).zip(nw) {
                *o = wk * (x * inv);
            }
        });
    let out = f32s_mut(OP, "out", out)?;
    project(&normed, t, h, ws, n, out, false);
    Ok(())
}

/// Exact bf16 → f32 widening (the bit pattern shifted; NaN payloads kept,
/// as CUDA's conversion does).
#[inline(always)]
pub fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

type Operands<'a> = (&'a [bf16], usize, usize, &'a [bf16], usize);

fn operands<'a>(op: &'static str, x: &'a T, w: &'a T, out: &T) -> Result<Operands<'a>> {
    let (t, k, n) = qwen_tensor::check_projection(op, x, w, out)?;
    Ok((bf16s(op, "x", x)?, t, k, bf16s(op, "w", w)?, n))
}

/// Computes every `dot(x[t], w[n])` and stores (or adds) it at `out[t, n]`.
/// Work is split over weight rows, so every weight byte is read once per
/// tile of tokens.
fn project(x: &[f32], t: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32], add: bool) {
    if t == 0 || n == 0 {
        return;
    }
    let rows_per_task = (n / (rayon::current_num_threads() * 8)).clamp(1, 256);
    // Results are produced row-major in n ([N, T]) so that each task owns a
    // contiguous block, then stored to the [T, N] output.
    let mut by_row = vec![0.0f32; n * t];
    by_row
        .par_chunks_mut(rows_per_task * t)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let first = chunk * rows_per_task;
            let mut acc = [[0.0f32; ROW_LANES]; TOKEN_TILE];
            for (r, dst_row) in dst.chunks_mut(t).enumerate() {
                let wrow = &w[(first + r) * k..(first + r + 1) * k];
                dot_row(wrow, x, k, dst_row, &mut acc);
            }
        });
    if t == 1 {
        if add {
            out.iter_mut().zip(&by_row).for_each(|(o, d)| *o += d);
        } else {
            out.copy_from_slice(&by_row);
        }
        return;
    }
    out.par_chunks_mut(n).enumerate().for_each(|(ti, orow)| {
        for (ni, o) in orow.iter_mut().enumerate() {
            let d = by_row[ni * t + ti];
            *o = if add { *o + d } else { d };
        }
    });
}

/// `dst[ti] = dot(wrow, x[ti])` for every token, in the 256-lane order: lane
/// `j` accumulates elements `k ≡ j (mod 256)`, so the accumulation is a
/// plain vector loop over contiguous memory; the lanes are then combined in
/// the spec's butterfly order.
fn dot_row(
    wrow: &[bf16],
    x: &[f32],
    k: usize,
    dst: &mut [f32],
    acc: &mut [[f32; ROW_LANES]; TOKEN_TILE],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above); the function
            // is the same safe Rust code compiled with 8-wide vectors. No FMA
            // is enabled, so every product and sum rounds as the spec says.
            return unsafe { dot_row_avx2(wrow, x, k, dst, acc) };
        }
    }
    dot_row_generic(wrow, x, k, dst, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_row_avx2(
    wrow: &[bf16],
    x: &[f32],
    k: usize,
    dst: &mut [f32],
    acc: &mut [[f32; ROW_LANES]; TOKEN_TILE],
) {
    dot_row_generic(wrow, x, k, dst, acc)
}

#[inline(always)]
fn dot_row_generic(
    wrow: &[bf16],
    x: &[f32],
    k: usize,
    dst: &mut [f32],
    acc: &mut [[f32; ROW_LANES]; TOKEN_TILE],
) {
    let t = dst.len();
    let mut wf = [0.0f32; ROW_LANES];
    let mut t0 = 0;
    while t0 < t {
        let tt = TOKEN_TILE.min(t - t0);
        for a in acc.iter_mut().take(tt) {
            a.fill(0.0);
        }
        let mut base = 0;
        while base < k {
            let len = ROW_LANES.min(k - base);
            if tt == 1 {
                // One token (decode): widen and accumulate in one pass.
                let xs = &x[t0 * k + base..t0 * k + base + len];
                for ((a, &wv), &xv) in acc[0][..len]
                    .iter_mut()
                    .zip(&wrow[base..base + len])
                    .zip(xs)
                {
                    *a += widen(wv) * xv;
                }
                base += len;
                continue;
            }
            for (f, &v) in wf[..len].iter_mut().zip(&wrow[base..base + len]) {
                *f = widen(v);
            }
            for (i, a) in acc.iter_mut().enumerate().take(tt) {
                let xs = &x[(t0 + i) * k + base..(t0 + i) * k + base + len];
                for ((a, &wv), &xv) in a[..len].iter_mut().zip(&wf[..len]).zip(xs) {
                    *a += wv * xv;
                }
            }
            base += len;
        }
        for (i, a) in acc.iter_mut().enumerate().take(tt) {
            dst[t0 + i] = combine_lanes(a);
        }
        t0 += tt;
    }
}

/// `numerics::row_lanes_combine` written out step by step: offsets 4, 2, 1
/// inside each group of 8 lanes, then 128..8 across the groups' first lanes.
#[inline(always)]
fn combine_lanes(a: &mut [f32; ROW_LANES]) -> f32 {
    for g in 0..32 {
        let b = 8 * g;
        for e in 0..4 {
            a[b + e] += a[b + e + 4];
        }
        a[b] += a[b + 2];
        a[b + 1] += a[b + 3];
        a[b] += a[b + 1];
    }
    for half in [16usize, 8, 4, 2, 1] {
        for g in 0..half {
            a[8 * g] += a[8 * (g + half)];
        }
    }
    a[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::row_reduce;

    #[test]
    fn dot_row_is_the_row_reduce_spec() {
        // Awkward lengths cover whole chunks, tails and rows shorter than 256.
        for k in [1usize, 7, 64, 255, 256, 300, 1000, 1024] {
            let w: Vec<bf16> = (0..k)
                .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) * 0.173))
                .collect();
            let x: Vec<f32> = (0..3 * k)
                .map(|i| {
                    widen(bf16::from_f32(
                        ((i * 53 % 97) as f32 - 48.0) * (1.0 + (i % 5) as f32 * 100.0),
                    ))
                })
                .collect();
            let mut dst = [0.0f32; 3];
            dot_row(&w, &x, k, &mut dst, &mut [[0.0; ROW_LANES]; TOKEN_TILE]);
            for (ti, d) in dst.iter().enumerate() {
                let want = row_reduce(k, |j| widen(w[j]) * x[ti * k + j]);
                assert_eq!(d.to_bits(), want.to_bits(), "k={k} token {ti}");
            }
        }
    }
}
