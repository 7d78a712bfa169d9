//! Launcher for rope.cu.

use qwen_tensor::{AttnGeometry, BatchMeta, Result};

use crate::device::{bf16s_mut, dev, f32s, u32s, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_norm_rope_store_impl(
        &self,
        qkv: &T,
        q_norm: &T,
        k_norm: &T,
        eps: f32,
        rope: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        q_out: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
    ) -> Result<()> {
        const OP: &str = "qk_norm_rope_store";
        let d = geo.head_dim;
        let tokens = meta.num_tokens();
        let (rope_rows, cache_slots) = qwen_tensor::check_qk_norm_rope(
            OP, qkv, q_norm, k_norm, rope, tokens, geo, q_out, k_cache, v_cache,
        )?;
        qwen_tensor::check_batch(OP, meta, geo, Some(rope_rows), cache_slots)?;
        check_head_dim(OP, geo)?;
        if tokens == 0 {
            return Ok(());
        }
        let (hq, hkv, di) = (
            int(OP, geo.num_q_heads)?,
            int(OP, geo.num_kv_heads)?,
            int(OP, d)?,
        );
        let warps = tokens * (geo.num_q_heads + 2 * geo.num_kv_heads);
        let ti = int(OP, tokens)?;
        let mut b = self.launch(self.kernel("qk_norm_rope_store"));
        b.arg(f32s(OP, "qkv", qkv)?)
            .arg(f32s(OP, "q_norm", q_norm)?)
            .arg(f32s(OP, "k_norm", k_norm)?)
            .arg(&eps)
            .arg(f32s(OP, "rope", rope)?)
            .arg(u32s(OP, "positions", meta.positions())?)
            .arg(u32s(OP, "slots", meta.slots())?)
            .arg(bf16s_mut(OP, "q_out", q_out)?)
            .arg(bf16s_mut(OP, "k_cache", k_cache)?)
            .arg(bf16s_mut(OP, "v_cache", v_cache)?)
            .arg(&ti)
            .arg(&hq)
            .arg(&hkv)
            .arg(&di);
        // SAFETY: argument order and types match qk_norm_rope_store in rope.cu;
        // every position has a rope row and every slot is in the caches
        // (check_batch, on the bounds upload_batch recorded for these tensors).
        // ROPE_WARPS warps a block, one per (token, head).
        let blocks = warps.div_ceil(ROPE_WARPS) as u32;
        unsafe { b.launch(grid((blocks, 1, 1), (32 * ROPE_WARPS as u32, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}

/// Warps a `qk_norm_rope_store` block (`ROPE_WARPS` in rope.cu).
const ROPE_WARPS: usize = 8;

/// The head widths attn_chunk is instantiated for (the shared checks
/// cover the rest of the geometry).
pub(crate) fn check_head_dim(op: &'static str, geo: AttnGeometry) -> Result<()> {
    let d = geo.head_dim;
    if ![32, 64, 128, 256].contains(&d) {
        return Err(shape_err(
            op,
            format!("head_dim {d} is not supported on CUDA (32, 64, 128 or 256)"),
        ));
    }
    Ok(())
}
