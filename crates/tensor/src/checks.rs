//! Shape checks shared by every backend's ops, so each op's shape contract
//! is written once.

use crate::{expect_2d, expect_shape, AttnGeometry, Backend, BatchMeta, Error, Result, Tensor};

fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

/// `x [T, K]` against `w [N, K]`, and `out [T, N]`: returns (T, K, N).
pub fn check_projection<B: Backend>(
    op: &'static str,
    x: &Tensor<B>,
    w: &Tensor<B>,
    out: &Tensor<B>,
) -> Result<(usize, usize, usize)> {
    let (t, k) = expect_2d(op, "x", x)?;
    let (n, kw) = expect_2d(op, "w", w)?;
    if k != kw {
        return Err(shape_err(op, format!("x has {k} columns but w has {kw}")));
    }
    expect_shape(op, "out", out, &[t, n])?;
    Ok((t, k, n))
}

/// [`check_projection`] plus a norm weight of the row width.
pub fn check_norm_projection<B: Backend>(
    op: &'static str,
    x: &Tensor<B>,
    norm_w: &Tensor<B>,
    w: &Tensor<B>,
    out: &Tensor<B>,
) -> Result<(usize, usize, usize)> {
    let (t, k, n) = check_projection(op, x, w, out)?;
    expect_shape(op, "norm_w", norm_w, &[k])?;
    Ok((t, k, n))
}

/// `gate_up [T, 2I]` (gate columns, then up) and `out [T, I]`: returns (T, I).
pub fn check_silu_mul<B: Backend>(
    op: &'static str,
    gate_up: &Tensor<B>,
    out: &Tensor<B>,
) -> Result<(usize, usize)> {
    let (t, two_i) = expect_2d(op, "gate_up", gate_up)?;
    if two_i % 2 != 0 {
        return Err(shape_err(op, format!("gate_up width {two_i} is odd")));
    }
    expect_shape(op, "out", out, &[t, two_i / 2])?;
    Ok((t, two_i / 2))
}

/// Head width a multiple of 32 (the head reduction's lanes), q heads a
/// multiple of kv heads, a non-empty cache block.
pub fn check_geometry(op: &'static str, geo: AttnGeometry) -> Result<()> {
    let d = geo.head_dim;
    if d == 0 || !d.is_multiple_of(32) {
        return Err(shape_err(
            op,
            format!("head_dim {d} must be a positive multiple of 32"),
        ));
    }
    if geo.num_kv_heads == 0 || !geo.num_q_heads.is_multiple_of(geo.num_kv_heads) {
        return Err(shape_err(
            op,
            format!(
                "{} q heads cannot share {} kv heads",
                geo.num_q_heads, geo.num_kv_heads
            ),
        ));
    }
    if geo.block_size == 0 {
        return Err(shape_err(op, "block_size must be positive".into()));
    }
    Ok(())
}

/// A K or V cache of `geo`'s block shape; returns its number of slots.
pub fn check_cache<B: Backend>(
    op: &'static str,
    cache: &Tensor<B>,
    geo: AttnGeometry,
) -> Result<usize> {
    match *cache.shape() {
        [blocks, bs, h, d]
            if bs == geo.block_size && h == geo.num_kv_heads && d == geo.head_dim =>
        {
            Ok(blocks * bs)
        }
        _ => Err(shape_err(
            op,
            format!("cache shape {:?} does not match {geo:?}", cache.shape()),
        )),
    }
}

/// Attention's operands: `geo` valid, q and out `[T, Hq·D]`, K and V caches
/// of `geo`'s block shape; returns the caches' number of slots.
pub fn check_attention<B: Backend>(
    op: &'static str,
    q: &Tensor<B>,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
    tokens: usize,
    geo: AttnGeometry,
    out: &Tensor<B>,
) -> Result<usize> {
    check_geometry(op, geo)?;
    expect_shape(op, "q", q, &[tokens, geo.q_width()])?;
    expect_shape(op, "out", out, &[tokens, geo.q_width()])?;
    let slots = check_cache(op, k_cache, geo)?;
    check_cache(op, v_cache, geo)?;
    Ok(slots)
}

/// qk_norm_rope_store's operands: `geo` valid, qkv `[T, qkv_width]`, the
/// two norm weights `[D]`, a rope table `[positions, D]`, q_out
/// `[T, Hq·D]`, K and V caches of `geo`'s block shape; returns (rope
/// positions, cache slots).
#[allow(clippy::too_many_arguments)]
pub fn check_qk_norm_rope<B: Backend>(
    op: &'static str,
    qkv: &Tensor<B>,
    q_norm: &Tensor<B>,
    k_norm: &Tensor<B>,
    rope: &Tensor<B>,
    tokens: usize,
    geo: AttnGeometry,
    q_out: &Tensor<B>,
    k_cache: &Tensor<B>,
    v_cache: &Tensor<B>,
) -> Result<(usize, usize)> {
    let d = geo.head_dim;
    check_geometry(op, geo)?;
    expect_shape(op, "qkv", qkv, &[tokens, geo.qkv_width()])?;
    expect_shape(op, "q_norm", q_norm, &[d])?;
    expect_shape(op, "k_norm", k_norm, &[d])?;
    expect_shape(op, "q_out", q_out, &[tokens, geo.q_width()])?;
    let (positions, rope_w) = expect_2d(op, "rope", rope)?;
    if rope_w != d {
        return Err(shape_err(
            op,
            format!("rope table width {rope_w} != head_dim {d}"),
        ));
    }
    let slots = check_cache(op, k_cache, geo)?;
    check_cache(op, v_cache, geo)?;
    Ok((positions, slots))
}

/// The batch `meta` against what an attention op indexes with it: the
/// geometry's block size is the layout's, every token's position has a row
/// of the rope table (when the op reads one, `rope_positions` rows), and
/// every cache slot the tokens' contexts reach is inside a cache of
/// `cache_slots` slots. A backend that does not read the layout back (a
/// GPU) relies on this instead of checking each index.
pub fn check_batch<B: Backend>(
    op: &'static str,
    meta: &BatchMeta<B>,
    geo: AttnGeometry,
    rope_positions: Option<usize>,
    cache_slots: usize,
) -> Result<()> {
    if meta.num_tokens() == 0 {
        return Ok(());
    }
    if meta.block_size() != geo.block_size {
        return Err(shape_err(
            op,
            format!(
                "the batch layout has blocks of {} positions, the cache {}",
                meta.block_size(),
                geo.block_size
            ),
        ));
    }
    if let Some(rows) = rope_positions {
        if meta.positions_end() > rows {
            return Err(shape_err(
                op,
                format!(
                    "position {} is past the rope table ({rows})",
                    meta.positions_end() - 1
                ),
            ));
        }
    }
    if meta.slots_end() > cache_slots {
        return Err(shape_err(
            op,
            format!(
                "the batch reaches cache slot {} but the cache has {cache_slots}",
                meta.slots_end() - 1
            ),
        ));
    }
    Ok(())
}
