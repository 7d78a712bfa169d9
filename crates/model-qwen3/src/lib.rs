//! # model-qwen3
//!
//! Qwen3 checkpoints on any [`qwen_tensor::Backend`]: `config.json` (both the
//! published and the newer `rope_parameters` format), safetensors weights
//! through mmap (single-file or sharded; bf16, f16 or f32), the tokenizer and
//! the checkpoint's own chat template, a paged KV cache, and the forward
//! pass. The model is written once against the backend trait; it never
//! knows which device it runs on.
//!
//! ```
//! use model_qwen3::{tokenizer::Tokenizer, Logits, Qwen3, Sequence};
//! use qwen_kernels_cpu::CpuBackend;
//! use qwen_tensor::Backend;
//!
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3");
//! let model = Qwen3::load(CpuBackend::new(), &dir, &mut |_, _| {})?;
//! let ids = Tokenizer::from_dir(&dir)?.encode("The quick brown fox")?;
//!
//! // Prefill the prompt, then take the most likely next token.
//! let mut cache = model.new_cache(64)?;
//! let mut seq = Sequence::default();
//! let logits = model.forward(&mut cache, &mut [(&mut seq, &ids[..])], Logits::Last)?;
//! let next = model.backend().argmax(&logits)?[0];
//! assert!(next < model.config().vocab_size as u32);
//! assert_eq!(seq.len(), ids.len());
//! # Ok::<(), model_qwen3::ModelError>(())
//! ```

pub mod chat;
pub mod config;
pub mod dummy;
pub mod error;
pub mod generation_config;
mod kv_cache;
mod model;
mod prefix_cache;
mod rope;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
pub use kv_cache::{BlockHash, KvCache, Sequence, DEFAULT_BLOCK_SIZE};
pub use model::{Feed, Logits, Qwen3};
pub use rope::rope_table;
pub use scheduler::{Scheduler, SchedulerConfig};
