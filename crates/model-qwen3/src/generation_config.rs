//! `generation_config.json`: the sampling defaults a checkpoint ships with
//! and, more importantly, its full list of end-of-sequence tokens (Qwen3's
//! config.json names only one of them).

use std::path::Path;

use serde::Deserialize;

use crate::config::TokenIds;
use crate::{ModelError, Result};

/// Generation defaults of a checkpoint. Every field is as written in the
/// file (absent or `null` gives `None`); judging whether a value makes
/// sense is left to the sampler, which also sees the user's overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end generation (possibly none).
    pub eos_token_ids: Vec<u32>,
    /// Softmax temperature.
    pub temperature: Option<f32>,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p.
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// Penalty applied to tokens already in the context.
    pub repetition_penalty: Option<f32>,
    /// Whether to sample (`false` means greedy).
    pub do_sample: Option<bool>,
    /// Default cap on generated tokens.
    pub max_new_tokens: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawGenerationConfig {
    eos_token_id: Option<TokenIds>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    do_sample: Option<bool>,
    max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`. The file is optional in Hugging
    /// Face checkpoints, so a missing one gives the all-`None` default; a
    /// present but malformed one is an error.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        let raw: RawGenerationConfig =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: path.clone(),
                msg: format!("invalid JSON: {e}"),
            })?;
        Ok(GenerationConfig {
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            temperature: raw.temperature,
            top_k: raw.top_k,
            top_p: raw.top_p,
            min_p: raw.min_p,
            repetition_penalty: raw.repetition_penalty,
            do_sample: raw.do_sample,
            max_new_tokens: raw.max_new_tokens,
        })
    }
}
