//! Benchmarks of the projections: `matmul` on every weight of a Qwen3 layer
//! and the LM head, then each one the way the model calls it —
//! `rms_norm_matmul` (the fused RMSNorm + QKV and + gate_up),
//! `rms_norm_matmul_silu` (gate_up with the SiLU gate behind), `matmul_add`
//! (o_proj and down with the residual add) and `logits` (final norm and
//! vocabulary projection) — for Qwen3-0.6B and 8B at 1 and 64 tokens;
//! `matmul/.../prompt` runs the same rows as prompt rows (the CUDA
//! backend's tensor-core GEMM), also at 128, 256, 2,048 and 8,192 rows; likewise
//! `rms_norm_matmul_silu/.../prompt` at 1, 64, 128 and 256 rows and
//! `logits/.../prompt` at 1, 64, 128 and 256 (the GEMM with the SiLU gate
//! or the hi/lo sum in its epilogue).
//!
//! Bytes: x and w read once, out written once (read and written for
//! `matmul_add`'s accumulator). FLOPs: 2·T·K·N. Weights rotate through
//! copies spanning more than the last-level cache, as a forward pass
//! streams every layer's weights from memory.

use qwen_benches::{Device, Fused, Harness, Timed, Work, EPS, MODELS, TOKENS};
use qwen_tensor::DType::{BF16, F32};

fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
    for m in MODELS {
        for p in m.projections() {
            let (k, n) = (p.k, p.n);
            let w = dev.bf16_copies(&[n, k], 0.05);
            let norm_w = dev.f32(&[k], 1.0);
            for t in TOKENS {
                let id = format!("{}/{}/T{t}", m.name, p.name);
                let next_w = |i: usize| &w[i % w.len()];
                let x_bf16 = dev.bf16(&[t, k], 1.0);
                let mut out = dev.zeros(&[t, n], F32);

                let work = Work::new()
                    .read(t * k, BF16)
                    .gemm(t, k, n)
                    .write(t * n, F32);
                h.bench(dev, "matmul", &id, work, |i| {
                    dev.backend.matmul(&x_bf16, next_w(i), &mut out)
                });

                // The same rows as a prompt: the tensor-core GEMM (the CPU
                // has no such path, so it would only repeat the bench above).
                if dev.backend.name() != "cpu" {
                    dev.backend.set_tensor_core_rows(t);
                    h.bench(dev, "matmul", &format!("{id}/prompt"), work, |i| {
                        dev.backend.matmul(&x_bf16, next_w(i), &mut out)
                    });
                    dev.backend.set_tensor_core_rows(0);
                }

                // Larger batches on the tensor cores only: a large decode
                // batch (256 rows), a prefill chunk (2,048) and a throughput
                // prompt step (8,192).
                if dev.backend.name() != "cpu" && t == TOKENS[TOKENS.len() - 1] {
                    for big in [128, 256, 2048, 8192] {
                        let xb = dev.bf16(&[big, k], 1.0);
                        let mut ob = dev.zeros(&[big, n], F32);
                        let work = Work::new()
                            .read(big * k, BF16)
                            .gemm(big, k, n)
                            .write(big * n, F32);
                        let id = format!("{}/{}/T{big}/prompt", m.name, p.name);
                        dev.backend.set_tensor_core_rows(big);
                        h.bench(dev, "matmul", &id, work, |i| {
                            dev.backend.matmul(&xb, next_w(i), &mut ob)
                        });
                        dev.backend.set_tensor_core_rows(0);
                    }
                }

                match p.fused {
                    Fused::AddOut => {
                        let work = work.read(t * n, F32);
                        h.bench(dev, "matmul_add", &id, work, |i| {
                            dev.backend.matmul_add(&x_bf16, next_w(i), &mut out)
                        });
                    }
                    Fused::NormIn | Fused::Logits => {
                        // The residual stream (f32) and the norm weight come in
                        // instead of a bf16 activation.
                        let x = dev.f32(&[t, k], 3.0);
                        let work = Work::new()
                            .read(t * k + k, F32)
                            .gemm(t, k, n)
                            .write(t * n, F32);
                        if p.fused == Fused::NormIn {
                            h.bench(dev, "rms_norm_matmul", &id, work, |i| {
                                dev.backend
                                    .rms_norm_matmul(&x, &norm_w, EPS, next_w(i), &mut out)
                            });
                        }
                        if p.name == "gate_up"
                            && dev.backend.name() != "cpu"
                            && t == TOKENS[TOKENS.len() - 1]
                        {
                            // Decode batches of the throughput workload.
                            for big in [128, 256] {
                                let xb = dev.f32(&[big, k], 3.0);
                                let mut ob = dev.zeros(&[big, n], F32);
                                let mut act = dev.zeros(&[big, n / 2], BF16);
                                let work = Work::new()
                                    .read(big * k + k, F32)
                                    .gemm(big, k, n)
                                    .write(big * n / 2, BF16);
                                dev.backend.set_tensor_core_rows(big);
                                h.bench(
                                    dev,
                                    "rms_norm_matmul_silu",
                                    &format!("{}/{}/T{big}/prompt", m.name, p.name),
                                    work,
                                    |i| {
                                        dev.backend.rms_norm_matmul_silu(
                                            &xb,
                                            &norm_w,
                                            EPS,
                                            next_w(i),
                                            &mut ob,
                                            &mut act,
                                        )
                                    },
                                );
                                dev.backend.set_tensor_core_rows(0);
                            }
                        }
                        if p.name == "gate_up" {
                            // The SiLU gate fused behind: bf16 [T, I] out.
                            let mut act = dev.zeros(&[t, n / 2], BF16);
                            let work = Work::new()
                                .read(t * k + k, F32)
                                .gemm(t, k, n)
                                .write(t * n / 2, BF16);
                            for (suffix, tc) in tc_variants(dev, t) {
                                dev.backend.set_tensor_core_rows(tc);
                                h.bench(
                                    dev,
                                    "rms_norm_matmul_silu",
                                    &format!("{id}{suffix}"),
                                    work,
                                    |i| {
                                        dev.backend.rms_norm_matmul_silu(
                                            &x,
                                            &norm_w,
                                            EPS,
                                            next_w(i),
                                            &mut out,
                                            &mut act,
                                        )
                                    },
                                );
                            }
                            dev.backend.set_tensor_core_rows(0);
                        }
                        if p.fused == Fused::Logits {
                            for (suffix, tc) in tc_variants(dev, t) {
                                dev.backend.set_tensor_core_rows(tc);
                                h.bench(dev, "logits", &format!("{id}{suffix}"), work, |i| {
                                    dev.backend.logits(&x, &norm_w, EPS, next_w(i), &mut out)
                                });
                            }
                            dev.backend.set_tensor_core_rows(0);
                            if dev.backend.name() != "cpu" && t == TOKENS[TOKENS.len() - 1] {
                                // Decode batches of the throughput workload.
                                for big in [128, 256] {
                                    let xb = dev.f32(&[big, k], 3.0);
                                    let mut ob = dev.zeros(&[big, n], F32);
                                    let work = Work::new()
                                        .read(big * k + k, F32)
                                        .read(n * k, BF16)
                                        .gemm(big, k, n)
                                        .write(big * n, F32);
                                    dev.backend.set_tensor_core_rows(big);
                                    let bid = format!("{}/{}/T{big}/prompt", m.name, p.name);
                                    h.bench(dev, "logits", &bid, work, |i| {
                                        dev.backend.logits(&xb, &norm_w, EPS, next_w(i), &mut ob)
                                    });
                                    dev.backend.set_tensor_core_rows(0);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The exact kernels (no suffix), and on a backend with tensor-core rows
/// the same op with every row announced as a prompt row (`/prompt`): the
/// CUDA backend's fused GEMM epilogues (gemm_wgmma.cu).
fn tc_variants<B: Timed>(dev: &Device<B>, t: usize) -> Vec<(&'static str, usize)> {
    if dev.backend.name() == "cpu" {
        vec![("", 0)]
    } else {
        vec![("", 0), ("/prompt", t)]
    }
}

qwen_benches::bench_main!(run);
