//! One Qwen3 decoder layer as a single backend op: the weights and the
//! activation buffers it takes, and the composition of the per-op calls
//! that defines its numerics (the CPU backend runs exactly that; another
//! backend may fuse the layer but must return the same bits).

use crate::{AttnGeometry, Backend, BatchMeta, Result, Tensor};

/// One decoder layer's weights, shaped as the ops that read them expect.
pub struct LayerWeights<'a, B: Backend> {
    /// f32 `[H]`, the RMSNorm before attention.
    pub input_norm: &'a Tensor<B>,
    /// bf16 `[(Hq + 2 Hkv) * D, H]`, q, k and v rows fused.
    pub qkv: &'a Tensor<B>,
    /// f32 `[D]`, per-head q RMSNorm.
    pub q_norm: &'a Tensor<B>,
    /// f32 `[D]`, per-head k RMSNorm.
    pub k_norm: &'a Tensor<B>,
    /// bf16 `[H, Hq * D]`.
    pub o_proj: &'a Tensor<B>,
    /// f32 `[H]`, the RMSNorm before the MLP.
    pub post_attention_norm: &'a Tensor<B>,
    /// bf16 `[2I, H]`, gate rows then up rows.
    pub gate_up: &'a Tensor<B>,
    /// bf16 `[H, I]`.
    pub down: &'a Tensor<B>,
    /// f32 `[H]`: the next layer's input RMSNorm, or None for the last
    /// layer. When given, the layer ends by writing that norm of its output
    /// into [`LayerActs::normed`], the first thing the next layer computes,
    /// so that a backend may fold it into the layer's last projection.
    pub next_input_norm: Option<&'a Tensor<B>>,
}

/// The per-layer inputs that are not weights: the rotation table, the norm
/// epsilon, the batch layout, the attention geometry and score scale.
pub struct LayerInputs<'a, B: Backend> {
    /// f32 `[max_pos, D]` (cos in the first D/2 columns, sin in the rest).
    pub rope: &'a Tensor<B>,
    pub eps: f32,
    pub meta: &'a BatchMeta<B>,
    pub geo: AttnGeometry,
    pub scale: f32,
    /// [`LayerActs::normed`] already holds this layer's input RMSNorm of
    /// `x` (the layer before wrote it through its `next_input_norm`): the
    /// layer projects that instead of normalising `x` again.
    pub normed_input: bool,
}

/// Activation buffers of one layer: after the op, `q`, `attn` and `act`
/// hold what the composed ops leave there; `qkv` and `gate_up` are
/// workspaces whose contents afterwards are unspecified (a backend may fuse
/// the projection into what reads it); `normed` is described below.
pub struct LayerActs<'a, B: Backend> {
    /// f32 `[T, (Hq + 2 Hkv) * D]`.
    pub qkv: &'a mut Tensor<B>,
    /// bf16 `[T, Hq * D]`.
    pub q: &'a mut Tensor<B>,
    /// bf16 `[T, Hq * D]`.
    pub attn: &'a mut Tensor<B>,
    /// f32 `[T, 2I]`.
    pub gate_up: &'a mut Tensor<B>,
    /// bf16 `[T, I]`.
    pub act: &'a mut Tensor<B>,
    /// bf16 `[T, H]`: on entry, with [`LayerInputs::normed_input`], the
    /// input RMSNorm of `x`; afterwards, with
    /// [`LayerWeights::next_input_norm`], `bf16(rmsnorm(x) * next_input_norm)`
    /// of the new `x`; otherwise unspecified.
    pub normed: &'a mut Tensor<B>,
}

/// The decoder layer as five ops in sequence (six with the next layer's
/// norm): what [`Backend::decoder_layer`] computes on every backend, bit
/// for bit. `x` (f32 `[T, H]`, the residual stream) is updated in place;
/// the layer's k and v rows of this batch are stored in the caches.
pub fn decoder_layer_ops<B: Backend>(
    be: &B,
    w: &LayerWeights<'_, B>,
    inp: LayerInputs<'_, B>,
    x: &mut Tensor<B>,
    k_cache: &mut Tensor<B>,
    v_cache: &mut Tensor<B>,
    mut a: LayerActs<'_, B>,
) -> Result<()> {
    decoder_layer_attention(be, w, &inp, x, k_cache, v_cache, &mut a)?;
    be.matmul_add(a.attn, w.o_proj, x)?;
    be.rms_norm_matmul_silu(
        x,
        w.post_attention_norm,
        inp.eps,
        w.gate_up,
        a.gate_up,
        a.act,
    )?;
    be.matmul_add(a.act, w.down, x)?;
    match w.next_input_norm {
        Some(nw) => be.rms_norm(x, nw, inp.eps, a.normed),
        None => Ok(()),
    }
}

/// The first two of [`decoder_layer_ops`]' ops: the input RMSNorm with the
/// fused QKV projection into `a.qkv` (the projection of `a.normed` where
/// the layer before wrote the norm, [`LayerInputs::normed_input`]: the
/// same bits, as `rms_norm_matmul` is `rms_norm` then `matmul`), then
/// q/k-norm, RoPE, the cache store and attention into `a.q` and `a.attn`.
/// For a backend that fuses the rest of the layer and runs this half as
/// the ops.
pub fn decoder_layer_attention<B: Backend>(
    be: &B,
    w: &LayerWeights<'_, B>,
    inp: &LayerInputs<'_, B>,
    x: &mut Tensor<B>,
    k_cache: &mut Tensor<B>,
    v_cache: &mut Tensor<B>,
    a: &mut LayerActs<'_, B>,
) -> Result<()> {
    let eps = inp.eps;
    if inp.normed_input {
        be.matmul(a.normed, w.qkv, a.qkv)?;
    } else {
        be.rms_norm_matmul(x, w.input_norm, eps, w.qkv, a.qkv)?;
    }
    be.qk_norm_rope_attention(
        a.qkv, w.q_norm, w.k_norm, eps, inp.rope, inp.meta, inp.geo, inp.scale, a.q, k_cache,
        v_cache, a.attn,
    )
}
