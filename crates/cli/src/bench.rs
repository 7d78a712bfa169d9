//! `qwen-cli bench`: decode latency at batch 1 against the memory-bandwidth
//! floor, on a real checkpoint or random weights of a real shape.

use std::path::PathBuf;
use std::time::Instant;

use model_qwen3::config::Qwen3Config;
use model_qwen3::dummy::{dummy_config, random_weights};
use model_qwen3::{Logits, Qwen3, Sequence};
use qwen_sampler::{Sampler, SamplingConfig, StopCriteria};

use crate::decode::{decode, DecodeIn};
use qwen_tensor::Backend;

/// Options of `qwen-cli bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchArgs {
    pub model: Option<PathBuf>,
    pub dummy: Option<String>,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub seed: u64,
    pub json: bool,
    /// `--mode`: latency (this file) or throughput (`throughput.rs`).
    pub mode: crate::throughput::BenchMode,
    pub throughput: crate::throughput::ThroughputArgs,
    /// `--tensor-core-decode`: generated tokens on the tensor cores too.
    pub tensor_core_decode: bool,
    /// `--overlap`: each step is queued before the host reads the step
    /// before's tokens (both modes).
    pub overlap: bool,
}

/// Latency results.
#[derive(Debug, Clone)]
pub struct Latency {
    pub shape: String,
    pub backend: String,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub ttft_ms: f64,
    pub ms_per_token: f64,
    pub decode_tok_s: f64,
    pub bytes_per_token: f64,
    pub bandwidth_gb_s: f64,
    pub floor_ms: f64,
    pub pct_of_floor: f64,
    /// Steps overlapped (`--overlap on`).
    pub overlap: bool,
    /// The generated ids (the prefill's, then each decode step's).
    pub tokens: Vec<u32>,
}

impl Latency {
    /// The floor against `bandwidth` where that is higher than the one
    /// measured before the run: on a shared host the bandwidth moves from
    /// one second to the next, and the fastest seen gives the honest
    /// (shortest) floor.
    pub fn at_best_bandwidth(mut self, bandwidth: f64) -> Latency {
        if bandwidth / 1e9 > self.bandwidth_gb_s {
            self.bandwidth_gb_s = bandwidth / 1e9;
            self.floor_ms = self.bytes_per_token / bandwidth * 1e3;
            self.pct_of_floor = 100.0 * self.floor_ms / self.ms_per_token;
        }
        self
    }
}

/// The config a benchmark runs: the checkpoint's config.json or the
/// shape's. Read before any weights, so that flags it rules out fail fast.
pub fn config(a: &BenchArgs) -> Result<Qwen3Config, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    match (&a.model, &a.dummy) {
        (Some(dir), None) => Qwen3Config::from_file(&dir.join("config.json")).map_err(err),
        (None, Some(shape)) => dummy_config(shape).map_err(err),
        _ => Err("bench needs exactly one of --model DIR or --dummy-weights SHAPE".into()),
    }
}

/// The latency mode's prompt and generation lengths against the model's
/// positions.
pub fn check_lengths(cfg: &Qwen3Config, a: &BenchArgs) -> Result<(), String> {
    let max = cfg.max_position_embeddings;
    if a.prompt_len == 0 || a.gen_len == 0 || a.prompt_len.saturating_add(a.gen_len) > max {
        return Err(format!(
            "--prompt-len and --gen-len must be positive and together at most {max}"
        ));
    }
    Ok(())
}

/// Loads the model for a benchmark: a checkpoint or random weights.
pub fn load<B: Backend>(backend: B, a: &BenchArgs) -> Result<(Qwen3<B>, String), String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let progress = &mut |done: usize, total: usize| {
        eprint!("\rpreparing weights: layer {done}/{total}");
        if done == total {
            eprintln!();
        }
    };
    let cfg = config(a)?;
    let (m, mut label) = match (&a.model, &a.dummy) {
        (Some(dir), _) => (
            Qwen3::load(backend, dir, progress).map_err(err)?,
            dir.display().to_string(),
        ),
        (None, shape) => {
            let w = random_weights(&cfg, a.seed, progress);
            (
                Qwen3::from_host(backend, cfg, &w).map_err(err)?,
                format!("{} (random weights)", shape.as_deref().unwrap_or_default()),
            )
        }
    };
    if a.tensor_core_decode {
        m.set_tensor_core_decode(true);
        label.push_str(", tensor-core decode");
    }
    Ok((m, label))
}

/// Bytes a decode step reads: every bf16 weight once (the embedding table
/// only for one row, unless it is also the output projection), plus the
/// KV cache of the average context.
pub fn bytes_per_token(cfg: &Qwen3Config, avg_context: f64) -> f64 {
    let (h, i, d) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.head_dim as f64,
    );
    let (hq, hkv) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
    );
    let per_layer = (hq + 2.0 * hkv) * d * h + h * hq * d + 3.0 * i * h;
    let weights = 2.0 * (per_layer * cfg.num_hidden_layers as f64 + cfg.vocab_size as f64 * h);
    let kv = 2.0 * 2.0 * hkv * d * cfg.num_hidden_layers as f64 * avg_context;
    weights + kv
}

/// Batch 1: prefill `prompt_len` random tokens, then `gen_len` greedy
/// decode steps that ignore end-of-sequence tokens.
pub fn latency<B: Backend>(
    model: &Qwen3<B>,
    a: &BenchArgs,
    shape: &str,
    bandwidth: f64,
) -> Result<Latency, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let cfg = model.config().clone();
    check_lengths(&cfg, a)?;
    let overlap = a.overlap;
    let prompt: Vec<u32> = (0..a.prompt_len as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ a.seed) % cfg.vocab_size as u64) as u32)
        .collect();
    let be = model.backend();
    let run = |gen: usize, report: bool| -> Result<(f64, f64, Vec<u32>), String> {
        let mut cache = model.new_cache(prompt.len() + gen).map_err(err)?;
        let mut seq = Sequence::default();
        let t0 = Instant::now();
        let logits = model
            .forward(&mut cache, &mut [(&mut seq, &prompt[..])], Logits::Last)
            .map_err(err)?;
        let first = be.argmax(&logits).map_err(|e| e.to_string())?[0];
        let ttft = t0.elapsed().as_secs_f64();
        // The loop `generate` runs, greedy, to exactly `gen` tokens.
        let mut sampler = Sampler::new(SamplingConfig::default(), 0).map_err(|e| e.to_string())?;
        let mut history = prompt.clone();
        let stop = StopCriteria {
            eos_token_ids: Vec::new(),
            max_new_tokens: gen,
        };
        let t1 = Instant::now();
        let mut taken = 0usize;
        let tokens = decode(
            DecodeIn {
                model,
                cache: &mut cache,
                seq: &mut seq,
                sampler: &mut sampler,
                history: &mut history,
                stop: &stop,
            },
            first,
            overlap,
            &mut |_, _| {
                taken += 1;
                if report && taken.is_multiple_of(32) {
                    eprint!("\rdecode {taken}/{gen}");
                }
                Ok(())
            },
        )?
        .tokens;
        if report {
            eprintln!("\rdecode {gen}/{gen}");
        }
        Ok((ttft, t1.elapsed().as_secs_f64(), tokens))
    };
    eprintln!("warming up");
    run(8.min(a.gen_len), false)?;
    let (ttft, decode_s, tokens) = run(a.gen_len, true)?;
    let steps = (a.gen_len - 1).max(1) as f64;
    let ms_per_token = decode_s * 1e3 / steps;
    let avg_ctx = a.prompt_len as f64 + a.gen_len as f64 / 2.0;
    let bytes = bytes_per_token(&cfg, avg_ctx);
    let floor_ms = bytes / bandwidth * 1e3;
    Ok(Latency {
        shape: shape.to_string(),
        backend: be.name().to_string(),
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        ttft_ms: ttft * 1e3,
        ms_per_token,
        decode_tok_s: 1e3 / ms_per_token,
        bytes_per_token: bytes,
        bandwidth_gb_s: bandwidth / 1e9,
        floor_ms,
        pct_of_floor: 100.0 * floor_ms / ms_per_token,
        overlap,
        tokens,
    })
}

/// Where a decode step's time goes: `steps` eager decode steps of `seqs`
/// sequences of `context` prompt tokens each, with a synchronise after
/// every op, summed per op over the layers (host-timed, so each op also
/// carries one launch; the graph-replayed step is faster).
pub fn op_profile<B: Backend>(
    model: &Qwen3<B>,
    seqs: usize,
    context: usize,
    steps: usize,
) -> Result<Vec<(String, f64)>, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let prompt: Vec<u32> = (0..context as u32).map(|i| i % 1000).collect();
    let mut cache = model
        .new_cache(seqs * (context + steps + 16))
        .map_err(err)?;
    let mut batch: Vec<Sequence> = (0..seqs).map(|_| Sequence::default()).collect();
    for seq in &mut batch {
        model
            .forward(&mut cache, &mut [(seq, &prompt[..])], Logits::Last)
            .map_err(err)?;
    }
    let next = [7u32];
    let mut totals: Vec<(String, f64)> = Vec::new();
    for _ in 0..steps {
        let mut rows: Vec<(&mut Sequence, &[u32])> =
            batch.iter_mut().map(|s| (s, &next[..])).collect();
        timed_pass(model, &mut cache, &mut rows, steps, &mut totals)?;
    }
    Ok(totals)
}

/// Where a prompt step's time goes: `steps` eager passes, each over the
/// whole prompts of `seqs` fresh sequences of `prompt_len` tokens (one
/// batch of `seqs * prompt_len` rows, as a chunked-prefill step of that
/// many tokens), timed per op as [`op_profile`] does.
pub fn prefill_op_profile<B: Backend>(
    model: &Qwen3<B>,
    seqs: usize,
    prompt_len: usize,
    steps: usize,
) -> Result<Vec<(String, f64)>, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| i % 1000).collect();
    let mut totals: Vec<(String, f64)> = Vec::new();
    for _ in 0..steps {
        let mut cache = model.new_cache(seqs * (prompt_len + 16)).map_err(err)?;
        let mut batch: Vec<Sequence> = (0..seqs).map(|_| Sequence::default()).collect();
        let mut rows: Vec<(&mut Sequence, &[u32])> =
            batch.iter_mut().map(|s| (s, &prompt[..])).collect();
        timed_pass(model, &mut cache, &mut rows, steps, &mut totals)?;
    }
    Ok(totals)
}

/// One tapped forward pass with a synchronise after every op; adds each
/// op's time, in us divided by `steps`, to `totals` by op name.
fn timed_pass<B: Backend>(
    model: &Qwen3<B>,
    cache: &mut model_qwen3::KvCache<B>,
    rows: &mut [(&mut Sequence, &[u32])],
    steps: usize,
    totals: &mut Vec<(String, f64)>,
) -> Result<(), String> {
    let be = model.backend();
    be.synchronize().map_err(|e| e.to_string())?;
    let mut last = Instant::now();
    model
        .forward_tapped(cache, rows, Logits::Last, &mut |name, _| {
            be.synchronize()?;
            let op = name.rsplit('.').next().unwrap_or(name).to_string();
            let dt = last.elapsed().as_secs_f64() * 1e6 / steps as f64;
            match totals.iter_mut().find(|(n, _)| *n == op) {
                Some((_, t)) => *t += dt,
                None => totals.push((op, dt)),
            }
            last = Instant::now();
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

impl Latency {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": "latency", "shape": self.shape, "backend": self.backend,
            "prompt_len": self.prompt_len, "gen_len": self.gen_len,
            "ttft_ms": self.ttft_ms, "ms_per_token": self.ms_per_token, "decode_tok_s": self.decode_tok_s,
            "bytes_per_token": self.bytes_per_token, "bandwidth_gb_s": self.bandwidth_gb_s,
            "floor_ms_per_token": self.floor_ms, "pct_of_bandwidth_floor": self.pct_of_floor,
            "overlap": self.overlap, "tokens": self.tokens,
        })
    }

    /// A small table for people.
    pub fn table(&self) -> String {
        format!(
            "| shape | backend | prompt | new | TTFT ms | ms/token | decode tok/s | floor ms/token | % of floor |\n\
             |---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {:.1} | {:.3} | {:.1} | {:.3} | {:.1}% |\n\
             (floor: {:.1} MB read per token at a measured {:.0} GB/s)",
            self.shape,
            self.backend,
            self.prompt_len,
            self.gen_len,
            self.ttft_ms,
            self.ms_per_token,
            self.decode_tok_s,
            self.floor_ms,
            self.pct_of_floor,
            self.bytes_per_token / 1e6,
            self.bandwidth_gb_s
        )
    }
}

/// Host memory read bandwidth (bytes/s): every core sums its share of a
/// 512 MiB buffer, best of five. Sixteen independent sums a core, so the
/// adds vectorise and the loop waits on memory, not on one add chain.
pub fn host_read_bandwidth() -> f64 {
    let n: usize = 64 << 20; // u64s
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let sum = |c: &[u64]| {
        let mut acc = [0u64; 16];
        let mut chunks = c.chunks_exact(16);
        for ch in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(ch) {
                *a = a.wrapping_add(x);
            }
        }
        chunks
            .remainder()
            .iter()
            .chain(&acc)
            .fold(0u64, |a, &x| a.wrapping_add(x))
    };
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(n.div_ceil(threads))
                .map(|c| s.spawn(move || sum(c)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((n * 8) as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_kernels_cpu::CpuBackend;
    use std::path::Path;

    #[test]
    fn overlapped_steps_generate_the_plain_loops_tokens() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3");
        let mut a = BenchArgs {
            model: Some(dir),
            dummy: None,
            prompt_len: 7,
            gen_len: 9,
            seed: 3,
            json: true,
            mode: crate::throughput::BenchMode::Latency,
            throughput: Default::default(),
            tensor_core_decode: false,
            overlap: true,
        };
        let (m, shape) = load(CpuBackend::new(), &a).unwrap();
        let on = latency(&m, &a, &shape, 1e9).unwrap();
        a.overlap = false;
        let off = latency(&m, &a, &shape, 1e9).unwrap();
        assert_eq!(on.tokens.len(), 9);
        assert_eq!(on.tokens, off.tokens);
        assert!(on.overlap && !off.overlap);
        assert_eq!(on.to_json()["tokens"].as_array().map(|v| v.len()), Some(9));
    }
}
