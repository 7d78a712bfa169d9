//! A decoder layer whose rows are all on the tensor cores (prompt steps,
//! `--tensor-core-decode`), with the output projection's split-K sum, its
//! residual add and the post-attention RMSNorm in one kernel
//! (`splits_add_rms_norm`) ahead of the fused gate/up + SiLU GEMM, and the
//! down projection's likewise with the next layer's input norm: the ops of
//! `decoder_layer_ops`, the same bits, two launches fewer.

use qwen_tensor::{
    check_batch, check_norm_projection, check_projection, check_silu_mul, decoder_layer_attention,
    DType, LayerActs, LayerInputs, LayerWeights, Result,
};

use crate::attention::{seqs, RopeArgs};
use crate::device::{bf16s, bf16s_mut, f32s_mut, T};
use crate::gemm::k_splits;
use crate::norm::check_norm_out;
use crate::{CudaBackend, Scratch};

const OP: &str = "decoder_layer";

impl CudaBackend {
    /// Whether [`Self::decoder_layer_tc`] takes this layer: every one of the
    /// `t` rows on the tensor cores, an output projection split in K shares
    /// (otherwise there is no sum to fold the norm into), rows the warp norm
    /// takes, and a gate/up the fused SiLU GEMM takes (as the ops would).
    pub(crate) fn layer_tc_applies(&self, w: &LayerWeights<'_, Self>, t: usize) -> bool {
        let (o, gu) = (w.o_proj.shape(), w.gate_up.shape());
        if o.len() != 2 || gu.len() != 2 {
            return false; // the ops report the bad shape
        }
        let (h, qw) = (o[0], o[1]);
        t > 0
            && self.tensor_core_rows(t) == t
            && w.o_proj.dtype() == DType::BF16
            && w.gate_up.dtype() == DType::BF16
            && k_splits(qw, h) > 1
            && Self::warp_row_norm(h)
            && self.wg_fused_applies(h, gu[0])
    }

    /// The layer as `decoder_layer_ops` runs it, but o_proj's shares go
    /// straight into the residual add + norm kernel, whose bf16 rows feed
    /// the fused gate/up + SiLU GEMM (which `rms_norm_matmul_silu` would
    /// have fed from its own norm of the same x), and down's likewise into
    /// the next layer's input norm.
    pub(crate) fn decoder_layer_tc(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: LayerInputs<'_, Self>,
        x: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        mut a: LayerActs<'_, Self>,
    ) -> Result<()> {
        use qwen_tensor::Backend;
        if !self.attention_half_qkv_rope(w, &inp, x, k_cache, v_cache, &mut a)? {
            decoder_layer_attention(self, w, &inp, x, k_cache, v_cache, &mut a)?;
        }
        let eps = inp.eps;
        // The checks matmul_add and rms_norm_matmul_silu make.
        let (t, _, h) = check_projection(OP, a.attn, w.o_proj, x)?;
        let (_, _, n) = check_norm_projection(OP, x, w.post_attention_norm, w.gate_up, a.gate_up)?;
        check_silu_mul(OP, a.gate_up, a.act)?;
        self.with_scratch(Scratch::NormBf16, &[t, h], DType::BF16, |normed| {
            self.project_add_norm(a.attn, w.o_proj, x, w.post_attention_norm, eps, normed)?;
            let (ns, gs) = (
                bf16s(OP, "normed", normed)?,
                bf16s(OP, "gate_up", w.gate_up)?,
            );
            if !self.gemm_tc_silu(OP, ns, gs, bf16s_mut(OP, "act", a.act)?, t, h, n / 2)? {
                return Err(crate::launch::shape_err(
                    OP,
                    "fused gate/up does not apply".into(),
                ));
            }
            Ok(())
        })?;
        match w.next_input_norm {
            Some(nw) => self.project_add_norm(a.act, w.down, x, nw, eps, a.normed),
            None => self.matmul_add(a.act, w.down, x),
        }
    }

    /// [`decoder_layer_attention`] with the QKV projection making q/k-norm,
    /// RoPE and the cache store in its epilogue ([`Self::gemm_tc_qkv_rope`])
    /// where that kernel applies and the ops would have run
    /// qk_norm_rope_store ahead of attention (batches with prompt rows; a
    /// decode batch makes them inside attention instead): the same bits,
    /// with `a.qkv` left untouched. `false` (nothing done) otherwise.
    fn attention_half_qkv_rope(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: &LayerInputs<'_, Self>,
        x: &T,
        k_cache: &mut T,
        v_cache: &mut T,
        a: &mut LayerActs<'_, Self>,
    ) -> Result<bool> {
        let (meta, geo) = (inp.meta, inp.geo);
        let tokens = meta.num_tokens();
        let decode = seqs(meta) == tokens && meta.tiles_are_tokens();
        // The checks matmul (or rms_norm_matmul) makes.
        let (t, k, n) = if inp.normed_input {
            check_projection(OP, a.normed, w.qkv, a.qkv)?
        } else {
            check_norm_projection(OP, x, w.input_norm, w.qkv, a.qkv)?
        };
        if (decode && self.rope_in_tc_attention())
            || w.qkv.dtype() != DType::BF16
            || !self.qkv_rope_applies(t, k, n, geo.head_dim)
        {
            return Ok(false);
        }
        // The checks qk_norm_rope_store makes (attention_impl makes its own).
        let (rope_rows, cache_slots) = qwen_tensor::check_qk_norm_rope(
            OP, a.qkv, w.q_norm, w.k_norm, inp.rope, tokens, geo, a.q, k_cache, v_cache,
        )?;
        check_batch(OP, meta, geo, Some(rope_rows), cache_slots)?;
        let r = RopeArgs {
            qkv: a.qkv,
            q_norm: w.q_norm,
            k_norm: w.k_norm,
            eps: inp.eps,
            rope: inp.rope,
        };
        if inp.normed_input {
            self.gemm_tc_qkv_rope(a.normed, w.qkv, &r, meta, geo, a.q, k_cache, v_cache)?;
        } else {
            self.with_scratch(Scratch::NormBf16, &[t, k], DType::BF16, |normed| {
                self.rms_norm_impl(x, w.input_norm, inp.eps, normed)?;
                self.gemm_tc_qkv_rope(normed, w.qkv, &r, meta, geo, a.q, k_cache, v_cache)
            })?;
        }
        self.attention_impl(a.q, k_cache, v_cache, meta, geo, inp.scale, a.attn)?;
        Ok(true)
    }

    /// `x += a · wᵀ` with every row on the tensor cores, then `normed =
    /// bf16(rms_norm(x) * norm_w)`: matmul_add then rms_norm, the same
    /// bits. Where the weight's K shares go through memory, their sum, the
    /// residual add and the norm are one kernel (`splits_add_rms_norm`);
    /// where the GEMM makes them in its blocks, it adds into x itself.
    fn project_add_norm(
        &self,
        a: &T,
        w: &T,
        x: &mut T,
        norm_w: &T,
        eps: f32,
        normed: &mut T,
    ) -> Result<()> {
        let (t, k, n) = check_projection(OP, a, w, x)?;
        check_norm_out(OP, (t, n), norm_w, normed)?;
        let (xs, ws) = (bf16s(OP, "x", a)?, bf16s(OP, "w", w)?);
        let splits = self.gemm_shares_out(t, k, n);
        if splits == 1 {
            self.gemm_tc_launch(OP, xs, ws, f32s_mut(OP, "acc", x)?, None, t, k, n, true)?;
            return self.rms_norm_impl(x, norm_w, eps, normed);
        }
        self.with_gemm_shares(OP, t, n, |part| {
            let out = f32s_mut(OP, "acc", x)?;
            self.gemm_tc_launch(OP, xs, ws, out, Some(&mut *part), t, k, n, true)?;
            self.splits_add_rms_norm(part, splits, x, norm_w, eps, normed)
        })
    }
}
