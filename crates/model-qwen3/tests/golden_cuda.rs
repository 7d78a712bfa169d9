//! The CUDA path: every golden test of the CPU path, and bitwise equality
//! with the CPU twin end to end. Skips, with a message, without a GPU.

mod common;

use common::{greedy, tiny_dir, Golden};
use model_qwen3::{Logits, Qwen3, Sequence};
use qwen_kernels_cpu::CpuBackend;
use qwen_kernels_cuda::CudaBackend;
use qwen_tensor::Backend;

/// The tiny model on the GPU; `exact` turns the tensor-core GEMMs off so
/// every op returns the CPU's bits.
fn gpu_model(exact: bool) -> Option<Qwen3<CudaBackend>> {
    match CudaBackend::new(0) {
        Ok(mut g) => {
            g.set_exact(exact);
            Some(
                Qwen3::load(g, &tiny_dir(), &mut |_, _| {})
                    .expect("tiny checkpoint loads on the GPU"),
            )
        }
        Err(e) => {
            // On the GPU machine (scripts/gpu-run.sh) a missing GPU is a failure.
            assert!(
                std::env::var_os("QWEN_REQUIRE_GPU").is_none(),
                "no GPU: {e}"
            );
            println!("skipping CUDA golden test: {e}");
            None
        }
    }
}

fn cpu_model() -> Qwen3<CpuBackend> {
    Qwen3::load(CpuBackend::new(), &tiny_dir(), &mut |_, _| {}).unwrap()
}

#[test]
fn cuda_logits_of_every_prompt_match_hf() {
    // Default mode: the 247-token prompt's projections run on the tensor cores.
    let Some(m) = gpu_model(false) else { return };
    common::logits_of_every_prompt_match_hf(&m);
}

#[test]
fn cuda_layer_op_equals_the_ops() {
    let Some(m) = gpu_model(false) else { return };
    common::layer_op_equals_the_ops(&m);
}

#[test]
fn cuda_greedy_decode_matches_hf_f32() {
    let Some(m) = gpu_model(false) else { return };
    common::greedy_decode_matches_hf_f32(&m);
}

/// Default mode (prompt rows on the tensor cores, generated rows exact):
/// a prompt's greedy tokens are the same alone and in a batch of 64, in
/// plain and in overlapped steps.
#[test]
fn cuda_batch_of_64_gives_each_prompt_its_tokens_alone() {
    let Some(m) = gpu_model(false) else { return };
    common::batch_of_64_is_invariant(&m, false);
    common::batch_of_64_is_invariant(&m, true);
}

/// With generated tokens on the tensor cores too, outputs are still the
/// same alone and in a batch of 64 (the tensor-core GEMM is row-invariant),
/// in plain and in overlapped steps.
#[test]
fn cuda_tensor_core_decode_is_batch_invariant() {
    let Some(m) = gpu_model(false) else { return };
    m.set_tensor_core_decode(true);
    common::batch_of_64_is_invariant(&m, false);
    common::batch_of_64_is_invariant(&m, true);
}

/// Preemption on the GPU (default mode): a preempted request's recompute
/// runs its prompt rows on the tensor cores and its generated tokens on
/// the exact kernels again, as they first ran, so its tokens do not change.
#[test]
fn cuda_preemption_leaves_greedy_output_unchanged() {
    let Some(m) = gpu_model(false) else { return };
    common::preemption_leaves_greedy_output_unchanged(&m, false, false);
    common::preemption_leaves_greedy_output_unchanged(&m, true, false);
    common::preemption_leaves_greedy_output_unchanged(&m, true, true);
}

/// The same with every row on the tensor cores (`--tensor-core-decode`).
#[test]
fn cuda_tensor_core_decode_preemption_leaves_greedy_output_unchanged() {
    let Some(m) = gpu_model(false) else { return };
    m.set_tensor_core_decode(true);
    common::preemption_leaves_greedy_output_unchanged(&m, false, false);
    common::preemption_leaves_greedy_output_unchanged(&m, false, true);
}

#[test]
fn cuda_prefill_in_one_pass_equals_token_by_token() {
    let Some(m) = gpu_model(true) else { return };
    common::prefill_in_one_pass_equals_token_by_token(&m);
}

#[test]
fn cuda_prefill_logits_equal_cpu_bitwise() {
    let Some(gm) = gpu_model(true) else { return };
    let cm = cpu_model();
    for p in &Golden::load().prompts {
        let run = |m: &dyn Fn(&mut Sequence) -> Vec<u32>| m(&mut Sequence::default());
        let c = run(&|s| {
            let mut cache = cm.new_cache(p.ids.len()).unwrap();
            let l = cm
                .forward(&mut cache, &mut [(s, &p.ids[..])], Logits::All)
                .unwrap();
            cm.backend().download(&l).unwrap().to_bits()
        });
        let g = run(&|s| {
            let mut cache = gm.new_cache(p.ids.len()).unwrap();
            let l = gm
                .forward(&mut cache, &mut [(s, &p.ids[..])], Logits::All)
                .unwrap();
            gm.backend().download(&l).unwrap().to_bits()
        });
        let diff = c.iter().zip(&g).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff, 0,
            "{}: {diff} logits differ between cpu and cuda",
            p.name
        );
    }
}

#[test]
fn cuda_greedy_64_tokens_equal_cpu_with_bitwise_logits() {
    let Some(gm) = gpu_model(true) else { return };
    let cm = cpu_model();
    for p in &Golden::load().prompts {
        let (ct, cl) = greedy(&cm, &p.ids, 64);
        let (gt, gl) = greedy(&gm, &p.ids, 64);
        assert_eq!(ct, gt, "{}: tokens", p.name);
        for (s, (a, b)) in cl.iter().zip(&gl).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{}: decode step {s} logits differ between cpu and cuda",
                p.name
            );
        }
    }
}

#[test]
fn cuda_cache_too_large_is_a_clear_error() {
    let Some(gm) = gpu_model(false) else { return };
    let e = match gm.new_cache(1 << 40) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a 2^40-position cache cannot fit"),
    };
    assert!(
        e.contains("out of device memory") && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn cuda_one_kernel_layers_decode_like_cpu() {
    // Layers of the Qwen3-0.6B shape, which decode one token with one
    // kernel a layer on the GPU when asked (kernels-cuda's layer.cu): two of them
    // with random weights and a small vocabulary, greedy for 70 steps
    // (past a 64-position attention chunk), against the CPU bit for bit.
    let Some(mut g) = CudaBackend::new(0).ok() else {
        assert!(std::env::var_os("QWEN_REQUIRE_GPU").is_none(), "no GPU");
        println!("skipping CUDA golden test: no GPU");
        return;
    };
    // The prompt pass on the exact kernels too, so the caches match.
    g.set_exact(true);
    g.set_layer_kernel(true).unwrap();
    let mut cfg = model_qwen3::dummy::dummy_config("qwen3-0.6b").unwrap();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 2048;
    let w = model_qwen3::dummy::random_weights(&cfg, 5, &mut |_, _| {});
    let gm = Qwen3::from_host(g, cfg.clone(), &w).unwrap();
    let cm = Qwen3::from_host(CpuBackend::new(), cfg, &w).unwrap();
    let ids: Vec<u32> = (0..9).map(|i| (i * 211 + 7) % 2048).collect();
    let (ct, cl) = greedy(&cm, &ids, 70);
    let (gt, gl) = greedy(&gm, &ids, 70);
    assert_eq!(ct, gt, "tokens");
    for (s, (a, b)) in cl.iter().zip(&gl).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "decode step {s}: logits differ between cpu and cuda");
    }
}
