//! Per-head q/k RMSNorm and rotary position embedding, writing q for
//! attention and k/v into the paged KV cache.

use half::bf16;
use qwen_tensor::{AttnGeometry, BatchMeta, Result};
use rayon::prelude::*;

use crate::numerics::head_reduce;
use crate::storage::{bf16s_mut, f32s, shape_err, u32s, T};
use crate::CpuBackend;

/// **Spec.** For token `t` at position `p = positions[t]`, each q head and
/// each k head `x` (a strided view of `qkv[t]`: q heads first, then k, then v):
/// `inv = 1 / sqrt(head_reduce(x²) / D + eps)`, `n[i] = w[i] * (x[i] * inv)`
/// (w = q_norm or k_norm, all f32), then rotate-half RoPE with
/// `c = rope[p, i]`, `s = rope[p, D/2 + i]`, for `i < D/2`:
/// `y[i] = n[i]·c − n[i+D/2]·s`, `y[i+D/2] = n[i+D/2]·c + n[i]·s`
/// (two rounded products, one rounded sum). q heads go to
/// `q_out[t, h·D + i] = bf16_rne(y[i])`; k heads to the cache slot
/// `slots[t]` as bf16; v heads are rounded to bf16 and stored unchanged.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_store(
    qkv: &T,
    q_norm: &T,
    k_norm: &T,
    eps: f32,
    rope: &T,
    meta: &BatchMeta<CpuBackend>,
    geo: AttnGeometry,
    q_out: &mut T,
    k_cache: &mut T,
    v_cache: &mut T,
) -> Result<()> {
    const OP: &str = "qk_norm_rope_store";
    let d = geo.head_dim;
    let (hq, hkv) = (geo.num_q_heads, geo.num_kv_heads);
    let tokens = meta.num_tokens();
    let (max_pos, cache_slots) = qwen_tensor::check_qk_norm_rope(
        OP, qkv, q_norm, k_norm, rope, tokens, geo, q_out, k_cache, v_cache,
    )?;
    qwen_tensor::check_batch(OP, meta, geo, Some(max_pos), cache_slots)?;
    let qkv = f32s(OP, "qkv", qkv)?;
    let qn = f32s(OP, "q_norm", q_norm)?;
    let kn = f32s(OP, "k_norm", k_norm)?;
    let rope = f32s(OP, "rope", rope)?;
    let pos = u32s(OP, "positions", meta.positions())?;
    let slots = u32s(OP, "slots", meta.slots())?;
    if let Some(&p) = pos.iter().find(|&&p| p as usize >= max_pos) {
        return Err(shape_err(
            OP,
            format!("position {p} is past the rope table ({max_pos})"),
        ));
    }
    if let Some(&s) = slots.iter().find(|&&s| s as usize >= cache_slots) {
        return Err(shape_err(
            OP,
            format!("cache slot {s} is past the cache ({cache_slots} slots)"),
        ));
    }
    let width = geo.qkv_width();
    let q_out = bf16s_mut(OP, "q_out", q_out)?;
    q_out
        .par_chunks_mut(hq * d)
        .enumerate()
        .for_each(|(t, qrow)| {
            let row = &qkv[t * width..(t + 1) * width];
            let cs = &rope[pos[t] as usize * d..(pos[t] as usize + 1) * d];
            for h in 0..hq {
                norm_rope_head(
                    &row[h * d..(h + 1) * d],
                    qn,
                    eps,
                    cs,
                    &mut qrow[h * d..(h + 1) * d],
                );
            }
        });
    let kc = bf16s_mut(OP, "k_cache", k_cache)?;
    for t in 0..tokens {
        let row = &qkv[t * width..(t + 1) * width];
        let cs = &rope[pos[t] as usize * d..(pos[t] as usize + 1) * d];
        let dst = &mut kc[slots[t] as usize * hkv * d..(slots[t] as usize + 1) * hkv * d];
        for h in 0..hkv {
            let src = &row[(hq + h) * d..(hq + h + 1) * d];
            norm_rope_head(src, kn, eps, cs, &mut dst[h * d..(h + 1) * d]);
        }
    }
    let vc = bf16s_mut(OP, "v_cache", v_cache)?;
    for t in 0..tokens {
        let src = &qkv[t * width + (hq + hkv) * d..(t + 1) * width];
        let dst = &mut vc[slots[t] as usize * hkv * d..(slots[t] as usize + 1) * hkv * d];
        for (o, &v) in dst.iter_mut().zip(src) {
            *o = bf16::from_f32(v);
        }
    }
    Ok(())
}

/// One head: RMSNorm with weight `w`, then RoPE with the `[cos | sin]` row `cs`.
fn norm_rope_head(x: &[f32], w: &[f32], eps: f32, cs: &[f32], out: &mut [bf16]) {
    let d = x.len();
    let half = d / 2;
    let ss = head_reduce(d, |i| x[i] * x[i]);
    let inv = 1.0 / (ss / d as f32 + eps).sqrt();
    let n = |i: usize| w[i] * (x[i] * inv);
    for i in 0..half {
        let (c, s) = (cs[i], cs[half + i]);
        let (lo, hi) = (n(i), n(i + half));
        out[i] = bf16::from_f32(lo * c - hi * s);
        out[i + half] = bf16::from_f32(hi * c + lo * s);
    }
}
