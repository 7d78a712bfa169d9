//! Config and weight loading: the real tiny checkpoint, both config styles,
//! synthetic checkpoints in every supported dtype and layout, and every
//! error a user is likely to hit, whose messages must name what is wrong.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use model_qwen3::config::Qwen3Config;
use model_qwen3::generation_config::GenerationConfig;
use model_qwen3::weights::{load_host_weights, HostWeights, WeightFiles};
use model_qwen3::{ModelError, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3")
}

/// A scratch directory removed on drop, unique per test and process.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("qwen3-loading-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn no_progress() -> impl FnMut(usize, usize) {
    |_, _| {}
}

fn load(dir: &Path) -> Result<HostWeights> {
    let cfg = Qwen3Config::from_file(&dir.join("config.json"))?;
    load_host_weights(dir, &cfg, &mut no_progress())
}

/// Asserts a user-facing message is a single line that names `needle`.
fn assert_one_line_naming(err: &ModelError, needle: &str) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "message spans lines: {msg:?}");
    assert!(
        msg.contains(needle),
        "message {msg:?} does not name {needle:?}"
    );
}

// ---------------------------------------------------------------- fixture

#[test]
fn tiny_checkpoint_config() {
    let cfg = Qwen3Config::from_file(&fixture().join("config.json")).unwrap();
    assert_eq!(cfg.vocab_size, 151_936);
    assert_eq!(cfg.hidden_size, 64);
    assert_eq!(cfg.intermediate_size, 192);
    assert_eq!(cfg.num_hidden_layers, 2);
    assert_eq!(cfg.num_attention_heads, 4);
    assert_eq!(cfg.num_key_value_heads, 2);
    // Explicit head_dim wins over hidden / heads = 16.
    assert_eq!(cfg.head_dim, 32);
    assert_eq!(cfg.rms_norm_eps, 1e-6);
    assert_eq!(cfg.rope_theta, 1e6);
    assert_eq!(cfg.max_position_embeddings, 4096);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.bos_token_id, Some(151_643));
    assert_eq!(cfg.eos_token_ids, vec![151_645]);
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn tiny_checkpoint_generation_config() {
    let g = GenerationConfig::from_dir(&fixture()).unwrap();
    assert_eq!(g.eos_token_ids, vec![151_645, 151_643]);
    assert_eq!(g.temperature, Some(0.6));
    assert_eq!(g.top_k, Some(20));
    assert_eq!(g.top_p, Some(0.95));
    assert_eq!(g.do_sample, Some(true));
    assert_eq!(g.min_p, None);
    assert_eq!(g.repetition_penalty, None);
    assert_eq!(g.max_new_tokens, None);
}

/// Reads a BF16 tensor straight from the file's bytes, independently of the
/// loader, to check the loader against.
fn raw_bf16_from_file(path: &Path, name: &str) -> Vec<bf16> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[name];
    assert_eq!(info["dtype"], "BF16");
    let begin = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + info["data_offsets"][1].as_u64().unwrap() as usize;
    bytes[begin..end]
        .chunks_exact(2)
        .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

#[test]
fn tiny_checkpoint_weights() {
    let dir = fixture();
    let cfg = Qwen3Config::from_file(&dir.join("config.json")).unwrap();
    let mut calls = Vec::new();
    let w = load_host_weights(&dir, &cfg, &mut |done, total| calls.push((done, total))).unwrap();
    assert_eq!(calls, vec![(1, 2), (2, 2)]);

    let (h, d, i) = (64, 32, 192);
    assert_eq!(w.embed.len(), 151_936 * h);
    assert!(w.lm_head.is_none(), "tied checkpoint must not load lm_head");
    assert_eq!(w.final_norm.len(), h);
    assert_eq!(w.layers.len(), 2);

    let file = dir.join("model.safetensors");
    for (l, layer) in w.layers.iter().enumerate() {
        assert_eq!(layer.qkv.len(), (4 + 2 * 2) * d * h);
        assert_eq!(layer.o_proj.len(), h * 4 * d);
        assert_eq!(layer.gate_up.len(), 2 * i * h);
        assert_eq!(layer.down.len(), h * i);

        let k_norm: Vec<f32> =
            raw_bf16_from_file(&file, &format!("model.layers.{l}.self_attn.k_norm.weight"))
                .iter()
                .map(|x| x.to_f32())
                .collect();
        assert_eq!(layer.k_norm, k_norm);
        assert_eq!(layer.k_norm[1], 96.5);

        // The fused matrices are the parts in order q, k, v and gate, up.
        let part = |p: &str| raw_bf16_from_file(&file, &format!("model.layers.{l}.{p}.weight"));
        let qkv = [
            part("self_attn.q_proj"),
            part("self_attn.k_proj"),
            part("self_attn.v_proj"),
        ]
        .concat();
        assert_eq!(layer.qkv, qkv);
        let gate_up = [part("mlp.gate_proj"), part("mlp.up_proj")].concat();
        assert_eq!(layer.gate_up, gate_up);
        assert_eq!(layer.down, part("mlp.down_proj"));
        assert_eq!(layer.o_proj, part("self_attn.o_proj"));
    }
    let embed = raw_bf16_from_file(&file, "model.embed_tokens.weight");
    assert!(w.embed == embed, "embedding differs from the file");
}

#[test]
fn weight_files_queries() {
    let files = WeightFiles::open(&fixture()).unwrap();
    assert!(files.contains("model.norm.weight"));
    assert!(!files.contains("lm_head.weight"));
    assert_eq!(
        files.shape("model.layers.1.self_attn.o_proj.weight"),
        Some(vec![64, 128])
    );
    assert_eq!(files.shape("nope"), None);
    let norm = files
        .f32("model.layers.0.self_attn.k_norm.weight", &[32])
        .unwrap();
    let norm_bf16 = files
        .bf16("model.layers.0.self_attn.k_norm.weight", &[32])
        .unwrap();
    assert_eq!(norm[1], 96.5);
    assert_eq!(norm_bf16[1], bf16::from_f32(96.5));
}

// ---------------------------------------------------------------- config

fn fixture_config_json() -> Value {
    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parse(v: &Value) -> Result<Qwen3Config> {
    Qwen3Config::from_json_str(&v.to_string(), Path::new("test/config.json"))
}

fn config_error(v: &Value) -> String {
    match parse(v) {
        Ok(cfg) => panic!("expected a config error, got {cfg:?}"),
        Err(e @ ModelError::Config { .. }) => {
            assert_one_line_naming(&e, "test/config.json");
            e.to_string()
        }
        Err(e) => panic!("expected ModelError::Config, got {e:?}"),
    }
}

#[test]
fn v5_rope_parameters_match_v4_rope_theta() {
    let v4 = fixture_config_json();
    let mut v5 = v4.clone();
    let obj = v5.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.remove("rope_scaling");
    obj.remove("torch_dtype");
    obj.insert("dtype".into(), json!("bfloat16"));
    obj.insert(
        "rope_parameters".into(),
        json!({"rope_theta": 1000000.0, "rope_type": "default"}),
    );
    let a = parse(&v4).unwrap();
    let b = parse(&v5).unwrap();
    assert_eq!(b.rope_theta, 1e6);
    assert_eq!(a, b);

    // Both spellings present and agreeing is fine too.
    let mut both = v4.clone();
    both["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "default"});
    assert_eq!(parse(&both).unwrap().rope_theta, 1e6);
}

#[test]
fn config_defaults() {
    let mut v = fixture_config_json();
    let obj = v.as_object_mut().unwrap();
    for key in [
        "rope_theta",
        "head_dim",
        "num_key_value_heads",
        "eos_token_id",
        "tie_word_embeddings",
    ] {
        obj.remove(key);
    }
    obj.insert("hidden_size".into(), json!(128));
    let cfg = parse(&v).unwrap();
    assert_eq!(cfg.rope_theta, 10_000.0, "HF's Qwen3Config default");
    assert_eq!(cfg.head_dim, 32, "hidden / heads");
    assert_eq!(cfg.num_key_value_heads, cfg.num_attention_heads);
    assert!(cfg.eos_token_ids.is_empty());
    assert!(!cfg.tie_word_embeddings);

    let mut list = fixture_config_json();
    list["eos_token_id"] = json!([7, 8]);
    assert_eq!(parse(&list).unwrap().eos_token_ids, vec![7, 8]);
}

#[test]
fn config_rejects_rope_scaling() {
    let mut v = fixture_config_json();
    v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32768});
    assert!(config_error(&v).contains("rope scaling 'yarn' is not supported"));

    let mut v = fixture_config_json();
    v["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    assert!(config_error(&v).contains("'linear'"));

    let mut v = fixture_config_json();
    v.as_object_mut().unwrap().remove("rope_theta");
    v["rope_parameters"] = json!({"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0});
    assert!(config_error(&v).contains("rope scaling 'yarn' is not supported"));

    let mut v = fixture_config_json();
    v["rope_parameters"] = json!({"rope_theta": 5e5, "rope_type": "default"});
    assert!(config_error(&v).contains("rope_theta"));
}

#[test]
fn config_validation_errors() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("model_type", json!("llama"), "'llama'"),
        ("model_type", json!("qwen3_moe"), "'qwen3_moe'"),
        ("head_dim", json!(48), "multiple of 32"),
        ("head_dim", json!(0), "head_dim"),
        ("hidden_size", json!(0), "hidden_size"),
        ("num_hidden_layers", json!(0), "num_hidden_layers"),
        ("num_key_value_heads", json!(3), "num_key_value_heads"),
        ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
        ("rms_norm_eps", json!(-1e-6), "rms_norm_eps"),
        ("rope_theta", json!(0.0), "rope_theta"),
        ("rope_theta", json!(-5.0), "rope_theta"),
        ("use_sliding_window", json!(true), "sliding"),
        ("attention_bias", json!(true), "attention_bias"),
        ("hidden_act", json!("gelu"), "gelu"),
        ("hidden_size", json!("64"), "line"),
        ("vocab_size", json!(-1), "line"),
        ("eos_token_id", json!("x"), "line"),
    ];
    for (key, value, needle) in cases {
        let mut v = fixture_config_json();
        v[key] = value.clone();
        let msg = config_error(&v);
        assert!(
            msg.contains(needle),
            "{key}={value}: {msg:?} lacks {needle:?}"
        );
    }
}

#[test]
fn config_missing_field_is_named() {
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ] {
        let mut v = fixture_config_json();
        v.as_object_mut().unwrap().remove(key);
        let msg = config_error(&v);
        assert!(
            msg.contains(&format!("missing required field '{key}'")),
            "{msg}"
        );
    }
}

#[test]
fn malformed_config_json() {
    let dir = TempDir::new("badjson");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\n  \"hidden_size\": 64,\n  oops\n}").unwrap();
    let err = Qwen3Config::from_file(&path).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err:?}");
    assert_one_line_naming(&err, "config.json");
    assert!(err.to_string().contains("line 3"), "{err}");

    let missing = Qwen3Config::from_file(&dir.join("absent.json")).unwrap_err();
    assert!(matches!(missing, ModelError::Io { .. }), "{missing:?}");
    assert_one_line_naming(&missing, "absent.json");
}

#[test]
fn generation_config_variants() {
    let dir = TempDir::new("gencfg");
    assert_eq!(
        GenerationConfig::from_dir(dir.path()).unwrap(),
        GenerationConfig::default()
    );

    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": 2, "max_new_tokens": 50, "min_p": null}"#,
    )
    .unwrap();
    let g = GenerationConfig::from_dir(dir.path()).unwrap();
    assert_eq!(g.eos_token_ids, vec![2]);
    assert_eq!(g.max_new_tokens, Some(50));
    assert_eq!(g.min_p, None);

    std::fs::write(dir.join("generation_config.json"), "{\"top_k\": ").unwrap();
    let err = GenerationConfig::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err:?}");
    assert_one_line_naming(&err, "generation_config.json");
}

// ---------------------------------------------------------------- synthetic checkpoints

const V: usize = 128;
const H: usize = 64;
const I: usize = 96;
const HQ: usize = 2;
const HKV: usize = 1;
const D: usize = 32;

fn synthetic_config(tied: bool) -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": V,
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": 1,
        "num_attention_heads": HQ,
        "num_key_value_heads": HKV,
        "head_dim": D,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "eos_token_id": 2
    })
}

/// A named tensor with its f32 values.
struct Synth {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Every tensor of a one-layer model. Values are multiples of 1/8 in
/// [-3, 4.5), exact in bf16, f16 and f32, and differ per tensor so that a
/// mix-up between tensors shows.
fn synthetic_tensors(tied: bool) -> Vec<Synth> {
    let mut specs: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![V, H]),
        ("model.norm.weight".into(), vec![H]),
    ];
    let layer = |s: &str| format!("model.layers.0.{s}.weight");
    specs.extend([
        (layer("input_layernorm"), vec![H]),
        (layer("post_attention_layernorm"), vec![H]),
        (layer("self_attn.q_proj"), vec![HQ * D, H]),
        (layer("self_attn.k_proj"), vec![HKV * D, H]),
        (layer("self_attn.v_proj"), vec![HKV * D, H]),
        (layer("self_attn.o_proj"), vec![H, HQ * D]),
        (layer("self_attn.q_norm"), vec![D]),
        (layer("self_attn.k_norm"), vec![D]),
        (layer("mlp.gate_proj"), vec![I, H]),
        (layer("mlp.up_proj"), vec![I, H]),
        (layer("mlp.down_proj"), vec![H, I]),
    ]);
    if !tied {
        specs.push(("lm_head.weight".into(), vec![V, H]));
    }
    specs
        .into_iter()
        .enumerate()
        .map(|(seed, (name, shape))| {
            let n: usize = shape.iter().product();
            let values = (0..n)
                .map(|k| ((seed * 13 + k * 7) % 60) as f32 / 8.0 - 3.0)
                .collect();
            Synth {
                name,
                shape,
                values,
            }
        })
        .collect()
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F32 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect(),
        Dtype::I8 => values.iter().map(|&v| v as i8 as u8).collect(),
        other => panic!("test cannot encode {other:?}"),
    }
}

/// Writes `tensors` to `path`, each in the dtype `dtype_of` picks.
fn write_safetensors(path: &Path, tensors: &[&Synth], dtype_of: &dyn Fn(&str) -> Dtype) {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            let dtype = dtype_of(&t.name);
            (
                t.name.clone(),
                dtype,
                t.shape.clone(),
                encode(&t.values, dtype),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A complete one-layer checkpoint directory, every tensor in `dtype`.
fn synthetic_checkpoint(tag: &str, tied: bool, dtype: Dtype) -> (TempDir, Vec<Synth>) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.join("config.json"), synthetic_config(tied).to_string()).unwrap();
    let tensors = synthetic_tensors(tied);
    let refs: Vec<&Synth> = tensors.iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, &|_| dtype);
    (dir, tensors)
}

fn values_of<'a>(tensors: &'a [Synth], name: &str) -> &'a [f32] {
    &tensors.iter().find(|t| t.name == name).unwrap().values
}

fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Checks every field of loaded weights against the synthetic values.
fn assert_matches_synthetic(w: &HostWeights, tensors: &[Synth], tied: bool) {
    let get = |n: &str| values_of(tensors, n);
    let layer = |s: &str| get(&format!("model.layers.0.{s}.weight"));
    assert_eq!(w.embed, to_bf16(get("model.embed_tokens.weight")));
    assert_eq!(w.final_norm, get("model.norm.weight"));
    assert_eq!(w.layers.len(), 1);
    let l = &w.layers[0];
    assert_eq!(l.input_norm, layer("input_layernorm"));
    assert_eq!(l.post_attention_norm, layer("post_attention_layernorm"));
    assert_eq!(l.q_norm, layer("self_attn.q_norm"));
    assert_eq!(l.k_norm, layer("self_attn.k_norm"));
    let qkv = [
        layer("self_attn.q_proj"),
        layer("self_attn.k_proj"),
        layer("self_attn.v_proj"),
    ]
    .concat();
    assert_eq!(l.qkv, to_bf16(&qkv));
    assert_eq!(l.o_proj, to_bf16(layer("self_attn.o_proj")));
    let gate_up = [layer("mlp.gate_proj"), layer("mlp.up_proj")].concat();
    assert_eq!(l.gate_up, to_bf16(&gate_up));
    assert_eq!(l.down, to_bf16(layer("mlp.down_proj")));
    match (&w.lm_head, tied) {
        (None, true) => {}
        (Some(m), false) => assert_eq!(*m, to_bf16(get("lm_head.weight"))),
        (m, _) => panic!("lm_head present: {}, tied: {tied}", m.is_some()),
    }
}

#[test]
fn synthetic_checkpoints_in_every_float_dtype() {
    for (dtype, tied) in [
        (Dtype::BF16, true),
        (Dtype::F16, false),
        (Dtype::F32, true),
        (Dtype::F32, false),
    ] {
        let (dir, tensors) = synthetic_checkpoint(&format!("{dtype:?}-{tied}"), tied, dtype);
        let w = load(dir.path()).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        assert_matches_synthetic(&w, &tensors, tied);
    }
}

#[test]
fn tied_checkpoint_ignores_a_stored_lm_head() {
    let dir = TempDir::new("tied-extra");
    std::fs::write(dir.join("config.json"), synthetic_config(true).to_string()).unwrap();
    let tensors = synthetic_tensors(false); // includes lm_head.weight
    let refs: Vec<&Synth> = tensors.iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, &|_| Dtype::BF16);
    let w = load(dir.path()).unwrap();
    assert!(w.lm_head.is_none());
}

#[test]
fn conversion_rounds_to_nearest_even_and_widens_exactly() {
    let dir = TempDir::new("rounding");
    let ties = Synth {
        name: "ties".into(),
        shape: vec![4],
        // Halfway cases: 1 + 2^-8 rounds down to even 1.0, 1 + 3 * 2^-8 up
        // to even 1 + 2^-6; the last is not a tie and rounds up.
        values: vec![
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -(1.0 + 1.0 / 256.0),
            1.0 + 1.5 / 256.0,
        ],
    };
    let halves = Synth {
        name: "halves".into(),
        shape: vec![2, 2],
        values: vec![0.1, -65504.0, 6.1e-5, 1.0 + 1.0 / 1024.0],
    };
    write_safetensors(&dir.join("model.safetensors"), &[&ties, &halves], &|n| {
        if n == "ties" {
            Dtype::F32
        } else {
            Dtype::F16
        }
    });
    let files = WeightFiles::open(dir.path()).unwrap();

    let got: Vec<f32> = files
        .bf16("ties", &[4])
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    assert_eq!(got, vec![1.0, 1.0 + 1.0 / 64.0, -1.0, 1.0 + 1.0 / 128.0]);
    assert_eq!(files.f32("ties", &[4]).unwrap(), ties.values);

    let exact: Vec<f32> = halves
        .values
        .iter()
        .map(|&v| f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(files.f32("halves", &[2, 2]).unwrap(), exact);
    let rounded: Vec<bf16> = exact.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(files.bf16("halves", &[2, 2]).unwrap(), rounded);
}

#[test]
fn unaligned_tensor_data_reads_correctly() {
    // A header of odd length puts every tensor at an odd file offset, which
    // the safetensors format allows even though our writer never does it.
    let dir = TempDir::new("unaligned");
    let values = [1.5f32, -2.25, 3.0e-3];
    let data = encode(&values, Dtype::F32);
    let mut header = format!(
        r#"{{"x":{{"dtype":"F32","shape":[3],"data_offsets":[0,{}]}}}}"#,
        data.len()
    );
    if header.len() % 2 == 0 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(&data);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let files = WeightFiles::open(dir.path()).unwrap();
    assert_eq!(files.f32("x", &[3]).unwrap(), values);
}

/// Splits the synthetic checkpoint over two shards and writes the index.
fn sharded_checkpoint(tag: &str, index_extra: &[(&str, &str)]) -> (TempDir, Vec<Synth>) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.join("config.json"), synthetic_config(false).to_string()).unwrap();
    let tensors = synthetic_tensors(false);
    let shard_of = |t: &Synth| {
        if t.name.contains("mlp") || t.name.starts_with("lm_head") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        }
    };
    let mut weight_map = serde_json::Map::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let part: Vec<&Synth> = tensors.iter().filter(|t| shard_of(t) == shard).collect();
        write_safetensors(&dir.join(shard), &part, &|n| {
            if n.contains("mlp") {
                Dtype::F16
            } else {
                Dtype::BF16
            }
        });
        for t in part {
            weight_map.insert(t.name.clone(), json!(shard));
        }
    }
    for (name, shard) in index_extra {
        weight_map.insert(name.to_string(), json!(shard));
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    (dir, tensors)
}

#[test]
fn sharded_checkpoint_loads() {
    let (dir, tensors) = sharded_checkpoint("sharded", &[]);
    let w = load(dir.path()).unwrap();
    assert_matches_synthetic(&w, &tensors, false);
}

// ---------------------------------------------------------------- weight errors

fn load_error(dir: &Path) -> ModelError {
    match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn missing_directory() {
    let dir = TempDir::new("gone");
    let gone = dir.join("no-such-model");
    let err = match WeightFiles::open(&gone) {
        Ok(_) => panic!("opened a missing directory"),
        Err(e) => e,
    };
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert_one_line_naming(&err, "no-such-model");
}

#[test]
fn directory_without_safetensors() {
    let dir = TempDir::new("empty");
    std::fs::write(dir.join("config.json"), synthetic_config(true).to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "model.safetensors");
    assert_one_line_naming(&err, &dir.path().display().to_string());
}

#[test]
fn truncated_safetensors() {
    let (dir, _) = synthetic_checkpoint("truncated", true, Dtype::BF16);
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for keep in [bytes.len() / 2, bytes.len() - 1, 5, 0] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load_error(dir.path());
        assert!(
            matches!(err, ModelError::Weights { .. }),
            "keep {keep}: {err:?}"
        );
        assert_one_line_naming(&err, "model.safetensors");
    }
}

#[test]
fn corrupt_header() {
    let (dir, _) = synthetic_checkpoint("corrupt", true, Dtype::BF16);
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "model.safetensors");
}

#[test]
fn missing_tensor() {
    let dir = TempDir::new("missing-tensor");
    std::fs::write(dir.join("config.json"), synthetic_config(true).to_string()).unwrap();
    let tensors = synthetic_tensors(true);
    let gone = "model.layers.0.self_attn.k_norm.weight";
    let refs: Vec<&Synth> = tensors.iter().filter(|t| t.name != gone).collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, &|_| Dtype::BF16);
    let err = load_error(dir.path());
    assert!(
        matches!(&err, ModelError::MissingTensor { name } if name == gone),
        "{err:?}"
    );
    assert_one_line_naming(&err, gone);
}

#[test]
fn untied_checkpoint_needs_lm_head() {
    let dir = TempDir::new("no-lm-head");
    std::fs::write(dir.join("config.json"), synthetic_config(false).to_string()).unwrap();
    let tensors = synthetic_tensors(true);
    let refs: Vec<&Synth> = tensors.iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, &|_| Dtype::BF16);
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_one_line_naming(&err, "lm_head.weight");
}

#[test]
fn wrong_shape() {
    let dir = TempDir::new("shape");
    std::fs::write(dir.join("config.json"), synthetic_config(true).to_string()).unwrap();
    let mut tensors = synthetic_tensors(true);
    let bad = "model.layers.0.mlp.down_proj.weight";
    // Transposed: same element count, wrong layout.
    tensors.iter_mut().find(|t| t.name == bad).unwrap().shape = vec![I, H];
    let refs: Vec<&Synth> = tensors.iter().collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, &|_| Dtype::BF16);
    let err = load_error(dir.path());
    match &err {
        ModelError::TensorShape {
            name,
            got,
            expected,
        } => {
            assert_eq!(name, bad);
            assert_eq!(got, &vec![I, H]);
            assert_eq!(expected, &vec![H, I]);
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    assert_one_line_naming(&err, bad);
}

#[test]
fn unsupported_dtypes() {
    for dtype in [Dtype::I8, Dtype::F64] {
        let dir = TempDir::new(&format!("dtype-{dtype:?}"));
        std::fs::write(dir.join("config.json"), synthetic_config(true).to_string()).unwrap();
        let tensors = synthetic_tensors(true);
        let bad = "model.layers.0.self_attn.o_proj.weight";
        let refs: Vec<&Synth> = tensors.iter().collect();
        write_safetensors(&dir.join("model.safetensors"), &refs, &|n| {
            if n == bad {
                dtype
            } else {
                Dtype::BF16
            }
        });
        let err = load_error(dir.path());
        assert!(
            matches!(&err, ModelError::TensorDType { name, .. } if name == bad),
            "{err:?}"
        );
        assert_one_line_naming(&err, bad);
        assert_one_line_naming(&err, &dtype.to_string());

        let files = WeightFiles::open(dir.path()).unwrap();
        let err = files.f32(bad, &[H, HQ * D]).unwrap_err();
        assert!(matches!(err, ModelError::TensorDType { .. }), "{err:?}");
    }
}

#[test]
fn index_naming_a_missing_shard() {
    let (dir, _) = sharded_checkpoint("lost-shard", &[]);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "model-00002-of-00002.safetensors");
}

#[test]
fn index_errors() {
    // A tensor the index places in a shard that does not hold it.
    let (dir, _) = sharded_checkpoint(
        "misplaced",
        &[("model.norm.weight", "model-00002-of-00002.safetensors")],
    );
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "model.norm.weight");

    // A shard name that tries to leave the checkpoint directory.
    let (dir, _) = sharded_checkpoint("escape", &[("extra", "../model.safetensors")]);
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "../model.safetensors");

    // Malformed index JSON.
    let (dir, _) = sharded_checkpoint("bad-index", &[]);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": [}",
    )
    .unwrap();
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, "model.safetensors.index.json");
}

#[test]
fn duplicate_tensor_across_shards() {
    let (dir, tensors) = sharded_checkpoint("duplicate", &[]);
    // Rewrite shard 2 with a copy of a tensor that shard 1 already holds.
    let dup = "model.norm.weight";
    let part: Vec<&Synth> = tensors
        .iter()
        .filter(|t| t.name.contains("mlp") || t.name.starts_with("lm_head") || t.name == dup)
        .collect();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &part,
        &|_| Dtype::BF16,
    );
    let err = load_error(dir.path());
    assert!(matches!(err, ModelError::Weights { .. }), "{err:?}");
    assert_one_line_naming(&err, dup);
    assert_one_line_naming(&err, "model-00001-of-00002.safetensors");
}
