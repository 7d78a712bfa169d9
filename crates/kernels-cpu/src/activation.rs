//! The gated SiLU of the MLP.

use half::bf16;
use qwen_tensor::Result;
use rayon::prelude::*;

use crate::numerics::silu;
use crate::storage::{bf16s_mut, f32s, shape_err, T};

/// **Spec.** `out[t, i] = bf16_rne(silu(g) * u)` with `g = gate_up[t, i]`,
/// `u = gate_up[t, I + i]`, `silu(g) = g / (1 + exp(-g))` using the shared
/// `numerics::exp`; all f32, one rounding. gate_up f32 `[T, 2I]`, out bf16 `[T, I]`.
pub fn silu_mul(gate_up: &T, out: &mut T) -> Result<()> {
    const OP: &str = "silu_mul";
    let (t, two_i) = qwen_tensor::expect_2d(OP, "gate_up", gate_up)?;
    if two_i % 2 != 0 {
        return Err(shape_err(OP, format!("gate_up width {two_i} is odd")));
    }
    let i = two_i / 2;
    qwen_tensor::expect_shape(OP, "out", out, &[t, i])?;
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
