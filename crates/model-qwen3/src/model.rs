//! The Qwen3 forward pass, written once against the `Backend` trait.

use std::path::Path;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use qwen_tensor::{
    AttnGeometry, Backend, BatchLayout, BatchMeta, DType, HostSlice, LayerActs, LayerInputs,
    LayerWeights, Tensor,
};

use crate::config::Qwen3Config;
use crate::kv_cache::{KvCache, Sequence, DEFAULT_BLOCK_SIZE};
use crate::rope::rope_table;
use crate::weights::{load_host_weights, HostWeights};
use crate::{ModelError, Result};

/// Which positions of a forward pass produce logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// One row per sequence: its last token (generation).
    Last,
    /// One row per token, in batch order (scoring, tests).
    All,
}

struct Layer<B: Backend> {
    input_norm: Tensor<B>,
    post_attention_norm: Tensor<B>,
    qkv: Tensor<B>,
    q_norm: Tensor<B>,
    k_norm: Tensor<B>,
    o_proj: Tensor<B>,
    gate_up: Tensor<B>,
    down: Tensor<B>,
}

/// Activation buffers of one forward pass, kept between passes of the same
/// token count so that decoding allocates nothing.
struct Workspace<B: Backend> {
    ids: Tensor<B>,
    meta: BatchMeta<B>,
    x: Tensor<B>,
    qkv: Tensor<B>,
    q: Tensor<B>,
    attn: Tensor<B>,
    gate_up: Tensor<B>,
    act: Tensor<B>,
    /// bf16 `[T, H]`: a layer's input RMSNorm, written by the layer before.
    normed: Tensor<B>,
}

/// A recorded decode step: its graph and the buffers the graph reads and
/// writes (inputs are written in place before each replay).
struct DecodeGraph<B: Backend> {
    graph: B::Graph,
    ws: Workspace<B>,
    logits: Tensor<B>,
}

/// A batch laid out for one forward pass.
struct Plan {
    /// Token rows: every prompt row first, then the generated ones, each
    /// group in batch order.
    layout: BatchLayout,
    /// Token ids in layout order.
    ids: Vec<u32>,
    /// How many leading rows are prompt tokens.
    prompt_rows: usize,
    /// Layout row of each token, in batch order.
    row_of: Vec<u32>,
}

/// Tokens of a batch that are still on the device (overlapped scheduling):
/// for each `(e, k)` of `entries`, batch entry `e` holds a one-token
/// placeholder for `tokens[k]` (u32 `[N]`, a step's sampled ids), which the
/// forward pass takes instead.
pub struct Feed<'a, B: Backend> {
    pub tokens: &'a Tensor<B>,
    pub entries: &'a [(usize, usize)],
}

// Two references: copyable whatever the backend (a derive would ask B: Copy).
impl<B: Backend> Clone for Feed<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Feed<'_, B> {}

/// Whether `feed` gives every one of a decode batch's `entries` entries
/// (one token each) its token.
fn feeds_every_entry<B: Backend>(feed: Option<Feed<'_, B>>, entries: usize) -> bool {
    let Some(f) = feed else { return false };
    let mut fed = vec![false; entries];
    for &(e, _) in f.entries {
        if let Some(x) = fed.get_mut(e) {
            *x = true;
        }
    }
    fed.iter().all(|&x| x)
}

/// A listener handed every named activation of a forward pass.
type Tap<'a, B> = dyn FnMut(&str, &mut Tensor<B>) -> Result<()> + 'a;

/// (tokens, block-table width, context capacity in 64-position chunks, cache id).
type GraphKey = (usize, usize, usize, u64);

/// Decode steps of at most this many sequences replay graphs. Each graph
/// keeps its own activations and `[seqs, vocab]` logits, so graphs for every
/// batch size of a busy server would hold gigabytes, while a large batch's
/// step is long enough that its launches cost little.
const GRAPH_MAX_SEQS: usize = 8;

/// Decode graphs pad the context to a power-of-two number of these, so one
/// graph serves many steps.
const GRAPH_CONTEXT_QUANTUM: usize = 64;

/// A Qwen3 model on backend `B`.
pub struct Qwen3<B: Backend> {
    workspace: Mutex<Option<Workspace<B>>>,
    graphs: Mutex<HashMap<GraphKey, DecodeGraph<B>>>,
    /// Set once the backend has said it cannot record graphs.
    no_graphs: AtomicBool,
    /// Generated tokens take the tensor-core path too (see
    /// [`Qwen3::set_tensor_core_decode`]).
    tc_decode: AtomicBool,
    backend: B,
    cfg: Qwen3Config,
    embed: Tensor<B>,
    layers: Vec<Layer<B>>,
    final_norm: Tensor<B>,
    lm_head: Option<Tensor<B>>,
    rope: Tensor<B>,
}

impl<B: Backend> Qwen3<B> {
    /// Loads a checkpoint directory (config.json + safetensors).
    /// `progress(done, total)` is called as layers are loaded.
    pub fn load(backend: B, dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such model directory",
                ),
            });
        }
        let cfg = Qwen3Config::from_file(&dir.join("config.json"))?;
        let host = load_host_weights(dir, &cfg, progress)?;
        let name = backend.name();
        Self::from_host(backend, cfg, &host).map_err(|e| match e {
            ModelError::Backend(qwen_tensor::Error::OutOfMemory(m)) => ModelError::Request(
                format!("the checkpoint does not fit in {name} memory (out of device memory: {m})"),
            ),
            e => e,
        })
    }

    /// Uploads host weights to the backend.
    pub fn from_host(backend: B, cfg: Qwen3Config, w: &HostWeights) -> Result<Self> {
        let (h, v, i, d) = (
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.intermediate_size,
            cfg.head_dim,
        );
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let bf =
            |data: &[half::bf16], shape: &[usize]| backend.upload(HostSlice::BF16(data), shape);
        let f = |data: &[f32], shape: &[usize]| backend.upload(HostSlice::F32(data), shape);
        let mut layers = Vec::with_capacity(w.layers.len());
        for l in &w.layers {
            layers.push(Layer {
                input_norm: f(&l.input_norm, &[h])?,
                post_attention_norm: f(&l.post_attention_norm, &[h])?,
                qkv: bf(&l.qkv, &[(hq + 2 * hkv) * d, h])?,
                q_norm: f(&l.q_norm, &[d])?,
                k_norm: f(&l.k_norm, &[d])?,
                o_proj: bf(&l.o_proj, &[h, hq * d])?,
                gate_up: bf(&l.gate_up, &[2 * i, h])?,
                down: bf(&l.down, &[h, i])?,
            });
        }
        let rope = rope_table(d, cfg.rope_theta, cfg.max_position_embeddings);
        Ok(Qwen3 {
            embed: bf(&w.embed, &[v, h])?,
            final_norm: f(&w.final_norm, &[h])?,
            lm_head: match &w.lm_head {
                Some(m) => Some(bf(m, &[v, h])?),
                None => None,
            },
            rope: f(&rope, &[cfg.max_position_embeddings, d])?,
            workspace: Mutex::new(None),
            graphs: Mutex::new(HashMap::new()),
            no_graphs: AtomicBool::new(false),
            tc_decode: AtomicBool::new(false),
            layers,
            cfg,
            backend,
        })
    }

    /// `true`: generated tokens' projections run on the backend's tensor
    /// cores as prompt rows do. Outputs stay batch-invariant (that GEMM
    /// depends only on its own row) but are no longer the CPU twin's bits;
    /// decoding large batches gets several times faster. `false` (the
    /// default): generated tokens take the exact path.
    pub fn set_tensor_core_decode(&self, on: bool) {
        if self.tc_decode.swap(on, Ordering::Relaxed) != on {
            // Recorded graphs hold the other path's kernels.
            if let Ok(mut g) = self.graphs.lock() {
                g.clear();
            }
        }
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Attention geometry with the given cache block size.
    pub fn geometry(&self, block_size: usize) -> AttnGeometry {
        AttnGeometry {
            num_q_heads: self.cfg.num_attention_heads,
            num_kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// A KV cache with room for `positions` positions in blocks of
    /// [`DEFAULT_BLOCK_SIZE`].
    pub fn new_cache(&self, positions: usize) -> Result<KvCache<B>> {
        let blocks = positions.div_ceil(DEFAULT_BLOCK_SIZE).max(1);
        let layers = self.cfg.num_hidden_layers;
        KvCache::new(&self.backend, layers, self.geometry(DEFAULT_BLOCK_SIZE), blocks).map_err(|e| match e {
            ModelError::Backend(qwen_tensor::Error::OutOfMemory(m)) => ModelError::Request(format!(
                "a KV cache of {positions} positions does not fit in {} memory (out of device memory: {m})",
                self.backend.name()
            )),
            e => e,
        })
    }

    /// Runs `batch` (each sequence with its new tokens: a whole prompt, a
    /// chunk of one, or one decode token) through the model, appending their
    /// keys and values to `cache`. Returns f32 logits `[rows, vocab]`, rows
    /// as chosen by `want`.
    pub fn forward(
        &self,
        cache: &mut KvCache<B>,
        batch: &mut [(&mut Sequence, &[u32])],
        want: Logits,
    ) -> Result<Tensor<B>> {
        self.forward_fed(cache, batch, want, None)
    }

    /// [`forward`](Self::forward) with some entries' tokens taken from the
    /// device ([`Feed`]): the same ops on the same ids, so the same bits.
    pub fn forward_fed(
        &self,
        cache: &mut KvCache<B>,
        batch: &mut [(&mut Sequence, &[u32])],
        want: Logits,
        feed: Option<Feed<'_, B>>,
    ) -> Result<Tensor<B>> {
        // Checked before `plan` reserves anything for the batch.
        if let Some(f) = feed {
            if let Some(&(e, _)) = f
                .entries
                .iter()
                .find(|&&(e, _)| batch.get(e).is_none_or(|(_, toks)| toks.len() != 1))
            {
                return Err(ModelError::Request(format!(
                    "fed entry {e} is not a one-token entry of a {}-entry batch",
                    batch.len()
                )));
            }
        }
        // Graphs record the exact path only: every row must be a generated
        // token (a sequence without a prompt length is in its prompt pass).
        let decode = want == Logits::Last
            && batch.len() <= GRAPH_MAX_SEQS
            && batch
                .iter()
                .all(|(seq, toks)| toks.len() == 1 && seq.prompt_len.is_some_and(|p| seq.len >= p));
        if decode && !self.no_graphs.load(Ordering::Relaxed) {
            return self.decode_step(cache, batch, feed);
        }
        self.forward_inner(cache, batch, want, None, feed)
    }

    /// Puts the fed tokens into `ids` (layout order; `row_of` from the plan;
    /// the entries checked by `forward_fed`).
    fn apply_feed(
        &self,
        feed: Option<Feed<'_, B>>,
        batch: &[(&mut Sequence, &[u32])],
        row_of: &[u32],
        ids: &mut Tensor<B>,
    ) -> Result<()> {
        let Some(feed) = feed else { return Ok(()) };
        let mut start = Vec::with_capacity(batch.len());
        let mut n = 0usize;
        for (_, toks) in batch {
            start.push(n);
            n += toks.len();
        }
        let pairs: Vec<(usize, usize)> = feed
            .entries
            .iter()
            .map(|&(e, k)| (row_of[start[e]] as usize, k))
            .collect();
        Ok(self.backend.feed_ids(feed.tokens, &pairs, ids)?)
    }

    /// One decode step (one token per sequence) through a recorded graph:
    /// recorded the first time its key is seen, replayed after that. The
    /// ops and their numerics are those of `forward_tapped`.
    fn decode_step(
        &self,
        cache: &mut KvCache<B>,
        batch: &mut [(&mut Sequence, &[u32])],
        feed: Option<Feed<'_, B>>,
    ) -> Result<Tensor<B>> {
        let be = &self.backend;
        // One token per sequence, all of one kind: layout order is batch order.
        let Plan {
            mut layout,
            ids,
            prompt_rows,
            row_of,
        } = self.plan(cache, batch)?;
        let t = layout.num_tokens();
        // Pad the block tables and the context so the graph's shapes (and
        // so its buffers and launch sizes) stay fixed across many steps.
        let width = layout.max_blocks.next_power_of_two();
        let mut tables = Vec::with_capacity(layout.num_seqs() * width);
        for row in layout.block_tables.chunks(layout.max_blocks) {
            tables.extend_from_slice(row);
            tables.resize(tables.len() + width - row.len(), 0);
        }
        layout.block_tables = tables;
        layout.max_blocks = width;
        let chunks = layout
            .max_context()
            .div_ceil(GRAPH_CONTEXT_QUANTUM)
            .next_power_of_two();
        let capacity = chunks * GRAPH_CONTEXT_QUANTUM;
        let mut graphs = self
            .graphs
            .lock()
            .map_err(|_| ModelError::Request("a previous decode step panicked".into()))?;
        let key = (t, width, chunks, cache.id());
        if !graphs.contains_key(&key) {
            // Keep only the graphs of the cache in use: each graph points into
            // its cache's tensors, and keeping every cache's graphs would grow
            // without bound (a cache used again is simply recorded again).
            graphs.retain(|k, _| k.3 == key.3);
        }
        let logits = match graphs.entry(key) {
            Entry::Occupied(e) => {
                let g = e.into_mut();
                be.update_batch(&mut g.ws.meta, &layout)?;
                g.ws.meta.set_context_capacity(capacity);
                // Ids the feed overwrites all need no copy of their own
                // (one stream operation fewer between two steps).
                if !feeds_every_entry(feed, batch.len()) {
                    be.write(&mut g.ws.ids, HostSlice::U32(&ids))?;
                }
                self.apply_feed(feed, batch, &row_of, &mut g.ws.ids)?;
                be.replay(&g.graph)?;
                g.logits.clone()
            }
            Entry::Vacant(v) => {
                let mut ws = self.workspace_for(&layout, &ids)?;
                self.apply_feed(feed, batch, &row_of, &mut ws.ids)?;
                ws.meta.set_context_capacity(capacity);
                let mut logits = be.zeros(&[t, self.cfg.vocab_size], DType::F32)?;
                let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
                let eps = self.cfg.rms_norm_eps;
                let graph = be.capture(&mut || {
                    self.run_layers(&mut ws, cache, prompt_rows, None)
                        .map_err(|e| match e {
                            ModelError::Backend(e) => e,
                            other => qwen_tensor::Error::Device(other.to_string()),
                        })?;
                    be.logits(&ws.x, &self.final_norm, eps, lm_head, &mut logits)?;
                    Ok(())
                })?;
                match graph {
                    Some(graph) => v.insert(DecodeGraph { graph, ws, logits }).logits.clone(),
                    None => {
                        // The backend ran the step eagerly and records nothing.
                        self.no_graphs.store(true, Ordering::Relaxed);
                        logits
                    }
                }
            }
        };
        for (seq, _) in batch.iter_mut() {
            seq.len += 1;
        }
        Ok(logits)
    }

    /// [`forward`](Self::forward), handing every intermediate activation to
    /// `tap` right after the op that produced it, under a stable name:
    /// `embed`; per layer `layers.{i}.` + `qkv` (fused norm + QKV
    /// projection), `q` (q after q-norm and RoPE), `k_cache` and `v_cache`
    /// (the layer's whole caches after this batch's k/v were stored), `attn`
    /// (attention output), `attn_residual` (residual after the output
    /// projection), `gate_up`, `act` (SiLU·mul), `out` (residual after the
    /// down projection); then `logits`. The tap may modify the tensor (fault
    /// injection); the rest of the pass then sees the modified values.
    pub fn forward_tapped(
        &self,
        cache: &mut KvCache<B>,
        batch: &mut [(&mut Sequence, &[u32])],
        want: Logits,
        tap: &mut dyn FnMut(&str, &mut Tensor<B>) -> Result<()>,
    ) -> Result<Tensor<B>> {
        self.forward_inner(cache, batch, want, Some(tap), None)
    }

    /// The eager forward pass, with or without a tap.
    fn forward_inner(
        &self,
        cache: &mut KvCache<B>,
        batch: &mut [(&mut Sequence, &[u32])],
        want: Logits,
        mut tap: Option<&mut Tap<'_, B>>,
        feed: Option<Feed<'_, B>>,
    ) -> Result<Tensor<B>> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let Plan {
            layout,
            ids,
            prompt_rows,
            row_of,
        } = self.plan(cache, batch)?;
        let t = layout.num_tokens();
        let mut guard = self
            .workspace
            .lock()
            .map_err(|_| ModelError::Request("a previous forward pass panicked".into()))?;
        if guard.as_ref().is_some_and(|w| w.meta.num_tokens() != t) {
            *guard = None;
        }
        let ws = match guard.as_mut() {
            Some(ws) => {
                be.update_batch(&mut ws.meta, &layout)?;
                be.write(&mut ws.ids, HostSlice::U32(&ids))?;
                ws
            }
            None => guard.insert(self.workspace_for(&layout, &ids)?),
        };
        self.apply_feed(feed, batch, &row_of, &mut ws.ids)?;
        self.run_layers(ws, cache, prompt_rows, tap.as_deref_mut())?;
        for (seq, toks) in batch.iter_mut() {
            seq.len += toks.len();
        }

        let (x, eps, h, v) = (&ws.x, cfg.rms_norm_eps, cfg.hidden_size, cfg.vocab_size);
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let in_order = row_of.iter().enumerate().all(|(i, &r)| r as usize == i);
        let mut logits = match want {
            // Every row in layout order (prompt rows on the tensor cores, as
            // in the layers), then put back in batch order.
            Logits::All => {
                be.set_tensor_core_rows(prompt_rows);
                let mut all = be.empty(&[t, v], DType::F32)?;
                be.logits(x, &self.final_norm, eps, lm_head, &mut all)?;
                if in_order {
                    all
                } else {
                    let rows_t = be.upload(HostSlice::U32(&row_of), &[t])?;
                    let mut ordered = be.empty(&[t, v], DType::F32)?;
                    be.gather_rows(&all, &rows_t, &mut ordered)?;
                    ordered
                }
            }
            // The rows a token is sampled from take the exact path, so a
            // sequence's choices never depend on its batch.
            Logits::Last => {
                be.set_tensor_core_rows(if self.tc_decode.load(Ordering::Relaxed) {
                    batch.len()
                } else {
                    0
                });
                let mut end = 0usize;
                let rows: Vec<u32> = batch
                    .iter()
                    .map(|(_, toks)| {
                        end += toks.len();
                        row_of[end - 1]
                    })
                    .collect();
                let mut out = be.empty(&[rows.len(), v], DType::F32)?;
                if rows.len() == t && in_order {
                    be.logits(x, &self.final_norm, eps, lm_head, &mut out)?;
                } else {
                    let rows_t = be.upload(HostSlice::U32(&rows), &[rows.len()])?;
                    let mut xr = be.zeros(&[rows.len(), h], DType::F32)?;
                    be.gather_rows(x, &rows_t, &mut xr)?;
                    be.logits(&xr, &self.final_norm, eps, lm_head, &mut out)?;
                }
                out
            }
        };
        be.set_tensor_core_rows(0);
        if let Some(tap) = tap {
            tap("logits", &mut logits)?;
        }
        Ok(logits)
    }

    /// The decoder layers over the batch in `ws`, leaving the final residual
    /// stream in `ws.x` (before the final norm).
    fn run_layers(
        &self,
        ws: &mut Workspace<B>,
        cache: &mut KvCache<B>,
        prompt_rows: usize,
        mut tap: Option<&mut Tap<'_, B>>,
    ) -> Result<()> {
        // Names are only formatted when someone listens: this is the decode hot path.
        let tapped = tap.is_some();
        let mut emit = |name: &dyn Fn() -> String, t: &mut Tensor<B>| match tap.as_mut() {
            Some(f) => f(&name(), t),
            None => Ok(()),
        };
        let be = &self.backend;
        let cfg = &self.cfg;
        let geo = self.geometry(cache.block_size());
        let Workspace {
            ids,
            meta,
            x,
            qkv,
            q,
            attn,
            gate_up,
            act,
            normed,
        } = ws;
        let meta = &*meta;
        let eps = cfg.rms_norm_eps;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();

        be.set_tensor_core_rows(prompt_rows);
        be.embedding(&self.embed, ids, x)?;
        emit(&|| "embed".into(), x)?;
        for (li, l) in self.layers.iter().enumerate() {
            let name = |op: &'static str| move || format!("layers.{li}.{op}");
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            if !tapped {
                // Nobody listens: the layer as one op, which a backend may
                // run in one pass (the same ops as below, bit for bit).
                let w = LayerWeights {
                    input_norm: &l.input_norm,
                    qkv: &l.qkv,
                    q_norm: &l.q_norm,
                    k_norm: &l.k_norm,
                    o_proj: &l.o_proj,
                    post_attention_norm: &l.post_attention_norm,
                    gate_up: &l.gate_up,
                    down: &l.down,
                    // Each layer hands the next its input norm (which a
                    // backend may fold into the down projection).
                    next_input_norm: self.layers.get(li + 1).map(|n| &n.input_norm),
                };
                let inp = LayerInputs {
                    rope: &self.rope,
                    eps,
                    meta,
                    geo,
                    scale,
                    normed_input: li > 0,
                };
                let acts = LayerActs {
                    qkv,
                    q,
                    attn,
                    gate_up,
                    act,
                    normed,
                };
                be.decoder_layer(&w, inp, x, kc, vc, acts)?;
                continue;
            }
            be.rms_norm_matmul(x, &l.input_norm, eps, &l.qkv, qkv)?;
            emit(&name("qkv"), qkv)?;
            let (qn, kn, rope) = (&l.q_norm, &l.k_norm, &self.rope);
            // A listener sees q and the caches before attention reads them
            // (qk_norm_rope_attention is these two in sequence).
            be.qk_norm_rope_store(qkv, qn, kn, eps, rope, meta, geo, q, kc, vc)?;
            emit(&name("q"), q)?;
            emit(&name("k_cache"), kc)?;
            emit(&name("v_cache"), vc)?;
            be.attention(q, kc, vc, meta, geo, scale, attn)?;
            emit(&name("attn"), attn)?;
            be.matmul_add(attn, &l.o_proj, x)?;
            emit(&name("attn_residual"), x)?;
            // A listener sees the projection before the gate.
            be.rms_norm_matmul(x, &l.post_attention_norm, eps, &l.gate_up, gate_up)?;
            emit(&name("gate_up"), gate_up)?;
            be.silu_mul(gate_up, act)?;
            emit(&name("act"), act)?;
            be.matmul_add(act, &l.down, x)?;
            emit(&name("out"), x)?;
        }
        Ok(())
    }

    /// Fresh activation buffers for a batch of `layout`'s size.
    fn workspace_for(&self, layout: &BatchLayout, ids: &[u32]) -> Result<Workspace<B>> {
        let be = &self.backend;
        let t = layout.num_tokens();
        let geo = self.geometry(layout.block_size);
        let (h, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        Ok(Workspace {
            ids: be.upload(HostSlice::U32(ids), &[t])?,
            meta: be.upload_batch(layout)?,
            x: be.zeros(&[t, h], DType::F32)?,
            qkv: be.zeros(&[t, geo.qkv_width()], DType::F32)?,
            q: be.zeros(&[t, geo.q_width()], DType::BF16)?,
            attn: be.zeros(&[t, geo.q_width()], DType::BF16)?,
            gate_up: be.zeros(&[t, 2 * i], DType::F32)?,
            act: be.zeros(&[t, i], DType::BF16)?,
            normed: be.zeros(&[t, h], DType::BF16)?,
        })
    }

    /// Checks the batch and reserves cache blocks; builds the batch layout.
    fn plan(&self, cache: &mut KvCache<B>, batch: &mut [(&mut Sequence, &[u32])]) -> Result<Plan> {
        if batch.is_empty() || batch.iter().any(|(_, toks)| toks.is_empty()) {
            return Err(ModelError::Request(
                "every sequence in a batch needs at least one token".into(),
            ));
        }
        let max_pos = self.cfg.max_position_embeddings;
        let vocab = self.cfg.vocab_size as u32;
        for (seq, toks) in batch.iter_mut() {
            let end = seq.len + toks.len();
            if end > max_pos {
                return Err(ModelError::Request(format!(
                    "{end} positions exceed max_position_embeddings ({max_pos})"
                )));
            }
            if let Some(bad) = toks.iter().find(|&&id| id >= vocab) {
                return Err(ModelError::Request(format!(
                    "token id {bad} is outside the vocabulary ({vocab})"
                )));
            }
            cache.reserve(seq, end)?;
            // A sequence's first pass is its prompt unless it was told otherwise.
            if seq.prompt_len.is_none() {
                seq.prompt_len = Some(end);
            }
        }
        let bs = cache.block_size();
        let max_blocks = batch.iter().map(|(s, _)| s.blocks.len()).max().unwrap_or(1);
        let mut layout = BatchLayout {
            max_blocks,
            block_size: bs,
            ..Default::default()
        };
        // Prompt rows first, so the backend can run them on the tensor cores
        // as one block of rows; every op treats rows independently, so their
        // order changes no bits.
        let total: usize = batch.iter().map(|(_, toks)| toks.len()).sum();
        let mut ids = Vec::with_capacity(total);
        let mut row_of = vec![0u32; total];
        let mut prompt_rows = 0;
        let all_prompt = self.tc_decode.load(Ordering::Relaxed);
        for prompt_pass in [true, false] {
            let mut i = 0;
            for (si, (seq, toks)) in batch.iter().enumerate() {
                let prompt_end = seq.prompt_len.unwrap_or(0);
                for (j, &id) in toks.iter().enumerate() {
                    let p = seq.len + j;
                    if (all_prompt || p < prompt_end) == prompt_pass {
                        row_of[i + j] = layout.positions.len() as u32;
                        layout.positions.push(p as u32);
                        layout.seq_of_token.push(si as u32);
                        ids.push(id);
                    }
                }
                i += toks.len();
            }
            if prompt_pass {
                prompt_rows = ids.len();
            }
        }
        for (seq, _) in batch.iter() {
            let mut table = seq.blocks.clone();
            table.resize(max_blocks, 0);
            layout.block_tables.extend(table);
        }
        Ok(Plan {
            layout,
            ids,
            prompt_rows,
            row_of,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_kernels_cpu::CpuBackend;

    #[test]
    fn a_feed_covers_a_batch_only_with_every_entry() {
        let be = CpuBackend::new();
        let tokens = be.upload(HostSlice::U32(&[4, 5]), &[2]).unwrap();
        let feed = |entries| {
            Some(Feed {
                tokens: &tokens,
                entries,
            })
        };
        assert!(feeds_every_entry(feed(&[(0, 0), (1, 1)]), 2));
        assert!(feeds_every_entry(feed(&[(1, 0), (0, 0)]), 2));
        assert!(!feeds_every_entry(feed(&[(0, 0)]), 2));
        assert!(!feeds_every_entry(feed(&[(0, 0), (0, 1)]), 2));
        assert!(!feeds_every_entry(feed(&[(5, 0)]), 1));
        assert!(!feeds_every_entry::<CpuBackend>(None, 1));
    }
}
