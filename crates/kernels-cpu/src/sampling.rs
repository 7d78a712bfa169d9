//! Sampling primitives: argmax, repetition penalty, and filtered sampling.
//!
//! `sample` is specified in integers wherever a sum is taken, so a parallel
//! implementation (a CUDA block reducing in any order) picks the same token.

use qwen_tensor::{Error, Result, SampleParams};
use rayon::prelude::*;

use crate::numerics;
use crate::storage::{f32s, f32s_mut, shape_err, T};

/// **Spec.** Index of the largest logit per row; NaN never wins; the lowest
/// index wins ties. logits f32 `[B, V]` with `V > 0` when `B > 0`.
pub fn argmax(logits: &T) -> Result<Vec<u32>> {
    const OP: &str = "argmax";
    let (b, v) = qwen_tensor::expect_2d(OP, "logits", logits)?;
    let l = f32s(OP, "logits", logits)?;
    if b == 0 {
        return Ok(Vec::new());
    }
    check_vocab(OP, v)?;
    Ok(l.chunks(v).map(argmax_row).collect())
}

/// Argmax of one row (see [`argmax`]).
pub fn argmax_row(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &x) in row.iter().enumerate() {
        if x > best_v {
            best = i;
            best_v = x;
        }
    }
    best as u32
}

/// **Spec.** For each row `b` and each distinct id in `history[b]`:
/// `x = x / penalty` if `x > 0`, else `x = x * penalty` (HF's rule), one
/// IEEE op per logit. Every id is checked against the vocabulary before any
/// logit changes, so an error leaves `logits` untouched.
pub fn repetition_penalty(logits: &mut T, penalty: &[f32], history: &[Vec<u32>]) -> Result<()> {
    const OP: &str = "repetition_penalty";
    let (b, v) = qwen_tensor::expect_2d(OP, "logits", logits)?;
    if penalty.len() != b || history.len() != b {
        return Err(shape_err(
            OP,
            format!(
                "{b} rows but {} penalties and {} histories",
                penalty.len(),
                history.len()
            ),
        ));
    }
    let l = f32s_mut(OP, "logits", logits)?;
    if b == 0 {
        return Ok(());
    }
    check_vocab(OP, v)?;
    if let Some(&id) = history.iter().flatten().find(|&&id| id as usize >= v) {
        return Err(shape_err(OP, format!("token {id} outside vocabulary {v}")));
    }
    for ((row, &p), hist) in l.chunks_mut(v).zip(penalty).zip(history) {
        let mut seen = hist.clone();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            let x = &mut row[id as usize];
            *x = if *x > 0.0 { *x / p } else { *x * p };
        }
    }
    Ok(())
}

/// Fixed-point scale of the quantised weights, `2^40`: one token's weight
/// is at most `2^40`, so a sum over any realistic vocabulary (< 2^23 tokens)
/// fits a `u64` with room to spare.
const Q_SCALE: f32 = (1u64 << 40) as f32;

/// **Spec.** Samples one token per row of logits f32 `[B, V]` with
/// `params[b]` and `uniform[b]`. For one row `x` with temperature `T`,
/// `top_k`, `top_p`, `min_p` and uniform `u`:
///
/// 1. `z_i = x_i / T`, one IEEE f32 division; a NaN `z_i` counts as `-inf`.
/// 2. Candidates are the indices sorted by `z` descending (IEEE compare, so
///    `-0` ties with `+0`), ties broken by the lower index first. If `top_k > 0`, keep the first `min(top_k, V)`.
///    Let `z_max` be the largest `z` (the first candidate's).
/// 3. Weights: `e_j = 1.0` if `z_j == z_max` (this covers infinite `z_max`:
///    all tokens at `+inf` tie, and an all `-inf` row is uniform), else
///    `e_j = numerics::exp(z_j - z_max)` (one f32 subtraction, then the
///    shared `exp`). Quantise `q_j = (e_j * 2^40) as u64`: the scaling is an
///    exact power of two, the conversion truncates toward zero (CUDA:
///    `__float2ull_rz`). The top candidate has `q = 2^40`. From here on
///    every sum is an exact `u64` sum, so the summation order is free.
/// 4. top-p, if `top_p < 1`: `S = Σ q_j` over the candidates;
///    `tau = (top_p as f64 * S as f64) as u64`, i.e. `S` rounded to nearest
///    f64, one f64 multiplication rounded to nearest, truncated. Keep
///    candidate `j` (in sorted order) while `Σ_{i<j} q_i < tau`; the first
///    candidate is always kept. This is the smallest prefix whose mass
///    reaches `top_p`.
/// 5. min-p, if `min_p > 0`: keep only candidates with `e_j >= min_p` (an
///    f32 compare; since `e` of the top is 1 this is `p_j >= min_p · p_max`).
///    The top candidate always survives.
/// 6. Draw: `K = Σ q` over the kept candidates;
///    `target = (u as f64 * K as f64) as u64` (`K` rounded to nearest f64,
///    one f64 multiplication rounded to nearest, truncated); the token is the
///    first kept candidate, in sorted order, whose inclusive prefix sum of
///    `q` is `> target`. `target < K` always holds because `u <= 1 - 2^-24`;
///    if no candidate qualifies anyway (or `K == 0`) the top candidate wins.
///
///    Without a top-k or top-p cut (`min(top_k, V) == V` when `top_k > 0`,
///    or `top_k == 0`; and `top_p == 1`) the draw walks the kept candidates
///    in **index order** instead of sorted order (same `K`, same `target`).
///    Each token is still drawn with probability `q_j / K`; only the map
///    from `u` to a token differs, and index order needs no ranking, so a
///    parallel implementation finds the token with a few nested block-wide
///    sums (the per-chunk sums are exact `u64`s) instead of a radix
///    descent over the rank keys.
///
/// Freedom an implementation has without changing a single token: tokens
/// with `q = 0` never change a sum or win a draw, so they may be dropped
/// before ranking when `top_k == 0` (with `top_k > 0` they must still take
/// part in the top-k cut); and the order only matters through "first
/// candidate whose prefix exceeds t", so no full sort is needed. This one
/// skips `exp` where `z_j - z_max < -30` (`q` would be 0), selects top-k
/// with a partial selection, and finds the top-p cut and the drawn token
/// with a weighted quickselect.
///
/// Errors (nothing is sampled): `params` or `uniform` not of length `B`,
/// or `V == 0` with `B > 0` ([`Error::Shape`]); a temperature that is not
/// finite and `> 0` (greedy decoding is the caller's `argmax`), `top_p`
/// outside `(0, 1]`, `min_p` outside `[0, 1]`, or `u` outside `[0, 1)`
/// ([`Error::Unsupported`]). Rows are sampled in parallel when `B > 1`;
/// each row's token depends only on that row's inputs.
pub fn sample(logits: &T, params: &[SampleParams], uniform: &[f32]) -> Result<Vec<u32>> {
    const OP: &str = "sample";
    let (b, v) = qwen_tensor::expect_2d(OP, "logits", logits)?;
    let l = f32s(OP, "logits", logits)?;
    if params.len() != b || uniform.len() != b {
        return Err(shape_err(
            OP,
            format!(
                "{b} rows but {} params and {} uniforms",
                params.len(),
                uniform.len()
            ),
        ));
    }
    if b == 0 {
        return Ok(Vec::new());
    }
    check_vocab(OP, v)?;
    for (r, (p, &u)) in params.iter().zip(uniform).enumerate() {
        check_params(r, p, u)?;
    }
    if b == 1 {
        return Ok(vec![sample_row(l, &params[0], uniform[0])]);
    }
    Ok(l.par_chunks(v)
        .zip(params.par_iter())
        .zip(uniform.par_iter())
        .map(|((row, p), &u)| sample_row(row, p, u))
        .collect())
}

fn check_vocab(op: &'static str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(shape_err(
            op,
            "logits have an empty vocabulary (V = 0)".into(),
        ));
    }
    Ok(())
}

/// The parameter check of [`sample`] for row `row` (every backend's
/// `sample` runs it, so the errors are the same everywhere).
pub fn check_params(row: usize, p: &SampleParams, u: f32) -> Result<()> {
    let bad = |what: String| Err(Error::Unsupported(format!("sample: row {row}: {what}")));
    if !(p.temperature.is_finite() && p.temperature > 0.0) {
        return bad(format!(
            "temperature must be finite and > 0 (use argmax for greedy), got {}",
            p.temperature
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return bad(format!("top_p must be in (0, 1], got {}", p.top_p));
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return bad(format!("min_p must be in [0, 1], got {}", p.min_p));
    }
    if !(0.0..1.0).contains(&u) {
        return bad(format!("uniform must be in [0, 1), got {u}"));
    }
    Ok(())
}

/// A candidate: its [`rank_key`] and its quantised weight `q`. Keys are
/// unique (they contain the index), so tuple order is key order.
type Cand = (u64, u64);

/// Packs a candidate into one integer whose ascending order is step 2's
/// order (z descending, then index ascending), so ranking is a plain `u64`
/// comparison instead of a float comparator. `z` must not be NaN; `-0` is
/// folded into `+0` because IEEE comparison ties them.
#[inline]
fn rank_key(z: f32, id: u32) -> u64 {
    let z = if z == 0.0 { 0.0 } else { z };
    let b = z.to_bits();
    // Flipping makes the bits of an f32 ascend with its value.
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    ((!ascending as u64) << 32) | id as u64
}

/// The `z` a [`rank_key`] was built from.
#[inline]
fn key_z(key: u64) -> f32 {
    let ascending = !((key >> 32) as u32);
    f32::from_bits(if ascending >> 31 == 1 {
        ascending & 0x7fff_ffff
    } else {
        !ascending
    })
}

/// Step 3's fixed-point weight.
#[inline]
fn quantise(e: f32) -> u64 {
    (e * Q_SCALE) as u64
}

/// Below this many candidates, [`weighted_select`] just sorts.
const SELECT_SORT_LEN: usize = 64;

/// Finds the first candidate in rank order whose inclusive prefix sum of
/// `q` exceeds `target`, without sorting everything: a quickselect that
/// halves the range around its median and descends into the side holding
/// the target (expected O(n) instead of O(n log n)). Reorders `cands` so
/// that `cands[..=i]` are the `i + 1` best-ranked candidates, and returns
/// `i`; `None` if the total weight is `<= target`.
fn weighted_select(cands: &mut [Cand], mut target: u64) -> Option<usize> {
    let (mut lo, mut hi) = (0, cands.len());
    // Invariant: cands[..lo] rank before cands[lo..hi], which rank before
    // cands[hi..], and `target` is relative to the weight of cands[..lo].
    while hi - lo > SELECT_SORT_LEN {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by_key(mid - lo, |c| c.0);
        let left: u64 = cands[lo..mid].iter().map(|c| c.1).sum();
        if target < left {
            hi = mid;
        } else if target - left < cands[mid].1 {
            return Some(mid);
        } else {
            target -= left + cands[mid].1;
            lo = mid + 1;
        }
    }
    cands[lo..hi].sort_unstable_by_key(|c| c.0);
    for (i, c) in cands.iter().enumerate().take(hi).skip(lo) {
        if target < c.1 {
            return Some(i);
        }
        target -= c.1;
    }
    None
}

/// Steps 1–6 of [`sample`] for one row with already validated inputs.
///
/// Rather than sorting, the top-p cut and the draw are each located with
/// [`weighted_select`]; both only depend on the rank order, so the result
/// is the one the fully sorted walk of the spec gives.
fn sample_row(row: &[f32], p: &SampleParams, u: f32) -> u32 {
    let v = row.len();
    let t = p.temperature;
    let z_of = |x: f32| {
        let z = x / t;
        if z.is_nan() {
            f32::NEG_INFINITY
        } else {
            z
        }
    };
    let z_max = row.iter().fold(f32::NEG_INFINITY, |m, &x| {
        let z = z_of(x);
        if z > m {
            z
        } else {
            m
        }
    });
    let weight = |z: f32| {
        if z == z_max {
            1.0
        } else {
            numerics::exp(z - z_max)
        }
    };

    let k = if p.top_k > 0 { p.top_k.min(v) } else { v };
    if k == v && p.top_p >= 1.0 {
        return draw_in_index_order(row, &z_of, &weight, z_max, p.min_p, u);
    }
    let mut cands: Vec<Cand> = if k < v {
        let mut keys: Vec<u64> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| rank_key(z_of(x), i as u32))
            .collect();
        keys.select_nth_unstable(k - 1);
        keys[..k]
            .iter()
            .map(|&key| (key, quantise(weight(key_z(key)))))
            .collect()
    } else {
        // Zero-weight tokens cannot matter without a top-k cut (see the
        // spec), and dropping them usually shrinks the set a lot.
        row.iter()
            .enumerate()
            .filter_map(|(i, &x)| {
                let z = z_of(x);
                // Shortcut, not a change of spec: exp(-30) ≈ 9.4e-14 is ten
                // times below 2^-40 ≈ 9.1e-13, far more than exp's few-ulp
                // error, so q would be 0. Saves the exps of the far tail.
                if z - z_max < -30.0 {
                    return None;
                }
                let q = quantise(weight(z));
                (q > 0).then(|| (rank_key(z, i as u32), q))
            })
            .collect()
    };
    // The top candidate, for the spec's fallbacks; the filters never drop it.
    let top = cands.iter().map(|c| c.0).min().map_or(0, |key| key as u32);

    if p.top_p < 1.0 {
        let s: u64 = cands.iter().map(|c| c.1).sum();
        let tau = (p.top_p as f64 * s as f64) as u64;
        // The kept prefix ends at the first candidate whose inclusive
        // prefix reaches tau (for tau = 0, the first candidate, whose
        // q = 2^40 exceeds 0); if none does, everything is kept.
        if let Some(last) = weighted_select(&mut cands, tau.saturating_sub(1)) {
            cands.truncate(last + 1);
        }
    }
    if p.min_p > 0.0 {
        cands.retain(|c| weight(key_z(c.0)) >= p.min_p);
    }

    let total: u64 = cands.iter().map(|c| c.1).sum();
    if total == 0 {
        return top;
    }
    let target = (u as f64 * total as f64) as u64;
    weighted_select(&mut cands, target).map_or(top, |i| cands[i].0 as u32)
}

/// Step 6 in index order, for a row without a top-k or top-p cut (see
/// [`sample`]): `z_of` and `weight` are the row's steps 1 and 3.
fn draw_in_index_order(
    row: &[f32],
    z_of: &impl Fn(f32) -> f32,
    weight: &impl Fn(f32) -> f32,
    z_max: f32,
    min_p: f32,
    u: f32,
) -> u32 {
    // A token's q if min-p keeps it, else 0; the -30 shortcut is
    // sample_row's (q would truncate to 0 anyway).
    let q_of = |x: f32| {
        let z = z_of(x);
        if z - z_max < -30.0 {
            return 0;
        }
        let e = weight(z);
        if e >= min_p {
            quantise(e)
        } else {
            0
        }
    };
    let total: u64 = row.iter().map(|&x| q_of(x)).sum();
    let target = (u as f64 * total as f64) as u64;
    let mut acc = 0u64;
    for (i, &x) in row.iter().enumerate() {
        acc += q_of(x);
        if acc > target {
            return i as u32;
        }
    }
    // The spec's fallback: the top candidate, the first token at z_max.
    row.iter().position(|&x| z_of(x) == z_max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Lcg;
    use crate::CpuBackend;
    use qwen_tensor::{Backend, DType, HostSlice, HostVec};

    fn logits(rows: &[&[f32]]) -> T {
        let v = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        CpuBackend
            .upload(HostSlice::F32(&flat), &[rows.len(), v])
            .unwrap()
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SampleParams {
        SampleParams {
            temperature,
            top_k,
            top_p,
            min_p,
        }
    }

    fn one(row: &[f32], p: SampleParams, u: f32) -> u32 {
        sample(&logits(&[row]), &[p], &[u]).unwrap()[0]
    }

    /// `n` evenly spread uniforms: stratified, so frequencies are close to
    /// the exact probabilities without statistical slack.
    fn grid(n: usize) -> impl Iterator<Item = f32> {
        (0..n).map(move |i| ((i as f64 + 0.5) / n as f64) as f32)
    }

    fn freqs(row: &[f32], p: SampleParams, n: usize) -> Vec<f64> {
        let mut count = vec![0usize; row.len()];
        for u in grid(n) {
            count[one(row, p, u) as usize] += 1;
        }
        count.iter().map(|&c| c as f64 / n as f64).collect()
    }

    fn softmax(x: &[f32], t: f32) -> Vec<f64> {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = x
            .iter()
            .map(|&v| ((v as f64 - m) / t as f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// The spec of [`sample`] transcribed literally: full sort, no selection,
    /// no dropping of zero weights.
    fn reference(row: &[f32], p: SampleParams, u: f32) -> u32 {
        let z: Vec<f32> = row
            .iter()
            .map(|&x| {
                let z = x / p.temperature;
                if z.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    z
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k.min(row.len()));
        }
        let z_max = z[order[0]];
        let e = |j: usize| {
            if z[j] == z_max {
                1.0
            } else {
                numerics::exp(z[j] - z_max)
            }
        };
        let q = |j: usize| (e(j) * 2f32.powi(40)) as u64;
        if p.top_p < 1.0 {
            let s: u64 = order.iter().map(|&j| q(j)).sum();
            let tau = (p.top_p as f64 * s as f64) as u64;
            let mut kept = Vec::new();
            let mut before = 0u64;
            for (n, &j) in order.iter().enumerate() {
                if n == 0 || before < tau {
                    kept.push(j);
                }
                before += q(j);
            }
            order = kept;
        }
        if p.min_p > 0.0 {
            order.retain(|&j| e(j) >= p.min_p);
        }
        let top = order[0];
        if (p.top_k == 0 || p.top_k >= row.len()) && p.top_p >= 1.0 {
            order.sort_unstable();
        }
        let k: u64 = order.iter().map(|&j| q(j)).sum();
        let target = (u as f64 * k as f64) as u64;
        let mut acc = 0;
        for &j in &order {
            acc += q(j);
            if acc > target {
                return j as u32;
            }
        }
        top as u32
    }

    #[test]
    fn rank_keys_sort_like_the_spec_and_round_trip() {
        let zs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for (i, &a) in zs.iter().enumerate() {
            assert_eq!(key_z(rank_key(a, 7)), if a == 0.0 { 0.0 } else { a });
            for (j, &b) in zs.iter().enumerate() {
                for (ia, ib) in [(1u32, 2u32), (2, 1)] {
                    let want = b.partial_cmp(&a).unwrap().then(ia.cmp(&ib));
                    assert_eq!(
                        rank_key(a, ia).cmp(&rank_key(b, ib)),
                        want,
                        "{i} {j} {a} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn weights_below_the_exp_shortcut_quantise_to_zero() {
        // sample_row skips exp when z - z_max < -30; that is only sound if
        // every such weight truncates to q = 0 anyway.
        let mut d = -30.0f32;
        while d > -120.0 {
            assert_eq!(quantise(numerics::exp(d)), 0, "d {d}");
            d = f32::from_bits(d.to_bits() + 997);
        }
        assert!(quantise(numerics::exp(-27.0)) > 0);
    }

    #[test]
    fn top_k_1_is_argmax_for_any_u() {
        let row = [0.3f32, -1.0, 2.5, 2.4, f32::NAN, 0.0];
        for u in [0.0, 0.1, 0.5, 0.9, 1.0 - f32::EPSILON / 2.0] {
            for t in [0.1, 1.0, 10.0] {
                assert_eq!(one(&row, params(t, 1, 1.0, 0.0), u), 2, "u {u} t {t}");
            }
        }
    }

    #[test]
    fn top_k_stays_inside_the_k_best() {
        let mut rng = Lcg(7);
        let row: Vec<f32> = (0..200).map(|_| rng.unit() * 4.0).collect();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap());
        let best: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
        let mut seen = std::collections::HashSet::new();
        for u in grid(2000) {
            let tok = one(&row, params(5.0, 5, 1.0, 0.0), u);
            assert!(best.contains(&tok), "token {tok} not among {best:?}");
            seen.insert(tok);
        }
        // A high temperature makes the five nearly equal: all must appear.
        assert_eq!(seen.len(), 5);
        // top_k larger than V keeps everything.
        assert!(one(&row, params(1.0, 10_000, 1.0, 0.0), 0.999) < 200);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let f = freqs(&row, params(1.0, 0, 0.7, 0.0), 20_000);
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
        assert!((f[0] - 0.5 / 0.8).abs() < 0.01, "{f:?}");
        assert!((f[1] - 0.3 / 0.8).abs() < 0.01, "{f:?}");
        // 0.85 needs the third token (0.5 + 0.3 < 0.85) but not the fourth.
        let f = freqs(&row, params(1.0, 0, 0.85, 0.0), 20_000);
        assert_eq!(f[3], 0.0, "{f:?}");
        assert!((f[2] - 0.15 / 0.95).abs() < 0.01, "{f:?}");
        // Exact boundary: four weights of 2^40 and top_p 0.5 give tau = 2^41;
        // the third token's prefix equals tau, so it is dropped.
        let flat = [0.0f32; 4];
        assert_eq!(one(&flat, params(1.0, 0, 0.5, 0.0), 0.49), 0);
        assert_eq!(one(&flat, params(1.0, 0, 0.5, 0.0), 0.99), 1);
        assert_eq!(one(&flat, params(1.0, 0, 0.5001, 0.0), 0.99), 2);
        // Tiny weights still count towards top-p's total: e^-27 · 2^40 ≈ 2.07
        // gives q = 2 and tau = 2^40 + 1, which lets the second top token in.
        let tail = [0.0f32, 0.0, -27.0];
        assert_eq!(one(&tail, params(1.0, 0, 0.5, 0.0), 0.99), 1);
        assert_eq!(one(&tail[..2], params(1.0, 0, 0.5, 0.0), 0.99), 0);
        // A tiny top_p still keeps the top token.
        assert_eq!(one(&row, params(1.0, 0, 1e-30, 0.0), 0.99), 0);
    }

    #[test]
    fn min_p_drops_tokens_below_the_scaled_top() {
        let row: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        // Threshold 0.25 * 0.5 = 0.125: tokens 0, 1, 2 stay.
        let f = freqs(&row, params(1.0, 0, 1.0, 0.25), 20_000);
        assert_eq!(f[3], 0.0, "{f:?}");
        assert!((f[2] - 0.15 / 0.95).abs() < 0.01, "{f:?}");
        // Threshold 0.5 * 0.5 = 0.25: only tokens 0 and 1.
        let f = freqs(&row, params(1.0, 0, 1.0, 0.5), 20_000);
        assert_eq!(f[2] + f[3], 0.0, "{f:?}");
        assert!(f[1] > 0.3, "{f:?}");
        // min_p = 1 is greedy.
        for u in grid(50) {
            assert_eq!(one(&row, params(1.0, 0, 1.0, 1.0), u), 0);
        }
    }

    #[test]
    fn frequencies_follow_softmax_of_scaled_logits() {
        let row = [2.0f32, 1.0, 0.0, -1.0, 0.5];
        let mut top_prob = Vec::new();
        for t in [0.5f32, 1.0, 2.0] {
            let f = freqs(&row, params(t, 0, 1.0, 0.0), 20_000);
            let want = softmax(&row, t);
            for (g, w) in f.iter().zip(&want) {
                assert!((g - w).abs() < 0.005, "t {t}: got {f:?}, want {want:?}");
            }
            top_prob.push(f[0]);
        }
        // Lower temperature sharpens, higher flattens.
        assert!(top_prob[0] > top_prob[1] && top_prob[1] > top_prob[2]);
    }

    #[test]
    fn ties_go_to_the_lower_index_first() {
        assert_eq!(one(&[1.0, 3.0, 3.0, 0.0], params(1.0, 1, 1.0, 0.0), 0.9), 1);
        // Four equal weights of 2^40: sorted order is 0, 1, 2, 3.
        let row = [0.0f32; 4];
        let p = params(1.0, 0, 1.0, 0.0);
        assert_eq!(one(&row, p, 0.0), 0);
        assert_eq!(one(&row, p, 0.2499), 0);
        assert_eq!(one(&row, p, 0.25), 1);
        assert_eq!(one(&row, p, 0.5), 2);
        assert_eq!(one(&row, p, 0.75), 3);
        assert_eq!(one(&row, p, 0.9999), 3);
        // Enough equal tokens to take the quickselect path; every u = i/256
        // lands exactly on a boundary between weights and must pick token i.
        let row = [1.5f32; 256];
        let l = logits(&[&row]);
        for i in 0..256u32 {
            let u = i as f32 / 256.0;
            assert_eq!(sample(&l, &[p], &[u]).unwrap()[0], i, "u {u}");
        }
    }

    #[test]
    fn without_a_cut_the_draw_walks_index_order() {
        // q_0 = e^-2 · 2^40 comes first in index order, though it ranks
        // second: u = 0 draws it, and u just below its share still does.
        let row = [0.0f32, 2.0];
        let share = (-2.0f32).exp() / (1.0 + (-2.0f32).exp());
        for p in [params(1.0, 0, 1.0, 0.0), params(1.0, 2, 1.0, 0.1)] {
            assert_eq!(one(&row, p, 0.0), 0, "{p:?}");
            assert_eq!(one(&row, p, share * 0.99), 0, "{p:?}");
            assert_eq!(one(&row, p, share * 1.01), 1, "{p:?}");
        }
        // A cut (top-k or top-p) ranks first: u = 0 is the top token.
        assert_eq!(one(&row, params(1.0, 1, 1.0, 0.0), 0.0), 1);
        assert_eq!(one(&row, params(1.0, 0, 0.999, 0.0), 0.0), 1);
        // min-p drops token 0 (e^-2 < 0.2) without bringing ranking back.
        assert_eq!(one(&[0.0, 2.0, 1.9], params(1.0, 0, 1.0, 0.2), 0.0), 1);
        assert_eq!(one(&[0.0, 1.9, 2.0], params(1.0, 0, 1.0, 0.2), 0.0), 1);
    }

    #[test]
    fn non_finite_logits() {
        let p = params(1.0, 0, 1.0, 0.0);
        for u in grid(20) {
            assert_eq!(one(&[f32::NAN, 1.0, f32::NAN], p, u), 1);
            assert_eq!(one(&[0.0, f32::INFINITY, 1e30], p, u), 1);
            assert_eq!(one(&[f32::NEG_INFINITY, -1e30, f32::NAN], p, u), 1);
        }
        // Tokens at +inf tie; a row with nothing finite is uniform.
        let row = [1.0, f32::INFINITY, f32::INFINITY];
        assert_eq!(one(&row, p, 0.2), 1);
        assert_eq!(one(&row, p, 0.7), 2);
        let row = [f32::NAN, f32::NEG_INFINITY];
        assert_eq!(one(&row, p, 0.2), 0);
        assert_eq!(one(&row, p, 0.7), 1);
        // A tiny temperature overflows z to +inf, which then ties.
        assert_eq!(one(&[1e30, 2e30, -1.0], params(1e-20, 0, 1.0, 0.0), 0.6), 1);
    }

    #[test]
    fn matches_a_literal_transcription_of_the_spec() {
        let mut rng = Lcg(42);
        for case in 0..400 {
            let v = 1 + (rng.next() % if case % 4 == 0 { 3000 } else { 300 }) as usize;
            let spread = [0.5f32, 5.0, 40.0][case % 3];
            let row: Vec<f32> = (0..v)
                .map(|_| match rng.next() % 50 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    // Repeated values exercise the tie order.
                    2..=9 => 1.0,
                    _ => (rng.unit() - 0.5) * spread,
                })
                .collect();
            let p = params(
                [0.3f32, 1.0, 1.7][case % 3],
                [0usize, 1, 3, 40, 1000][case % 5],
                [1.0f32, 0.9, 0.5, 0.05][(case / 3) % 4],
                [0.0f32, 0.01, 0.3][(case / 5) % 3],
            );
            for _ in 0..10 {
                let u = rng.unit();
                assert_eq!(
                    one(&row, p, u),
                    reference(&row, p, u),
                    "case {case} {p:?} u {u}"
                );
            }
        }
    }

    #[test]
    fn batch_rows_are_independent() {
        let mut rng = Lcg(3);
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..64).map(|_| rng.unit() * 6.0).collect())
            .collect();
        let ps: Vec<SampleParams> = (0..6)
            .map(|r| params(0.5 + r as f32 * 0.3, r % 3 * 4, 1.0 - r as f32 * 0.1, 0.0))
            .collect();
        let us: Vec<f32> = (0..6).map(|_| rng.unit()).collect();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let got = sample(&logits(&refs), &ps, &us).unwrap();
        for r in 0..6 {
            assert_eq!(got[r], one(&rows[r], ps[r], us[r]), "row {r}");
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let l = logits(&[&[1.0, 2.0]]);
        let ok = params(1.0, 0, 1.0, 0.0);
        let msg = |p: SampleParams, u: f32| sample(&l, &[p], &[u]).unwrap_err().to_string();
        assert!(msg(params(0.0, 0, 1.0, 0.0), 0.5).contains("temperature"));
        assert!(msg(params(-1.0, 0, 1.0, 0.0), 0.5).contains("temperature"));
        assert!(msg(params(f32::NAN, 0, 1.0, 0.0), 0.5).contains("temperature"));
        assert!(msg(params(f32::INFINITY, 0, 1.0, 0.0), 0.5).contains("temperature"));
        assert!(msg(params(1.0, 0, 0.0, 0.0), 0.5).contains("top_p"));
        assert!(msg(params(1.0, 0, 1.5, 0.0), 0.5).contains("top_p"));
        assert!(msg(params(1.0, 0, f32::NAN, 0.0), 0.5).contains("top_p"));
        assert!(msg(params(1.0, 0, 1.0, -0.1), 0.5).contains("min_p"));
        assert!(msg(params(1.0, 0, 1.0, 1.1), 0.5).contains("min_p"));
        assert!(msg(ok, 1.0).contains("uniform"));
        assert!(msg(ok, -0.1).contains("uniform"));
        assert!(msg(ok, f32::NAN).contains("uniform"));
        assert!(matches!(sample(&l, &[], &[0.5]), Err(Error::Shape { .. })));
        assert!(matches!(sample(&l, &[ok], &[]), Err(Error::Shape { .. })));
        let empty = CpuBackend.zeros(&[1, 0], DType::F32).unwrap();
        assert!(matches!(
            sample(&empty, &[ok], &[0.5]),
            Err(Error::Shape { .. })
        ));
        let ids = CpuBackend.zeros(&[1, 2], DType::U32).unwrap();
        assert!(matches!(
            sample(&ids, &[ok], &[0.5]),
            Err(Error::DType { .. })
        ));
        let none = CpuBackend.zeros(&[0, 5], DType::F32).unwrap();
        assert_eq!(sample(&none, &[], &[]).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn argmax_and_penalty_reject_an_empty_vocabulary() {
        let mut empty = CpuBackend.zeros(&[2, 0], DType::F32).unwrap();
        assert!(argmax(&empty).is_err());
        assert!(repetition_penalty(&mut empty, &[1.0, 1.0], &[vec![], vec![]]).is_err());
    }

    #[test]
    fn repetition_penalty_follows_hf_and_checks_ids_first() {
        let mut l = logits(&[&[2.0, -2.0, 1.0], &[4.0, 4.0, -1.0]]);
        repetition_penalty(&mut l, &[2.0, 0.5], &[vec![0, 1, 0], vec![2]]).unwrap();
        assert_eq!(
            CpuBackend.download(&l).unwrap(),
            HostVec::F32(vec![1.0, -4.0, 1.0, 4.0, 4.0, -0.5])
        );
        let err = repetition_penalty(&mut l, &[2.0, 2.0], &[vec![0], vec![3]]);
        assert!(err.is_err());
        // Row 0 was not penalised before row 1's bad id was found.
        assert_eq!(
            CpuBackend.download(&l).unwrap(),
            HostVec::F32(vec![1.0, -4.0, 1.0, 4.0, 4.0, -0.5])
        );
    }
}
