//! Benchmarks of `rms_norm` (f32 residual stream in, bf16 normalised rows
//! out) at the hidden sizes of Qwen3-0.6B and 8B, 1 and 64 tokens.
//!
//! Bytes: x f32 `[T, H]` and the f32 weight `[H]` read, bf16 `[T, H]`
//! written. The op has no weight to stream, so inputs are not rotated: in a
//! forward pass x was just written by the previous op.

use qwen_benches::{Device, Harness, Timed, Work, EPS, MODELS, TOKENS};
use qwen_tensor::DType::{BF16, F32};

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        let hid = m.hidden;
        let w = dev.f32(&[hid], 1.0);
        for t in TOKENS {
            let x = dev.f32(&[t, hid], 3.0);
            let mut out = dev.zeros(&[t, hid], BF16);
            let work = Work::new().read(t * hid + hid, F32).write(t * hid, BF16);
            h.bench(dev, "rms_norm", &format!("{}/T{t}", m.name), work, |_| {
                dev.backend.rms_norm(&x, &w, EPS, &mut out)
            });
        }
    }
}

qwen_benches::bench_main!(run);
