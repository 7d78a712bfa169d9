//! Random weights of the real Qwen3 shapes, so benchmarks need no download.

use half::bf16;
use std::path::Path;

use crate::config::Qwen3Config;
use crate::weights::{HostLayer, HostWeights};
use crate::{ModelError, Result};

/// Names accepted by [`dummy_config`], besides a path to a config.json.
pub const PRESETS: [&str; 6] = [
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
];

/// The config of a published dense Qwen3 model (its hidden size,
/// intermediate size, layers, query heads, tied embeddings), or of the
/// config.json at `name` when it is a path.
pub fn dummy_config(name: &str) -> Result<Qwen3Config> {
    let (h, i, l, heads, tied) = match name {
        "qwen3-0.6b" => (1024, 3072, 28, 16, true),
        "qwen3-1.7b" => (2048, 6144, 28, 16, true),
        "qwen3-4b" => (2560, 9728, 36, 32, true),
        "qwen3-8b" => (4096, 12288, 36, 32, false),
        "qwen3-14b" => (5120, 17408, 40, 40, false),
        "qwen3-32b" => (5120, 25600, 64, 64, false),
        // A name that reads as a path is one, present or not (its error
        // then names the file rather than the presets).
        path if Path::new(path).is_file()
            || path.ends_with(".json")
            || path.contains(['/', std::path::MAIN_SEPARATOR]) =>
        {
            return Qwen3Config::from_file(Path::new(path))
        }
        other => {
            return Err(ModelError::Request(format!(
                "unknown shape '{other}' (expected one of {} or a config.json path)",
                PRESETS.join(", ")
            )))
        }
    };
    Ok(Qwen3Config {
        vocab_size: 151_936,
        hidden_size: h,
        intermediate_size: i,
        num_hidden_layers: l,
        num_attention_heads: heads,
        num_key_value_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        max_position_embeddings: 40_960,
        tie_word_embeddings: tied,
        bos_token_id: Some(151_643),
        eos_token_ids: vec![151_645],
        torch_dtype: Some("bfloat16".into()),
    })
}

/// splitmix64: a seedable stream, cheap enough for billions of values.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` values uniform in `(-scale, scale)`, from `seed`.
fn uniform_bf16(n: usize, scale: f32, seed: u64) -> Vec<bf16> {
    use rayon::prelude::*;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let u = (mix(seed ^ mix(i as u64)) >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32((2.0 * u - 1.0) * scale)
        })
        .collect()
}

/// Random weights for `cfg`: projections uniform with the scale of
/// 1/sqrt(fan_in) (activations stay O(1) through the layers), embeddings
/// at 0.02 like HF's initialiser, norms at 1. `progress(done, total)` per layer.
pub fn random_weights(
    cfg: &Qwen3Config,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> HostWeights {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let s = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let seed = mix(seed ^ ((l as u64 + 1) * 0x1000));
        layers.push(HostLayer {
            input_norm: vec![1.0; h],
            post_attention_norm: vec![1.0; h],
            qkv: uniform_bf16((hq + 2 * hkv) * d * h, s(h), seed ^ 1),
            q_norm: vec![1.0; d],
            k_norm: vec![1.0; d],
            o_proj: uniform_bf16(h * hq * d, s(hq * d), seed ^ 2),
            gate_up: uniform_bf16(2 * i * h, s(h), seed ^ 3),
            down: uniform_bf16(h * i, s(i), seed ^ 4),
        });
        progress(l + 1, cfg.num_hidden_layers);
    }
    HostWeights {
        embed: uniform_bf16(cfg.vocab_size * h, 0.02 * 3f32.sqrt(), mix(seed ^ 7)),
        layers,
        final_norm: vec![1.0; h],
        lm_head: (!cfg.tie_word_embeddings)
            .then(|| uniform_bf16(cfg.vocab_size * h, s(h), mix(seed ^ 9))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_shapes() {
        let c = dummy_config("qwen3-8b").unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_hidden_layers,
                c.head_dim,
                c.tie_word_embeddings
            ),
            (4096, 36, 128, false)
        );
        let c = dummy_config("qwen3-0.6b").unwrap();
        assert!(c.tie_word_embeddings && c.num_attention_heads * c.head_dim != c.hidden_size);
        assert!(dummy_config("qwen3-9000b")
            .unwrap_err()
            .to_string()
            .contains("qwen3-0.6b"));
    }

    #[test]
    fn a_missing_config_path_is_named_as_a_file() {
        for path in ["/no/such/dir/config.json", "no-such-config.json"] {
            let e = dummy_config(path).unwrap_err().to_string();
            assert!(e.contains("cannot read") && e.contains(path), "{e}");
        }
    }

    #[test]
    fn random_weights_are_seeded_and_shaped() {
        let mut c = dummy_config("qwen3-0.6b").unwrap();
        c.num_hidden_layers = 1;
        c.vocab_size = 10;
        let a = random_weights(&c, 1, &mut |_, _| {});
        let b = random_weights(&c, 1, &mut |_, _| {});
        assert_eq!(a.layers[0].qkv.len(), (16 + 16) * 128 * 1024);
        assert_eq!(a.layers[0].down, b.layers[0].down);
        assert_ne!(a.layers[0].qkv[..64], a.layers[0].gate_up[..64]);
        let max = a.layers[0]
            .down
            .iter()
            .fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
        assert!(max > 0.0 && max <= 1.0 / (3072f32).sqrt() * 1.01);
    }
}
