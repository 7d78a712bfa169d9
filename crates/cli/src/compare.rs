//! Element-wise comparison of one activation against its reference, and the
//! contracts `qwen-cli verify` holds each op to.

use qwen_tensor::{bf16, f16, HostVec};

/// Relative factor of the tensor-core bound: a tensor-core GEMM may differ from
/// the CPU spec by `TC_FACTOR · Σ_k |x_k·w_k|` per output element (the
/// bound `crates/kernels-cuda/tests/twin.rs` documents), plus one f32 ulp
/// of the output for the final rounding, which both sides do once, on sums
/// that already differ (this matters where a large residual absorbs a
/// small projection).
pub const TC_FACTOR: f64 = 1e-5;

/// What an op's output must satisfy against its reference.
#[derive(Debug, Clone, PartialEq)]
pub enum Contract {
    /// Same bits.
    Exact,
    /// Tensor-core op: `|Δ| ≤ TC_FACTOR·mag + ulp(reference)` per element
    /// (the ulp of the reference's type: f32, or bf16 for the attention
    /// output); for a GEMM `mag[i] = Σ_k |x_k·w_k|` of that element.
    TensorCore(Vec<f32>),
    /// Tensor-core attention: the same test, `mag` from
    /// `qwen_kernels_cpu::attention_tc_magnitudes` in units of `TC_FACTOR`.
    TensorCoreAttention(Vec<f32>),
    /// `‖tested − reference‖₂ / ‖reference‖₂ ≤ bound`, for references that
    /// compute in another precision (Hugging Face in f32).
    RelL2(f64),
}

impl Contract {
    /// Short label for the table.
    pub fn label(&self) -> String {
        match self {
            Contract::Exact => "exact".into(),
            Contract::TensorCore(_) => format!("tc {TC_FACTOR:.0e}Σ|xw|"),
            Contract::TensorCoreAttention(_) => "tc attn bound".to_string(),
            Contract::RelL2(b) => format!("relL2<={b:.0e}"),
        }
    }
}

/// How far one activation is from its reference.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Elements compared.
    pub n: usize,
    /// Elements whose bits differ (in the tested dtype).
    pub differing: usize,
    pub max_abs: f64,
    /// Largest distance in units in the last place of the tested dtype.
    pub max_ulp: u64,
    pub rel_l2: f64,
    /// Flat index of the element with the largest |Δ| (None: no difference).
    pub worst: Option<usize>,
    /// Elements beyond the tensor-core bound (TensorCore contracts only).
    pub beyond_bound: usize,
    /// Whether the contract holds.
    pub ok: bool,
}

/// Maps a float's bits to an integer line on which adjacent floats are one
/// apart, so that the ulp distance is a subtraction (±0 coincide).
fn ordered(bits: u32, sign: u32) -> i64 {
    if bits & sign != 0 {
        -((bits & !sign) as i64)
    } else {
        bits as i64
    }
}

/// The reference converted to the tested dtype, as bit patterns; f32
/// references of bf16 activations are rounded to nearest even first.
fn bits_as(tested: &HostVec, reference: &HostVec) -> Vec<u32> {
    let r = reference.to_f32();
    match (tested, reference) {
        (a, b) if a.dtype() == b.dtype() => b.to_bits(),
        (HostVec::BF16(_), _) => r
            .iter()
            .map(|&v| bf16::from_f32(v).to_bits() as u32)
            .collect(),
        (HostVec::F16(_), _) => r
            .iter()
            .map(|&v| f16::from_f32(v).to_bits() as u32)
            .collect(),
        (HostVec::F32(_), _) => r.iter().map(|v| v.to_bits()).collect(),
        (HostVec::U32(_), _) => r.iter().map(|&v| v as u32).collect(),
    }
}

/// Compares `tested` with `reference` (same element count, checked by the
/// caller) and evaluates `contract`.
pub fn compare(tested: &HostVec, reference: &HostVec, contract: &Contract) -> Stats {
    let a = tested.to_f32();
    let b = reference.to_f32();
    let abits = tested.to_bits();
    let bbits = bits_as(tested, reference);
    let sign = match tested {
        HostVec::BF16(_) | HostVec::F16(_) => 0x8000,
        _ => 0x8000_0000,
    };
    // One rounding step of the reference's type (both sides round once).
    let eps = match reference {
        HostVec::BF16(_) => 2f64.powi(-7),
        _ => f32::EPSILON as f64,
    };
    let mut s = Stats {
        n: a.len(),
        ..Default::default()
    };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut worst_d = -1.0f64;
    for i in 0..a.len() {
        let (x, y) = (a[i] as f64, b[i] as f64);
        den += y * y;
        if abits[i] == bbits[i] && tested.dtype() == reference.dtype() {
            continue;
        }
        // A NaN on one side only is the worst difference there is.
        let d = if x.is_nan() || y.is_nan() {
            if x.is_nan() && y.is_nan() {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (x - y).abs()
        };
        num += d * d;
        if abits[i] != bbits[i] {
            s.differing += 1;
            let u = ordered(abits[i], sign).abs_diff(ordered(bbits[i], sign));
            s.max_ulp = s.max_ulp.max(u);
        }
        if d > worst_d && d > 0.0 {
            worst_d = d;
            s.worst = Some(i);
        }
        if let Contract::TensorCore(mag) | Contract::TensorCoreAttention(mag) = contract {
            let ulp = (b[i].abs().max(f32::MIN_POSITIVE) as f64) * eps;
            let bound = TC_FACTOR * mag[i] as f64 + ulp;
            // A NaN bound (a NaN input) counts as beyond it.
            if matches!(
                d.partial_cmp(&bound),
                None | Some(std::cmp::Ordering::Greater)
            ) {
                s.beyond_bound += 1;
            }
        }
    }
    s.max_abs = worst_d.max(0.0);
    s.rel_l2 = if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    };
    s.ok = match contract {
        Contract::Exact => s.differing == 0,
        Contract::TensorCore(_) | Contract::TensorCoreAttention(_) => s.beyond_bound == 0,
        // Written so that NaN fails.
        Contract::RelL2(bound) => s.rel_l2 <= *bound,
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(v: &[f32]) -> HostVec {
        HostVec::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
    }

    #[test]
    fn identical_is_exact() {
        let x = HostVec::F32(vec![1.0, -0.0, 3.0]);
        let s = compare(&x, &x, &Contract::Exact);
        assert!(s.ok);
        assert_eq!((s.differing, s.max_ulp, s.worst), (0, 0, None));
        assert_eq!(s.rel_l2, 0.0);
    }

    #[test]
    fn one_ulp_is_caught_and_located() {
        let a = bf(&[1.0, 2.0, -3.0, 4.0]);
        let HostVec::BF16(mut v) = a.clone() else {
            unreachable!()
        };
        v[2] = bf16::from_bits(v[2].to_bits() + 1);
        let b = HostVec::BF16(v);
        let s = compare(&b, &a, &Contract::Exact);
        assert!(!s.ok);
        assert_eq!((s.differing, s.max_ulp, s.worst), (1, 1, Some(2)));
        assert_eq!(s.max_abs, 2f64.powi(-6));
        // Across zero: +0 and the smallest negative subnormal are one apart.
        let z = compare(
            &HostVec::F32(vec![0.0]),
            &HostVec::F32(vec![-f32::from_bits(1)]),
            &Contract::Exact,
        );
        assert_eq!(z.max_ulp, 1);
    }

    #[test]
    fn tensor_core_bound() {
        let r = HostVec::F32(vec![1.0, 1.0]);
        let t = HostVec::F32(vec![1.0 + 1e-6, 1.0 + 3e-5]);
        let mag = vec![1.0, 1.0];
        let s = compare(&t, &r, &Contract::TensorCore(mag));
        assert_eq!(s.beyond_bound, 1);
        assert!(!s.ok);
        let s = compare(&t, &r, &Contract::TensorCore(vec![1.0, 10.0]));
        assert!(s.ok, "{s:?}");
    }

    #[test]
    fn tensor_core_attention_allows_one_bf16_step() {
        // 1.5 and its bf16 neighbours: one step (2⁻⁷) is within the
        // rounding allowance of a bf16 reference, two are not (mag 0).
        let r = bf(&[1.5]);
        let one = bf(&[1.5 + 2f32.powi(-7)]);
        let two = bf(&[1.5 + 2.0 * 2f32.powi(-7)]);
        let c = Contract::TensorCoreAttention(vec![0.0]);
        assert!(compare(&one, &r, &c).ok);
        let s = compare(&two, &r, &c);
        assert_eq!((s.ok, s.beyond_bound), (false, 1));
        // A magnitude widens the bound by TC_FACTOR·mag.
        let wide = Contract::TensorCoreAttention(vec![(2f64.powi(-7) / TC_FACTOR) as f32]);
        assert!(compare(&two, &r, &wide).ok);
    }

    #[test]
    fn rel_l2_against_f32_reference() {
        let r = HostVec::F32(vec![3.0, 4.0]);
        let t = bf(&[3.0, 4.0]);
        assert!(compare(&t, &r, &Contract::RelL2(0.0)).ok);
        let t = HostVec::F32(vec![3.0, 4.5]);
        let s = compare(&t, &r, &Contract::RelL2(0.05));
        assert!((s.rel_l2 - 0.1).abs() < 1e-12);
        assert!(!s.ok);
        let nan = HostVec::F32(vec![f32::NAN, 4.0]);
        assert!(!compare(&nan, &r, &Contract::RelL2(1.0)).ok);
    }
}
