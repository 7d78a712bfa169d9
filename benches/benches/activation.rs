//! Benchmarks of `silu_mul`, the SwiGLU activation between gate_up and down:
//! f32 `[T, 2I]` (gate then up) in, bf16 `[T, I]` out, at the intermediate
//! sizes of Qwen3-0.6B and 8B, 1 and 64 tokens.
//!
//! Bytes: the f32 input read once, the bf16 output written once.

use qwen_benches::{Device, Harness, Timed, Work, MODELS, TOKENS};
use qwen_tensor::DType::{BF16, F32};

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        let i = m.intermediate;
        for t in TOKENS {
            let gate_up = dev.f32(&[t, 2 * i], 4.0);
            let mut out = dev.zeros(&[t, i], BF16);
            let work = Work::new().read(t * 2 * i, F32).write(t * i, BF16);
            h.bench(dev, "silu_mul", &format!("{}/T{t}", m.name), work, |_| {
                dev.backend.silu_mul(&gate_up, &mut out)
            });
        }
    }
}

qwen_benches::bench_main!(run);
