//! Projections with bf16 weights and f32 accumulation, plain, with the
//! residual add fused, and with RMSNorm fused in front (the QKV and
//! gate/up projections).

use half::bf16;
use qwen_tensor::Result;
use rayon::prelude::*;

use crate::norm::rms_norm_row;
use crate::numerics::{row_lanes_combine, ROW_LANES};
use crate::storage::{bf16s, f32s, f32s_mut, shape_err, T};

/// Tokens that share one pass over a weight row.
const TOKEN_TILE: usize = 4;

/// **Spec.** `out[t, n] = row_reduce_k(f32(x[t, k]) * f32(w[n, k]))`: the
/// product of two bf16 values is exact in f32, so only the 256-lane sum
/// order (see `numerics`) decides the bits. Each output depends on its own
/// token and weight row only, so results do not depend on the batch.
/// x bf16 `[T, K]`, w bf16 `[N, K]`, out f32 `[T, N]`.
pub fn matmul(x: &T, w: &T, out: &mut T) -> Result<()> {
    let (xs, t, k, ws, n) = operands("matmul", x, w)?;
    qwen_tensor::expect_shape("matmul", "out", out, &[t, n])?;
    let xf: Vec<f32> = xs.iter().map(|&v| widen(v)).collect();
    let out = f32s_mut("matmul", "out", out)?;
    project(&xf, t, k, ws, n, out, false);
    Ok(())
}

/// **Spec.** `acc[t, n] = acc[t, n] + dot`, with `dot` exactly as in
/// [`matmul`] and one f32 add: the residual add of the down and output
/// projections. Shapes as in [`matmul`], acc f32 `[T, N]`.
pub fn matmul_add(x: &T, w: &T, acc: &mut T) -> Result<()> {
    let (xs, t, k, ws, n) = operands("matmul_add", x, w)?;
    qwen_tensor::expect_shape("matmul_add", "acc", acc, &[t, n])?;
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
    let (t, h) = qwen_tensor::expect_2d(OP, "x", x)?;
    let (n, k) = qwen_tensor::expect_2d(OP, "w", w)?;
    if k != h {
        return Err(shape_err(OP, format!("x has {h} columns but w has {k}")));
    }
    qwen_tensor::expect_shape(OP, "norm_w", norm_w, &[h])?;
    qwen_tensor::expect_shape(OP, "out", out, &[t, n])?;
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

/// Exact bf16 → f32 widening (the bit pattern shifted; NaN payloads kept,
/// as CUDA's conversion does).
#[inline(always)]
pub fn widen(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

type Operands<'a> = (&'a [bf16], usize, usize, &'a [bf16], usize);

fn operands<'a>(op: &'static str, x: &'a T, w: &'a T) -> Result<Operands<'a>> {
    let (t, k) = qwen_tensor::expect_2d(op, "x", x)?;
    let (n, kw) = qwen_tensor::expect_2d(op, "w", w)?;
    if k != kw {
        return Err(shape_err(op, format!("x has {k} columns but w has {kw}")));
    }
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
            for (r, dst_row) in dst.chunks_mut(t).enumerate() {
                let wrow = &w[(first + r) * k..(first + r + 1) * k];
                dot_row(wrow, x, k, dst_row);
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

/// `dst[ti] = dot(wrow, x[ti])` for every token, in the 256-lane order.
fn dot_row(wrow: &[bf16], x: &[f32], k: usize, dst: &mut [f32]) {
    let t = dst.len();
    let mut wf = [0.0f32; ROW_LANES];
    let mut t0 = 0;
    while t0 < t {
        let tt = TOKEN_TILE.min(t - t0);
        let mut acc = [[0.0f32; ROW_LANES]; TOKEN_TILE];
        let mut base = 0;
        while base < k {
            let len = ROW_LANES.min(k - base);
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
            dst[t0 + i] = row_lanes_combine(a);
        }
        t0 += tt;
    }
}
