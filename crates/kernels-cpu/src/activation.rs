//! The gated SiLU of the MLP.

use half::bf16;
use qwen_tensor::Result;
use rayon::prelude::*;

use crate::numerics::silu;
use crate::storage::{bf16s_mut, f32s, T};

/// **Spec.** `out[t, i] = bf16_rne(silu(g) * u)` with `g = gate_up[t, i]`,
/// `u = gate_up[t, I + i]`, `silu(g) = g / (1 + exp(-g))` using the shared
/// `numerics::exp`; all f32, one rounding. gate_up f32 `[T, 2I]`, out bf16 `[T, I]`.
pub fn silu_mul(gate_up: &T, out: &mut T) -> Result<()> {
    const OP: &str = "silu_mul";
    let (_, i) = qwen_tensor::check_silu_mul(OP, gate_up, out)?;
    let two_i = 2 * i;
    let gu = f32s(OP, "gate_up", gate_up)?;
    let out = bf16s_mut(OP, "out", out)?;
    out.par_chunks_mut(i)
        .zip(gu.par_chunks(two_i))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = bf16::from_f32(silu(g) * u);
            }
        });
    Ok(())
}

/// **Spec.** [`rms_norm_matmul`](crate::matmul::rms_norm_matmul) into
/// `gate_up`, then [`silu_mul`] into `out`: the fused op is defined as the
/// two in sequence.
pub fn rms_norm_matmul_silu(
    x: &T,
    norm_w: &T,
    eps: f32,
    w: &T,
    gate_up: &mut T,
    out: &mut T,
) -> Result<()> {
    crate::matmul::rms_norm_matmul(x, norm_w, eps, w, gate_up)?;
    silu_mul(gate_up, out)
}
