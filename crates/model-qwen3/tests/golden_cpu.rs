//! The CPU path against Hugging Face's golden outputs on the tiny checkpoint.

mod common;

use common::{tiny_dir, Golden};
use model_qwen3::Qwen3;
use qwen_kernels_cpu::CpuBackend;
use qwen_tensor::Backend;

fn model() -> Qwen3<CpuBackend> {
    Qwen3::load(CpuBackend::new(), &tiny_dir(), &mut |_, _| {}).expect("tiny checkpoint loads")
}

#[test]
fn logits_of_every_prompt_match_hf() {
    common::logits_of_every_prompt_match_hf(&model());
}

#[test]
fn greedy_decode_matches_hf_f32() {
    common::greedy_decode_matches_hf_f32(&model());
}

#[test]
fn layer_op_equals_the_ops() {
    common::layer_op_equals_the_ops(&model());
}

#[test]
fn prefill_in_one_pass_equals_token_by_token() {
    common::prefill_in_one_pass_equals_token_by_token(&model());
}

#[test]
fn embedding_rows_equal_hf_hidden_state_zero() {
    // HF's hidden_states[0] is the embedding output: an exact widening.
    let g = Golden::load();
    let (shape, hs) = g.f32("plain", "hidden_states_f32");
    let p = g.prompts.iter().find(|p| p.name == "plain").unwrap();
    let h = shape[2];
    let m = model();
    let cpu = m.backend();
    let ids = cpu
        .upload(qwen_tensor::HostSlice::U32(&p.ids), &[p.ids.len()])
        .unwrap();
    let w = model_qwen3::weights::WeightFiles::open(&tiny_dir()).unwrap();
    let table = w
        .bf16("model.embed_tokens.weight", &[m.config().vocab_size, h])
        .unwrap();
    let table = cpu
        .upload(
            qwen_tensor::HostSlice::BF16(&table),
            &[m.config().vocab_size, h],
        )
        .unwrap();
    let mut out = cpu
        .zeros(&[p.ids.len(), h], qwen_tensor::DType::F32)
        .unwrap();
    cpu.embedding(&table, &ids, &mut out).unwrap();
    assert_eq!(
        cpu.download(&out).unwrap().to_f32(),
        hs[..p.ids.len() * h].to_vec()
    );
}
