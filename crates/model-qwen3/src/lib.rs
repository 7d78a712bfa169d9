//! # model-qwen3
//!
//! Qwen3 checkpoints (in progress).

pub mod chat;
pub mod config;
pub mod error;
pub mod generation_config;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
