//! `config.json` of a Qwen3 checkpoint: parsed, defaulted the way Hugging
//! Face's `Qwen3Config` defaults it, and checked against what this engine
//! can run, so that an unsupported checkpoint fails at load time with a
//! message instead of producing wrong text later.

use std::path::Path;

use serde::Deserialize;

use crate::{ModelError, Result};

/// HF's `Qwen3Config` defaults for fields a config may leave out.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_RMS_NORM_EPS: f32 = 1e-6;
const DEFAULT_MAX_POSITIONS: usize = 32_768;

/// The attention kernels tile the head dimension in 32-wide pieces.
const HEAD_DIM_MULTIPLE: usize = 32;

/// The architecture hyper-parameters of a dense Qwen3 model.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
    /// Number of token ids (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one attention head. Qwen3 sets it explicitly and it need not
    /// equal `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Base of the rotary position embedding.
    pub rope_theta: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens named by the config (possibly none).
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype`, or `dtype` in
    /// newer configs), for information only.
    pub torch_dtype: Option<String>,
}

/// A token id field that Hugging Face configs write either as one integer or
/// as a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a token id or a list of token ids")]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

/// RoPE settings: transformers v5 `rope_parameters` or v4 `rope_scaling`.
#[derive(Debug, Default, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    /// Older spelling of `rope_type` in `rope_scaling`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
}

impl RawRope {
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }
}

/// config.json as written. Everything is optional here so that a missing
/// field gets our own message naming it, and so that `null` means absent.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
}

impl Qwen3Config {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates config JSON; `path` is only used in messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let bad = |msg: String| ModelError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        Self::from_raw(raw).map_err(bad)
    }

    fn from_raw(raw: RawConfig) -> std::result::Result<Self, String> {
        fn required<T>(value: Option<T>, name: &str) -> std::result::Result<T, String> {
            value.ok_or_else(|| format!("missing required field '{name}'"))
        }

        if let Some(found) = &raw.model_type {
            if found != "qwen3" {
                return Err(format!(
                    "model_type is '{found}', but this engine only runs 'qwen3'"
                ));
            }
        }
        // Both would change the computation; ignoring them would run the
        // checkpoint silently wrong.
        if raw.attention_bias == Some(true) {
            return Err("attention_bias is true, but biased attention is not supported".into());
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|&a| a != "silu") {
            return Err(format!("hidden_act '{act}' is not supported (only 'silu')"));
        }
        if raw.use_sliding_window == Some(true)
            || raw
                .layer_types
                .iter()
                .flatten()
                .any(|t| t == "sliding_attention")
        {
            return Err("sliding-window attention is not supported".into());
        }

        let rope_theta = resolve_rope_theta(&raw)?;

        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        // HF: an absent kv-head count means plain multi-head attention.
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(DEFAULT_MAX_POSITIONS);

        for (name, value) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
            ("max_position_embeddings", max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        // Token ids travel as u32 everywhere downstream.
        if u32::try_from(vocab_size).is_err() {
            return Err(format!("vocab_size {vocab_size} does not fit in u32"));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            ));
        }

        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(format!(
                    "head_dim is absent and hidden_size {hidden_size} is not divisible by \
                     num_attention_heads {num_attention_heads}"
                ))
            }
        };
        if head_dim == 0 || head_dim % HEAD_DIM_MULTIPLE != 0 {
            return Err(format!(
                "head_dim {head_dim} is not supported: the attention kernels need a positive \
                 multiple of {HEAD_DIM_MULTIPLE}"
            ));
        }

        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(DEFAULT_RMS_NORM_EPS);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps must be positive and finite, got {rms_norm_eps}"
            ));
        }

        Ok(Qwen3Config {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }
}

/// Finds the RoPE base in either config style and refuses any RoPE variant
/// other than the plain one, since we only implement that.
fn resolve_rope_theta(raw: &RawConfig) -> std::result::Result<f64, String> {
    for rope in [&raw.rope_parameters, &raw.rope_scaling]
        .into_iter()
        .flatten()
    {
        if let Some(kind) = rope.kind().filter(|&k| k != "default") {
            return Err(format!("rope scaling '{kind}' is not supported"));
        }
    }
    // v4 requires a type in rope_scaling; without one we cannot tell what
    // its other fields (a factor, say) were meant to do.
    if raw
        .rope_scaling
        .as_ref()
        .is_some_and(|r| r.kind().is_none())
    {
        return Err("rope_scaling has no rope_type, so it cannot be checked".into());
    }
    let nested = raw.rope_parameters.as_ref().and_then(|r| r.rope_theta);
    let theta = match (raw.rope_theta, nested) {
        (Some(top), Some(inner)) if top != inner => {
            return Err(format!(
                "rope_theta {top} disagrees with rope_parameters.rope_theta {inner}"
            ))
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => DEFAULT_ROPE_THETA,
    };
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!(
            "rope_theta must be positive and finite, got {theta}"
        ));
    }
    Ok(theta)
}
