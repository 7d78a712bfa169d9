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
        if std::is_x86_feature_detected!("avx512f") {
            // Token by token, the weight row staying in L1 after the first:
            // each token's 256 lanes fit the registers, where a tile of
            // tokens' lanes would not.
            for (ti, d) in dst.iter_mut().enumerate() {
                // SAFETY: the CPU supports AVX-512F (checked just above), which
                // implies AVX2; x holds each token's k values, wrow k weights.
                *d = unsafe { dot_row_t1_avx512(wrow, &x[ti * k..(ti + 1) * k], k) };
            }
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above); the function
            // is the same safe Rust code compiled with 8-wide vectors. No FMA
            // is enabled, so every product and sum rounds as the spec says.
            return unsafe { dot_row_avx2(wrow, x, k, dst, acc) };
        }
    }
    dot_row_generic(wrow, x, k, dst, acc, combine_lanes)
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
    // SAFETY: this function only runs where AVX2 is available.
    dot_row_generic(wrow, x, k, dst, acc, |a| unsafe { combine_lanes_avx2(a) })
}

/// One token's dot product with the 256 lanes in sixteen 16-wide
/// registers: lane `j` still adds `widen(w[k]) * x[k]` for `k ≡ j (mod
/// 256)` in increasing k from +0.0, a separate multiply and add (no FMA),
/// but nothing is cleared, loaded or stored per chunk, so the loop keeps
/// up with the weight stream. The partial last chunk (k not a multiple of
/// 256) and the lane combine are the AVX2 path's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn dot_row_t1_avx512(wrow: &[bf16], x: &[f32], k: usize) -> f32 {
    use std::arch::x86_64::*;
    assert!(wrow.len() >= k && x.len() >= k);
    let full = k / ROW_LANES * ROW_LANES;
    let (wp, xp) = (wrow.as_ptr().cast::<u16>(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); ROW_LANES / 16];
    let mut base = 0;
    while base < full {
        for (i, a) in acc.iter_mut().enumerate() {
            let o = base + 16 * i;
            // SAFETY: o + 16 <= full <= k, within both slices (asserted).
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_si256(wp.add(o).cast::<__m256i>()),
                    _mm512_loadu_ps(xp.add(o)),
                )
            };
            // bf16 -> f32: the bits shifted up, as `widen`.
            let wf = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(wv)));
            *a = _mm512_add_ps(*a, _mm512_mul_ps(wf, xv));
        }
        base += ROW_LANES;
    }
    if full == k {
        // SAFETY: AVX-512F is enabled for this function.
        return unsafe { combine_regs_avx512(&acc) };
    }
    let mut lanes = [0.0f32; ROW_LANES];
    for (i, a) in acc.iter().enumerate() {
        // SAFETY: 16·i + 16 <= 256 lanes.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * i), *a) };
    }
    for ((l, &wv), &xv) in lanes.iter_mut().zip(&wrow[full..k]).zip(&x[full..k]) {
        *l += widen(wv) * xv;
    }
    // SAFETY: AVX2 is enabled for this function.
    unsafe { combine_lanes_avx2(&mut lanes) }
}

/// [`combine_lanes`] on the 256 lanes as sixteen 16-wide registers (lane
/// `16·i + l` in lane `l` of `acc[i]`), without storing them: the same
/// pairs added in the same order, each step's partner lanes brought in by
/// a shuffle. Inside each group of 8 lanes offsets 4, 2, 1 (the groups'
/// useful halves packed two registers into one after the first step);
/// then the 32 group results, gathered into two registers in group order,
/// across groups at offsets 16, 8, 4, 2, 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn combine_regs_avx512(acc: &[std::arch::x86_64::__m512; ROW_LANES / 16]) -> f32 {
    use std::arch::x86_64::*;
    // Offset 4: lanes 0-3 and 8-11 take 4-7 and 12-15 (128-bit blocks
    // swapped pairwise); the other lanes are left unused.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        _mm512_add_ps(
            acc[i],
            _mm512_shuffle_f32x4::<0b10_11_00_01>(acc[i], acc[i]),
        )
    });
    // Register p holds, block by block, the useful lanes of groups 4p,
    // 4p + 2, 4p + 1, 4p + 3 (u[2p]'s blocks 0 and 2, u[2p + 1]'s).
    let pack = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    let m: [__m512; 8] = std::array::from_fn(|p| {
        let v = _mm512_permutex2var_ps(u[2 * p], pack, u[2 * p + 1]);
        // Offset 2: lanes 0, 1 of each block take lanes 2, 3; offset 1:
        // lane 0 takes lane 1.
        let v = _mm512_add_ps(v, _mm512_permute_ps::<0b00_00_11_10>(v));
        _mm512_add_ps(v, _mm512_permute_ps::<0b00_00_00_01>(v))
    });
    // Group results into lanes in group order: m[p] holds groups 4p, 4p+1,
    // 4p+2, 4p+3 at lanes 0, 8, 4, 12.
    let eight = _mm512_setr_epi32(0, 8, 4, 12, 16, 24, 20, 28, 0, 0, 0, 0, 0, 0, 0, 0);
    let halves = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    let sixteen = |p: usize| {
        let lo = _mm512_permutex2var_ps(m[p], eight, m[p + 1]);
        let hi = _mm512_permutex2var_ps(m[p + 2], eight, m[p + 3]);
        _mm512_permutex2var_ps(lo, halves, hi)
    };
    // Across groups: 16 (groups 16-31 onto 0-15), 8, 4, 2, 1.
    let r = _mm512_add_ps(sixteen(0), sixteen(4));
    let r = _mm512_add_ps(r, _mm512_shuffle_f32x4::<0b00_00_11_10>(r, r));
    let r = _mm512_add_ps(r, _mm512_shuffle_f32x4::<0b00_00_00_01>(r, r));
    let r = _mm512_add_ps(r, _mm512_permute_ps::<0b00_00_11_10>(r));
    let r = _mm512_add_ps(r, _mm512_permute_ps::<0b00_00_00_01>(r));
    _mm512_cvtss_f32(r)
}

/// [`combine_lanes`] with AVX2: each block of 8 groups is transposed so the
/// in-group steps (offsets 4, 2, 1) become whole-vector adds, leaving one
/// vector of 8 group results; the cross-group steps (128..8) follow as
/// vector adds and halvings. The same pairs are added as in the scalar
/// code, so every bit is the same (a NaN stays a NaN; which NaN payload
/// survives an add is not fixed in the scalar code either).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn combine_lanes_avx2(a: &mut [f32; ROW_LANES]) -> f32 {
    use std::arch::x86_64::*;
    let p = a.as_ptr();
    let mut r = [_mm256_setzero_ps(); 4];
    for (blk, rb) in r.iter_mut().enumerate() {
        // v[i]: lanes of group 8·blk + i. SAFETY: 64·blk + 8·i + 8 <= 256.
        let v: [__m256; 8] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(p.add(64 * blk + 8 * i)) });
        // Transpose: t[e] holds lane e of the 8 groups.
        let u0 = _mm256_unpacklo_ps(v[0], v[1]);
        let u1 = _mm256_unpackhi_ps(v[0], v[1]);
        let u2 = _mm256_unpacklo_ps(v[2], v[3]);
        let u3 = _mm256_unpackhi_ps(v[2], v[3]);
        let u4 = _mm256_unpacklo_ps(v[4], v[5]);
        let u5 = _mm256_unpackhi_ps(v[4], v[5]);
        let u6 = _mm256_unpacklo_ps(v[6], v[7]);
        let u7 = _mm256_unpackhi_ps(v[6], v[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(u0, u2);
        let s1 = _mm256_shuffle_ps::<0xEE>(u0, u2);
        let s2 = _mm256_shuffle_ps::<0x44>(u1, u3);
        let s3 = _mm256_shuffle_ps::<0xEE>(u1, u3);
        let s4 = _mm256_shuffle_ps::<0x44>(u4, u6);
        let s5 = _mm256_shuffle_ps::<0xEE>(u4, u6);
        let s6 = _mm256_shuffle_ps::<0x44>(u5, u7);
        let s7 = _mm256_shuffle_ps::<0xEE>(u5, u7);
        let t = [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ];
        // Offset 4, then 2, then 1, inside every group at once.
        let e0 = _mm256_add_ps(t[0], t[4]);
        let e1 = _mm256_add_ps(t[1], t[5]);
        let e2 = _mm256_add_ps(t[2], t[6]);
        let e3 = _mm256_add_ps(t[3], t[7]);
        *rb = _mm256_add_ps(_mm256_add_ps(e0, e2), _mm256_add_ps(e1, e3));
    }
    // Offsets 128 (group g += g + 16) and 64 (g += g + 8).
    let s = _mm256_add_ps(_mm256_add_ps(r[0], r[2]), _mm256_add_ps(r[1], r[3]));
    // Offsets 32, 16 and 8 within the first 8 groups.
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps::<0x01>(q, q)))
}

#[inline(always)]
fn dot_row_generic(
    wrow: &[bf16],
    x: &[f32],
    k: usize,
    dst: &mut [f32],
    acc: &mut [[f32; ROW_LANES]; TOKEN_TILE],
    combine: impl Fn(&mut [f32; ROW_LANES]) -> f32,
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
            dst[t0 + i] = combine(a);
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
    use crate::test_bits::assert_same_bits;
    use crate::test_rng::Lcg;

    /// 256 lanes whose combined sum depends on the order of the adds: mixed
    /// magnitudes; in some rounds NaNs, infinities and signed zeros, or one
    /// lane far larger than the rest (the result then shows which lanes
    /// were added to it, and in which order).
    fn order_sensitive_lanes(rng: &mut Lcg, round: usize) -> [f32; ROW_LANES] {
        let mut a = [0.0f32; ROW_LANES];
        for (j, v) in a.iter_mut().enumerate() {
            let z = rng.bits();
            let u = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            *v = u * 10f32.powi(((z >> 20) % 16) as i32 - 8);
            if round % 10 == 1 && j % 37 == 3 {
                *v = f32::from_bits(0x7fc0_0000 | (j as u32));
            }
            if round % 10 == 2 && j % 51 == 7 {
                *v = if j % 2 == 0 { f32::INFINITY } else { -0.0 };
            }
            if round % 10 == 3 && j == round % ROW_LANES {
                *v = 1e30;
            }
        }
        a
    }

    /// The AVX2 lane combine adds the same pairs as the spec, bit for bit,
    /// on values whose sums depend on the order (mixed magnitudes, signed
    /// zeros, infinities); NaN stays NaN (which payload survives is not
    /// something Rust or LLVM promise: they may swap an add's operands).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_combine_is_the_spec() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Lcg(12345);
        for round in 0..200 {
            let a = order_sensitive_lanes(&mut rng, round);
            let want = crate::numerics::row_lanes_combine(&mut a.clone());
            // SAFETY: AVX2 is available (checked above).
            let got = unsafe { combine_lanes_avx2(&mut a.clone()) };
            let scalar = combine_lanes(&mut a.clone());
            for v in [got, scalar] {
                assert_same_bits(v, want, format!("round {round}"));
            }
        }
    }

    /// The register combine of the AVX-512 path adds the same pairs as the
    /// spec, bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_register_combine_is_the_spec() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = Lcg(54321);
        for round in 0..300 {
            let a = order_sensitive_lanes(&mut rng, round);
            let want = crate::numerics::row_lanes_combine(&mut a.clone());
            // SAFETY: AVX-512F is available (checked above); each load reads
            // 16 of the array's 256 floats.
            let got = unsafe {
                let regs: [__m512; ROW_LANES / 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(a.as_ptr().add(16 * i)));
                combine_regs_avx512(&regs)
            };
            assert_same_bits(got, want, format!("round {round}"));
        }
    }

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
            // The dispatching entry, and each lower path where the CPU has it
            // (the dispatcher takes AVX-512 where it can).
            type Path = fn(&[bf16], &[f32], usize, &mut [f32]);
            let mut paths: Vec<(&str, Path)> = vec![
                ("dispatch", |w, x, k, d| {
                    dot_row(w, x, k, d, &mut [[0.0; ROW_LANES]; TOKEN_TILE])
                }),
                ("generic", |w, x, k, d| {
                    let acc = &mut [[0.0; ROW_LANES]; TOKEN_TILE];
                    dot_row_generic(w, x, k, d, acc, combine_lanes)
                }),
            ];
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                paths.push(("avx2", |w, x, k, d| {
                    let acc = &mut [[0.0; ROW_LANES]; TOKEN_TILE];
                    // SAFETY: AVX2 is available (checked where this is pushed).
                    unsafe { dot_row_avx2(w, x, k, d, acc) }
                }));
            }
            for (name, path) in paths {
                let mut dst = [0.0f32; 3];
                path(&w, &x, k, &mut dst);
                for (ti, d) in dst.iter().enumerate() {
                    let want = row_reduce(k, |j| widen(w[j]) * x[ti * k + j]);
                    assert_eq!(d.to_bits(), want.to_bits(), "{name}: k={k} token {ti}");
                }
            }
            // One token alone (the decode shape).
            let mut one = [0.0f32; 1];
            dot_row(&w, &x, k, &mut one, &mut [[0.0; ROW_LANES]; TOKEN_TILE]);
            let want = row_reduce(k, |j| widen(w[j]) * x[j]);
            assert_eq!(one[0].to_bits(), want.to_bits(), "k={k} one token");
        }
    }

    /// The single-token path on values whose sums depend on the order
    /// (mixed magnitudes), signed zeros (a lane of -0 products stays +0),
    /// infinities and NaN, against the scalar spec.
    #[test]
    fn one_token_dot_row_is_the_spec_on_special_values() {
        let mut rng = Lcg(987654321);
        for (round, k) in [1024usize, 3072, 300, 256, 100, 2048, 1024, 512]
            .into_iter()
            .enumerate()
        {
            let w: Vec<bf16> = (0..k)
                .map(|i| {
                    let r = rng.bits();
                    let v = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                        * 10f32.powi(((r >> 20) % 12) as i32 - 6);
                    match (round, i % 97) {
                        (1, 5) => bf16::NEG_ZERO,
                        (2, 9) => bf16::INFINITY,
                        (3, 11) => bf16::NAN,
                        _ => bf16::from_f32(v),
                    }
                })
                .collect();
            let x: Vec<f32> = (0..k)
                .map(|i| {
                    let r = rng.bits();
                    let v = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    // Round 4: every product is a signed zero (lanes start at +0).
                    if round == 4 {
                        -0.0
                    } else if i % 13 == 0 {
                        v * 1e4
                    } else {
                        v
                    }
                })
                .collect();
            let mut one = [0.0f32; 1];
            dot_row(&w, &x, k, &mut one, &mut [[0.0; ROW_LANES]; TOKEN_TILE]);
            let want = row_reduce(k, |j| widen(w[j]) * x[j]);
            assert_same_bits(one[0], want, format!("round {round} k={k}"));
        }
    }
}
