//! Benchmarks of `qk_norm_rope_store`: per-head q/k RMSNorm and rotary
//! embedding on the fused QKV output, q written out and k/v written into
//! the paged KV cache, for Qwen3-0.6B and 8B, at 1 and 64 decoding
//! sequences (one new token each, at position 511), and on the GPU a
//! prompt step of 2,048 tokens (four prompts of 512, `P2048`).
//!
//! Bytes: the f32 QKV rows, both f32 norm weights, one f32 rope row
//! (cos|sin) per token and the positions and slots read; q (bf16) and the
//! new k and v cache entries (bf16) written.

use qwen_benches::{paged_layout, Device, Harness, Timed, Work, EPS, MODELS, TOKENS};
use qwen_tensor::DType::{BF16, F32, U32};

/// Context of every sequence, new token included.
const CTX: usize = 512;

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        let geo = m.geometry();
        let d = geo.head_dim;
        let q_norm = dev.f32(&[d], 1.0);
        let k_norm = dev.f32(&[d], 1.0);
        // Qwen3's real table: rope_theta 1e6.
        let mut rope = vec![0f32; CTX * d];
        for (p, row) in rope.chunks_mut(d).enumerate() {
            for i in 0..d / 2 {
                let a = p as f64 * 1e6f64.powf(-(2.0 * i as f64) / d as f64);
                row[i] = a.cos() as f32;
                row[d / 2 + i] = a.sin() as f32;
            }
        }
        let rope = dev.upload(qwen_tensor::HostSlice::F32(&rope), &[CTX, d]);
        // (sequences, new tokens each, the case's name)
        let mut cases: Vec<(usize, usize, String)> =
            TOKENS.iter().map(|&t| (t, 1, format!("T{t}"))).collect();
        if dev.backend.name() != "cpu" {
            cases.push((4, CTX, "P2048".into()));
        }
        for (seqs, new, name) in cases {
            let t = seqs * new;
            let (layout, blocks) = paged_layout(&mut dev.rng(), &vec![(CTX, new); seqs]);
            let meta = dev.batch(&layout);
            let mut k_cache = dev.zeros(&geo.cache_shape(blocks), BF16);
            let mut v_cache = dev.zeros(&geo.cache_shape(blocks), BF16);
            let qkv = dev.f32(&[t, geo.qkv_width()], 2.0);
            let mut q = dev.zeros(&[t, geo.q_width()], BF16);
            let work = Work::new()
                .read(t * geo.qkv_width() + 2 * d + t * d, F32)
                .read(2 * t, U32)
                .write(t * geo.q_width() + 2 * t * geo.kv_width(), BF16);
            h.bench(
                dev,
                "qk_norm_rope_store",
                &format!("{}/{name}", m.name),
                work,
                |_| {
                    dev.backend.qk_norm_rope_store(
                        &qkv,
                        &q_norm,
                        &k_norm,
                        EPS,
                        &rope,
                        &meta,
                        geo,
                        &mut q,
                        &mut k_cache,
                        &mut v_cache,
                    )
                },
            );
        }
    }
}

qwen_benches::bench_main!(run);
