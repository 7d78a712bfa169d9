//! How far a tensor-core attention (a backend's prompt rows, see
//! `Backend::set_tensor_core_rows`) may stray from the [`attention`] spec:
//! the one bound the GPU twin tests and `qwen-cli verify` hold it to.
//!
//! [`attention`]: crate::attention

use qwen_tensor::{AttnGeometry, BatchLayout};

/// The factor of the bound: `|tested − spec| ≤ TC_ATTENTION_FACTOR · mag +
/// 2⁻⁷·|spec|` per element, `mag` from [`attention_tc_magnitudes`].
pub const TC_ATTENTION_FACTOR: f64 = 1e-5;

/// The scale of each output element's bound, `[tokens, q heads, head_dim]`
/// like the attention output, for q (`[tokens, q heads · head_dim]`) and
/// the paged caches (`[blocks, block_size, kv heads, head_dim]`), all as
/// f32. For element i of (token, q head), with `a_j = scale·Σ_k |q_k·k_jk|`
/// over the attended keys j, `A = max a_j`, `w_j` the softmax weights and
/// `V_i = Σ_j w_j·|v_ji|`: `mag = (4·A + 3)·V_i`.
///
/// Why: each score may be off by `1e-5·a_j` (the tensor-core GEMM bound), which
/// moves every weight by a factor within `1 ± 2e-5·A` once normalised, and
/// so the output by at most `2·2e-5·A·V_i`; the weights' rounding (bf16
/// hi + lo, 2⁻¹⁷), the rescaling and the tensor cores' sum over the keys
/// fit in `3e-5·V_i`; both sides then round to bf16 once, which the
/// `2⁻⁷·|spec|` term covers.
///
/// ```
/// use qwen_kernels_cpu::attention_tc_magnitudes;
/// use qwen_tensor::{AttnGeometry, BatchLayout};
/// // One token at position 0: its own key only, so w = 1.
/// let geo = AttnGeometry { num_q_heads: 1, num_kv_heads: 1, head_dim: 2, block_size: 1 };
/// let layout = BatchLayout {
///     positions: vec![0], seq_of_token: vec![0], block_tables: vec![0],
///     max_blocks: 1, block_size: 1,
/// };
/// let m = attention_tc_magnitudes(geo, &layout, &[1.0, -2.0], &[3.0, 1.0], &[0.5, -4.0], 1.0);
/// // A = |1·3| + |−2·1| = 5: (4·5 + 3)·|v|.
/// assert_eq!(m, vec![23.0 * 0.5, 23.0 * 4.0]);
/// ```
pub fn attention_tc_magnitudes(
    geo: AttnGeometry,
    layout: &BatchLayout,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    scale: f32,
) -> Vec<f32> {
    let (hq, hkv, d, bs) = (
        geo.num_q_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    let group = hq / hkv;
    let t = layout.num_tokens();
    let mut mag = vec![0.0f32; t * hq * d];
    for tok in 0..t {
        let p = layout.positions[tok] as usize;
        let table = &layout.block_tables[layout.seq_of_token[tok] as usize * layout.max_blocks..];
        let row =
            |j: usize, h: usize| ((table[j / bs] as usize * bs + j % bs) * hkv + h / group) * d;
        for h in 0..hq {
            let qr = &q[(tok * hq + h) * d..][..d];
            let (mut big_a, mut scores) = (0.0f64, Vec::with_capacity(p + 1));
            for j in 0..=p {
                let kr = &k_cache[row(j, h)..][..d];
                let (mut dot, mut abs) = (0.0f64, 0.0f64);
                for (&a, &b) in qr.iter().zip(kr) {
                    dot += a as f64 * b as f64;
                    abs += (a as f64 * b as f64).abs();
                }
                big_a = big_a.max(abs * scale as f64);
                scores.push(dot * scale as f64);
            }
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let l: f64 = w.iter().sum();
            for i in 0..d {
                let v: f64 = (0..=p)
                    .map(|j| w[j] / l * (v_cache[row(j, h) + i] as f64).abs())
                    .sum();
                mag[(tok * hq + h) * d + i] = ((4.0 * big_a + 3.0) * v) as f32;
            }
        }
    }
    mag
}
