//! Continuous batching: many requests share every forward pass.
//!
//! Each [`Scheduler::step`] builds one batch for [`Qwen3::forward`]: the
//! next token of every running sequence that is decoding, plus chunks of
//! prompts still being prefilled, up to a token budget
//! ([`SchedulerConfig::max_num_batched_tokens`]). A long prompt is prefilled
//! a chunk per step alongside the others' decoding instead of stalling
//! them, and new requests join as soon as there is room, not when the
//! current batch is done.
//!
//! When the KV cache runs out of blocks for a running sequence, the
//! youngest running sequence is preempted: its blocks are released and it
//! goes back to the head of the queue, to be resumed later by prefilling its
//! prompt and the tokens it had generated. Its output is unchanged, because
//! a token's keys and values depend only on the tokens before it.
//!
//! With prefix caching ([`SchedulerConfig::prefix_caching`]), every full
//! block a sequence computes is published under the name of its whole
//! prefix (see [`KvCache::publish`]); a request whose prompt starts with a
//! published prefix shares those blocks and starts its prefill after them.
//!
//! The token choice is the caller's: a closure gets the logits of the
//! sequences that need a token and returns one token per row. That keeps the
//! model crate free of any sampling policy ([`greedy`] is here for tests and
//! benchmarks).
//!
//! [`Scheduler::step_overlapped`] queues each step before the host reads
//! the step before it back: the sampler leaves its tokens on the device
//! ([`greedy_on_device`]), the next step takes them as input from there,
//! and the host retires and schedules while the GPU runs. Same tokens as
//! [`Scheduler::step`].
//!
//! ```
//! use model_qwen3::scheduler::{greedy, Request, Scheduler, SchedulerConfig};
//! use model_qwen3::Qwen3;
//! use qwen_kernels_cpu::CpuBackend;
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3");
//! let model = Qwen3::load(CpuBackend::new(), &dir, &mut |_, _| {})?;
//! let mut s = Scheduler::new(&model, model.new_cache(1024)?, SchedulerConfig::default())?;
//! for prompt in [vec![785, 3974, 13876, 38835], vec![9707, 11, 1879]] {
//!     s.add_request(Request { prompt, max_new_tokens: 5, stop_ids: vec![] })?;
//! }
//! let done = s.run(&mut greedy(model.backend()))?;
//! assert_eq!((done.len(), done[1].tokens.len()), (2, 5));
//! # Ok::<(), model_qwen3::ModelError>(())
//! ```

use std::collections::{HashMap, VecDeque};

use qwen_tensor::{Backend, DType, Download, HostSlice, HostVec, Tensor};

use crate::kv_cache::{BlockHash, KvCache, Sequence};
use crate::model::{Feed, Logits, Qwen3};
use crate::{ModelError, Result};

/// Identifies a request for its lifetime in a [`Scheduler`]: handed out in
/// increasing order from 0.
pub type RequestId = u64;

/// A generation request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Prompt token ids; at least one.
    pub prompt: Vec<u32>,
    /// New tokens at most; at least one.
    pub max_new_tokens: usize,
    /// Generating any of these ends the request (the token is kept in its
    /// output). Empty: run to `max_new_tokens` (benchmarks ignoring EOS).
    pub stop_ids: Vec<u32>,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It generated one of its stop ids.
    Stop,
    /// It generated `max_new_tokens` tokens.
    Length,
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: RequestId,
    pub prompt_len: usize,
    /// The generated tokens (a stop token included).
    pub tokens: Vec<u32>,
    pub reason: StopReason,
    /// Tokens this request ran through the model to build its KV cache:
    /// its prompt, less what it found in the prefix cache, plus everything
    /// it recomputed after preemptions.
    pub prefill_tokens: usize,
    /// Positions it took from the prefix cache instead of computing them.
    pub cached_tokens: usize,
    /// How many times it was preempted.
    pub preemptions: usize,
}

/// What the token-choosing closure learns about each row of the logits it
/// gets.
#[derive(Debug, Clone, Copy)]
pub struct SampleRow<'a> {
    pub id: RequestId,
    /// The prompt, then every token generated so far that the host has.
    pub tokens: &'a [u32],
    pub prompt_len: usize,
    /// Tokens generated after `tokens` that are still on the device
    /// ([`Scheduler::step_overlapped`]; 0 in plain steps).
    pub in_flight: usize,
}

impl<'a> SampleRow<'a> {
    /// The tokens generated so far that the host has.
    pub fn generated(&self) -> &'a [u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// Greedy decoding: the argmax of every row.
pub fn greedy<B: Backend>(
    backend: &B,
) -> impl FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Vec<u32>> + '_ {
    move |logits, _| Ok(backend.argmax(logits)?)
}

/// Greedy decoding for [`Scheduler::step_overlapped`]: the argmax of every
/// row, left on the device.
pub fn greedy_on_device<B: Backend>(
    backend: &B,
) -> impl FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Tensor<B>> + '_ {
    move |logits, rows| {
        let mut out = backend.empty(&[rows.len()], DType::U32)?;
        backend.argmax_to(logits, &mut out)?;
        Ok(out)
    }
}

/// Limits and switches of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// Tokens per forward pass, decode tokens and prefill chunks together;
    /// at least `max_num_seqs` so every running sequence can decode each
    /// step.
    pub max_num_batched_tokens: usize,
    /// Share full blocks of equal prefixes between sequences.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            prefix_caching: true,
        }
    }
}

/// Running totals of a [`Scheduler`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Forward passes.
    pub steps: u64,
    /// Tokens run to build KV caches (prompts, and re-prefills after
    /// preemption).
    pub prefill_tokens: u64,
    /// Decode tokens run (one per decoding sequence per step).
    pub decode_tokens: u64,
    /// Positions taken from the prefix cache instead of computed.
    pub cached_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Sequences preempted.
    pub preemptions: u64,
}

/// What one [`Scheduler::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    /// Tokens generated this step, one per sequence that got one.
    pub tokens: Vec<(RequestId, u32)>,
    /// Requests that ended this step.
    pub finished: Vec<Finished>,
    /// Tokens in the forward pass.
    pub batch_tokens: usize,
    /// Sequences in the forward pass.
    pub batch_seqs: usize,
    /// Requests preempted to make room this step.
    pub preempted: Vec<RequestId>,
}

/// A request the scheduler holds, waiting or running.
struct Active {
    id: RequestId,
    /// The prompt, then the generated tokens. Every token but the last
    /// generated one has (once prefilled) its keys and values in the cache.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new: usize,
    stop_ids: Vec<u32>,
    seq: Sequence,
    /// Names of the full blocks of `tokens`, computed as needed; they stay
    /// valid across preemptions because tokens are only appended.
    hashes: Vec<BlockHash>,
    /// Leading blocks of `seq` that are published (or were found) in the
    /// prefix cache.
    published: usize,
    /// Set once it has generated a token since it was last admitted: its
    /// forward tokens count as decode tokens from then on.
    decoding: bool,
    prefill_tokens: usize,
    cached_tokens: usize,
    preemptions: usize,
    /// Tokens sampled on the device that `tokens` does not hold yet
    /// (overlapped steps): at most one when a step is scheduled.
    in_flight: usize,
}

impl Active {
    /// Tokens without keys and values in the cache yet, an in-flight one
    /// included.
    fn pending(&self) -> usize {
        self.tokens.len() + self.in_flight - self.seq.len()
    }

    /// Whether it has all its tokens, counting those in flight: nothing
    /// more to run, only to be retired once they land.
    fn complete(&self) -> bool {
        self.tokens.len() + self.in_flight - self.prompt_len >= self.max_new
    }

    /// Makes sure the names of the first `n` full blocks are computed.
    fn name_blocks<B: Backend>(&mut self, cache: &KvCache<B>, n: usize) {
        let bs = cache.block_size();
        while self.hashes.len() < n {
            let j = self.hashes.len();
            let h = cache.block_hash(
                self.hashes.last().copied(),
                &self.tokens[j * bs..(j + 1) * bs],
            );
            self.hashes.push(h);
        }
    }
}

/// A continuous-batching engine over one model and one KV cache.
pub struct Scheduler<'m, B: Backend> {
    model: &'m Qwen3<B>,
    cache: KvCache<B>,
    cfg: SchedulerConfig,
    /// Admitted in order; preempted sequences go back to the front.
    waiting: VecDeque<Active>,
    /// In admission order: the last is the youngest, preempted first.
    running: Vec<Active>,
    next_id: RequestId,
    stats: SchedulerStats,
    /// Set when a step failed part way: sequence state may then disagree
    /// with the cache, so no further step runs.
    failed: Option<String>,
    /// The last overlapped step's sampled tokens, not yet read back.
    in_flight: Option<InFlight<B>>,
}

/// A step's sampled tokens on their way to the host: the device tensor
/// (u32, one per row), its copy, and the request of each row.
struct InFlight<B: Backend> {
    tokens: Tensor<B>,
    download: Download,
    ids: Vec<RequestId>,
}

impl<'m, B: Backend> Scheduler<'m, B> {
    /// A scheduler running `model` over `cache` (from
    /// [`Qwen3::new_cache`] or [`KvCache::new`] with this model's
    /// geometry); every block of the cache is its to manage.
    pub fn new(model: &'m Qwen3<B>, cache: KvCache<B>, cfg: SchedulerConfig) -> Result<Self> {
        if cfg.max_num_seqs == 0 {
            return Err(ModelError::Request(
                "the scheduler needs max_num_seqs >= 1".into(),
            ));
        }
        if cfg.max_num_batched_tokens < cfg.max_num_seqs {
            return Err(ModelError::Request(format!(
                "max_num_batched_tokens ({}) must be at least max_num_seqs ({}), so that every \
                 running sequence can decode each step",
                cfg.max_num_batched_tokens, cfg.max_num_seqs
            )));
        }
        Ok(Scheduler {
            model,
            cache,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            stats: SchedulerStats::default(),
            failed: None,
            in_flight: None,
        })
    }

    /// Queues a request. Refused (with a message for the user) when it is
    /// empty, names a token outside the vocabulary, or could not fit the
    /// model's positions or the whole KV cache even alone.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        let cfg = self.model.config();
        if req.prompt.is_empty() {
            return Err(ModelError::Request(
                "a request needs at least one prompt token".into(),
            ));
        }
        if req.max_new_tokens == 0 {
            return Err(ModelError::Request(
                "a request needs max_new_tokens >= 1".into(),
            ));
        }
        let vocab = cfg.vocab_size as u32;
        if let Some(bad) = req.prompt.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        // The last generated token is never fed back, so the cache holds at
        // most prompt + max_new - 1 positions.
        let positions = req.prompt.len() + req.max_new_tokens - 1;
        if positions > cfg.max_position_embeddings {
            return Err(ModelError::Request(format!(
                "{} prompt tokens + {} new tokens exceed max_position_embeddings ({})",
                req.prompt.len(),
                req.max_new_tokens,
                cfg.max_position_embeddings
            )));
        }
        let capacity = self.cache.num_blocks() * self.cache.block_size();
        if positions > capacity {
            return Err(ModelError::Request(format!(
                "{} prompt tokens + {} new tokens need {positions} positions; the KV cache holds {capacity}",
                req.prompt.len(),
                req.max_new_tokens
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Active {
            id,
            prompt_len: req.prompt.len(),
            seq: Sequence::for_prompt(req.prompt.len()),
            tokens: req.prompt,
            max_new: req.max_new_tokens,
            stop_ids: req.stop_ids,
            hashes: Vec::new(),
            published: 0,
            decoding: false,
            prefill_tokens: 0,
            cached_tokens: 0,
            preemptions: 0,
            in_flight: 0,
        });
        Ok(id)
    }

    /// Whether any request is waiting or running.
    pub fn has_unfinished(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Requests queued, preempted ones included.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Running totals since this scheduler was made.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// The limits it was made with.
    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    /// The KV cache it manages (free and named block counts).
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// The cache back, to reuse for another scheduler (its prefix cache
    /// included).
    pub fn into_cache(self) -> KvCache<B> {
        self.cache
    }

    /// Steps until every request has finished; returns them by id.
    pub fn run<F>(&mut self, sample: &mut F) -> Result<Vec<Finished>>
    where
        F: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Vec<u32>>,
    {
        self.run_with(|s| s.step(sample))
    }

    /// [`run`](Self::run) through [`step_overlapped`](Self::step_overlapped).
    pub fn run_overlapped<G>(&mut self, sample: &mut G) -> Result<Vec<Finished>>
    where
        G: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Tensor<B>>,
    {
        self.run_with(|s| s.step_overlapped(sample))
    }

    fn run_with(
        &mut self,
        mut step: impl FnMut(&mut Self) -> Result<StepOutput>,
    ) -> Result<Vec<Finished>> {
        let mut done = Vec::new();
        while self.has_unfinished() {
            done.extend(step(self)?.finished);
        }
        done.sort_by_key(|f| f.id);
        Ok(done)
    }

    /// One forward pass: schedules, runs the batch, hands the logits of
    /// every sequence that needs a token to `sample`, which returns one
    /// token per row, and retires finished requests. `sample` is called at
    /// most once per step and sees each request once per generated token
    /// (a preempted request is never asked again for a token it already
    /// has), so a stateful sampler stays in step. Tokens of an earlier
    /// overlapped step still in flight are read back first.
    ///
    /// After an error the scheduler refuses further steps.
    pub fn step<F>(&mut self, sample: &mut F) -> Result<StepOutput>
    where
        F: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Vec<u32>>,
    {
        self.guarded(|s| s.step_inner(sample))
    }

    /// [`step`](Self::step) without waiting for its tokens: `sample` leaves
    /// them on the device (u32, one per row; [`greedy_on_device`]), the next
    /// step takes them as its input from there, and this step returns the
    /// tokens (and finished requests) of the step before, which the host
    /// reads while the GPU runs this one. So the host's work between two
    /// steps (reading tokens back, retiring, scheduling, uploading the
    /// batch) no longer leaves the device idle, as vLLM's async scheduling.
    ///
    /// The tokens are those [`step`](Self::step) gives: the same batches of
    /// the same sequences, and every op batch-invariant. What differs is
    /// the schedule around a stop token: the step after one is already
    /// queued, so the request runs one more row whose token is dropped, and
    /// its sampler may be asked for that one token more. `SampleRow::tokens`
    /// lacks the request's `in_flight` tokens, so a sampler that reads the
    /// history (a repetition penalty) belongs in plain steps. Steps that
    /// must preempt read the tokens in flight back first.
    pub fn step_overlapped<G>(&mut self, sample: &mut G) -> Result<StepOutput>
    where
        G: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Tensor<B>>,
    {
        self.guarded(|s| s.step_overlapped_inner(sample))
    }

    /// Runs a step, refusing once one has failed.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Result<StepOutput>) -> Result<StepOutput> {
        if let Some(e) = &self.failed {
            return Err(ModelError::Request(format!(
                "the scheduler stopped after an earlier error: {e}"
            )));
        }
        let r = f(self);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn step_inner<F>(&mut self, sample: &mut F) -> Result<StepOutput>
    where
        F: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Vec<u32>>,
    {
        let mut out = StepOutput::default();
        if let Some(prev) = self.in_flight.take() {
            self.resolve(prev, &mut out)?;
        }
        let chunks = self.schedule(&mut out)?;
        if self.nothing_to_run(&chunks)? {
            return Ok(out);
        }
        let (mut logits, sampled) = self.run_batch(&chunks, &mut out, None)?;
        if sampled.is_empty() {
            return Ok(out);
        }
        let picks = {
            let info = self.sample_rows(&sampled);
            sample(&mut logits, &info)?
        };
        self.take_tokens(&sampled, &picks, &mut out)?;
        Ok(out)
    }

    fn step_overlapped_inner<G>(&mut self, sample: &mut G) -> Result<StepOutput>
    where
        G: FnMut(&mut Tensor<B>, &[SampleRow<'_>]) -> Result<Tensor<B>>,
    {
        let mut out = StepOutput::default();
        // Each running sequence grows by at most one block a step (prompts'
        // blocks are reserved on admission), so with fewer free blocks than
        // sequences this step may preempt: read the tokens in flight first,
        // so that a preempted request resumes with all its tokens.
        if self.cache.free_blocks() < self.running.len() {
            if let Some(prev) = self.in_flight.take() {
                self.resolve(prev, &mut out)?;
            }
        }
        let chunks = self.schedule(&mut out)?;
        let prev = self.in_flight.take();
        if chunks.iter().all(|&n| n == 0) {
            // Only tokens in flight are left (their requests complete).
            if let Some(prev) = prev {
                self.resolve(prev, &mut out)?;
                return Ok(out);
            }
            self.nothing_to_run(&chunks)?;
            return Ok(out);
        }
        let (mut logits, sampled) = self.run_batch(&chunks, &mut out, prev.as_ref())?;
        let next = if sampled.is_empty() {
            None
        } else {
            let tokens = {
                let info = self.sample_rows(&sampled);
                sample(&mut logits, &info)?
            };
            if tokens.dtype() != DType::U32 || tokens.numel() != sampled.len() {
                return Err(ModelError::Request(format!(
                    "the sampler returned a {:?} tensor of {} elements for {} rows",
                    tokens.dtype(),
                    tokens.numel(),
                    sampled.len()
                )));
            }
            let download = self.model.backend().download_start(&tokens)?;
            let ids = sampled
                .iter()
                .map(|&k| {
                    let s = &mut self.running[k];
                    s.in_flight += 1;
                    s.decoding = true;
                    s.id
                })
                .collect();
            Some(InFlight {
                tokens,
                download,
                ids,
            })
        };
        drop(logits);
        if let Some(prev) = prev {
            self.resolve(prev, &mut out)?;
        }
        self.in_flight = next;
        Ok(out)
    }

    /// Whether a step's schedule runs nothing: fine when nothing is left,
    /// an error (rather than a spin) when requests are.
    fn nothing_to_run(&self, chunks: &[usize]) -> Result<bool> {
        if chunks.iter().any(|&n| n > 0) {
            return Ok(false);
        }
        if self.has_unfinished() {
            // Cannot happen: a request fits the cache alone (checked by
            // `add_request`) and the oldest running one is never preempted
            // for its own growth. Fail rather than spin.
            return Err(ModelError::Request(
                "the scheduler could not schedule any token".into(),
            ));
        }
        Ok(true)
    }

    /// Runs the scheduled chunks as one forward pass (tokens still in
    /// flight fed from `prev`) and publishes new full prompt blocks; returns
    /// the logits of the sequences that now need a token, and their indices
    /// in `running`.
    fn run_batch(
        &mut self,
        chunks: &[usize],
        out: &mut StepOutput,
        prev: Option<&InFlight<B>>,
    ) -> Result<(Tensor<B>, Vec<usize>)> {
        // Count the work before the forward pass moves the sequences on.
        for (s, &n) in self.running.iter_mut().zip(chunks) {
            if n == 0 {
                continue;
            }
            out.batch_tokens += n;
            out.batch_seqs += 1;
            if s.decoding {
                self.stats.decode_tokens += n as u64;
            } else {
                s.prefill_tokens += n;
                self.stats.prefill_tokens += n as u64;
            }
        }
        let prev_row: HashMap<RequestId, usize> = prev
            .map(|p| p.ids.iter().enumerate().map(|(r, &id)| (id, r)).collect())
            .unwrap_or_default();
        // A token in flight has no value on the host yet: its entry holds a
        // placeholder that the forward pass replaces from the device.
        const PLACEHOLDER: [u32; 1] = [0];
        let model = self.model;
        let mut batch: Vec<(&mut Sequence, &[u32])> = Vec::with_capacity(out.batch_seqs);
        let mut row_of: Vec<usize> = Vec::with_capacity(out.batch_seqs);
        let mut fed: Vec<(usize, usize)> = Vec::new();
        for (k, (s, &n)) in self.running.iter_mut().zip(chunks).enumerate() {
            if n == 0 {
                continue;
            }
            let start = s.seq.len();
            if start < s.tokens.len() {
                batch.push((&mut s.seq, &s.tokens[start..start + n]));
            } else {
                let r = prev_row
                    .get(&s.id)
                    .copied()
                    .filter(|_| n == 1)
                    .ok_or_else(|| {
                        ModelError::Request(format!(
                            "request {}: its next token is neither on the host nor in flight",
                            s.id
                        ))
                    })?;
                fed.push((batch.len(), r));
                batch.push((&mut s.seq, &PLACEHOLDER[..]));
            }
            row_of.push(k);
        }
        let feed = match (prev, fed.is_empty()) {
            (Some(p), false) => Some(Feed {
                tokens: &p.tokens,
                entries: &fed,
            }),
            _ => None,
        };
        let logits = model.forward_fed(&mut self.cache, &mut batch, Logits::Last, feed)?;
        drop(batch);
        self.stats.steps += 1;

        if self.cfg.prefix_caching {
            for (s, &n) in self.running.iter_mut().zip(chunks) {
                if n == 0 {
                    continue;
                }
                // Only blocks wholly inside the prompt are shared: their rows
                // are prompt rows for every request that can find them, so a
                // hit gives the same bits as computing them (generated rows
                // take the exact path, prompt rows the tensor cores).
                let full = s.seq.len().min(s.prompt_len) / self.cache.block_size();
                s.name_blocks(&self.cache, full);
                while s.published < full {
                    self.cache
                        .publish(&s.seq, s.published, s.hashes[s.published])?;
                    s.published += 1;
                }
            }
        }

        // Rows whose sequence has all its tokens in the cache get a token;
        // the others ended a prefill chunk short of their last token.
        let rows: Vec<usize> = (0..row_of.len())
            .filter(|&r| self.running[row_of[r]].pending() == 0)
            .collect();
        let sampled: Vec<usize> = rows.iter().map(|&r| row_of[r]).collect();
        if rows.is_empty() || rows.len() == row_of.len() {
            return Ok((logits, sampled));
        }
        let be = model.backend();
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = be.upload(HostSlice::U32(&idx), &[idx.len()])?;
        let mut picked = be.empty(&[rows.len(), model.config().vocab_size], DType::F32)?;
        be.gather_rows(&logits, &idx, &mut picked)?;
        Ok((picked, sampled))
    }

    /// What the sampler is told about the sequences `running[k]`.
    fn sample_rows(&self, sampled: &[usize]) -> Vec<SampleRow<'_>> {
        sampled
            .iter()
            .map(|&k| {
                let s = &self.running[k];
                SampleRow {
                    id: s.id,
                    tokens: &s.tokens,
                    prompt_len: s.prompt_len,
                    in_flight: s.in_flight,
                }
            })
            .collect()
    }

    /// Reads an overlapped step's tokens back and hands them over.
    fn resolve(&mut self, prev: InFlight<B>, out: &mut StepOutput) -> Result<()> {
        let InFlight {
            tokens,
            download,
            ids,
        } = prev;
        let picks = match download.wait()? {
            HostVec::U32(v) => v,
            _ => {
                return Err(ModelError::Request(
                    "the sampled tokens came back in another dtype".into(),
                ))
            }
        };
        drop(tokens);
        if picks.len() != ids.len() {
            return Err(ModelError::Request(format!(
                "the sampler returned {} tokens for {} rows",
                picks.len(),
                ids.len()
            )));
        }
        // Tokens of requests retired since (after a stop token) are dropped.
        let index: HashMap<RequestId, usize> = self
            .running
            .iter()
            .enumerate()
            .map(|(k, s)| (s.id, k))
            .collect();
        let (mut live, mut live_picks) = (Vec::new(), Vec::new());
        for (id, &tok) in ids.iter().zip(&picks) {
            if let Some(&k) = index.get(id) {
                self.running[k].in_flight -= 1;
                live.push(k);
                live_picks.push(tok);
            }
        }
        self.take_tokens(&live, &live_picks, out)
    }

    /// Appends the new token of each `running[k]` of `ks`, then retires
    /// the requests that ended (a stop token, or their last token).
    fn take_tokens(&mut self, ks: &[usize], picks: &[u32], out: &mut StepOutput) -> Result<()> {
        if picks.len() != ks.len() {
            return Err(ModelError::Request(format!(
                "the sampler returned {} tokens for {} rows",
                picks.len(),
                ks.len()
            )));
        }
        let vocab = self.model.config().vocab_size as u32;
        if let Some(bad) = picks.iter().find(|&&t| t >= vocab) {
            return Err(ModelError::Request(format!(
                "the sampler returned token {bad}, outside the vocabulary ({vocab})"
            )));
        }
        let mut finished: Vec<Option<StopReason>> = vec![None; self.running.len()];
        for (&k, &tok) in ks.iter().zip(picks) {
            let s = &mut self.running[k];
            s.tokens.push(tok);
            s.decoding = true;
            out.tokens.push((s.id, tok));
            self.stats.generated_tokens += 1;
            if s.stop_ids.contains(&tok) {
                finished[k] = Some(StopReason::Stop);
            } else if s.tokens.len() - s.prompt_len >= s.max_new {
                finished[k] = Some(StopReason::Length);
            }
        }

        if finished.iter().any(Option::is_some) {
            let all = std::mem::take(&mut self.running);
            for (mut s, reason) in all.into_iter().zip(finished) {
                let Some(reason) = reason else {
                    self.running.push(s);
                    continue;
                };
                self.cache.release(&mut s.seq);
                out.finished.push(Finished {
                    id: s.id,
                    prompt_len: s.prompt_len,
                    tokens: s.tokens.split_off(s.prompt_len),
                    reason,
                    prefill_tokens: s.prefill_tokens,
                    cached_tokens: s.cached_tokens,
                    preemptions: s.preemptions,
                });
            }
        }
        Ok(())
    }

    /// Chooses this step's tokens: returns, for each running sequence (in
    /// order, after any preemptions and admissions), how many of its
    /// pending tokens to run, and reserves their KV blocks.
    fn schedule(&mut self, out: &mut StepOutput) -> Result<Vec<usize>> {
        let bs = self.cache.block_size();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut chunks = Vec::with_capacity(self.running.len() + self.waiting.len());

        // Running sequences, oldest first: decode tokens, and the rest of a
        // prefill that an earlier step's budget cut short. Their prompts'
        // blocks were reserved on admission, so only decoding grows them.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            if self.running[i].complete() {
                // Its last token is in flight: nothing more to run.
                chunks.push(0);
                i += 1;
                continue;
            }
            let want = self.running[i].pending().min(budget);
            let extra = |s: &Active| {
                (s.seq.len() + want)
                    .div_ceil(bs)
                    .saturating_sub(s.seq.blocks().len())
            };
            let mut evicted_self = false;
            while extra(&self.running[i]) > self.cache.free_blocks() {
                if self.in_flight.is_some() {
                    // step_overlapped reads them back before a step that
                    // could preempt; a request must not lose one.
                    return Err(ModelError::Request(
                        "a preemption with tokens in flight".into(),
                    ));
                }
                // Free the youngest; it may be this sequence itself, which
                // then waits for the older ones to make room.
                let victim = self.running.len() - 1;
                out.preempted.push(self.preempt_last());
                if victim == i {
                    evicted_self = true;
                    break;
                }
            }
            if evicted_self {
                break;
            }
            let s = &mut self.running[i];
            let end = s.seq.len() + want;
            self.cache.reserve(&mut s.seq, end)?;
            chunks.push(want);
            budget -= want;
            i += 1;
        }
        chunks.resize(self.running.len(), 0);

        // Admit waiting requests, in order, while there is budget and room
        // for their whole prompt (admitting on a first chunk's room alone
        // would let new prompts take the blocks running sequences are about
        // to decode into, and preempt them straight away).
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(s) = self.waiting.front_mut() else {
                break;
            };
            let hits = if self.cfg.prefix_caching {
                // At least the last token must be computed, for its logits.
                let reusable = (s.tokens.len() - 1) / bs;
                s.name_blocks(&self.cache, reusable);
                self.cache.lookup(&s.hashes[..reusable])
            } else {
                Vec::new()
            };
            let need = s.tokens.len().div_ceil(bs) - hits.len() + self.cache.unheld(&hits);
            // Keep 1% of the blocks for running sequences' next decode
            // blocks (as vLLM's watermark), unless nothing runs.
            let watermark = if self.running.is_empty() {
                0
            } else {
                self.cache.num_blocks() / 100
            };
            if need + watermark > self.cache.free_blocks() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            self.cache.share(&mut s.seq, &hits)?;
            s.published = hits.len();
            s.cached_tokens += hits.len() * bs;
            self.stats.cached_tokens += (hits.len() * bs) as u64;
            let end = s.tokens.len();
            self.cache.reserve(&mut s.seq, end)?;
            let want = s.pending().min(budget);
            budget -= want;
            chunks.push(want);
            self.running.push(s);
        }
        Ok(chunks)
    }

    /// Preempts the youngest running sequence: releases its blocks (named
    /// ones stay in the prefix cache until overwritten) and queues it first.
    fn preempt_last(&mut self) -> RequestId {
        let mut s = self.running.pop().expect("a running sequence to preempt");
        self.cache.release(&mut s.seq);
        s.published = 0;
        s.decoding = false;
        s.preemptions += 1;
        self.stats.preemptions += 1;
        let id = s.id;
        self.waiting.push_front(s);
        id
    }
}
