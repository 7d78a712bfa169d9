//! Causal attention over the paged KV cache, split over the sequence in
//! fixed chunks (flash-decoding), for prefill and decode alike.

use half::bf16;
use qwen_tensor::{AttnGeometry, BatchMeta, Result};
use rayon::prelude::*;

use crate::matmul::widen;
use crate::numerics::{exp, head_reduce};
use crate::storage::{bf16s, bf16s_mut, shape_err, u32s, T};
use crate::CpuBackend;
use qwen_tensor::check_attention;

/// Positions per split of the context. Fixed: it is part of the numerics,
/// so it never depends on the batch or the device.
pub const ATTN_CHUNK: usize = 64;

/// **Spec.** Token `t` (position `P`, sequence `s`) and q head `h` attend
/// over positions `0..=P` of sequence `s` through kv head `h / (Hq/Hkv)`;
/// position `p` lives at cache slot `block_tables[s][p / bs]·bs + p % bs`.
/// The context is cut into chunks of [`ATTN_CHUNK`] positions. In chunk `c`:
/// `s_p = head_reduce(f32(q[i])·f32(k_p[i])) · scale`, `m_c = max s_p`,
/// `e_p = exp(s_p − m_c)`, `l_c = Σ e_p` and `o_c[i] = Σ e_p·f32(v_p[i])`,
/// both summed in increasing `p` from +0.0. Then with `M = max m_c` and
/// `w_c = exp(m_c − M)`: `L = Σ l_c·w_c`, `O[i] = Σ o_c[i]·w_c` in
/// increasing `c` from +0.0, and `out[i] = bf16_rne(O[i] / L)`.
/// `exp` is `numerics::exp`; no FMA anywhere.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &T,
    k_cache: &T,
    v_cache: &T,
    meta: &BatchMeta<CpuBackend>,
    geo: AttnGeometry,
    scale: f32,
    out: &mut T,
) -> Result<()> {
    const OP: &str = "attention";
    let tokens = meta.num_tokens();
    let cache_slots = check_attention(OP, q, k_cache, v_cache, tokens, geo, out)?;
    qwen_tensor::check_batch(OP, meta, geo, None, cache_slots)?;
    let (hq, hkv, d, bs) = (
        geo.num_q_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    let qs = bf16s(OP, "q", q)?;
    let kc = bf16s(OP, "k_cache", k_cache)?;
    let vc = bf16s(OP, "v_cache", v_cache)?;
    let pos = u32s(OP, "positions", meta.positions())?;
    let seq = u32s(OP, "seq_of_token", meta.seq_of_token())?;
    let tables = u32s(OP, "block_tables", meta.block_tables())?;
    let mb = meta.max_blocks();
    for t in 0..tokens {
        let s = seq[t] as usize;
        let ctx = pos[t] as usize + 1;
        if (s + 1) * mb > tables.len() || ctx.div_ceil(bs) > mb {
            return Err(shape_err(
                OP,
                format!("token {t}: no block table entry for position {}", pos[t]),
            ));
        }
        for b in &tables[s * mb..s * mb + ctx.div_ceil(bs)] {
            if (*b as usize + 1) * bs > cache_slots {
                return Err(shape_err(OP, format!("block {b} is past the cache")));
            }
        }
    }
    let group = hq / hkv;
    let out = bf16s_mut(OP, "out", out)?;
    out.par_chunks_mut(d).enumerate().for_each(|(th, o)| {
        let (t, h) = (th / hq, th % hq);
        let s = seq[t] as usize;
        let table = &tables[s * mb..(s + 1) * mb];
        let kvh = h / group;
        let slot = |p: usize| (table[p / bs] as usize * bs + p % bs) * hkv * d + kvh * d;
        let qh = &qs[t * hq * d + h * d..t * hq * d + (h + 1) * d];
        let (ctx, key, value) = (
            pos[t] as usize + 1,
            |p| &kc[slot(p)..slot(p) + d],
            |p| &vc[slot(p)..slot(p) + d],
        );
        #[cfg(target_arch = "x86_64")]
        {
            if d == 128 && std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above); q,
                // every key and value row and `o` hold head_dim = 128 values.
                unsafe { attend_one_d128_avx512(qh, ctx, scale, key, value, o) };
                return;
            }
        }
        attend_one(qh, ctx, scale, key, value, o);
    });
    Ok(())
}

/// [`attend_one`] for head_dim 128 with AVX-512, the same bits: scores by
/// [`head_dot_d128`], `o_c` accumulated as 8 vectors (`e·v` a multiply then
/// an add, in increasing p). The rest (max, exp, the chunk merge) is the
/// scalar code's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn attend_one_d128_avx512<'a>(
    q: &[bf16],
    ctx: usize,
    scale: f32,
    key: impl Fn(usize) -> &'a [bf16],
    value: impl Fn(usize) -> &'a [bf16],
    out: &mut [bf16],
) {
    use std::arch::x86_64::*;
    const D: usize = 128;
    assert!(q.len() == D && out.len() == D);
    // SAFETY: q holds 128 values (asserted).
    let qv = widen_d128(q);
    let chunks = ctx.div_ceil(ATTN_CHUNK);
    let mut m = vec![0.0f32; chunks];
    let mut l = vec![0.0f32; chunks];
    let mut o = vec![0.0f32; chunks * D];
    let mut scores = [0.0f32; ATTN_CHUNK];
    for c in 0..chunks {
        let start = c * ATTN_CHUNK;
        let len = ATTN_CHUNK.min(ctx - start);
        for (j, sc) in scores[..len].iter_mut().enumerate() {
            // Cache rows of one head lie Hkv·D apart, which the hardware
            // prefetchers do not follow: the key PREFETCH_ROWS ahead, and
            // this chunk's values (summed right after), are asked for now.
            if j + PREFETCH_ROWS < len {
                prefetch_row(key(start + j + PREFETCH_ROWS));
            }
            prefetch_row(value(start + j));
            let k = key(start + j);
            *sc = head_dot_d128(&qv, k) * scale;
        }
        let mc = scores[..len]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let mut lc = 0.0f32;
        let mut oc = [_mm512_setzero_ps(); 8];
        for (j, &sc) in scores[..len].iter().enumerate() {
            let e = exp(sc - mc);
            lc += e;
            let v = value(start + j);
            let (ev, vv) = (_mm512_set1_ps(e), widen_d128(v));
            for (acc, vv) in oc.iter_mut().zip(vv) {
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(ev, vv));
            }
        }
        for (i, acc) in oc.iter().enumerate() {
            // SAFETY: o holds chunks·128 floats; this writes 16 of chunk c's.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(c * D + 16 * i), *acc) };
        }
        m[c] = mc;
        l[c] = lc;
    }
    merge_chunks(&m, &l, &o, out);
}

/// Cache rows [`attend_one_d128_avx512`] asks for ahead of its scores.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 8;

/// Every cache line of a 128-value bf16 row, asked into L1 (a hint).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_row(row: &[bf16]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let p = row.as_ptr().cast::<i8>();
    for off in [0usize, 64, 128, 192, 255] {
        // SAFETY: a prefetch reads nothing into the program and never
        // faults; the addresses are inside the row (256 bytes).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) };
    }
}

/// One query head over `ctx` positions; `key(p)`/`value(p)` give the cache rows.
fn attend_one<'a>(
    q: &[bf16],
    ctx: usize,
    scale: f32,
    key: impl Fn(usize) -> &'a [bf16],
    value: impl Fn(usize) -> &'a [bf16],
    out: &mut [bf16],
) {
    let d = q.len();
    let chunks = ctx.div_ceil(ATTN_CHUNK);
    let mut m = vec![0.0f32; chunks];
    let mut l = vec![0.0f32; chunks];
    let mut o = vec![0.0f32; chunks * d];
    let mut scores = [0.0f32; ATTN_CHUNK];
    for c in 0..chunks {
        let start = c * ATTN_CHUNK;
        let len = ATTN_CHUNK.min(ctx - start);
        for (j, sc) in scores[..len].iter_mut().enumerate() {
            let k = key(start + j);
            *sc = head_reduce(d, |i| widen(q[i]) * widen(k[i])) * scale;
        }
        let mc = scores[..len]
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let oc = &mut o[c * d..(c + 1) * d];
        let mut lc = 0.0f32;
        for (j, &sc) in scores[..len].iter().enumerate() {
            let e = exp(sc - mc);
            lc += e;
            for (oi, &v) in oc.iter_mut().zip(value(start + j)) {
                *oi += e * widen(v);
            }
        }
        m[c] = mc;
        l[c] = lc;
    }
    merge_chunks(&m, &l, &o, out);
}

/// 128 bf16 widened to f32 (bits shifted up, as `widen`), 16 a vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn widen_d128(x: &[bf16]) -> [std::arch::x86_64::__m512; 8] {
    use std::arch::x86_64::*;
    assert!(x.len() == 128);
    std::array::from_fn(|m| {
        // SAFETY: 16·m + 16 <= 128 values (asserted).
        let v = unsafe { _mm256_loadu_si256(x.as_ptr().add(16 * m).cast::<__m256i>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    })
}

/// `head_reduce(128, |i| q[i]·widen(k[i]))` with AVX-512, the same bits:
/// the 128 products are 8 vectors; two rounds of permutes deal them out so
/// that vector `X_i` holds element `4t + i` of every lane `t` (32 lanes of
/// 4 elements), `((0 + X_0) + X_1) + X_2) + X_3` is each lane's sum in the
/// spec's order, and the lanes then halve (16, 8, 4, 2, 1) as the
/// butterfly does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
fn head_dot_d128(qv: &[std::arch::x86_64::__m512; 8], k: &[bf16]) -> f32 {
    use std::arch::x86_64::*;
    let kv = widen_d128(k);
    let pr: [__m512; 8] = std::array::from_fn(|i| _mm512_mul_ps(qv[i], kv[i]));
    // Round one: from vectors (2u, 2u + 1) = elements 32u..32u + 32, lanes
    // 8u..8u + 8: [x0 | x1] (a) and [x2 | x3] (b) of those lanes.
    let idx_a = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    let idx_b = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    let a: [__m512; 4] =
        std::array::from_fn(|u| _mm512_permutex2var_ps(pr[2 * u], idx_a, pr[2 * u + 1]));
    let b: [__m512; 4] =
        std::array::from_fn(|u| _mm512_permutex2var_ps(pr[2 * u], idx_b, pr[2 * u + 1]));
    // Round two: 128-bit quarters (0, 1) of two round-one vectors give
    // element 4t of lanes 16h..16h + 16, quarters (2, 3) element 4t + 1
    // (4t + 2 and 4t + 3 from the b vectors).
    let half = |h: usize| {
        let x0 = _mm512_shuffle_f32x4::<0x44>(a[2 * h], a[2 * h + 1]);
        let x1 = _mm512_shuffle_f32x4::<0xEE>(a[2 * h], a[2 * h + 1]);
        let x2 = _mm512_shuffle_f32x4::<0x44>(b[2 * h], b[2 * h + 1]);
        let x3 = _mm512_shuffle_f32x4::<0xEE>(b[2 * h], b[2 * h + 1]);
        let s = _mm512_add_ps(_mm512_setzero_ps(), x0);
        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s, x1), x2), x3)
    };
    // Butterfly: lanes j += j + 16, then + 8, + 4, + 2, + 1.
    let s16 = _mm512_add_ps(half(0), half(1));
    let s8 = _mm256_add_ps(
        _mm512_castps512_ps256(s16),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s16))),
    );
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<0x01>(s2, s2)))
}

/// The spec's merge of a row's chunks: `M = max m_c`, `w_c = exp(m_c − M)`,
/// `L = Σ l_c·w_c`, `O[i] = Σ o_c[i]·w_c` in increasing c from +0.0,
/// `out[i] = bf16_rne(O[i] / L)`.
fn merge_chunks(m: &[f32], l: &[f32], o: &[f32], out: &mut [bf16]) {
    let d = out.len();
    let big_m = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut big_l = 0.0f32;
    let mut acc = vec![0.0f32; d];
    for c in 0..m.len() {
        let w = exp(m[c] - big_m);
        big_l += l[c] * w;
        for (a, &oc) in acc.iter_mut().zip(&o[c * d..(c + 1) * d]) {
            *a += oc * w;
        }
    }
    for (dst, a) in out.iter_mut().zip(acc) {
        *dst = bf16::from_f32(a / big_l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_bits::assert_same_bits;
    use crate::test_rng::Lcg;

    /// The AVX-512 score is `head_reduce`'s, bit for bit, on products whose
    /// sums depend on the order (magnitudes over 24 binades), signed zeros,
    /// infinities.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_head_dot_is_head_reduce() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = Lcg(77);
        for round in 0..2000 {
            let mut val = |i: usize| {
                let r = rng.bits();
                let v = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                    * 2f32.powi(((r >> 16) % 24) as i32 - 12);
                match (round % 50, i % 29) {
                    (1, 3) => -0.0,
                    (2, 5) => f32::INFINITY,
                    _ => v,
                }
            };
            let q: Vec<bf16> = (0..128).map(|i| bf16::from_f32(val(i))).collect();
            let mut k: Vec<bf16> = (0..128).map(|i| bf16::from_f32(val(i))).collect();
            if round % 50 == 3 {
                // Every product -0 (q's signs flipped to match): the spec's
                // lanes start at +0, so the score is +0.
                for (kv, qv) in k.iter_mut().zip(&q) {
                    *kv = if qv.is_sign_negative() {
                        bf16::ZERO
                    } else {
                        bf16::NEG_ZERO
                    };
                }
            }
            let want = head_reduce(128, |i| widen(q[i]) * widen(k[i]));
            // SAFETY: AVX-512F is available (checked above).
            let got = unsafe { head_dot_d128(&widen_d128(&q), &k) };
            assert_same_bits(got, want, format!("round {round}"));
        }
    }

    /// The AVX-512 head_dim-128 path gives the scalar spec's bits: contexts
    /// inside one chunk, on chunk edges and over many chunks; keys with
    /// Qwen3's huge k_norm channels; rows of signed-zero products; an
    /// infinite score (NaN weights) stays NaN on both paths.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_head_128_is_the_spec() {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = Lcg(424242);
        let mut rnd = move || rng.unit() - 0.5;
        const D: usize = 128;
        for (case, ctx) in [1usize, 5, 64, 65, 200, 513, 1100, 300, 77]
            .into_iter()
            .enumerate()
        {
            let q: Vec<bf16> = (0..D)
                .map(|i| match (case, i % 17) {
                    (7, 3) => bf16::NEG_ZERO,
                    _ => bf16::from_f32(rnd() * 4.0),
                })
                .collect();
            let keys: Vec<bf16> = (0..ctx * D)
                .map(|i| {
                    let v = rnd() * 2.0;
                    match (case, i % D) {
                        // A signed-zero row: every product is +-0.
                        (6, _) if i / D == 3 => bf16::NEG_ZERO,
                        (_, 1) => bf16::from_f32(v * 96.5),
                        (8, 9) if i / D == 40 => bf16::INFINITY,
                        _ => bf16::from_f32(v),
                    }
                })
                .collect();
            let values: Vec<bf16> = (0..ctx * D).map(|_| bf16::from_f32(rnd() * 3.0)).collect();
            let key = |p: usize| &keys[p * D..(p + 1) * D];
            let value = |p: usize| &values[p * D..(p + 1) * D];
            let scale = 1.0 / (D as f32).sqrt();
            let mut want = vec![bf16::ZERO; D];
            attend_one(&q, ctx, scale, key, value, &mut want);
            let mut got = vec![bf16::ZERO; D];
            // SAFETY: AVX-512F is available (checked above); every row holds 128.
            unsafe { attend_one_d128_avx512(&q, ctx, scale, key, value, &mut got) };
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                // Widening is exact and one-to-one: the same bits as bf16.
                assert_same_bits(widen(g), widen(w), format!("ctx {ctx} element {i}"));
            }
        }
    }
}
