//! User-facing sampling settings and their validation.

use qwen_tensor::SampleParams;

use crate::SamplerError;

/// How one sequence picks its next token.
///
/// The default is greedy decoding: temperature 0 takes the argmax and the
/// filters are off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Logits are divided by this before sampling; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability
    /// reaches this; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the top token's probability;
    /// 0 disables.
    pub min_p: f32,
    /// HF-style penalty on tokens already in the history: positive logits
    /// are divided by it, negative ones multiplied; 1 disables. Applies in
    /// greedy mode too.
    pub repetition_penalty: f32,
    /// Seed of the counter-based random stream (see [`crate::uniform`]).
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Checks every field's range: temperature finite and >= 0, top_p in
    /// (0, 1], min_p in [0, 1], repetition_penalty finite and > 0.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |name, rule, value| Err(SamplerError::InvalidConfig { name, rule, value });
        let t = self.temperature;
        if t.is_nan() || t < 0.0 {
            return bad("temperature", ">= 0", t);
        }
        if !t.is_finite() {
            return bad("temperature", "finite", t);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]", self.top_p);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "in [0, 1]", self.min_p);
        }
        let p = self.repetition_penalty;
        if !(p.is_finite() && p > 0.0) {
            return bad("repetition_penalty", "finite and > 0", p);
        }
        Ok(())
    }

    /// True when the next token is the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The per-row parameters [`qwen_tensor::Backend::sample`] takes.
    pub fn sample_params(&self) -> SampleParams {
        SampleParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
        }
    }
}
