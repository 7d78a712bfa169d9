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
    let tokens = meta.num_tokens;
    let cache_slots = check_attention(OP, q, k_cache, v_cache, tokens, geo, out)?;
    let (hq, hkv, d, bs) = (
        geo.num_q_heads,
        geo.num_kv_heads,
        geo.head_dim,
        geo.block_size,
    );
    let qs = bf16s(OP, "q", q)?;
    let kc = bf16s(OP, "k_cache", k_cache)?;
    let vc = bf16s(OP, "v_cache", v_cache)?;
    let pos = u32s(OP, "positions", &meta.positions)?;
    let seq = u32s(OP, "seq_of_token", &meta.seq_of_token)?;
    let tables = u32s(OP, "block_tables", &meta.block_tables)?;
    let mb = meta.max_blocks;
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
        attend_one(
            qh,
            pos[t] as usize + 1,
            scale,
            |p| &kc[slot(p)..slot(p) + d],
            |p| &vc[slot(p)..slot(p) + d],
            o,
        );
    });
    Ok(())
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
    let big_m = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut big_l = 0.0f32;
    let mut acc = vec![0.0f32; d];
    for c in 0..chunks {
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
