//! `qwen-cli bench --mode throughput`: offline throughput of the
//! continuous-batching scheduler on nano-vllm's benchmark workload.
//!
//! The workload follows nano-vllm's `bench.py`: 256 sequences whose prompt
//! and output lengths are drawn uniformly from [100, 1024], prompts of
//! random token ids below 10000, every sequence generating exactly its
//! output length (end-of-sequence ignored), sampled at temperature 0.6. All
//! requests are queued at once and the wall time covers everything from the
//! first step to the last token. The draws come from our own seeded stream,
//! so the lengths are not nano-vllm's exact ones, only the same
//! distribution.

use std::time::Instant;

use model_qwen3::config::Qwen3Config;
use model_qwen3::scheduler::{greedy, Request, SampleRow, Scheduler, SchedulerConfig};
use model_qwen3::{KvCache, ModelError, Qwen3, DEFAULT_BLOCK_SIZE};
use qwen_kernels_cpu::CpuBackend;
use qwen_kernels_cuda::CudaBackend;
use qwen_sampler::{sample_batch, sample_batch_on_device, Sampler, SamplingConfig};
use qwen_tensor::{Backend, DType, Tensor};

use crate::bench::BenchArgs;

/// What `qwen-cli bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    /// Batch 1 decode speed (the default).
    Latency,
    /// Tokens per second of a large offline batch through the scheduler.
    Throughput,
}

/// Parses `--mode`.
pub fn parse_mode(v: &str) -> Result<BenchMode, String> {
    match v {
        "latency" => Ok(BenchMode::Latency),
        "throughput" => Ok(BenchMode::Throughput),
        other => Err(format!(
            "unknown --mode '{other}' (expected latency or throughput)"
        )),
    }
}

/// Options of `--mode throughput`.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputArgs {
    /// Sequences in the workload.
    pub num_seqs: usize,
    /// Longest prompt and output; both are drawn from [min(100, L), L].
    pub max_len: usize,
    /// KV cache size in blocks of 16 positions; by default sized from free
    /// device memory (CUDA) or capped at 4 GiB (CPU), and never more than
    /// the whole workload needs.
    pub kv_blocks: Option<usize>,
    /// Token budget of one forward pass.
    pub max_batched_tokens: usize,
    /// Sequences running at once; by default 256, or the token budget when
    /// that is smaller.
    pub max_seqs: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f32,
    /// The throughput-only flags given, to refuse them in latency mode.
    pub given: Vec<String>,
}

impl Default for ThroughputArgs {
    fn default() -> Self {
        ThroughputArgs {
            num_seqs: 256,
            max_len: 1024,
            kv_blocks: None,
            max_batched_tokens: 8192,
            max_seqs: None,
            temperature: 0.6,
            given: Vec::new(),
        }
    }
}

/// The flags [`ThroughputArgs::set`] takes.
pub const FLAGS: [&str; 6] = [
    "--num-seqs",
    "--max-len",
    "--kv-blocks",
    "--max-batched-tokens",
    "--max-seqs",
    "--temperature",
];

impl ThroughputArgs {
    /// The running-sequence limit in effect.
    pub fn max_seqs(&self) -> usize {
        self.max_seqs.unwrap_or(256.min(self.max_batched_tokens))
    }

    /// Sets one of [`FLAGS`] from its value.
    pub fn set(&mut self, flag: &str, v: &str) -> Result<(), String> {
        let count = |v: &str| -> Result<usize, String> {
            match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!("{flag}: '{v}' is not a positive whole number")),
            }
        };
        match flag {
            "--num-seqs" => self.num_seqs = count(v)?,
            "--max-len" => self.max_len = count(v)?,
            "--kv-blocks" => self.kv_blocks = Some(count(v)?),
            "--max-batched-tokens" => self.max_batched_tokens = count(v)?,
            "--max-seqs" => self.max_seqs = Some(count(v)?),
            "--temperature" => {
                self.temperature = match v.parse::<f32>() {
                    Ok(t) if t.is_finite() && t >= 0.0 => t,
                    _ => return Err(format!("{flag}: '{v}' is not a temperature >= 0")),
                }
            }
            other => return Err(format!("unknown option '{other}' (see qwen-cli --help)")),
        }
        self.given.push(flag.to_string());
        Ok(())
    }
}

/// Refuses settings the model or the scheduler cannot run, before the
/// workload is built (a huge `--max-len` would otherwise allocate it).
fn check(t: &ThroughputArgs, cfg: &Qwen3Config) -> Result<(), String> {
    if t.num_seqs > MAX_SEQS {
        return Err(format!("--num-seqs must be at most {MAX_SEQS}"));
    }
    let max_pos = cfg.max_position_embeddings;
    if 2 * t.max_len - 1 > max_pos {
        return Err(format!(
            "--max-len {}: a prompt and an output of up to {} tokens each exceed the model's {max_pos} positions",
            t.max_len, t.max_len
        ));
    }
    if t.max_batched_tokens < t.max_seqs() {
        return Err(format!(
            "--max-batched-tokens ({}) must be at least --max-seqs ({}), so every running sequence can decode each step",
            t.max_batched_tokens,
            t.max_seqs()
        ));
    }
    Ok(())
}

/// The most sequences a workload may have: far beyond any benchmark, and
/// small enough that building the prompts cannot exhaust host memory.
const MAX_SEQS: usize = 100_000;

/// splitmix64, for a workload that is the same on every machine.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi` (the modulo bias is below 2⁻⁵⁰ here).
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// The benchmark's requests: `n` prompts, then their output lengths, as
/// nano-vllm draws them (token ids in 0..=10000, below the vocabulary).
pub fn workload(n: usize, max_len: usize, vocab: usize, seed: u64) -> Vec<Request> {
    let mut rng = Stream(seed);
    let lo = max_len.min(100);
    let top = 10_000.min(vocab - 1);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            let len = rng.between(lo, max_len);
            (0..len).map(|_| rng.between(0, top) as u32).collect()
        })
        .collect();
    prompts
        .into_iter()
        .map(|prompt| Request {
            prompt,
            max_new_tokens: rng.between(lo, max_len),
            stop_ids: Vec::new(),
        })
        .collect()
}

/// Bytes of one KV block across all layers (bf16 keys and values).
pub fn bytes_per_block(cfg: &Qwen3Config) -> usize {
    2 * 2 * cfg.num_hidden_layers * DEFAULT_BLOCK_SIZE * cfg.num_key_value_heads * cfg.head_dim
}

/// Blocks the whole workload could hold at once: beyond this a cache only
/// costs allocation time.
fn workload_blocks(reqs: &[Request]) -> usize {
    reqs.iter()
        .map(|r| (r.prompt.len() + r.max_new_tokens - 1).div_ceil(DEFAULT_BLOCK_SIZE))
        .sum()
}

/// Device bytes a step needs besides the KV cache and weights, generously:
/// the activations of a full token budget and the `[seqs, vocab]` logits,
/// each twice (a step's buffers are replaced while the old ones are still
/// allocated), plus recorded decode graphs and library workspaces.
fn step_bytes(cfg: &Qwen3Config, a: &ThroughputArgs) -> usize {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let per_token = 4 * h + 4 * (hq + 2 * hkv) * d + 2 * 2 * hq * d + 4 * 2 * i + 2 * i;
    let logits = 4 * cfg.vocab_size * a.max_seqs();
    2 * (per_token * a.max_batched_tokens + logits) + (1 << 30)
}

/// The KV cache size for this run: `--kv-blocks`, else what `free` device
/// bytes allow after step buffers and a tenth of the device (`total`) as a
/// margin, capped by what the workload can use.
fn kv_blocks(
    cfg: &Qwen3Config,
    a: &ThroughputArgs,
    reqs: &[Request],
    memory: (usize, usize),
) -> usize {
    if let Some(n) = a.kv_blocks {
        return n;
    }
    let (free, total) = memory;
    let usable = free.saturating_sub(total / 10 + step_bytes(cfg, a));
    (usable / bytes_per_block(cfg)).clamp(1, workload_blocks(reqs).max(1))
}

/// Throughput results.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub shape: String,
    pub backend: String,
    pub num_seqs: usize,
    pub max_len: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub wall_s: f64,
    pub output_tok_s: f64,
    pub total_tok_s: f64,
    pub preemptions: u64,
    pub steps: u64,
    pub prefill_tokens: u64,
    pub kv_blocks: usize,
    pub max_batched_tokens: usize,
    pub max_seqs: usize,
    pub temperature: f32,
    pub overlap: bool,
}

impl Throughput {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": "throughput", "shape": self.shape, "backend": self.backend,
            "num_seqs": self.num_seqs, "max_len": self.max_len,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
            "wall_s": self.wall_s, "output_tok_s": self.output_tok_s, "total_tok_s": self.total_tok_s,
            "preemptions": self.preemptions, "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "kv_blocks": self.kv_blocks, "block_size": DEFAULT_BLOCK_SIZE,
            "max_batched_tokens": self.max_batched_tokens, "max_seqs": self.max_seqs,
            "temperature": self.temperature, "overlap": self.overlap,
        })
    }

    /// A small table for people.
    pub fn table(&self) -> String {
        format!(
            "| shape | backend | seqs | prompt tok | output tok | time s | output tok/s | total tok/s | preemptions |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {} |\n\
             (lengths uniform in [{}, {}]; {} steps of at most {} tokens and {} sequences; \
             KV cache {} blocks of {}; temperature {}; overlapped steps {})",
            self.shape,
            self.backend,
            self.num_seqs,
            self.prompt_tokens,
            self.output_tokens,
            self.wall_s,
            self.output_tok_s,
            self.total_tok_s,
            self.preemptions,
            self.max_len.min(100),
            self.max_len,
            self.steps,
            self.max_batched_tokens,
            self.max_seqs,
            self.kv_blocks,
            DEFAULT_BLOCK_SIZE,
            self.temperature,
            if self.overlap { "on" } else { "off" }
        )
    }
}

/// Runs `bench --mode throughput` on the GPU when `gpu` is given, else on
/// the CPU, and prints the result.
pub fn run_cmd(a: &BenchArgs, gpu: Option<CudaBackend>) -> Result<(), String> {
    // Settings the model rules out fail before the weights are made.
    check(&a.throughput, &crate::bench::config(a)?)?;
    let result = match gpu {
        Some(g) => {
            eprintln!("backend: cuda ({})", g.device_name());
            let (m, shape) = crate::bench::load(g, a)?;
            if std::env::var_os("QWEN_PROFILE").is_some() {
                // Decode steps like the run's buckets (few long sequences
                // at the end, many shorter ones early) and a full prompt step.
                for (seqs, ctx) in [(16, 1536), (48, 1280), (128, 1024), (256, 640)] {
                    for (op, us) in crate::bench::op_profile(&m, seqs, ctx, 4)? {
                        eprintln!("profile {seqs}x{ctx}: {op:>14} {us:9.1} us/step");
                    }
                }
                for (op, us) in crate::bench::prefill_op_profile(&m, 8, 1024, 4)? {
                    eprintln!("profile prompt 8x1024: {op:>14} {us:9.1} us/step");
                }
            }
            let memory = m.backend().memory_info().map_err(|e| e.to_string())?;
            run(&m, a, &shape, memory)?
        }
        None => {
            eprintln!("backend: cpu");
            let (m, shape) = crate::bench::load(CpuBackend::new(), a)?;
            // The CPU has no free-memory query worth trusting here: allow
            // 4 GiB of cache unless --kv-blocks says otherwise.
            run(&m, a, &shape, (4 << 30, 0))?
        }
    };
    if a.json {
        println!("{}", result.to_json());
    } else {
        println!("{}", result.table());
    }
    Ok(())
}

/// Per-request samplers, made on first use: request `id` draws from random
/// stream `id`, so its tokens do not depend on its batch neighbours.
struct Samplers {
    config: SamplingConfig,
    by_id: Vec<Option<Sampler>>,
}

impl Samplers {
    fn pick<B: Backend>(
        &mut self,
        be: &B,
        logits: &mut Tensor<B>,
        rows: &[SampleRow<'_>],
    ) -> model_qwen3::Result<Vec<u32>> {
        let fail = |e: qwen_sampler::SamplerError| ModelError::Request(e.to_string());
        let mut taken = self.take(rows).map_err(fail)?;
        let histories: Vec<&[u32]> = rows.iter().map(|r| r.tokens).collect();
        let mut refs: Vec<&mut Sampler> = taken.iter_mut().collect();
        let picked = sample_batch(be, logits, &mut refs, &histories);
        self.put_back(rows, taken);
        picked.map_err(fail)
    }

    /// [`pick`](Self::pick) with the tokens left on the device.
    fn pick_on_device<B: Backend>(
        &mut self,
        be: &B,
        logits: &mut Tensor<B>,
        rows: &[SampleRow<'_>],
    ) -> model_qwen3::Result<Tensor<B>> {
        let fail = |e: qwen_sampler::SamplerError| ModelError::Request(e.to_string());
        let mut taken = self.take(rows).map_err(fail)?;
        let mut refs: Vec<&mut Sampler> = taken.iter_mut().collect();
        let picked = sample_batch_on_device(be, logits, &mut refs);
        self.put_back(rows, taken);
        picked.map_err(fail)
    }

    /// Each row's sampler, made on first use, out of the table while it draws.
    fn take(&mut self, rows: &[SampleRow<'_>]) -> Result<Vec<Sampler>, qwen_sampler::SamplerError> {
        let mut taken = Vec::with_capacity(rows.len());
        for r in rows {
            let id = r.id as usize;
            if self.by_id.len() <= id {
                self.by_id.resize(id + 1, None);
            }
            let s = match self.by_id[id].take() {
                Some(s) => s,
                None => Sampler::new(self.config, r.id)?,
            };
            taken.push(s);
        }
        Ok(taken)
    }

    fn put_back(&mut self, rows: &[SampleRow<'_>], taken: Vec<Sampler>) {
        for (r, s) in rows.iter().zip(taken) {
            self.by_id[r.id as usize] = Some(s);
        }
    }
}

/// The benchmark on a loaded model; `memory` is (free, total) device bytes
/// for sizing the KV cache.
pub fn run<B: Backend>(
    model: &Qwen3<B>,
    a: &BenchArgs,
    shape: &str,
    memory: (usize, usize),
) -> Result<Throughput, String> {
    let err = |e: ModelError| e.to_string();
    let t = &a.throughput;
    let cfg = model.config();
    check(t, cfg)?;
    let reqs = workload(t.num_seqs, t.max_len, cfg.vocab_size, a.seed);
    let blocks = kv_blocks(cfg, t, &reqs, memory);
    eprintln!(
        "KV cache: {blocks} blocks of {DEFAULT_BLOCK_SIZE} positions ({:.2} GiB)",
        (blocks * bytes_per_block(cfg)) as f64 / (1u64 << 30) as f64
    );
    let cache = KvCache::new(
        model.backend(),
        cfg.num_hidden_layers,
        model.geometry(DEFAULT_BLOCK_SIZE),
        blocks,
    )
    .map_err(|e| match e {
        ModelError::Backend(qwen_tensor::Error::OutOfMemory(m)) => format!(
            "a KV cache of {blocks} blocks does not fit in {} memory ({m}); try a smaller --kv-blocks",
            model.backend().name()
        ),
        e => e.to_string(),
    })?;
    let sched_cfg = SchedulerConfig {
        max_num_seqs: t.max_seqs(),
        max_num_batched_tokens: t.max_batched_tokens,
        ..Default::default()
    };
    let be = model.backend();
    let sampling = SamplingConfig {
        temperature: t.temperature,
        seed: a.seed,
        ..Default::default()
    };

    // Warm-up: kernels compile on first use and decode graphs record on
    // first sight; a few short requests through the same cache take that
    // out of the timed run. Without prefix caching, so that the timed run
    // finds none of the warm-up's blocks.
    eprintln!("warming up");
    let warm_cfg = SchedulerConfig {
        prefix_caching: false,
        ..sched_cfg
    };
    let mut s = Scheduler::new(model, cache, warm_cfg).map_err(err)?;
    let warm_len = t.max_len.min(100);
    for r in reqs.iter().take(4) {
        s.add_request(Request {
            prompt: r.prompt[..warm_len.min(r.prompt.len())].to_vec(),
            max_new_tokens: 4,
            stop_ids: Vec::new(),
        })
        .map_err(err)?;
    }
    s.run(&mut greedy(be)).map_err(err)?;
    be.synchronize().map_err(|e| e.to_string())?;
    let cache = s.into_cache();

    let mut s = Scheduler::new(model, cache, sched_cfg).map_err(err)?;
    let prompt_tokens: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    for r in reqs {
        s.add_request(r).map_err(err)?;
    }
    let mut samplers = Samplers {
        config: sampling,
        by_id: Vec::new(),
    };
    // The overlapped steps' samplers (a run takes one kind of step).
    let mut device_samplers = Samplers {
        config: sampling,
        by_id: Vec::new(),
    };
    let profile = std::env::var_os("QWEN_PROFILE").is_some();
    // Profiled: when the host had the step's forward pass enqueued, how
    // long the GPU then still took with it, and how long sampling took.
    let enqueued = std::cell::Cell::new(None::<(Instant, f64, f64)>);
    let mut pick =
        |logits: &mut Tensor<B>, rows: &[SampleRow<'_>]| -> model_qwen3::Result<Vec<u32>> {
            let at = Instant::now();
            if profile {
                be.synchronize().map_err(ModelError::Backend)?;
            }
            let waited = at.elapsed();
            let picked = if t.temperature == 0.0 {
                be.argmax(logits)?
            } else {
                samplers.pick(be, logits, rows)?
            };
            if profile {
                let sampled = (at.elapsed() - waited).as_secs_f64();
                enqueued.set(Some((at, waited.as_secs_f64(), sampled)));
            }
            Ok(picked)
        };
    // The profile times each step's own tokens, so it runs plain steps.
    let overlap = a.overlap && !profile;
    let mut pick_on_device =
        |logits: &mut Tensor<B>, rows: &[SampleRow<'_>]| -> model_qwen3::Result<Tensor<B>> {
            if t.temperature == 0.0 {
                let mut out = be.empty(&[rows.len()], DType::U32)?;
                be.argmax_to(logits, &mut out)?;
                Ok(out)
            } else {
                device_samplers.pick_on_device(be, logits, rows)
            }
        };
    let started = Instant::now();
    let mut last_report = started;
    let (mut done, mut output_tokens) = (0usize, 0usize);
    let mut steps: Vec<StepTime> = Vec::new();
    while s.has_unfinished() {
        let step_start = Instant::now();
        let out = if overlap {
            s.step_overlapped(&mut pick_on_device)
        } else {
            s.step(&mut pick)
        }
        .map_err(err)?;
        if profile {
            let (host, gpu_tail, sample) = match enqueued.take() {
                Some((at, wait, sample)) => ((at - step_start).as_secs_f64(), wait, sample),
                None => (0.0, 0.0, 0.0),
            };
            steps.push(StepTime {
                tokens: out.batch_tokens,
                seqs: out.batch_seqs,
                secs: step_start.elapsed().as_secs_f64(),
                host,
                gpu_tail,
                sample,
            });
        }
        done += out.finished.len();
        output_tokens += out.tokens.len();
        if last_report.elapsed().as_secs_f64() >= 1.0 {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprint!(
                "\r{done}/{} done, {} running, {} waiting, {output_tokens} tokens out, {:.0} tok/s out, {} preemptions   ",
                t.num_seqs,
                s.num_running(),
                s.num_waiting(),
                output_tokens as f64 / secs,
                s.stats().preemptions
            );
        }
    }
    be.synchronize().map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    eprintln!("\r{done}/{} done in {wall:.2} s{:40}", t.num_seqs, "");
    if profile {
        eprintln!("{}", step_profile(&steps));
    }
    let st = s.stats();
    Ok(Throughput {
        shape: shape.to_string(),
        backend: be.name().to_string(),
        num_seqs: t.num_seqs,
        max_len: t.max_len,
        prompt_tokens,
        output_tokens,
        wall_s: wall,
        output_tok_s: output_tokens as f64 / wall,
        total_tok_s: (prompt_tokens + output_tokens) as f64 / wall,
        preemptions: st.preemptions,
        steps: st.steps,
        prefill_tokens: st.prefill_tokens,
        kv_blocks: blocks,
        max_batched_tokens: t.max_batched_tokens,
        max_seqs: t.max_seqs(),
        temperature: t.temperature,
        overlap,
    })
}

/// One scheduler step of a profiled run: its batch and its host wall time
/// (each step ends by downloading its sampled tokens, so the GPU is done),
/// split at the moment the host had the forward pass enqueued: `host` is the
/// time to schedule and enqueue it, `gpu_tail` how long the GPU then still
/// ran (near 0: the host, not the GPU, set the step's pace); `sample` is
/// the sampling that followed, its tokens downloaded.
struct StepTime {
    tokens: usize,
    seqs: usize,
    secs: f64,
    host: f64,
    gpu_tail: f64,
    sample: f64,
}

/// `QWEN_PROFILE=1`: where a throughput run's time went, as a table of
/// steps grouped into those with prompt tokens and pure decode steps by
/// batch size (buckets of 32 sequences).
fn step_profile(steps: &[StepTime]) -> String {
    // name -> (steps, tokens, secs, host secs, gpu tail secs, sample secs)
    let mut rows: Vec<(String, [f64; 6])> = Vec::new();
    for st in steps {
        let name = if st.tokens > st.seqs {
            "with prompt tokens".to_string()
        } else {
            let lo = (st.seqs - 1) / 32 * 32 + 1;
            format!("decode {lo:>3}-{:>3} seqs", lo + 31)
        };
        let add = [
            1.0,
            st.tokens as f64,
            st.secs,
            st.host,
            st.gpu_tail,
            st.sample,
        ];
        match rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => r.1.iter_mut().zip(add).for_each(|(a, b)| *a += b),
            None => rows.push((name, add)),
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let total: f64 = steps.iter().map(|s| s.secs).sum();
    let mut t = String::from(
        "| steps | count | tokens | total s | share | ms/step | host enqueue ms/step | GPU after enqueue ms/step | sampling ms/step |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, [n, tokens, secs, host, tail, sample]) in rows {
        t.push_str(&format!(
            "| {name} | {n} | {tokens} | {secs:.2} | {:.1}% | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            100.0 * secs / total,
            1e3 * secs / n,
            1e3 * host / n,
            1e3 * tail / n,
            1e3 * sample / n
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_seeded_and_in_range() {
        let w = workload(256, 1024, 151_936, 0);
        assert_eq!(w, workload(256, 1024, 151_936, 0));
        assert_ne!(w, workload(256, 1024, 151_936, 1));
        assert_eq!(w.len(), 256);
        for r in &w {
            assert!((100..=1024).contains(&r.prompt.len()));
            assert!((100..=1024).contains(&r.max_new_tokens));
            assert!(r.prompt.iter().all(|&t| t <= 10_000));
            assert!(r.stop_ids.is_empty());
        }
        // Uniform: the mean length is near 562.
        let mean = w.iter().map(|r| r.prompt.len()).sum::<usize>() as f64 / 256.0;
        assert!((500.0..625.0).contains(&mean), "{mean}");
        // Pinned: scripts/hf_bench.py draws the same workload from its own
        // copy of the stream, and these are the values it gets.
        assert_eq!(w[0].prompt.len(), 910);
        assert_eq!(w[0].prompt[..3], [1996, 1151, 337]);
        assert_eq!((w[0].max_new_tokens, w[255].max_new_tokens), (247, 294));
        let prompt: usize = w.iter().map(|r| r.prompt.len()).sum();
        let output: usize = w.iter().map(|r| r.max_new_tokens).sum();
        assert_eq!((prompt, output), (138_774, 129_928));
        // Short limits shrink both ranges.
        let small = workload(4, 20, 151_936, 0);
        assert!(small
            .iter()
            .all(|r| (20..=20).contains(&r.prompt.len()) && r.max_new_tokens == 20));
    }

    #[test]
    fn kv_sizing_follows_free_memory_and_the_workload() {
        let cfg = model_qwen3::dummy::dummy_config("qwen3-0.6b").unwrap();
        // 28 layers x 8 heads x 128 x 2 (K, V) x 2 bytes x 16 positions.
        assert_eq!(bytes_per_block(&cfg), 1_835_008);
        let a = ThroughputArgs::default();
        let reqs = workload(256, 1024, cfg.vocab_size, 0);
        let gib = 1usize << 30;
        // An H100 after 1.2 GB of weights: room for the whole workload.
        let all = kv_blocks(&cfg, &a, &reqs, (78 * gib, 80 * gib));
        assert_eq!(all, workload_blocks(&reqs));
        // 12 GiB free of 80: nothing left after the 8 GiB margin and step
        // buffers but a little.
        let some = kv_blocks(&cfg, &a, &reqs, (12 * gib, 80 * gib));
        assert!(
            some < all && some * bytes_per_block(&cfg) < 3 * gib,
            "{some}"
        );
        let flag = ThroughputArgs {
            kv_blocks: Some(7),
            ..Default::default()
        };
        assert_eq!(kv_blocks(&cfg, &flag, &reqs, (0, 0)), 7);
    }

    #[test]
    fn flags_parse_and_refuse_bad_values() {
        let mut t = ThroughputArgs::default();
        t.set("--num-seqs", "8").unwrap();
        t.set("--temperature", "0").unwrap();
        t.set("--kv-blocks", "100").unwrap();
        assert_eq!(
            (t.num_seqs, t.temperature, t.kv_blocks),
            (8, 0.0, Some(100))
        );
        assert_eq!(t.given, ["--num-seqs", "--temperature", "--kv-blocks"]);
        for (f, v) in [
            ("--num-seqs", "0"),
            ("--max-len", "-3"),
            ("--temperature", "-1"),
            ("--temperature", "nan"),
            ("--kv-blocks", "many"),
        ] {
            let e = t.set(f, v).unwrap_err();
            assert!(e.contains(f) && !e.contains('\n'), "{e}");
        }
        assert!(parse_mode("fast").is_err());
        assert_eq!(parse_mode("throughput"), Ok(BenchMode::Throughput));
    }
}
