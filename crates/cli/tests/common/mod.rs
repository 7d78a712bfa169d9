//! Running qwen-cli from the integration tests, and the demo checkpoint.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a qwen-cli run left behind.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs qwen-cli with `args` and QWEN_FAULT set to `fault` (unset when `None`).
pub fn qwen_cli_with_fault(args: &[&str], fault: Option<&str>) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qwen-cli"));
    c.args(args).env_remove("QWEN_FAULT");
    if let Some(f) = fault {
        c.env("QWEN_FAULT", f);
    }
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs qwen-cli with `args`.
pub fn qwen_cli(args: &[&str]) -> Run {
    qwen_cli_with_fault(args, None)
}

/// Asserts a clean failure: exit status 1, no panic, exactly one error
/// line, and that line mentions `needle`.
pub fn assert_one_error(what: &str, r: &Run, needle: &str) {
    let err = &r.stderr;
    assert_eq!(r.code, 1, "{what} should fail with status 1; stderr: {err}");
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: want one error line, got: {err}");
    assert!(
        errors[0].contains(needle),
        "{what}: '{}' does not mention '{needle}'",
        errors[0]
    );
}

/// Runs qwen-cli with `args` and asserts [`assert_one_error`].
pub fn fails_with(args: &[&str], needle: &str) {
    assert_one_error(&format!("{args:?}"), &qwen_cli(args), needle);
}

/// The demo checkpoint (with its golden files) in fixtures/.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3")
}
