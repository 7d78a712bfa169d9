//! Bad input to `qwen-cli generate` ends in one clear error line, a
//! non-zero exit and no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3")
}

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

/// Runs qwen-cli and returns (exit code, stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-cli"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a clean failure whose error line mentions `needle`.
fn fails_with(args: &[&str], needle: &str) {
    let (code, err) = run(args);
    assert_ne!(code, 0, "{args:?} should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: want one error line, got: {err}");
    assert!(
        errors[0].contains(needle),
        "{args:?}: '{}' does not mention '{needle}'",
        errors[0]
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
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "safetensors",
    );
}

#[test]
fn truncated_safetensors() {
    let dir = scratch("truncated");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "model.safetensors",
    );
}

#[test]
fn missing_tensor() {
    let dir = scratch("missing-tensor");
    rewrite_weights(&dir, |t| {
        t.retain(|(n, ..)| n != "model.layers.1.mlp.down_proj.weight")
    });
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "model.layers.1.mlp.down_proj.weight",
    );
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
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "o_proj",
    );
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
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "model.norm.weight",
    );
}

#[test]
fn malformed_config() {
    let dir = scratch("config");
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64,,}").unwrap();
    fails_with(
        &[
            "generate",
            "--model",
            d(&dir),
            "--prompt",
            "hi",
            "--backend",
            "cpu",
        ],
        "config.json",
    );
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
    let (code, err) = run(&[
        "generate",
        "--prompt",
        "hi",
        "--backend",
        "cuda",
        "--max-tokens",
        "2",
    ]);
    assert!(!err.contains("panicked"), "{err}");
    if code != 0 {
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
}
