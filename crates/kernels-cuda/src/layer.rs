//! Launcher for layer.cu: a whole decoder layer of a batch-1 decode step in
//! one kernel, one block per SM, when the shapes suit it (head_dim 128,
//! widths a multiple of 256, every weight stage holding a few rows: the
//! Qwen3-0.6B shape) and the backend was asked to (`set_layer_kernel`;
//! off by default, as it measures slower than the kernels one by one); any
//! other batch or shape runs the ops one by one.

use cudarc::driver::LaunchConfig;
use qwen_tensor::{
    check_attention, check_batch, check_norm_projection, check_projection, check_qk_norm_rope,
    check_silu_mul, decoder_layer_ops, DType, LayerActs, LayerInputs, LayerWeights, Result,
};

use crate::attention::{chunk_smem, max_chunks, seqs, CHUNK};
use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int};
use crate::{CudaBackend, Scratch};

const OP: &str = "decoder_layer";
/// Threads a block; LAYER_THREADS in layer.cu.
const THREADS: u32 = 256;
/// Weight stages in flight a block (at most LAYER_RING_MAX in layer.cu),
/// and the bytes of one; passed to the kernel.
const RING: usize = 4;
const STAGE: usize = 40 * 1024;
/// The head_dim layer.cu is built for; LAYER_D there.
const HEAD_DIM: usize = 128;
/// Fewer rows than this a stage would leave most of a block's 8 warps idle.
const MIN_STAGE_ROWS: usize = 4;
/// Static shared memory of decoder_layer_t1 (its own and attention.cu's) is below this.
const STATIC_SMEM: usize = 2048;

fn align128(n: usize) -> usize {
    n.div_ceil(128) * 128
}

/// Dynamic shared memory of decoder_layer_t1 as (attention region, xs,
/// total) for hidden size `h`, q width `qw`, intermediate size `i` (head_dim
/// 128, `group` q heads a kv head, `chunks` attention chunks), or None
/// where the layer does not suit it: a width not a multiple of 256, a
/// weight stage of fewer than MIN_STAGE_ROWS rows, a context too long for
/// the merge, or more shared memory than `optin`.
fn layer_smem(
    (ring, stage): (usize, usize),
    h: usize,
    qw: usize,
    i: usize,
    group: usize,
    chunks: usize,
    optin: usize,
) -> Option<(usize, usize, usize)> {
    let rows_per_stage = |k: usize, halves: usize| stage / (k * 2 * halves);
    let att = align128(chunk_smem(HEAD_DIM, group));
    let xs = align128(h.max(qw).max(i) * 4);
    let smem = att + xs + ring * stage;
    let ok = [h, qw, i].iter().all(|&k| k > 0 && k.is_multiple_of(256))
        && rows_per_stage(h, 2) >= MIN_STAGE_ROWS
        && rows_per_stage(qw.max(i), 1) >= MIN_STAGE_ROWS
        && group * chunks <= CHUNK * HEAD_DIM
        && smem + STATIC_SMEM <= optin;
    ok.then_some((att, xs, smem))
}

impl CudaBackend {
    /// Backend::decoder_layer: layer.cu when the batch is one decode token
    /// and the shapes suit it, else `decoder_layer_ops`.
    pub(crate) fn decoder_layer_impl(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: LayerInputs<'_, Self>,
        x: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        a: LayerActs<'_, Self>,
    ) -> Result<()> {
        let (meta, geo) = (inp.meta, inp.geo);
        // Off, or not one decode token: the ops, which check their own
        // operands (nothing is checked twice on the default path).
        let one_token = meta.num_tokens() == 1 && seqs(meta) == 1;
        if !(self.dev.layer_kernel
            && self.dev.sm_count > 0
            && one_token
            && self.tensor_core_rows(1) == 0
            && geo.head_dim == HEAD_DIM)
        {
            if self.layer_tc_applies(w, meta.num_tokens()) {
                return self.decoder_layer_tc(w, inp, x, k_cache, v_cache, a);
            }
            return decoder_layer_ops(self, w, inp, x, k_cache, v_cache, a);
        }
        // The kernel reads every operand itself: the ops' checks, once.
        let (t, h, _) = check_norm_projection(OP, x, w.input_norm, w.qkv, a.qkv)?;
        let (rope_rows, cache_slots) = check_qk_norm_rope(
            OP, a.qkv, w.q_norm, w.k_norm, inp.rope, t, geo, a.q, k_cache, v_cache,
        )?;
        check_batch(OP, meta, geo, Some(rope_rows), cache_slots)?;
        check_attention(OP, a.q, k_cache, v_cache, t, geo, a.attn)?;
        let (_, qw, _) = check_projection(OP, a.attn, w.o_proj, x)?;
        check_norm_projection(OP, x, w.post_attention_norm, w.gate_up, a.gate_up)?;
        let (_, i) = check_silu_mul(OP, a.gate_up, a.act)?;
        check_projection(OP, a.act, w.down, x)?;
        let group = geo.num_q_heads / geo.num_kv_heads;
        let plan = layer_smem(
            (RING, STAGE),
            h,
            qw,
            i,
            group,
            max_chunks(meta),
            self.dev.smem_optin,
        );
        let Some(smem) = plan.filter(|_| t == 1) else {
            return decoder_layer_ops(self, w, inp, x, k_cache, v_cache, a);
        };
        // The kernel normalises x itself (the same bits as a.normed holds
        // with `normed_input`), and leaves the next layer's norm to the op.
        let mut a = a;
        self.launch_layer(w, &inp, x, k_cache, v_cache, &mut a, (h, i), smem)?;
        match w.next_input_norm {
            Some(nw) => self.rms_norm_impl(x, nw, inp.eps, a.normed),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_layer(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: &LayerInputs<'_, Self>,
        x: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        a: &mut LayerActs<'_, Self>,
        (h, i): (usize, usize),
        (att, xs, smem): (usize, usize, usize),
    ) -> Result<()> {
        let (meta, geo) = (inp.meta, inp.geo);
        let chunks = max_chunks(meta);
        let part_shape = [geo.num_q_heads * chunks * (HEAD_DIM + 2)];
        let mut cfg: LaunchConfig = grid((self.dev.sm_count as u32, 1, 1), (THREADS, 1, 1));
        cfg.shared_mem_bytes = smem as u32;
        // The attention partials and per-kv-head counters are attention.rs's
        // (same slots and shapes as its one-token launch); the barrier's two
        // counters start at zero and every barrier leaves the first at zero.
        self.with_scratch(Scratch::AttnPartials, &part_shape, DType::F32, |part| {
            self.with_scratch(Scratch::AttnDone, &[geo.num_kv_heads], DType::U32, |done| {
                self.with_scratch(Scratch::LayerSync, &[2], DType::U32, |bar| {
                    let mut b = self.launch(self.kernel("decoder_layer_t1"));
                    b.arg(f32s_mut(OP, "x", x)?)
                        .arg(f32s(OP, "input_norm", w.input_norm)?)
                        .arg(&inp.eps)
                        .arg(bf16s(OP, "qkv_w", w.qkv)?)
                        .arg(f32s_mut(OP, "qkv", a.qkv)?)
                        .arg(f32s(OP, "q_norm", w.q_norm)?)
                        .arg(f32s(OP, "k_norm", w.k_norm)?)
                        .arg(f32s(OP, "rope", inp.rope)?)
                        .arg(u32s(OP, "slots", meta.slots())?)
                        .arg(u32s(OP, "positions", meta.positions())?)
                        .arg(u32s(OP, "seq_of_token", meta.seq_of_token())?)
                        .arg(u32s(OP, "block_tables", meta.block_tables())?)
                        .arg(&int(OP, meta.max_blocks())?)
                        .arg(&int(OP, geo.block_size)?)
                        .arg(bf16s_mut(OP, "k_cache", k_cache)?)
                        .arg(bf16s_mut(OP, "v_cache", v_cache)?)
                        .arg(f32s_mut(OP, "partials", part)?)
                        .arg(u32s_mut(OP, "done", done)?)
                        .arg(&int(OP, chunks)?)
                        .arg(&inp.scale)
                        .arg(bf16s_mut(OP, "q", a.q)?)
                        .arg(bf16s_mut(OP, "attn", a.attn)?)
                        .arg(bf16s(OP, "o_proj", w.o_proj)?)
                        .arg(f32s(OP, "post_attention_norm", w.post_attention_norm)?)
                        .arg(bf16s(OP, "gate_up_w", w.gate_up)?)
                        .arg(bf16s_mut(OP, "act", a.act)?)
                        .arg(bf16s(OP, "down", w.down)?)
                        .arg(u32s_mut(OP, "barrier", bar)?)
                        .arg(&int(OP, h)?)
                        .arg(&int(OP, geo.num_q_heads)?)
                        .arg(&int(OP, geo.num_kv_heads)?)
                        .arg(&int(OP, i)?)
                        .arg(&int(OP, att)?)
                        .arg(&int(OP, xs)?)
                        .arg(&int(OP, RING)?)
                        .arg(&int(OP, STAGE)?);
                    // SAFETY: the arguments follow decoder_layer_t1's
                    // parameters in order and type; every tensor passed the
                    // ops' shape checks above (one token, head_dim 128), the
                    // partials and counters are sized as attention.rs sizes
                    // them for this context, the shared memory holds the
                    // attention region, xs and the ring (checked against the
                    // device's limit), and the grid is one block per SM, so
                    // that every block is resident for the grid barriers
                    // (one block's shared memory fills an SM).
                    unsafe { b.launch(cfg) }.map_err(dev)
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_layers_take_the_one_kernel() {
        const H100: usize = 227 * 1024;
        // Qwen3-0.6B (hidden 1024, 16 q heads of 128, intermediate 3072),
        // short and 8,192-position contexts.
        let (att, xs, smem) = layer_smem((RING, STAGE), 1024, 2048, 3072, 2, 1, H100).unwrap();
        // Keys and values 32,768 bytes, scores 512, the q heads of a pass
        // 2,048; the widest activation (3,072 f32) 12,288.
        assert_eq!((att, xs), (35_328, 12_288));
        assert_eq!(smem, att + xs + 4 * 40 * 1024);
        assert!(layer_smem((RING, STAGE), 1024, 2048, 3072, 2, 128, H100).is_some());
        // Too little shared memory (an older GPU).
        assert!(layer_smem((RING, STAGE), 1024, 2048, 3072, 2, 1, 100 * 1024).is_none());
        // Qwen3-8B: a down row of 12,288 is 24 KB, one row a stage.
        assert!(layer_smem((RING, STAGE), 4096, 4096, 12_288, 4, 1, H100).is_none());
        // Qwen3-1.7B: down rows of 6,144 (3 a stage).
        assert!(layer_smem((RING, STAGE), 2048, 2048, 6144, 2, 1, H100).is_none());
        // Widths off the 256 grid.
        assert!(layer_smem((RING, STAGE), 1000, 2048, 3072, 2, 1, H100).is_none());
    }
}
