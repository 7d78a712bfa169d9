//! # qwen-sampler
//!
//! Turns logits into tokens for the Qwen3 engine, written once against the
//! [`qwen_tensor::Backend`] trait: the math lives in the backend's
//! `repetition_penalty`, `argmax` and `sample` ops, and this crate adds
//! validated settings ([`SamplingConfig`]), per-sequence state
//! ([`Sampler`]), a batched step ([`sample_batch`]), the counter-based random
//! stream ([`uniform`]) and stop conditions ([`StopCriteria`]).
//!
//! Draws are a function of `(seed, stream, step)` only, so a sequence's
//! tokens do not depend on which other sequences share its batch or on the
//! device.
//!
//! ```
//! use qwen_kernels_cpu::CpuBackend;
//! use qwen_sampler::{FinishReason, Sampler, SamplingConfig, StopCriteria};
//! use qwen_tensor::{Backend, HostSlice};
//!
//! let cpu = CpuBackend::new();
//! let row = [0.5f32, 3.0, 1.0, -2.0];
//!
//! // Greedy (the default) picks the argmax.
//! let mut greedy = Sampler::new(SamplingConfig::default(), 0).unwrap();
//! let mut logits = cpu.upload(HostSlice::F32(&row), &[1, 4]).unwrap();
//! assert_eq!(greedy.sample(&cpu, &mut logits, &[]).unwrap(), 1);
//!
//! // Seeded sampling is reproducible.
//! let config = SamplingConfig { temperature: 0.8, top_k: 3, seed: 42, ..Default::default() };
//! let draw = |stream| {
//!     let mut s = Sampler::new(config, stream).unwrap();
//!     (0..8)
//!         .map(|_| {
//!             let mut logits = cpu.upload(HostSlice::F32(&row), &[1, 4]).unwrap();
//!             s.sample(&cpu, &mut logits, &[]).unwrap()
//!         })
//!         .collect::<Vec<u32>>()
//! };
//! assert_eq!(draw(7), draw(7));
//! assert!(draw(7).iter().all(|&t| t != 3), "top_k 3 never picks the worst token");
//!
//! let stop = StopCriteria { eos_token_ids: vec![2], max_new_tokens: 16 };
//! assert_eq!(stop.check(2, 1), Some(FinishReason::Stop));
//! assert_eq!(stop.check(1, 16).map(FinishReason::as_str), Some("length"));
//! ```

mod config;
mod error;
mod rng;
mod sampler;
mod stop;

pub use config::SamplingConfig;
pub use error::SamplerError;
pub use rng::{hash, uniform};
pub use sampler::{sample_batch, sample_batch_on_device, sample_batch_on_device_into, Sampler};
pub use stop::{FinishReason, StopCriteria};
