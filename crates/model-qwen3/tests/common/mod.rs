//! Shared loading of the tiny reference checkpoint and its golden outputs.
#![allow(dead_code)]

use std::path::PathBuf;

use model_qwen3::{KvCache, Logits, Qwen3, Sequence};
use qwen_tensor::Backend;

/// The repo's tiny checkpoint, found relative to this crate.
pub fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3")
}

pub struct Prompt {
    pub name: String,
    pub text: String,
    pub ids: Vec<u32>,
    pub greedy_f32: Vec<u32>,
    pub greedy_bf16: Vec<u32>,
    pub ppl_f32: f64,
    pub hf_bf16_rel_err: f64,
}

pub struct Golden {
    pub prompts: Vec<Prompt>,
    pub topk: usize,
    tensors: Vec<u8>,
}

impl Golden {
    pub fn load() -> Golden {
        let dir = tiny_dir();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let prompts = json["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| Prompt {
                name: p["name"].as_str().unwrap().to_string(),
                text: p["text"].as_str().unwrap().to_string(),
                ids: ids(&p["ids"]),
                greedy_f32: ids(&p["greedy_f32"]),
                greedy_bf16: ids(&p["greedy_bf16"]),
                ppl_f32: p["ppl_f32"].as_f64().unwrap(),
                hf_bf16_rel_err: p["hf_bf16_rel_err_last_logits"].as_f64().unwrap(),
            })
            .collect();
        Golden {
            prompts,
            topk: json["topk"].as_u64().unwrap() as usize,
            tensors: std::fs::read(dir.join("reference.safetensors")).unwrap(),
        }
    }

    fn raw(&self, name: &str) -> (Vec<usize>, Vec<[u8; 4]>) {
        let st = safetensors::SafeTensors::deserialize(&self.tensors).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("no golden tensor {name}"));
        (
            t.shape().to_vec(),
            t.data().chunks(4).map(|c| c.try_into().unwrap()).collect(),
        )
    }

    /// An f32 golden tensor `{prompt}.{key}` and its shape.
    pub fn f32(&self, prompt: &str, key: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d) = self.raw(&format!("{prompt}.{key}"));
        (s, d.into_iter().map(f32::from_le_bytes).collect())
    }

    /// An i32 golden tensor (indices) as u32.
    pub fn idx(&self, prompt: &str, key: &str) -> (Vec<usize>, Vec<u32>) {
        let (s, d) = self.raw(&format!("{prompt}.{key}"));
        (
            s,
            d.into_iter()
                .map(|b| i32::from_le_bytes(b) as u32)
                .collect(),
        )
    }
}

/// Relative L2 distance ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Prefills `ids` in one pass, then decodes greedily for `steps` tokens.
/// Returns the tokens and the logits of every decode step (the logits that
/// chose each token, as HF's `output_logits` gives them).
pub fn greedy<B: Backend>(
    model: &Qwen3<B>,
    ids: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache: KvCache<B> = model.new_cache(ids.len() + steps + 1).unwrap();
    let mut seq = Sequence::default();
    let mut logits = model
        .forward(&mut cache, &mut [(&mut seq, ids)], Logits::Last)
        .unwrap();
    let mut toks = Vec::new();
    let mut all = Vec::new();
    for _ in 0..steps {
        let row = model.backend().download(&logits).unwrap().to_f32();
        let next = model.backend().argmax(&logits).unwrap()[0];
        all.push(row);
        toks.push(next);
        logits = model
            .forward(&mut cache, &mut [(&mut seq, &[next])], Logits::Last)
            .unwrap();
    }
    (toks, all)
}
