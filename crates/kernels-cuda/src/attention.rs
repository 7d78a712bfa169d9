//! Launcher for attention.cu: per-chunk partials, merged in order by the
//! last chunk of each (token, kv head) to finish; with one token per
//! sequence, q/k-norm and RoPE done in the same kernel.

use qwen_tensor::{check_attention, AttnGeometry, BatchMeta, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::rope::check_head_dim;
use crate::{CudaBackend, Scratch};

/// Positions per split; must equal qwen_kernels_cpu::ATTN_CHUNK and CHUNK in attention.cu.
const CHUNK: usize = 64;
const _: () = assert!(CHUNK == qwen_kernels_cpu::ATTN_CHUNK);
/// Decode grids of up to this many (token, kv head, chunk) blocks take
/// attn_chunk (256 threads, built for latency), larger ones attn_span.
const FEW_BLOCKS: usize = 512;
/// Chunks per attn_span block; SPAN in attention.cu.
const SPAN: usize = 4;
/// Query rows (token, q head) per pass of attn_tile; TILE_ROWS in attention.cu.
const TILE_ROWS: usize = 32;
const _: () = assert!(qwen_tensor::QUERY_TILE == 16); // TILE_TOKENS in attention.cu

/// The inputs of qk_norm_rope_store that attn_rope_chunk* read.
pub(crate) struct RopeArgs<'a> {
    pub qkv: &'a T,
    pub q_norm: &'a T,
    pub k_norm: &'a T,
    pub eps: f32,
    pub rope: &'a T,
}

/// Where a launch's q comes from: given, or made in the kernel (which then
/// writes q out and the new rows into the caches).
enum QFrom<'a> {
    Given,
    Rope(RopeArgs<'a>),
}

/// One batch's sequence count (the rows of its block tables).
fn seqs(meta: &BatchMeta<CudaBackend>) -> usize {
    meta.block_tables.shape().first().copied().unwrap_or(0)
}

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
        let tokens = meta.num_tokens;
        if tokens > 0 && seqs(meta) != tokens {
            return self.attention_tiles(q, k_cache, v_cache, meta, geo, scale, out);
        }
        let chunks = meta.max_context.div_ceil(CHUNK).max(1);
        if tokens * geo.num_kv_heads * chunks > FEW_BLOCKS {
            return self.attention_spans(q, k_cache, v_cache, meta, geo, scale, out);
        }
        self.attention_launch(QFrom::Given, q, k_cache, v_cache, meta, geo, scale, out)
    }

    /// Attention for a large decode batch (attn_span): a block per (token,
    /// kv head) and SPAN chunks, copying a chunk while it sums the one
    /// before.
    #[allow(clippy::too_many_arguments)]
    fn attention_spans(
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
        let max_chunks = meta.max_context.div_ceil(CHUNK).max(1);
        // Two stages of a chunk's keys and values, then the group's scores;
        // the merging block keeps a factor per (q head, chunk) there.
        let group = geo.num_q_heads / geo.num_kv_heads;
        let smem = (4 * CHUNK * d * 2 + group * CHUNK * 4).max(group * max_chunks * 4);
        // (attn_span's static shared memory is under 2 KB.)
        if smem + 2048 > self.dev.smem_optin {
            return Err(shape_err(
                OP,
                format!(
                    "context of {} positions is too long for head_dim {d} with {group} q heads per kv head",
                    meta.max_context
                ),
            ));
        }
        let (mb, bs) = (int(OP, meta.max_blocks)?, int(OP, geo.block_size)?);
        let (hq, hkv, di, mc) = (
            int(OP, geo.num_q_heads)?,
            int(OP, geo.num_kv_heads)?,
            int(OP, d)?,
            int(OP, max_chunks)?,
        );
        let mut cfg = grid(
            (
                (tokens * geo.num_kv_heads) as u32,
                max_chunks.div_ceil(SPAN) as u32,
                1,
            ),
            (128, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        let part_shape = [tokens * geo.num_q_heads * max_chunks * (d + 2)];
        self.with_scratch(Scratch::AttnPartials, &part_shape, DType::F32, |part| {
            // Spans finished per (token, kv head): zero when created, and set
            // back to zero by the block that merges them.
            let done_shape = [tokens * geo.num_kv_heads];
            self.with_scratch(Scratch::AttnDone, &done_shape, DType::U32, |done| {
                let mut b = self.launch(self.kernel("attn_span"));
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
                // SAFETY: argument order and types match attn_span in attention.cu; one
                // token per sequence (checked by the caller); the partials hold
                // max_chunks entries for every (token, q head), done one counter per
                // (token, kv head), and the dynamic shared memory is sized above.
                unsafe { b.launch(cfg) }.map_err(dev)
            })
        })
    }

    /// Attention by query tile (attn_tile), for batches that are not one
    /// token per sequence: each chunk of keys is read once per tile of a
    /// prompt instead of once per token (a token alone takes attn_chunk's
    /// body in the same kernel).
    #[allow(clippy::too_many_arguments)]
    fn attention_tiles(
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
        let tiles = meta.num_query_tiles;
        if meta.query_tiles.shape() != [tiles, 2] || tiles == 0 || tiles > tokens {
            return Err(shape_err(
                OP,
                format!("{tiles} query tiles for {tokens} tokens"),
            ));
        }
        let max_chunks = meta.max_context.div_ceil(CHUNK).max(1);
        // Keys and values (rows padded by 8), TILE_ROWS f32 q rows and their
        // scores; or, in a merging block, a factor per chunk for each of 8
        // warps (a tile) or G heads (a token alone, as attn_chunk).
        let group = geo.num_q_heads / geo.num_kv_heads;
        let smem = (2 * CHUNK * (d + 8) * 2 + TILE_ROWS * d * 4 + TILE_ROWS * CHUNK * 4)
            .max(2 * CHUNK * d * 2 + group * CHUNK * 4)
            .max(group.max(8) * max_chunks * 4);
        // (attn_tile's static shared memory is under 1 KB.)
        if smem + 1024 > self.dev.smem_optin {
            return Err(shape_err(
                OP,
                format!(
                    "context of {} positions is too long to merge in one block",
                    meta.max_context
                ),
            ));
        }
        let (mb, bs) = (int(OP, meta.max_blocks)?, int(OP, geo.block_size)?);
        let (hq, hkv, di, mc) = (
            int(OP, geo.num_q_heads)?,
            int(OP, geo.num_kv_heads)?,
            int(OP, d)?,
            int(OP, max_chunks)?,
        );
        let mut cfg = grid(
            ((tiles * geo.num_kv_heads) as u32, max_chunks as u32, 1),
            (256, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        let part_shape = [tokens * geo.num_q_heads * max_chunks * (d + 2)];
        self.with_scratch(Scratch::AttnPartials, &part_shape, DType::F32, |part| {
            // Chunks finished per (tile, kv head): zero when created, and set
            // back to zero by the block that merges them.
            let done_shape = [tokens * geo.num_kv_heads];
            self.with_scratch(Scratch::AttnDone, &done_shape, DType::U32, |done| {
                let mut b = self.launch(self.kernel("attn_tile"));
                b.arg(bf16s(OP, "q", q)?)
                    .arg(bf16s(OP, "k_cache", k_cache)?)
                    .arg(bf16s(OP, "v_cache", v_cache)?)
                    .arg(u32s(OP, "positions", &meta.positions)?)
                    .arg(u32s(OP, "seq_of_token", &meta.seq_of_token)?)
                    .arg(u32s(OP, "block_tables", &meta.block_tables)?)
                    .arg(u32s(OP, "query_tiles", &meta.query_tiles)?)
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
                // SAFETY: argument order and types match attn_tile in attention.cu; the
                // tiles (from BatchLayout::query_tiles) cover the tokens, each of at most
                // TILE_TOKENS consecutive positions of one sequence; the partials hold
                // max_chunks entries for every (token, q head), done one counter per
                // (tile, kv head) (tiles <= tokens), and the dynamic shared memory is
                // sized above for the kernel's layout.
                unsafe { b.launch(cfg) }.map_err(dev)
            })
        })
    }

    /// q/k-norm, RoPE and the cache store, then attention. With one token
    /// per sequence and a grid of the latency-bound shape the attention
    /// kernel does all of it (the rows it needs are its own token's);
    /// otherwise the two kernels, as for large decode batches, whose every
    /// block would compute its group's q again.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_attention_impl(
        &self,
        r: RopeArgs<'_>,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        q_out: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        out: &mut T,
    ) -> Result<()> {
        let tokens = meta.num_tokens;
        let chunks = meta.max_context.div_ceil(CHUNK).max(1);
        if tokens == 0 || seqs(meta) != tokens || tokens * geo.num_kv_heads * chunks > FEW_BLOCKS {
            self.qk_norm_rope_store_impl(
                r.qkv, r.q_norm, r.k_norm, r.eps, r.rope, meta, geo, q_out, k_cache, v_cache,
            )?;
            return self.attention_impl(q_out, k_cache, v_cache, meta, geo, scale, out);
        }
        qwen_tensor::check_qk_norm_rope(
            "qk_norm_rope_attention",
            r.qkv,
            r.q_norm,
            r.k_norm,
            r.rope,
            tokens,
            geo,
            q_out,
            k_cache,
            v_cache,
        )?;
        // The kernel writes q_out and the caches through these pointers;
        // the exclusive borrows above keep anyone else from them meanwhile.
        self.attention_launch(
            QFrom::Rope(r),
            q_out,
            k_cache,
            v_cache,
            meta,
            geo,
            scale,
            out,
        )
    }

    /// The attention kernel; `q` is the query tensor (with `QFrom::Rope`,
    /// the one the kernel writes).
    #[allow(clippy::too_many_arguments)]
    fn attention_launch(
        &self,
        from: QFrom<'_>,
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
        let rope = matches!(from, QFrom::Rope(_));
        let (name, threads) = if rope {
            ("attn_rope_chunk", 256)
        } else {
            ("attn_chunk", 256)
        };
        let f = self.kernel(name);
        // One token per sequence: rows before each token's own position are
        // older than this step, and the kernel copies them before it waits.
        let decode = i32::from(seqs(meta) == tokens);
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
                match from {
                    QFrom::Given => b.arg(bf16s(OP, "q", q)?),
                    QFrom::Rope(_) => b.arg(&0u64),
                };
                b.arg(bf16s(OP, "k_cache", k_cache)?)
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
                    .arg(bf16s_mut(OP, "out", out)?)
                    .arg(&decode);
                match &from {
                    QFrom::Given => {
                        let none = 0u64;
                        b.arg(&none).arg(&none).arg(&none).arg(&0f32).arg(&none);
                        b.arg(&none).arg(&none)
                    }
                    QFrom::Rope(r) => {
                        b.arg(f32s(OP, "qkv", r.qkv)?)
                            .arg(f32s(OP, "q_norm", r.q_norm)?)
                            .arg(f32s(OP, "k_norm", r.k_norm)?)
                            .arg(&r.eps)
                            .arg(f32s(OP, "rope", r.rope)?);
                        b.arg(u32s(OP, "slots", &meta.slots)?)
                            .arg(bf16s(OP, "q_out", q)?)
                    }
                };
                // SAFETY: argument order and types match attn_chunk{,_many} in attention.cu; the
                // partials buffer holds max_chunks entries for every (token, q head), done
                // one counter per (token, kv head), and the dynamic shared memory holds a
                // chunk's keys, values and scores.
                unsafe { b.launch(cfg) }.map_err(dev)
            })
        })
    }
}
