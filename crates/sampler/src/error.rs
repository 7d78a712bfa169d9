//! The sampler's error type.

/// Errors from configuring or running a [`Sampler`](crate::Sampler).
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// A [`SamplingConfig`](crate::SamplingConfig) field is out of range,
    /// e.g. "temperature must be >= 0, got -1".
    #[error("{name} must be {rule}, got {value}")]
    InvalidConfig {
        /// The field's name.
        name: &'static str,
        /// The range it must lie in.
        rule: &'static str,
        /// The rejected value.
        value: f32,
    },
    /// The logits, samplers and histories of a batch do not line up.
    #[error("batch mismatch: {0}")]
    Batch(String),
    /// The backend failed or rejected an op.
    #[error(transparent)]
    Backend(#[from] qwen_tensor::Error),
}
