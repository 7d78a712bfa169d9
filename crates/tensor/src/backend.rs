//! The `Backend` trait: every op the Qwen3 model and the sampler need.
//!
//! Each op's numerics (where bf16 rounding happens, accumulation dtype,
//! reduction order) are specified by the CPU backend's doc comments in
//! `qwen-kernels-cpu`; every other backend must return the same bits, except
//! the tensor-core ops named there.
//!
//! Ops write into tensors the caller allocated, and take whole batches:
//! `T` below is the number of tokens in the batch, across all sequences.

use crate::{
    decoder_layer_ops, AttnGeometry, BatchLayout, BatchMeta, DType, Download, HostSlice, HostVec,
    LayerActs, LayerInputs, LayerWeights, Result, Tensor,
};

/// Per-row sampling parameters for [`Backend::sample`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Logits are divided by this; must be > 0 (0 means greedy, handled by the caller).
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches top_p; 1.0 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below min_p × the top probability; 0 disables.
    pub min_p: f32,
}

impl Default for SampleParams {
    fn default() -> Self {
        SampleParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
        }
    }
}

/// A compute device. The model and sampler are written once against this trait.
pub trait Backend: Sized + Send + Sync {
    /// The device buffer behind a [`Tensor`]; cloning copies the data.
    type Storage: Send + Sync + Clone;
    /// A recorded sequence of ops that can be replayed (a CUDA graph).
    type Graph: Send;

    /// Short name for messages ("cpu", "cuda").
    fn name(&self) -> &'static str;

    // ---- memory -------------------------------------------------------

    /// A zero-filled tensor.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>>;
    /// A tensor whose contents are unspecified, for the output of an op
    /// that writes every element (a decode step's `[rows, vocab]` logits are
    /// not worth zeroing first). The default zero-fills.
    fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor<Self>> {
        self.zeros(shape, dtype)
    }
    /// Copies host data to a new tensor of `shape`.
    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<Tensor<Self>>;
    /// Overwrites a tensor's contents; dtype and length must match.
    fn write(&self, dst: &mut Tensor<Self>, data: HostSlice<'_>) -> Result<()>;
    /// Several [`write`](Self::write)s, in order, with the same checks. A
    /// backend may merge small ones into one transfer (a decode step's
    /// positions and slots); the default writes each in turn.
    fn write_many(&self, writes: &mut [(&mut Tensor<Self>, HostSlice<'_>)]) -> Result<()> {
        for (dst, data) in writes.iter_mut() {
            self.write(dst, *data)?;
        }
        Ok(())
    }
    /// Copies a tensor to the host.
    fn download(&self, t: &Tensor<Self>) -> Result<HostVec>;
    /// Starts copying a tensor to the host and returns without waiting for
    /// the work queued so far: [`Download::wait`] blocks until the copy has
    /// landed (overlapped scheduling queues the next step before it reads
    /// this one's tokens). The default downloads at once.
    fn download_start(&self, t: &Tensor<Self>) -> Result<Download> {
        Ok(Download::ready(self.download(t)?))
    }
    /// Waits for queued work to finish (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()>;

    /// Runs `f` once, then records a second run of it into a graph without
    /// executing it, so [`replay`](Self::replay) can repeat its ops on the
    /// same tensors with no per-op host work. `f` must only queue ops on
    /// this backend (no uploads, downloads or allocations on the second
    /// run). Backends without graphs run `f` once and return `None`.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>>;
    /// Replays a graph made by [`capture`](Self::capture).
    fn replay(&self, graph: &Self::Graph) -> Result<()>;

    /// Says that the first `rows` token rows of the projections and the
    /// attention that follow (until the next call) are prompt tokens. A
    /// backend with tensor cores may run those rows there: a result within
    /// the bound its twin tests state rather than the spec's bits, but one
    /// that depends only on the row itself, never on the batch around it. Every other row takes the
    /// exact path. `0` (the default) keeps every row exact. Backends without
    /// such a path ignore it.
    fn set_tensor_core_rows(&self, rows: usize) {
        let _ = rows;
    }

    /// Uploads a batch layout for one forward pass.
    fn upload_batch(&self, layout: &BatchLayout) -> Result<BatchMeta<Self>> {
        upload_batch_tiles(self, layout, layout.query_tiles())
    }

    /// Refreshes `meta` for a new layout, overwriting its tensors in place
    /// when their sizes are unchanged (a decode step allocates nothing).
    fn update_batch(&self, meta: &mut BatchMeta<Self>, layout: &BatchLayout) -> Result<()> {
        let slots_end = layout.checked_slots_end()?;
        let t = layout.num_tokens();
        let s = layout.num_seqs();
        let tiles = layout.query_tiles();
        if meta.num_tokens != t
            || meta.block_tables.shape() != [s, layout.max_blocks]
            || meta.num_query_tiles != tiles.len() / 2
        {
            *meta = upload_batch_tiles(self, layout, tiles)?;
            return Ok(());
        }
        // Each write is a host-to-device copy on the step's critical path
        // (these two may be merged into one).
        let slots = layout.slots();
        self.write_many(&mut [
            (&mut meta.positions, HostSlice::U32(&layout.positions)),
            (&mut meta.slots, HostSlice::U32(&slots)),
        ])?;
        if meta.host_seq_of_token != layout.seq_of_token {
            self.write(&mut meta.seq_of_token, HostSlice::U32(&layout.seq_of_token))?;
            meta.host_seq_of_token.clone_from(&layout.seq_of_token);
        }
        if meta.host_block_tables != layout.block_tables {
            self.write(&mut meta.block_tables, HostSlice::U32(&layout.block_tables))?;
            meta.host_block_tables.clone_from(&layout.block_tables);
        }
        let single = BatchLayout::tiles_are_tokens(&tiles);
        if !(single && meta.tiles_are_tokens) {
            self.write(&mut meta.query_tiles, HostSlice::U32(&tiles))?;
            meta.tiles_are_tokens = single;
        }
        meta.max_blocks = layout.max_blocks;
        meta.block_size = layout.block_size;
        meta.max_context = layout.max_context();
        meta.positions_end = layout.max_context();
        meta.slots_end = slots_end;
        Ok(())
    }

    // ---- model ops ------------------------------------------------------

    /// `out[t] = f32(table[ids[t]])`: table bf16 `[V, H]`, ids u32 `[T]`, out f32 `[T, H]`.
    fn embedding(
        &self,
        table: &Tensor<Self>,
        ids: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// `out = bf16(rmsnorm(x) * w)`: x f32 `[T, H]`, w f32 `[H]`, out bf16 `[T, H]`.
    fn rms_norm(
        &self,
        x: &Tensor<Self>,
        w: &Tensor<Self>,
        eps: f32,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// `out = x · wᵀ`: x bf16 `[T, K]`, w bf16 `[N, K]`, out f32 `[T, N]`.
    fn matmul(&self, x: &Tensor<Self>, w: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()>;

    /// `acc += x · wᵀ` (the residual add fused into the projection):
    /// x bf16 `[T, K]`, w bf16 `[N, K]`, acc f32 `[T, N]`.
    fn matmul_add(&self, x: &Tensor<Self>, w: &Tensor<Self>, acc: &mut Tensor<Self>) -> Result<()>;

    /// Fused RMSNorm + projection: `out = bf16(rmsnorm(x) * norm_w) · wᵀ`.
    /// x f32 `[T, H]`, norm_w f32 `[H]`, w bf16 `[N, H]`, out f32 `[T, N]`.
    fn rms_norm_matmul(
        &self,
        x: &Tensor<Self>,
        norm_w: &Tensor<Self>,
        eps: f32,
        w: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// The MLP's first half in one op: RMSNorm, the gate/up projection and
    /// the SiLU gate, `out = silu_mul(rms_norm_matmul(x, norm_w, w))` bit
    /// for bit. x f32 `[T, H]`, norm_w f32 `[H]`, w bf16 `[2I, H]` (gate
    /// rows, then up rows), gate_up f32 `[T, 2I]` a workspace the backend
    /// may use for the projection (its contents afterwards are unspecified),
    /// out bf16 `[T, I]`.
    fn rms_norm_matmul_silu(
        &self,
        x: &Tensor<Self>,
        norm_w: &Tensor<Self>,
        eps: f32,
        w: &Tensor<Self>,
        gate_up: &mut Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// The final RMSNorm and the vocabulary projection, with the normalised
    /// hidden state kept in f32: `out = (rmsnorm(x) * norm_w) · wᵀ`.
    /// x f32 `[T, H]`, norm_w f32 `[H]`, w bf16 `[V, H]`, out f32 `[T, V]`.
    fn logits(
        &self,
        x: &Tensor<Self>,
        norm_w: &Tensor<Self>,
        eps: f32,
        w: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// Per-head q/k RMSNorm, then RoPE (rotate-half), reading q and k as
    /// strided views of the fused QKV output; writes q (bf16 `[T, Hq*D]`)
    /// and this batch's k and v into the KV cache at `meta.slots`.
    ///
    /// qkv f32 `[T, (Hq + 2 Hkv) * D]`, q_norm/k_norm f32 `[D]`,
    /// rope f32 `[max_pos, D]` (cos in the first D/2 columns, sin in the
    /// rest), caches bf16 `[blocks, block_size, Hkv, D]`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_store(
        &self,
        qkv: &Tensor<Self>,
        q_norm: &Tensor<Self>,
        k_norm: &Tensor<Self>,
        eps: f32,
        rope: &Tensor<Self>,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        q_out: &mut Tensor<Self>,
        k_cache: &mut Tensor<Self>,
        v_cache: &mut Tensor<Self>,
    ) -> Result<()>;

    /// Causal attention of every token over its own sequence's cache,
    /// positions `0..=positions[t]`, with GQA. q bf16 `[T, Hq*D]`,
    /// out bf16 `[T, Hq*D]`; `scale` multiplies q·k.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Tensor<Self>,
        k_cache: &Tensor<Self>,
        v_cache: &Tensor<Self>,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// [`qk_norm_rope_store`](Backend::qk_norm_rope_store) then
    /// [`attention`](Backend::attention) with q from `q_out`, bit for bit
    /// (q, the caches and `out` all as the two ops leave them): one op, so
    /// that a backend may do both in one pass when every sequence of the
    /// batch brings one token. Shapes as in the two ops.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_attention(
        &self,
        qkv: &Tensor<Self>,
        q_norm: &Tensor<Self>,
        k_norm: &Tensor<Self>,
        eps: f32,
        rope: &Tensor<Self>,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        scale: f32,
        q_out: &mut Tensor<Self>,
        k_cache: &mut Tensor<Self>,
        v_cache: &mut Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// One decoder layer: [`decoder_layer_ops`] (RMSNorm + QKV, q/k-norm +
    /// RoPE + cache store + attention, output projection + residual,
    /// RMSNorm + gate/up + SiLU, down projection + residual) bit for bit,
    /// as one op so that a backend may run the layer in one pass. `x` f32
    /// `[T, H]` is updated in place.
    fn decoder_layer(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: LayerInputs<'_, Self>,
        x: &mut Tensor<Self>,
        k_cache: &mut Tensor<Self>,
        v_cache: &mut Tensor<Self>,
        acts: LayerActs<'_, Self>,
    ) -> Result<()> {
        decoder_layer_ops(self, w, inp, x, k_cache, v_cache, acts)
    }

    /// `out = bf16(silu(gate) * up)`: gate_up f32 `[T, 2I]` (gate then up), out bf16 `[T, I]`.
    fn silu_mul(&self, gate_up: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()>;

    /// `ids[row] = tokens[k]` for each `(row, k)` of `feed`, other ids
    /// untouched: ids u32 `[T]`, tokens u32 `[N]`. Puts tokens that are
    /// still on the device (a step's sampled ids) into the next step's
    /// input without a round trip through the host.
    fn feed_ids(
        &self,
        tokens: &Tensor<Self>,
        feed: &[(usize, usize)],
        ids: &mut Tensor<Self>,
    ) -> Result<()>;

    /// `out[r] = src[rows[r]]`: src f32 `[T, H]`, rows u32 `[R]`, out f32 `[R, H]`.
    fn gather_rows(
        &self,
        src: &Tensor<Self>,
        rows: &Tensor<Self>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    // ---- sampling primitives ----------------------------------------------

    /// Index of the largest logit of each row (lowest index on ties): logits f32 `[B, V]`.
    fn argmax(&self, logits: &Tensor<Self>) -> Result<Vec<u32>>;

    /// [`argmax`](Self::argmax) into a device tensor, out u32 `[B]`, without
    /// waiting for it. The default computes on the host and writes.
    fn argmax_to(&self, logits: &Tensor<Self>, out: &mut Tensor<Self>) -> Result<()> {
        let picked = self.argmax(logits)?;
        self.write(out, HostSlice::U32(&picked))
    }

    /// Divides positive logits by `penalty[b]` and multiplies negative ones
    /// by it, once for each distinct token in `history[b]` (as HF does).
    fn repetition_penalty(
        &self,
        logits: &mut Tensor<Self>,
        penalty: &[f32],
        history: &[Vec<u32>],
    ) -> Result<()>;

    /// Samples one token per row after temperature, top-k, top-p and min-p,
    /// drawing with `uniform[b]` in `[0, 1)`.
    fn sample(
        &self,
        logits: &Tensor<Self>,
        params: &[SampleParams],
        uniform: &[f32],
    ) -> Result<Vec<u32>>;

    /// [`sample`](Self::sample) into a device tensor, out u32 `[B]`, without
    /// waiting for it. The default samples and writes.
    fn sample_to(
        &self,
        logits: &Tensor<Self>,
        params: &[SampleParams],
        uniform: &[f32],
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        let picked = self.sample(logits, params, uniform)?;
        self.write(out, HostSlice::U32(&picked))
    }
}

/// [`Backend::upload_batch`] with the layout's query tiles already formed.
fn upload_batch_tiles<B: Backend>(
    b: &B,
    layout: &BatchLayout,
    tiles: Vec<u32>,
) -> Result<BatchMeta<B>> {
    let slots_end = layout.checked_slots_end()?;
    let t = layout.num_tokens();
    let s = layout.num_seqs();
    Ok(BatchMeta {
        positions: b.upload(HostSlice::U32(&layout.positions), &[t])?,
        slots: b.upload(HostSlice::U32(&layout.slots()), &[t])?,
        seq_of_token: b.upload(HostSlice::U32(&layout.seq_of_token), &[t])?,
        block_tables: b.upload(
            HostSlice::U32(&layout.block_tables),
            &[s, layout.max_blocks],
        )?,
        query_tiles: b.upload(HostSlice::U32(&tiles), &[tiles.len() / 2, 2])?,
        num_tokens: t,
        num_query_tiles: tiles.len() / 2,
        tiles_are_tokens: BatchLayout::tiles_are_tokens(&tiles),
        max_blocks: layout.max_blocks,
        block_size: layout.block_size,
        max_context: layout.max_context(),
        positions_end: layout.max_context(),
        slots_end,
        host_seq_of_token: layout.seq_of_token.clone(),
        host_block_tables: layout.block_tables.clone(),
    })
}
