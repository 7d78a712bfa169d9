//! Benchmarks of the sampling primitives on f32 logits `[B, 151936]` (the
//! Qwen3 vocabulary) for 1, 64 and 256 rows: `argmax` (greedy decoding),
//! `sample` (temperature, top-k, top-p, min-p with Qwen3's recommended
//! settings), `sample_temperature` (temperature 0.6 alone, the offline
//! throughput workload's setting: no cut, so the draw walks index order)
//! and `repetition_penalty`.
//!
//! Bytes: `argmax` and `sample` read every logit once and write one id per
//! row (the ids reach the host, as callers need them). `repetition_penalty`
//! reads the history ids and one penalty per row, and reads and writes the
//! logit of each distinct history token. The CUDA `sample` reads each row
//! once per pass of its radix descent (sampling.cu), one block a row, so its
//! "% floor" shows how far those passes are from a single read;
//! `sample_temperature` reads a row twice (z_max, then the draw's sums),
//! its slices spread over the GPU.

use qwen_benches::{Device, Harness, Timed, Work};
use qwen_tensor::DType::{F32, U32};
use qwen_tensor::SampleParams;

const VOCAB: usize = 151_936;
/// Tokens of history per row for the repetition penalty.
const HISTORY: usize = 256;

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for rows in [1, 64, 256] {
        let id = format!("V{VOCAB}/B{rows}");
        let mut logits = dev.f32(&[rows, VOCAB], 3.0);
        let read_all = Work::new().read(rows * VOCAB, F32).write(rows, U32);

        h.bench(dev, "argmax", &id, read_all, |_| {
            dev.backend.argmax(&logits).map(drop)
        });

        // Qwen3's generation_config.json (thinking mode).
        let params = vec![
            SampleParams {
                temperature: 0.6,
                top_k: 20,
                top_p: 0.95,
                min_p: 0.0,
            };
            rows
        ];
        let uniform: Vec<f32> = (0..rows)
            .map(|_| (dev.rng().next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .collect();
        h.bench(dev, "sample", &id, read_all, |_| {
            dev.backend.sample(&logits, &params, &uniform).map(drop)
        });
        let plain = vec![
            SampleParams {
                temperature: 0.6,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
            };
            rows
        ];
        h.bench(dev, "sample_temperature", &id, read_all, |_| {
            dev.backend.sample(&logits, &plain, &uniform).map(drop)
        });

        let history: Vec<Vec<u32>> = (0..rows).map(|_| dev.rng().ids(HISTORY, VOCAB)).collect();
        let distinct: usize = history
            .iter()
            .map(|hist| {
                let mut d = hist.clone();
                d.sort_unstable();
                d.dedup();
                d.len()
            })
            .sum();
        let penalty = vec![1.1f32; rows];
        let work = Work::new()
            .read(rows * HISTORY, U32)
            .read(rows + distinct, F32)
            .write(distinct, F32);
        // Applied again on every call: logits shrink towards 0 or grow
        // towards -inf, neither of which changes the work done.
        h.bench(dev, "repetition_penalty", &id, work, |_| {
            dev.backend
                .repetition_penalty(&mut logits, &penalty, &history)
        });
    }
}

qwen_benches::bench_main!(run);
