//! # model-qwen3
//!
//! Qwen3 checkpoints (in progress).

pub mod chat;
pub mod config;
pub mod error;
pub mod generation_config;
mod kv_cache;
mod model;
mod rope;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, Sequence, DEFAULT_BLOCK_SIZE};
pub use model::{Logits, Qwen3};
pub use rope::rope_table;
