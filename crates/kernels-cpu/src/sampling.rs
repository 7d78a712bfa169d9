//! Sampling primitives: argmax, repetition penalty, and filtered sampling.

use qwen_tensor::{Result, SampleParams};

use crate::storage::{f32s, f32s_mut, shape_err, T};

/// **Spec.** Index of the largest logit per row; NaN never wins; the lowest
/// index wins ties. logits f32 `[B, V]`.
pub fn argmax(logits: &T) -> Result<Vec<u32>> {
    let (_, v) = qwen_tensor::expect_2d("argmax", "logits", logits)?;
    let l = f32s("argmax", "logits", logits)?;
    Ok(l.chunks(v.max(1)).map(argmax_row).collect())
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
/// IEEE op per logit.
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
    for ((row, &p), hist) in l.chunks_mut(v).zip(penalty).zip(history) {
        let mut seen = hist.clone();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            let x = row
                .get_mut(id as usize)
                .ok_or_else(|| shape_err(OP, format!("token {id} outside vocabulary {v}")))?;
            *x = if *x > 0.0 { *x / p } else { *x * p };
        }
    }
    Ok(())
}

/// Samples one token per row (placeholder until the filtered sampler lands).
pub fn sample(logits: &T, params: &[SampleParams], uniform: &[f32]) -> Result<Vec<u32>> {
    let _ = (params, uniform);
    argmax(logits)
}
