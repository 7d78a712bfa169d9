//! Bad input to `qwen-cli generate` ends in one clear error line, a
//! non-zero exit and no panic.

mod common;

use std::path::{Path, PathBuf};

use common::{fails_with, qwen_cli, tiny};

use safetensors::tensor::{Dtype, TensorView};

/// A scratch copy of the tiny checkpoint (without the golden files).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qwen-cli-errors-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// `generate` on the checkpoint in `dir`, on the CPU, must fail naming `needle`.
fn generate_fails(dir: &Path, needle: &str) {
    fails_with(
        &[
            "generate",
            "--model",
            d(dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        needle,
    );
}

/// Rewrites model.safetensors in `dir` through `edit` on (name, dtype, shape, bytes).
fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn d(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

#[test]
fn missing_model_dir() {
    fails_with(
        &[
            "generate",
            "--model",
            "/nonexistent/qwen",
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "/nonexistent/qwen",
    );
}

#[test]
fn missing_safetensors() {
    let dir = scratch("missing-st");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    generate_fails(&dir, "safetensors");
}

#[test]
fn truncated_safetensors() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    generate_fails(&dir, "model.safetensors");
}

#[test]
fn missing_tensor() {
    let dir = scratch("missing-tensor");
    rewrite_weights(&dir, |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.down_proj.weight")
    });
    generate_fails(&dir, "model.layers.1.mlp.down_proj.weight");
}

#[test]
fn wrong_shape() {
    let dir = scratch("wrong-shape");
    rewrite_weights(&dir, |t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.0.self_attn.o_proj.weight")
            .unwrap();
        let (rows, cols) = (e.2[0], e.2[1]);
        e.2 = vec![cols, rows];
    });
    generate_fails(&dir, "o_proj");
}

#[test]
fn unsupported_dtype() {
    let dir = scratch("dtype");
    rewrite_weights(&dir, |t| {
        let e = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        e.1 = Dtype::I16;
    });
    generate_fails(&dir, "model.norm.weight");
}

#[test]
fn malformed_config() {
    let dir = scratch("config");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,,}").unwrap();
    generate_fails(&dir, "config.json");
}

#[test]
fn prompt_longer_than_max_positions() {
    let dir = scratch("maxpos");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace(
            "\"max_position_embeddings\": 4096",
            "\"max_position_embeddings\": 8",
        ),
    )
    .unwrap();
    let prompt = "one two three four five six seven eight nine ten eleven twelve";
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            prompt,
            "--backend",
            "cpu",
        ],
        "max_position_embeddings",
    );
}

#[test]
fn bad_sampling_flags() {
    fails_with(
        &[
            "generate",
            "--prompt",
            "hi",
            "--temperature",
            "-1",
            "--backend",
            "cpu",
        ],
        "temperature",
    );
    fails_with(
        &[
            "generate",
            "--prompt",
            "hi",
            "--top-p",
            "0",
            "--backend",
            "cpu",
        ],
        "top_p",
    );
    fails_with(
        &[
            "generate",
            "--prompt",
            "hi",
            "--top-p",
            "1.5",
            "--backend",
            "cpu",
        ],
        "top_p",
    );
}

#[test]
fn unknown_backend_and_flags() {
    fails_with(&["generate", "--prompt", "hi", "--backend", "tpu"], "tpu");
    fails_with(&["generate", "--prompt", "hi", "--bogus"], "--bogus");
    fails_with(&["frobnicate"], "frobnicate");
}

#[test]
fn cuda_without_gpu_is_one_line() {
    // On a machine with a working GPU this succeeds; elsewhere it must fail cleanly.
    let r = qwen_cli(&[
        "generate",
        "--prompt",
        "hi",
        "--backend",
        "cuda",
        "--max-tokens",
        "2",
    ]);
    let err = &r.stderr;
    assert!(!err.contains("panicked"), "{err}");
    if r.code != 0 {
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
}
