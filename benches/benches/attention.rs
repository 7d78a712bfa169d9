//! Benchmarks of `attention` over the paged KV cache: decode steps of 1 and
//! 64 sequences at contexts 512 and 4096, of 16 at 1536 (the throughput
//! workload's tail) and of 256 and 48 over a spread of contexts (its
//! buckets), one 512-token prefill, and a
//! chunked-prefill step (2,048 tokens of prompts and decode tokens), for
//! Qwen3-0.6B and 8B (GQA: 16 or 32 q heads over 8 kv heads); and of the
//! decode steps as `qk_norm_rope_attention` (q/k-norm, RoPE and the cache
//! store in the same op), which also reads the f32 QKV rows, both norm
//! weights and a rope row per token, and writes q and the new k/v rows.
//! Ids ending in `/tc` run the prompt rows (every row of a decode step) on
//! the tensor cores (attention_tc.cu), the rest exact; `/tc-all` runs every
//! row of the mixed step there, as `--tensor-core-decode` does.
//!
//! Bytes: q read and out written (bf16), each sequence's K and V cache read
//! once (bf16, `context × kv_heads × head_dim` each; q heads sharing a kv
//! head, and prefill tokens sharing a sequence, do not count it again), and
//! the batch metadata. FLOPs: 4·head_dim per (token, q head, attended
//! position): q·k and p·v. Caches rotate through copies, as every layer
//! reads its own.

use qwen_benches::{meta_work, paged_layout, Device, Harness, Timed, Work, EPS, MODELS};
use qwen_tensor::DType::{BF16, F32};

/// (benchmark id suffix, sequences as (context, new tokens)).
fn cases() -> Vec<(String, Vec<(usize, usize)>)> {
    let mut v = Vec::new();
    for ctx in [512, 4096] {
        for seqs in [1, 64] {
            v.push((format!("decode/ctx{ctx}/B{seqs}"), vec![(ctx, 1); seqs]));
        }
    }
    // The throughput workload's tail: few sequences, long contexts.
    v.push(("decode/ctx1536/B16".into(), vec![(1536, 1); 16]));
    // Its decode buckets with their spread of contexts (some blocks finish
    // long before others), in no order of length: 256 sequences of
    // 150-1,350 positions, 48 of 900-1,900.
    let spread = |n: usize, lo: usize, hi: usize| -> Vec<(usize, usize)> {
        (0..n)
            .map(|i| (lo + (i * 37 % n) * (hi - lo) / (n - 1), 1))
            .collect()
    };
    v.push(("decode/spread150-1350/B256".into(), spread(256, 150, 1350)));
    v.push(("decode/spread900-1900/B48".into(), spread(48, 900, 1900)));
    // The same batch, longest context first (blocks start in that order).
    let mut sorted = spread(256, 150, 1350);
    sorted.sort_by(|a, b| b.cmp(a));
    v.push(("decode/spread150-1350/B256/longest-first".into(), sorted));
    v.push(("prefill/T512".into(), vec![(512, 512)]));
    // A chunked-prefill step of the throughput workload: 2,048 tokens, a
    // prompt's second chunk and two whole prompts beside 240 decode tokens.
    let mut mixed = vec![(1024, 768), (640, 640), (400, 400)];
    mixed.extend([(700, 1); 240]);
    v.push(("mixed/T2048".into(), mixed));
    v
}

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        let geo = m.geometry();
        let scale = 1.0 / (geo.head_dim as f32).sqrt();
        for (name, seqs) in cases() {
            let (layout, blocks) = paged_layout(&mut dev.rng(), &seqs);
            let t = layout.num_tokens();
            let meta = dev.batch(&layout);
            let shape = geo.cache_shape(blocks);
            let mut k = dev.bf16_copies(&shape, 1.0);
            let mut v = dev.bf16_copies(&shape, 1.0);
            let q = dev.bf16(&[t, geo.q_width()], 1.0);
            let mut out = dev.zeros(&[t, geo.q_width()], BF16);

            let cached: usize = seqs.iter().map(|&(ctx, _)| ctx).sum();
            let attended: usize = layout.positions.iter().map(|&p| p as usize + 1).sum();
            let work = Work {
                flops: (4 * geo.num_q_heads * geo.head_dim * attended) as u64,
                ..meta_work(&layout)
            }
            .read(t * geo.q_width(), BF16)
            .read(2 * cached * geo.kv_width(), BF16)
            .write(t * geo.q_width(), BF16);
            h.bench(dev, "attention", &format!("{}/{name}", m.name), work, |i| {
                let c = i % k.len();
                dev.backend
                    .attention(&q, &k[c], &v[c], &meta, geo, scale, &mut out)
            });
            // The same step with its prompt rows (every row of a decode
            // step, as `--tensor-core-decode` announces them) on the tensor
            // cores, where the backend has them.
            // (The CPU has no such path: it would only repeat the bench above.)
            if dev.backend.name() != "cpu" {
                let prompt_rows: usize =
                    seqs.iter().filter(|&&(_, n)| n > 1).map(|&(_, n)| n).sum();
                let mut variants = vec![("tc", prompt_rows)];
                if name.starts_with("decode") {
                    variants = vec![("tc", t)];
                } else if prompt_rows < t {
                    variants.push(("tc-all", t));
                }
                for (suffix, tc) in variants {
                    dev.backend.set_tensor_core_rows(tc);
                    h.bench(
                        dev,
                        "attention",
                        &format!("{}/{name}/{suffix}", m.name),
                        work,
                        |i| {
                            let c = i % k.len();
                            dev.backend
                                .attention(&q, &k[c], &v[c], &meta, geo, scale, &mut out)
                        },
                    );
                }
                dev.backend.set_tensor_core_rows(0);
            }
            if !name.starts_with("decode") {
                continue;
            }
            let d = geo.head_dim;
            let (q_norm, k_norm) = (dev.f32(&[d], 1.0), dev.f32(&[d], 1.0));
            let max_pos = layout.max_context();
            let rope = dev.f32(&[max_pos, d], 1.0);
            let qkv = dev.f32(&[t, geo.qkv_width()], 2.0);
            let mut q_out = dev.zeros(&[t, geo.q_width()], BF16);
            let work = work
                .read(t * geo.qkv_width() + 2 * d + t * d, F32)
                .write(t * geo.q_width() + 2 * t * geo.kv_width(), BF16);
            let id = format!("{}/{name}", m.name);
            h.bench(dev, "qk_norm_rope_attention", &id, work, |i| {
                let c = i % k.len();
                dev.backend.qk_norm_rope_attention(
                    &qkv, &q_norm, &k_norm, EPS, &rope, &meta, geo, scale, &mut q_out, &mut k[c],
                    &mut v[c], &mut out,
                )
            });
        }
    }
}

qwen_benches::bench_main!(run);
