//! Launcher for attention.cu: per-chunk partials, merged in order by the
//! last chunk of each (token, kv head) to finish.

use qwen_tensor::{check_attention, AttnGeometry, BatchMeta, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::rope::check_head_dim;
use crate::{CudaBackend, Scratch};

/// Positions per split; must equal qwen_kernels_cpu::ATTN_CHUNK and CHUNK in attention.cu.
const CHUNK: usize = 64;
const _: () = assert!(CHUNK == qwen_kernels_cpu::ATTN_CHUNK);
/// Grids of up to this many blocks take attn_chunk (256 threads, built for
/// latency), larger ones attn_chunk_many (128 threads, more blocks per SM);
/// the thread counts must match ATTN_KERNEL's in attention.cu.
const FEW_BLOCKS: usize = 512;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_impl(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "attention";
        let tokens = meta.num_tokens;
        let d = geo.head_dim;
        check_attention(OP, q, k_cache, v_cache, tokens, geo, out)?;
        check_head_dim(OP, geo)?;
        if tokens == 0 {
            return Ok(());
        }
        let max_chunks = meta.max_context.div_ceil(CHUNK).max(1);
        let rows = tokens * geo.num_q_heads;
        let (mb, bs) = (int(OP, meta.max_blocks)?, int(OP, geo.block_size)?);
        let (hq, hkv, di, mc) = (
            int(OP, geo.num_q_heads)?,
            int(OP, geo.num_kv_heads)?,
            int(OP, d)?,
            int(OP, max_chunks)?,
        );
        // Keys and values of a chunk, then the group's scores.
        let group = geo.num_q_heads / geo.num_kv_heads;
        let smem = 2 * CHUNK * d * 2 + group * CHUNK * 4;
        // The merging block keeps one factor per (q head, chunk) where the
        // keys and values were: 64·head_dim floats, 8,192 chunks (524,288
        // positions) for Qwen3's head_dim 128 and a group of one.
        if group * max_chunks > CHUNK * d {
            return Err(shape_err(
                OP,
                format!(
                    "context of {} positions is too long for head_dim {d} with {group} q heads per kv head",
                    meta.max_context
                ),
            ));
        }
        let blocks = tokens * geo.num_kv_heads * max_chunks;
        let (name, threads) = if blocks <= FEW_BLOCKS {
            ("attn_chunk", 256)
        } else {
            ("attn_chunk_many", 128)
        };
        let f = self.kernel(name);
        let mut cfg = grid(
            ((tokens * geo.num_kv_heads) as u32, max_chunks as u32, 1),
            (threads, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        let part_shape = [rows * max_chunks * (d + 2)];
        self.with_scratch(Scratch::AttnPartials, &part_shape, DType::F32, |part| {
            // Chunks finished per (token, kv head): zero when created, and
            // set back to zero by the block that merges them.
            let done_shape = [tokens * geo.num_kv_heads];
            self.with_scratch(Scratch::AttnDone, &done_shape, DType::U32, |done| {
                let mut b = self.launch(f);
                b.arg(bf16s(OP, "q", q)?)
                    .arg(bf16s(OP, "k_cache", k_cache)?)
                    .arg(bf16s(OP, "v_cache", v_cache)?)
                    .arg(u32s(OP, "positions", &meta.positions)?)
                    .arg(u32s(OP, "seq_of_token", &meta.seq_of_token)?)
                    .arg(u32s(OP, "block_tables", &meta.block_tables)?)
                    .arg(&mb)
                    .arg(&bs)
                    .arg(&hq)
                    .arg(&hkv)
                    .arg(&di)
                    .arg(&scale)
                    .arg(&mc)
                    .arg(f32s_mut(OP, "partials", part)?)
                    .arg(u32s_mut(OP, "done", done)?)
                    .arg(bf16s_mut(OP, "out", out)?);
                // SAFETY: argument order and types match attn_chunk{,_many} in attention.cu; the
                // partials buffer holds max_chunks entries for every (token, q head), done
                // one counter per (token, kv head), and the dynamic shared memory holds a
                // chunk's keys, values and scores.
                unsafe { b.launch(cfg) }.map_err(dev)
            })
        })
    }
}
