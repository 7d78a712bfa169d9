//! Launcher for attention_tc.cu: the leading `tc_rows` rows of a batch
//! (prompt rows, `Backend::set_tensor_core_rows`) on the tensor cores, a
//! block per (query tile, kv head); attention.rs runs the rows after them.

use qwen_tensor::{AttnGeometry, BatchMeta, DType, Result};

use crate::attention::RopeArgs;
use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::{CudaBackend, Scratch};

const OP: &str = "attention";
/// Keys a step and a block, shared-row padding, and the words before a
/// span's outputs in its partials; TC_KEYS, TC_SPAN, TC_PAD and
/// TC_SPAN_HEAD in attention_tc.cu.
const TC_KEYS: usize = 64;
const TC_SPAN: usize = 1024;
const TC_PAD: usize = 8;
const TC_SPAN_HEAD: usize = 4;

/// attention_tc.cu's kernels: head_dim 32, 64, 128 or 256, one or two row
/// groups a pass; then the ROPE variants of the one-row-group kernels
/// (decode tokens: q and the new rows made in the kernel), by head_dim.
pub(crate) const KERNELS: &[&str] = &[
    "attn_tc_d32_r1",
    "attn_tc_d32_r2",
    "attn_tc_d64_r1",
    "attn_tc_d64_r2",
    "attn_tc_d128_r1",
    "attn_tc_d128_r2",
    "attn_tc_d256_r1",
    "attn_tc_d256_r2",
    "attn_tc_rope_d32",
    "attn_tc_rope_d64",
    "attn_tc_rope_d128",
    "attn_tc_rope_d256",
];

/// The kernel for head width index `width` (0..4: 32 to 256), `groups`
/// row groups, with or without RoPE.
fn kernel_name(width: usize, groups: usize, rope: bool) -> &'static str {
    if rope {
        KERNELS[8 + width]
    } else {
        KERNELS[2 * width + groups - 1]
    }
}

/// Where a tensor-core attention launch gets q: from `q`, or (ROPE) from
/// the QKV output, writing q_out and the new rows into the caches.
enum TcInputs<'a> {
    Plain {
        q: &'a T,
        k_cache: &'a T,
        v_cache: &'a T,
    },
    Rope {
        r: RopeArgs<'a>,
        q_out: &'a mut T,
        k_cache: &'a mut T,
        v_cache: &'a mut T,
    },
}

/// The query tiles of `meta`, checked as far as the host can: `tiles`
/// pairs, at most one per token.
pub(crate) fn check_tiles(meta: &BatchMeta<CudaBackend>) -> Result<usize> {
    let tiles = meta.num_query_tiles();
    if meta.query_tiles().shape() != [tiles, 2] || tiles == 0 || tiles > meta.num_tokens() {
        return Err(shape_err(
            OP,
            format!("{tiles} query tiles for {} tokens", meta.num_tokens()),
        ));
    }
    Ok(tiles)
}

impl CudaBackend {
    /// Attention of the batch's first `tc_rows` rows on the tensor cores
    /// (arguments already checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_tensor_cores(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        tc_rows: usize,
        out: &mut T,
    ) -> Result<()> {
        let inputs = TcInputs::Plain {
            q,
            k_cache,
            v_cache,
        };
        self.tc_attention(inputs, meta, geo, scale, tc_rows, out)
    }

    /// Whether a tensor-core decode batch makes q and its new rows inside
    /// attention (attn_tc_rope): yes unless `QWEN_CUDA_TC_ROPE=0` (device.rs),
    /// which keeps qk_norm_rope_store ahead of it, to measure the two.
    pub(crate) fn rope_in_tc_attention(&self) -> bool {
        self.dev.tc_rope
    }

    /// q/k-norm, RoPE, the cache store and attention of a decode batch
    /// (one token per sequence, every row on the tensor cores) in one
    /// kernel: the same bits as `qk_norm_rope_store` then
    /// [`Self::attention_tensor_cores`] (arguments already checked by the
    /// caller, as for both).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_attention_tensor_cores(
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
        let inputs = TcInputs::Rope {
            r,
            q_out,
            k_cache,
            v_cache,
        };
        self.tc_attention(inputs, meta, geo, scale, tokens, out)
    }

    fn tc_attention(
        &self,
        mut inputs: TcInputs<'_>,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        tc_rows: usize,
        out: &mut T,
    ) -> Result<()> {
        let tiles = check_tiles(meta)?;
        let (d, group) = (geo.head_dim, geo.num_q_heads / geo.num_kv_heads);
        // Row groups of 16 a pass: one where every tile is a token (its
        // group's rows fit one), else two. Either way each row's sums are
        // the same (attention_tc.cu), so the choice is free.
        let rope = matches!(inputs, TcInputs::Rope { .. });
        if rope && !meta.tiles_are_tokens() {
            return Err(shape_err(
                OP,
                "RoPE in tensor-core attention needs decode tokens".into(),
            ));
        }
        let groups = if meta.tiles_are_tokens() || group == 1 {
            1
        } else {
            2
        };
        // q rows, two stages of keys and values (which the merge reuses).
        let smem = (16 * groups + 4 * TC_KEYS) * (d + TC_PAD) * 2;
        if smem > self.dev.smem_optin {
            return Err(shape_err(
                OP,
                format!(
                    "head_dim {d} needs {smem} bytes of shared memory for tensor-core attention"
                ),
            ));
        }
        // Spans of TC_SPAN keys a block; rows of more than one merge them
        // through `spans` (per row and span: max, sum, D outputs) and a
        // counter per (tile, kv head), both left alone when one span does.
        let max_spans = meta.max_context().div_ceil(TC_SPAN).max(1);
        // The spans' merge keeps a factor per (row, span) and a sum per row
        // where the stages were, for as many rows at a time as fit: one at least.
        if max_spans > 1 && (max_spans + 1) * 4 > smem {
            return Err(shape_err(
                OP,
                format!(
                    "context of {} positions is too long for tensor-core attention: \
                     the merge of its {max_spans} spans does not fit a block's shared memory",
                    meta.max_context()
                ),
            ));
        }
        let mut cfg = grid(
            ((tiles * geo.num_kv_heads) as u32, max_spans as u32, 1),
            (128 * groups as u32, 1, 1),
        );
        cfg.shared_mem_bytes = smem as u32;
        // check_head_dim (the caller's) allows exactly these widths.
        let width = match d {
            32 => 0,
            64 => 1,
            128 => 2,
            256 => 3,
            _ => return Err(shape_err(OP, format!("head_dim {d}"))),
        };
        let mut launch = |spans: Option<(&mut T, &mut T)>| -> Result<()> {
            let mut b = self.launch(self.kernel(kernel_name(width, groups, rope)));
            match &mut inputs {
                TcInputs::Plain {
                    q,
                    k_cache,
                    v_cache,
                } => {
                    b.arg(bf16s(OP, "q", q)?)
                        .arg(bf16s(OP, "k_cache", k_cache)?)
                        .arg(bf16s(OP, "v_cache", v_cache)?);
                }
                TcInputs::Rope {
                    r,
                    q_out,
                    k_cache,
                    v_cache,
                } => {
                    b.arg(f32s(OP, "qkv", r.qkv)?)
                        .arg(f32s(OP, "q_norm", r.q_norm)?)
                        .arg(f32s(OP, "k_norm", r.k_norm)?)
                        .arg(&r.eps)
                        .arg(f32s(OP, "rope", r.rope)?)
                        .arg(u32s(OP, "slots", meta.slots())?)
                        .arg(bf16s_mut(OP, "q_out", q_out)?)
                        .arg(bf16s_mut(OP, "k_cache", k_cache)?)
                        .arg(bf16s_mut(OP, "v_cache", v_cache)?);
                }
            }
            b.arg(u32s(OP, "positions", meta.positions())?)
                .arg(u32s(OP, "seq_of_token", meta.seq_of_token())?)
                .arg(u32s(OP, "block_tables", meta.block_tables())?)
                .arg(u32s(OP, "query_tiles", meta.query_tiles())?)
                .arg(&int(OP, meta.max_blocks())?)
                .arg(&int(OP, geo.block_size)?)
                .arg(&int(OP, geo.num_q_heads)?)
                .arg(&int(OP, geo.num_kv_heads)?)
                .arg(&scale)
                .arg(&int(OP, tc_rows)?)
                .arg(&int(OP, max_spans)?);
            match spans {
                Some((part, done)) => {
                    b.arg(f32s_mut(OP, "spans", part)?)
                        .arg(u32s_mut(OP, "done", done)?);
                }
                None => {
                    b.arg(&0u64).arg(&0u64);
                }
            }
            b.arg(bf16s_mut(OP, "out", out)?);
            // SAFETY: the arguments are the attn_tc kernels' parameters in
            // order (the kernel of this head_dim and row-group count; the
            // ROPE kernels' first nine are qk_norm_rope_store's inputs and
            // outputs, checked by the caller as that op checks them: a rope
            // row for every position, every slot in the caches); the
            // grid is one block per (query tile, kv head, span), the tiles
            // coming from BatchLayout::query_tiles (at most one per token,
            // checked above), each of at most 16 consecutive positions of one
            // sequence, and no context longer than max_context, so that
            // without `spans` (null) every tile has one span and the kernel
            // reads neither pointer; with them, `spans` holds max_spans
            // entries of head_dim + 4 floats per (token, q head) and `done`
            // a counter per (tile, kv head). The shared memory holds 16 q
            // rows a row group and two stages of TC_KEYS keys and values, as
            // attention_tc.cu lays it out (the quarters' partials, (64·head_dim
            // + 128) floats a row group, fit in the stages, as do one row's
            // factors for the spans' merge, checked above); 128 threads a row
            // group, as the kernel reads them.
            unsafe { b.launch(cfg) }.map_err(dev)
        };
        if max_spans == 1 {
            return launch(None);
        }
        let part_shape = [meta.num_tokens() * geo.num_q_heads * max_spans * (d + TC_SPAN_HEAD)];
        self.with_scratch(Scratch::TcSpans, &part_shape, DType::F32, |part| {
            // Zero when created; the merging block sets its counter back.
            let done_shape = [tiles * geo.num_kv_heads];
            self.with_scratch(Scratch::TcDone, &done_shape, DType::U32, |done| {
                launch(Some((part, done)))
            })
        })
    }
}
