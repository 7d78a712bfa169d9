//! Launcher for attention.cu: per-chunk partials, merged in order by the
//! last block of each (token or query tile, kv head) to finish. Small
//! decode batches take attn_chunk (with one token per sequence, q/k-norm
//! and RoPE in the same kernel: attn_rope_chunk, or attn_rope_cluster,
//! whose chunks merge through shared memory; each with a `_g2` form for
//! groups of up to two q heads a kv head and a `_g4` form for three or
//! four), large ones attn_span,
//! and batches with prompt tokens attn_tile. Rows announced for the tensor
//! cores go to attention_tc.rs first.

use cudarc::driver::LaunchConfig;
use qwen_tensor::{check_attention, check_batch, AttnGeometry, BatchMeta, DType, Result};

use crate::attention_tc::check_tiles;
use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err, Launch};
use crate::rope::check_head_dim;
use crate::{CudaBackend, Scratch};

const OP: &str = "attention";
/// Positions per split; must equal qwen_kernels_cpu::ATTN_CHUNK and CHUNK in attention.cu.
pub(crate) const CHUNK: usize = 64;
/// Query heads a pass of attn_chunk / attn_rope_chunk (HPASS in
/// attention.cu): attn_rope_chunk makes them in shared memory after the
/// scores. The `_g2` kernels take 2, in the room sized for 4.
const HPASS: usize = 4;

/// Dynamic shared memory of attn_chunk_body (attention.cu): a chunk's keys
/// and values, the group's scores, then the first pass's q heads in f32.
pub(crate) fn chunk_smem(head_dim: usize, group: usize) -> usize {
    2 * CHUNK * head_dim * 2 + group * CHUNK * 4 + HPASS * head_dim * 4
}
/// attn_rope_cluster's: chunk_smem, then the chunk's partials (m, l and D
/// sums for each of the group's q heads), then room for every chunk's
/// partials, where block 0 of a cluster of `chunks` receives them.
fn cluster_smem(head_dim: usize, group: usize, chunks: usize) -> usize {
    chunk_smem(head_dim, group) + (1 + chunks) * group * (head_dim + 2) * 4
}
/// Whether a cluster of `chunks` blocks fits where every GPU of the kind
/// can place it: two of its blocks to an SM (`smem_optin` bytes a block at
/// most), so that 16 blocks need 8 SMs of one GPC. Every Qwen3 shape
/// (head_dim 128, groups up to 8) fits at 16 chunks; wider heads with
/// large groups take the unclustered kernel.
fn cluster_fits(head_dim: usize, group: usize, chunks: usize, smem_optin: usize) -> bool {
    2 * cluster_smem(head_dim, group, chunks) <= smem_optin
}
const _: () = assert!(CHUNK == qwen_kernels_cpu::ATTN_CHUNK);
/// Decode grids of up to this many (token, kv head, chunk) blocks take
/// attn_chunk (256 threads, built for latency), larger ones attn_span.
const FEW_BLOCKS: usize = 512;
/// Chunks per attn_span block; SPAN in attention.cu.
const SPAN: usize = 4;
/// Query rows (token, q head) per pass of attn_tile; TILE_ROWS in attention.cu.
const TILE_ROWS: usize = 32;
const _: () = assert!(qwen_tensor::QUERY_TILE == 16); // TILE_TOKENS in attention.cu
/// Static shared memory of the attention kernels is below this.
const STATIC_SMEM: usize = 2048;

/// The inputs of qk_norm_rope_store that attn_rope_chunk reads.
pub(crate) struct RopeArgs<'a> {
    pub qkv: &'a T,
    pub q_norm: &'a T,
    pub k_norm: &'a T,
    pub eps: f32,
    pub rope: &'a T,
}

/// One batch's sequence count (the rows of its block tables).
pub(crate) fn seqs(meta: &BatchMeta<CudaBackend>) -> usize {
    meta.block_tables().shape().first().copied().unwrap_or(0)
}

/// Chunks of the batch's longest context.
pub(crate) fn max_chunks(meta: &BatchMeta<CudaBackend>) -> usize {
    meta.max_context().div_ceil(CHUNK).max(1)
}

/// The small-decode-batch kernel: attn_chunk (q given), or with RoPE
/// attn_rope_cluster / attn_rope_chunk, whose `_g2` forms take two q heads
/// a pass over the keys instead of four where a kv head has at most two
/// (Qwen3-0.6B and 1.7B): half the score products, all of the four-head
/// form's beyond the group being zero padding, and less code to fetch on
/// a cold instruction cache (the same sums). Groups of three or four
/// (Qwen3-4B, 8B) take the `_g4` forms: four heads in one pass, without
/// the code of later passes.
fn chunk_kernel(rope: bool, cluster: bool, group: usize) -> &'static str {
    match (rope, cluster, group) {
        (false, _, _) => "attn_chunk",
        (true, true, 0..=2) => "attn_rope_cluster_g2",
        (true, true, 3..=4) => "attn_rope_cluster_g4",
        (true, true, _) => "attn_rope_cluster",
        (true, false, 0..=2) => "attn_rope_chunk_g2",
        (true, false, 3..=4) => "attn_rope_chunk_g4",
        (true, false, _) => "attn_rope_chunk",
    }
}

/// Whether a batch is a small decode batch: one token per sequence and a
/// grid of at most FEW_BLOCKS (token, kv head, chunk) blocks.
fn few_decode_blocks(meta: &BatchMeta<CudaBackend>, geo: AttnGeometry) -> bool {
    let tokens = meta.num_tokens();
    seqs(meta) == tokens && tokens * geo.num_kv_heads * max_chunks(meta) <= FEW_BLOCKS
}

/// The "too long to merge" error of a context whose chunk factors would
/// not fit a block's shared memory.
fn too_long(meta: &BatchMeta<CudaBackend>, geo: AttnGeometry) -> qwen_tensor::Error {
    let group = geo.num_q_heads / geo.num_kv_heads;
    shape_err(
        OP,
        format!(
            "context of {} positions is too long for head_dim {} with {group} q heads per kv head",
            meta.max_context(),
            geo.head_dim
        ),
    )
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
        let cache_slots = check_attention(OP, q, k_cache, v_cache, meta.num_tokens(), geo, out)?;
        check_batch(OP, meta, geo, None, cache_slots)?;
        check_head_dim(OP, geo)?;
        if meta.num_tokens() == 0 {
            return Ok(());
        }
        // Prompt rows (the leading ones) on the tensor cores; the others,
        // if any, by tile with those rows left out, so that every row takes
        // the one path its kind names whatever the batch.
        let tc = self.tensor_core_rows(meta.num_tokens());
        if tc > 0 {
            self.attention_tensor_cores(q, k_cache, v_cache, meta, geo, scale, tc, out)?;
            if tc == meta.num_tokens() {
                return Ok(());
            }
            return self.attention_tiles(q, k_cache, v_cache, meta, geo, scale, tc, out);
        }
        if seqs(meta) != meta.num_tokens() {
            self.attention_tiles(q, k_cache, v_cache, meta, geo, scale, 0, out)
        } else if few_decode_blocks(meta, geo) {
            self.attention_chunks(None, q, k_cache, v_cache, meta, geo, scale, out)
        } else {
            self.attention_spans(q, k_cache, v_cache, meta, geo, scale, out)
        }
    }

    /// q/k-norm, RoPE and the cache store, then attention. In a decode
    /// batch (one token per sequence) the attention kernel does all of it
    /// (the rows it needs are its own token's): on the tensor cores where
    /// every row is theirs, else in a small batch's exact kernel; otherwise
    /// the two kernels (large exact decode batches, whose every block would
    /// compute its group's q again, and batches with prompt rows, whose
    /// tiles read each other's new rows).
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
        let tokens = meta.num_tokens();
        let decode = seqs(meta) == tokens && meta.tiles_are_tokens();
        let tc = self.tensor_core_rows(tokens);
        let tc_decode = tokens > 0 && decode && tc == tokens && self.rope_in_tc_attention();
        if !tc_decode && (tokens == 0 || !few_decode_blocks(meta, geo) || tc > 0) {
            self.qk_norm_rope_store_impl(
                r.qkv, r.q_norm, r.k_norm, r.eps, r.rope, meta, geo, q_out, k_cache, v_cache,
            )?;
            return self.attention_impl(q_out, k_cache, v_cache, meta, geo, scale, out);
        }
        let (rope_rows, cache_slots) = qwen_tensor::check_qk_norm_rope(
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
        check_attention(OP, q_out, k_cache, v_cache, tokens, geo, out)?;
        check_batch(OP, meta, geo, Some(rope_rows), cache_slots)?;
        check_head_dim(OP, geo)?;
        // The kernel writes q_out and the caches through these pointers;
        // the exclusive borrows above keep anyone else from them meanwhile.
        if tc_decode {
            return self
                .rope_attention_tensor_cores(r, meta, geo, scale, q_out, k_cache, v_cache, out);
        }
        self.attention_chunks(Some(r), q_out, k_cache, v_cache, meta, geo, scale, out)
    }

    /// A small decode batch: attn_chunk, a block per (token, kv head,
    /// chunk); or attn_rope_chunk, which makes q from the QKV output (`rope`)
    /// and writes it to `q` and the new rows to the caches.
    #[allow(clippy::too_many_arguments)]
    fn attention_chunks(
        &self,
        rope: Option<RopeArgs<'_>>,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut T,
    ) -> Result<()> {
        let (d, chunks) = (geo.head_dim, max_chunks(meta));
        // Keys and values of a chunk, then the group's scores. The merging
        // block keeps one factor per (q head, chunk) where the keys and
        // values were: 64·head_dim floats, 8,192 chunks (524,288 positions)
        // for Qwen3's head_dim 128 and a group of one.
        let group = geo.num_q_heads / geo.num_kv_heads;
        if group * chunks > CHUNK * d {
            return Err(too_long(meta, geo));
        }
        let mut cfg = grid(
            (
                (meta.num_tokens() * geo.num_kv_heads) as u32,
                chunks as u32,
                1,
            ),
            (256, 1, 1),
        );
        // With RoPE, a (token, kv head)'s chunks run as one cluster where
        // the GPU allows one that large, and merge through shared memory.
        let cluster = rope.is_some()
            && chunks <= self.dev.max_cluster
            && cluster_fits(d, group, chunks, self.dev.smem_optin);
        cfg.shared_mem_bytes = if cluster {
            cluster_smem(d, group, chunks)
        } else {
            chunk_smem(d, group)
        } as u32;
        let name = chunk_kernel(rope.is_some(), cluster, group);
        let extra = |b: &mut Launch<'_>| -> Result<()> {
            if cluster {
                b.cluster((1, chunks as u32, 1));
            }
            // One token per sequence (every batch here): rows before each
            // token's own position are older than this step, and the kernel
            // copies them before it waits.
            b.arg(&1i32);
            match &rope {
                None => {
                    let none = 0u64;
                    b.arg(&none).arg(&none).arg(&none).arg(&0f32).arg(&none);
                    b.arg(&none).arg(&none);
                }
                Some(r) => {
                    b.arg(f32s(OP, "qkv", r.qkv)?)
                        .arg(f32s(OP, "q_norm", r.q_norm)?)
                        .arg(f32s(OP, "k_norm", r.k_norm)?)
                        .arg(&r.eps)
                        .arg(f32s(OP, "rope", r.rope)?);
                    b.arg(u32s(OP, "slots", meta.slots())?)
                        .arg(bf16s(OP, "q_out", q)?);
                }
            }
            Ok(())
        };
        let q_in = if rope.is_some() { None } else { Some(q) };
        // SAFETY: attn_chunk, attn_rope_chunk and attn_rope_cluster (and
        // their `_g2` and `_g4` forms, the same parameters) take
        // `decode` and the seven RopeIn parameters after `out`, as pushed by
        // `extra` (null for attn_chunk, which does not read them); the grid
        // is one block per (token, kv head, chunk), as clusters of a (token,
        // kv head)'s chunks for attn_rope_cluster (at most max_cluster, which
        // the kernel opted in to, each within the opt-in shared memory),
        // and the shared memory a chunk's keys, values, scores, q heads
        // (and, in a cluster, its partials and room for every chunk's:
        // cluster_smem), or the merge's factors (checked above).
        unsafe {
            self.launch_attention(
                name, cfg, q_in, k_cache, v_cache, meta, geo, scale, out, extra,
            )
        }
    }

    /// A large decode batch (attn_span): a block per (token, kv head) and
    /// SPAN chunks, copying a chunk's keys while it sums the one before.
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
        let (d, chunks) = (geo.head_dim, max_chunks(meta));
        // Two stages of a chunk's keys, one of its values, the group's
        // scores and q; the merging block keeps a factor per (q head, chunk)
        // there.
        let group = geo.num_q_heads / geo.num_kv_heads;
        let smem = (3 * CHUNK * d * 2 + group * CHUNK * 4 + group * d * 4).max(group * chunks * 4);
        if smem + STATIC_SMEM > self.dev.smem_optin {
            return Err(too_long(meta, geo));
        }
        let mut cfg = grid(
            (
                (meta.num_tokens() * geo.num_kv_heads) as u32,
                chunks.div_ceil(SPAN) as u32,
                1,
            ),
            (128, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        // SAFETY: attn_span takes nothing after `out`; one token per sequence
        // (the caller's dispatch); one block per (token, kv head, SPAN
        // chunks); the shared memory is sized above for its stages, scores
        // and merge.
        unsafe {
            self.launch_attention(
                "attn_span",
                cfg,
                Some(q),
                k_cache,
                v_cache,
                meta,
                geo,
                scale,
                out,
                |_| Ok(()),
            )
        }
    }

    /// Attention by query tile (attn_tile), for batches that are not one
    /// token per sequence: each chunk of keys is read once per tile of a
    /// prompt instead of once per token (a token alone takes attn_chunk's
    /// body in the same kernel). Rows before `row0` are left alone (the
    /// tensor cores' rows).
    #[allow(clippy::too_many_arguments)]
    fn attention_tiles(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        row0: usize,
        out: &mut T,
    ) -> Result<()> {
        let tiles = check_tiles(meta)?;
        let (d, chunks) = (geo.head_dim, max_chunks(meta));
        // Keys and values (rows padded by 8), TILE_ROWS f32 q rows and their
        // scores; or, in a merging block, a factor per chunk for each of 8
        // warps (a tile) or G heads (a token alone, as attn_chunk).
        let group = geo.num_q_heads / geo.num_kv_heads;
        let smem = (2 * CHUNK * (d + 8) * 2 + TILE_ROWS * d * 4 + TILE_ROWS * CHUNK * 4)
            .max(2 * CHUNK * d * 2 + group * CHUNK * 4)
            .max(group.max(8) * chunks * 4);
        if smem + STATIC_SMEM > self.dev.smem_optin {
            return Err(too_long(meta, geo));
        }
        let mut cfg = grid(
            ((tiles * geo.num_kv_heads) as u32, chunks as u32, 1),
            (256, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        let row0 = int(OP, row0)?;
        let extra = |b: &mut Launch<'_>| -> Result<()> {
            b.arg(u32s(OP, "query_tiles", meta.query_tiles())?)
                .arg(&row0);
            Ok(())
        };
        // SAFETY: attn_tile takes the query tiles and row0 after `out`; they come from
        // BatchLayout::query_tiles (checked above to be `tiles` pairs, at most
        // one per token), each of at most TILE_TOKENS consecutive positions of
        // one sequence; the grid is one block per (tile, kv head, chunk), and
        // the shared memory is sized above for either body and the merge.
        unsafe {
            self.launch_attention(
                "attn_tile",
                cfg,
                Some(q),
                k_cache,
                v_cache,
                meta,
                geo,
                scale,
                out,
                extra,
            )
        }
    }

    /// Launches attention kernel `name` with the parameters every one of
    /// them takes (q, or null where the kernel makes it; the caches; the
    /// batch layout; the geometry; the partials and the chunk counters,
    /// from scratch; out), then those `extra` pushes. Arguments already
    /// passed `check_attention`.
    ///
    /// # Safety
    /// `name` is one of attn_chunk, attn_rope_chunk, attn_span and
    /// attn_tile, whose parameters after `out` are exactly what `extra`
    /// pushes; `cfg` is a grid of at most one counter's worth of blocks per
    /// (token, kv head) in x, and enough dynamic shared memory for that
    /// kernel at this batch's `max_context`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_attention(
        &self,
        name: &'static str,
        cfg: LaunchConfig,
        q: Option<&T>,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut T,
        extra: impl FnOnce(&mut Launch<'_>) -> Result<()>,
    ) -> Result<()> {
        let (tokens, d, chunks) = (meta.num_tokens(), geo.head_dim, max_chunks(meta));
        let (mb, bs) = (int(OP, meta.max_blocks())?, int(OP, geo.block_size)?);
        let (hq, hkv, di, mc) = (
            int(OP, geo.num_q_heads)?,
            int(OP, geo.num_kv_heads)?,
            int(OP, d)?,
            int(OP, chunks)?,
        );
        let part_shape = [tokens * geo.num_q_heads * chunks * (d + 2)];
        self.with_scratch(Scratch::AttnPartials, &part_shape, DType::F32, |part| {
            // Chunks (or spans) finished per (token or tile, kv head): zero
            // when created, and set back to zero by the block that merges.
            let done_shape = [tokens * geo.num_kv_heads];
            self.with_scratch(Scratch::AttnDone, &done_shape, DType::U32, |done| {
                let mut b = self.launch(self.kernel(name));
                match q {
                    Some(q) => b.arg(bf16s(OP, "q", q)?),
                    None => b.arg(&0u64),
                };
                b.arg(bf16s(OP, "k_cache", k_cache)?)
                    .arg(bf16s(OP, "v_cache", v_cache)?)
                    .arg(u32s(OP, "positions", meta.positions())?)
                    .arg(u32s(OP, "seq_of_token", meta.seq_of_token())?)
                    .arg(u32s(OP, "block_tables", meta.block_tables())?)
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
                extra(&mut b)?;
                // SAFETY: the parameters before `out` are every attention
                // kernel's, in attention.cu's order; the rest, the grid and
                // the shared memory are the caller's contract. The partials
                // hold max_chunks entries for every (token, q head), and the
                // counters one per (token, kv head), at least one per block
                // column the grid's x can name.
                unsafe { b.launch(cfg) }.map_err(dev)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{chunk_kernel, cluster_fits};

    #[test]
    fn qwen3_clusters_fit_two_blocks_an_sm() {
        // The H100's opt-in shared memory a block.
        let optin = 227 * 1024;
        // Groups of 2 (0.6B), 4 (8B), 5 (14B) and 8 (32B) at head_dim 128
        // and the largest cluster.
        for group in [2, 4, 5, 8] {
            assert!(cluster_fits(128, group, 16, optin), "group {group}");
        }
        // Head_dim 256 with a group of 8: a short context clusters, 16
        // chunks do not.
        assert!(cluster_fits(256, 8, 4, optin));
        assert!(!cluster_fits(256, 8, 16, optin));
    }

    #[test]
    fn groups_of_up_to_four_take_the_one_pass_kernels() {
        // Qwen3-0.6B / 1.7B (16 q heads on 8 kv heads) take the `_g2` forms,
        // 4B / 8B (32 on 8) the `_g4` ones, 14B (40 on 8) and 32B (64 on 8)
        // the kernels with later passes.
        assert_eq!(chunk_kernel(true, true, 2), "attn_rope_cluster_g2");
        assert_eq!(chunk_kernel(true, false, 2), "attn_rope_chunk_g2");
        assert_eq!(chunk_kernel(true, true, 1), "attn_rope_cluster_g2");
        assert_eq!(chunk_kernel(true, true, 4), "attn_rope_cluster_g4");
        assert_eq!(chunk_kernel(true, false, 3), "attn_rope_chunk_g4");
        assert_eq!(chunk_kernel(true, true, 8), "attn_rope_cluster");
        assert_eq!(chunk_kernel(true, false, 5), "attn_rope_chunk");
        assert_eq!(chunk_kernel(false, true, 2), "attn_chunk");
    }
}
