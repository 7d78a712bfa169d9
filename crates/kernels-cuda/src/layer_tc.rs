//! A decoder layer whose rows are all on the tensor cores (prompt steps,
//! `--tensor-core-decode`), with the output projection's split-K sum, its
//! residual add and the post-attention RMSNorm in one kernel
//! (`splits_add_rms_norm`) ahead of the fused gate/up + SiLU GEMM, and the
//! down projection's likewise with the next layer's input norm: the ops of
//! `decoder_layer_ops`, the same bits, two launches fewer.

use qwen_tensor::{
    check_norm_projection, check_projection, check_silu_mul, decoder_layer_attention, DType,
    LayerActs, LayerInputs, LayerWeights, Result,
};

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
    /// have fed from its own norm of the same x).
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
        decoder_layer_attention(self, w, &inp, x, k_cache, v_cache, &mut a)?;
        let eps = inp.eps;
        // The checks matmul_add and rms_norm_matmul_silu make.
        let (t, qw, h) = check_projection(OP, a.attn, w.o_proj, x)?;
        let (_, _, n) = check_norm_projection(OP, x, w.post_attention_norm, w.gate_up, a.gate_up)?;
        check_silu_mul(OP, a.gate_up, a.act)?;
        let splits = k_splits(qw, h);
        self.with_gemm_shares(OP, t, h, |part| {
            let (xs, ws) = (bf16s(OP, "attn", a.attn)?, bf16s(OP, "o_proj", w.o_proj)?);
            let out = f32s_mut(OP, "x", x)?;
            self.gemm_tc_launch(OP, xs, ws, out, Some(&mut *part), t, qw, h, true)?;
            self.with_scratch(Scratch::NormBf16, &[t, h], DType::BF16, |normed| {
                self.splits_add_rms_norm(part, splits, x, w.post_attention_norm, eps, normed)?;
                let (ns, gs) = (
                    bf16s(OP, "normed", normed)?,
                    bf16s(OP, "gate_up", w.gate_up)?,
                );
                let done =
                    self.gemm_tc_silu(OP, ns, gs, bf16s_mut(OP, "act", a.act)?, t, h, n / 2)?;
                if !done {
                    return Err(crate::launch::shape_err(
                        OP,
                        "fused gate/up does not apply".into(),
                    ));
                }
                Ok(())
            })
        })?;
        // down: its shares, residual add and the next layer's input norm in
        // one kernel the same way, where down is split and a next layer
        // wants its norm.
        let (_, i, _) = check_projection(OP, a.act, w.down, x)?;
        let splits = k_splits(i, h);
        let Some(nw) = w.next_input_norm.filter(|_| splits > 1) else {
            self.matmul_add(a.act, w.down, x)?;
            return match w.next_input_norm {
                Some(nw) => self.rms_norm(x, nw, eps, a.normed),
                None => Ok(()),
            };
        };
        check_norm_out(OP, (t, h), nw, a.normed)?;
        self.with_gemm_shares(OP, t, h, |part| {
            let (xs, ws) = (bf16s(OP, "act", a.act)?, bf16s(OP, "down", w.down)?);
            self.gemm_tc_launch(
                OP,
                xs,
                ws,
                f32s_mut(OP, "x", x)?,
                Some(&mut *part),
                t,
                i,
                h,
                true,
            )?;
            self.splits_add_rms_norm(part, splits, x, nw, eps, a.normed)
        })
    }
}
