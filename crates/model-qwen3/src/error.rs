//! The error type of everything in this crate. Messages are written for the
//! person running the program: one line naming the file or tensor at fault.

use std::path::PathBuf;

/// Anything that can go wrong loading or running a Qwen3 checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json or generation_config.json is malformed or unsupported.
    #[error("bad config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A safetensors file is malformed, truncated or inconsistent.
    #[error("bad weights file {path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor {name} is missing from the checkpoint")]
    MissingTensor { name: String },
    /// A tensor has a shape other than the config implies.
    #[error("tensor {name} has shape {got:?}, but the config implies {expected:?}")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor is stored in a dtype this engine does not load.
    #[error("tensor {name} has unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    TensorDType { name: String, dtype: String },
    /// The tokenizer could not be loaded or failed on some input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A request the model cannot serve (prompt too long, cache full, ...).
    #[error("{0}")]
    Request(String),
    /// A backend op failed.
    #[error(transparent)]
    Backend(#[from] qwen_tensor::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;
