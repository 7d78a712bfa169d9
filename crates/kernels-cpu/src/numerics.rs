//! The shared numerical building blocks every op is specified with: the one
//! `exp` both backends use, and the two fixed reduction orders.
//!
//! The CUDA backend mirrors this file in `numerics.cuh`, operation for
//! operation. Nothing here uses FMA: each product and sum is rounded on its
//! own (CUDA compiles with `--fmad=false`), and sqrt/division are IEEE.

/// `exp(x)` in f32 without libm: `2^n · e^r` with `n = rint(x·log2 e)`, `r`
/// from a two-part Cody–Waite reduction, `e^r` from the degree-7 Taylor
/// polynomial in Horner form, and `2^n` applied as two exact power-of-two
/// scalings (so subnormal results round once, the same on every device).
/// Accurate to about 2 ulp on normal results.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    if x < EXP_LO {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = C7;
    p = p * r + C6;
    p = p * r + C5;
    p = p * r + C4;
    p = p * r + C3;
    p = p * r + C2;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let n = n as i32;
    let n1 = n >> 1;
    let n2 = n - n1;
    (p * pow2i(n1)) * pow2i(n2)
}

/// `x · sigmoid(x)` as `x / (1 + exp(-x))`, one IEEE division.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `2^k` for `k` in `[-126, 127]`, built from its bits.
#[inline]
fn pow2i(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 1.44269504
const LN2_HI: f32 = f32::from_bits(0x3f31_8000); // 0.693359375, exact times small ints
const LN2_LO: f32 = f32::from_bits(0xb95e_8083); // -2.12194440e-4
/// Above this `exp` returns +inf (88.7228394).
pub const EXP_HI: f32 = f32::from_bits(0x42b1_7218);
/// Below this `exp` returns 0 (-103.972084).
pub const EXP_LO: f32 = f32::from_bits(0xc2cf_f1b5);
const C2: f32 = f32::from_bits(0x3f00_0000); // 1/2
const C3: f32 = f32::from_bits(0x3e2a_aaab); // 1/6
const C4: f32 = f32::from_bits(0x3d2a_aaab); // 1/24
const C5: f32 = f32::from_bits(0x3c08_8889); // 1/120
const C6: f32 = f32::from_bits(0x3ab6_0b61); // 1/720
const C7: f32 = f32::from_bits(0x3950_0d01); // 1/5040

/// Lanes of the row reduction.
pub const ROW_LANES: usize = 256;
/// Order in which the row reduction pairs lanes (`lane ^ offset`): first
/// inside each group of 8 (one GPU thread's vector), then across the 32
/// threads of a warp.
pub const ROW_BUTTERFLY: [usize; 8] = [4, 2, 1, 128, 64, 32, 16, 8];

/// **Row reduction**, used for every reduction along a hidden-size row
/// (RMSNorm sums of squares, every matmul dot product): element `k` goes to
/// lane `k % 256`; each lane adds its elements in increasing `k`, starting
/// from `+0.0`; the lanes are then combined pairwise in [`ROW_BUTTERFLY`]
/// order. `term(k)` yields the value to add for element `k`.
#[inline]
pub fn row_reduce(len: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; ROW_LANES];
    let full = len / ROW_LANES * ROW_LANES;
    let mut base = 0;
    while base < full {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += term(base + j);
        }
        base += ROW_LANES;
    }
    for (j, a) in acc.iter_mut().enumerate().take(len - full) {
        *a += term(full + j);
    }
    row_lanes_combine(&mut acc)
}

/// The lane-combining step of [`row_reduce`], for callers that fill the 256
/// lane accumulators themselves (the matmul kernel does, for speed).
#[inline]
pub fn row_lanes_combine(acc: &mut [f32; ROW_LANES]) -> f32 {
    // Lanes whose bits of already-used offsets are clear hold the butterfly
    // value; lane 0 ends with the result every GPU lane ends with.
    let mut done = 0usize;
    for off in ROW_BUTTERFLY {
        let mut j = 0;
        while j < ROW_LANES {
            if j & (done | off) == 0 {
                acc[j] += acc[j | off];
            }
            j += 1;
        }
        done |= off;
    }
    acc[0]
}

/// Lanes of the head reduction.
pub const HEAD_LANES: usize = 32;
/// Order in which the head reduction pairs lanes.
pub const HEAD_BUTTERFLY: [usize; 5] = [16, 8, 4, 2, 1];

/// **Head reduction**, used along one attention head (`head_dim` elements,
/// a multiple of 32): lane `t` owns the contiguous elements
/// `[t·D/32, (t+1)·D/32)` and adds them in order from `+0.0`; lanes are
/// combined pairwise in [`HEAD_BUTTERFLY`] order (a warp's xor shuffles).
#[inline]
pub fn head_reduce(head_dim: usize, term: impl Fn(usize) -> f32) -> f32 {
    let per = head_dim / HEAD_LANES;
    let mut acc = [0.0f32; HEAD_LANES];
    for (t, a) in acc.iter_mut().enumerate() {
        for i in t * per..(t + 1) * per {
            *a += term(i);
        }
    }
    let mut done = 0usize;
    for off in HEAD_BUTTERFLY {
        for j in 0..HEAD_LANES {
            if j & (done | off) == 0 {
                acc[j] += acc[j | off];
            }
        }
        done |= off;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm_everywhere() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-100.0) > 0.0, "subnormal results are kept");
    }

    #[test]
    fn silu_matches_definition() {
        for x in [-30.0f32, -2.5, -0.1, 0.0, 0.7, 3.0, 50.0] {
            let want = x as f64 / (1.0 + (-x as f64).exp());
            assert!((silu(x) as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3));
        }
    }

    #[test]
    fn row_reduce_follows_the_lane_order() {
        // With values that make rounding order visible, compare with an
        // explicit simulation of 256 lanes and a full xor butterfly.
        let len = 1000;
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 * 1.37e-3 + 1e4 * ((i % 3) as f32))
            .collect();
        let mut lanes = [0.0f32; 256];
        for (k, x) in v.iter().enumerate() {
            lanes[k % 256] += x;
        }
        for off in ROW_BUTTERFLY {
            let prev = lanes;
            for j in 0..256 {
                lanes[j] = prev[j] + prev[j ^ off];
            }
        }
        assert!(lanes.iter().all(|&l| l.to_bits() == lanes[0].to_bits()));
        assert_eq!(row_reduce(len, |k| v[k]).to_bits(), lanes[0].to_bits());
        let exact: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((row_reduce(len, |k| v[k]) as f64 - exact).abs() < 1e-6 * exact);
    }

    #[test]
    fn head_reduce_follows_the_lane_order() {
        let d = 128;
        let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let mut lanes = [0.0f32; 32];
        for (t, l) in lanes.iter_mut().enumerate() {
            for x in &v[t * 4..t * 4 + 4] {
                *l += x;
            }
        }
        for off in HEAD_BUTTERFLY {
            let prev = lanes;
            for j in 0..32 {
                lanes[j] = prev[j] + prev[j ^ off];
            }
        }
        assert_eq!(head_reduce(d, |i| v[i]).to_bits(), lanes[0].to_bits());
    }
}
