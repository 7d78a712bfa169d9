//! Benchmarks of the row lookups: `embedding` (bf16 table rows widened to
//! f32, at the start of a forward pass) and `gather_rows` (picking the rows
//! whose logits are wanted out of a prefill's hidden states), for Qwen3-0.6B
//! and 8B, 1 and 64 rows.
//!
//! Bytes: the ids read, one table (or source) row read per id, one f32 row
//! written per id. The table is far larger than any cache, and calls
//! rotate through many sets of random ids, so rows come from memory as in
//! real use. `gather_rows` reads a prefill's hidden states that the previous
//! op just wrote, so those may come from cache (and beat the DRAM floor).

use qwen_benches::{Device, Harness, Timed, Work, MODELS, TOKENS};
use qwen_tensor::DType::{BF16, F32, U32};

/// Id tensors to rotate through: at 64 tokens they touch the whole table
/// (more than any cache); a single-token lookup is bound by latency, not by
/// where its one row comes from.
const ID_SETS: usize = 4096;
/// Tokens in the prefill that `gather_rows` picks rows from.
const PREFILL: usize = 512;

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        let (v, hid) = (m.vocab, m.hidden);
        let table = dev.bf16(&[v, hid], 0.3);
        let src = dev.f32(&[PREFILL, hid], 3.0);
        for t in TOKENS {
            let id = format!("{}/T{t}", m.name);
            let ids: Vec<_> = (0..ID_SETS)
                .map(|_| {
                    let ids = dev.rng().ids(t, v);
                    dev.u32(&ids)
                })
                .collect();
            let mut out = dev.zeros(&[t, hid], F32);
            let work = Work::new()
                .read(t, U32)
                .read(t * hid, BF16)
                .write(t * hid, F32);
            h.bench(dev, "embedding", &id, work, |i| {
                dev.backend.embedding(&table, &ids[i % ID_SETS], &mut out)
            });

            // The last token of each of `t` equal prefills packed in PREFILL tokens.
            let rows: Vec<u32> = (1..=t).map(|s| (s * PREFILL / t - 1) as u32).collect();
            let rows = dev.u32(&rows);
            let work = Work::new()
                .read(t, U32)
                .read(t * hid, F32)
                .write(t * hid, F32);
            h.bench(dev, "gather_rows", &id, work, |_| {
                dev.backend.gather_rows(&src, &rows, &mut out)
            });
        }
    }
}

qwen_benches::bench_main!(run);
