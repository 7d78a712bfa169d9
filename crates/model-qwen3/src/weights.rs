//! Reading a checkpoint's safetensors files (single or sharded) through
//! memory maps, and assembling them into the host-side layout the model
//! uploads: fused QKV and gate/up matrices, norms widened to f32.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::Qwen3Config;
use crate::{ModelError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// Where a tensor lives: shard, dtype, shape and absolute byte range.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

/// The safetensors files of a checkpoint directory, memory-mapped, with an
/// index from tensor name to its bytes. Tensors are read on demand and
/// converted to the dtype the caller asks for.
pub struct WeightFiles {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

impl fmt::Debug for WeightFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let paths: Vec<&Path> = self.shards.iter().map(|s| s.path.as_path()).collect();
        f.debug_struct("WeightFiles")
            .field("shards", &paths)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or, if absent, every shard named by
    /// `dir/model.safetensors.index.json` (the order Hugging Face tries).
    /// Every header is parsed and checked here, so later reads only fail
    /// for a missing tensor, a wrong shape or an unsupported dtype.
    pub fn open(dir: &Path) -> Result<WeightFiles> {
        let meta = std::fs::metadata(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(weights_err(dir, "is not a directory"));
        }

        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut files = Self {
            shards: Vec::new(),
            tensors: HashMap::new(),
        };
        if single.is_file() {
            files.add_shard(single)?;
        } else if index.is_file() {
            files.open_sharded(dir, &index)?;
        } else {
            return Err(weights_err(
                dir,
                format!("contains neither {SINGLE_FILE} nor {INDEX_FILE}"),
            ));
        }
        Ok(files)
    }

    fn open_sharded(&mut self, dir: &Path, index_path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| weights_err(index_path, format!("invalid index JSON: {e}")))?;

        // Sorted so that shards open, and errors surface, deterministically.
        let shard_names: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        for name in shard_names {
            // A shard name is a file next to the index, never a path that
            // could reach elsewhere on disk.
            if Path::new(name).file_name() != Some(name.as_ref()) {
                return Err(weights_err(
                    index_path,
                    format!("shard name '{name}' is not a plain file name"),
                ));
            }
            let path = dir.join(name);
            if !path.is_file() {
                return Err(weights_err(
                    index_path,
                    format!("names shard '{name}', which does not exist"),
                ));
            }
            self.add_shard(path)?;
        }

        for (tensor, shard_name) in &index.weight_map {
            let actual = self.tensors.get(tensor).map(|e| &self.shards[e.shard].path);
            if actual.and_then(|p| p.file_name()) != Some(shard_name.as_ref()) {
                return Err(weights_err(
                    index_path,
                    format!("maps tensor {tensor} to '{shard_name}', which does not contain it"),
                ));
            }
        }
        Ok(())
    }

    /// Maps one file, validates its header and records its tensors.
    fn add_shard(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is opened read-only and the mapping is only ever
        // read, through shared slices, for as long as `self` owns it. What we
        // cannot rule out is another process truncating or rewriting the file
        // while it is mapped (reads could then fault or see new bytes); as
        // with every memory-mapped loader, checkpoints must not be modified
        // while a model is loading from them.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;

        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            weights_err(
                &path,
                format!("not a valid safetensors file (truncated or corrupt?): {e}"),
            )
        })?;
        let data_start = 8 + header_len;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let (begin, end) = info.data_offsets;
            // read_metadata already checks this; it is repeated because
            // every later read slices the map with these bounds.
            let bytes = (data_start + begin)..(data_start + end);
            if begin > end || bytes.end > map.len() {
                return Err(weights_err(
                    &path,
                    format!("tensor {name} has offsets outside the file"),
                ));
            }
            if let Some(other) = self.tensors.get(&name) {
                return Err(weights_err(
                    &path,
                    format!(
                        "tensor {name} is also in {}",
                        self.shards[other.shard].path.display()
                    ),
                ));
            }
            let entry = Entry {
                shard,
                dtype: info.dtype,
                shape: info.shape.clone(),
                bytes,
            };
            self.tensors.insert(name, entry);
        }
        self.shards.push(Shard { path, map });
        Ok(())
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|e| e.shape.clone())
    }

    /// Reads a tensor as bf16, checking its shape. BF16 is copied; F16 and
    /// F32 are rounded to nearest-even bf16.
    pub fn bf16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<bf16>> {
        let mut out = Vec::new();
        self.append_bf16(name, expected_shape, &mut out)?;
        Ok(out)
    }

    /// Reads a tensor as f32, checking its shape. BF16 and F16 widen
    /// exactly; F32 is copied.
    pub fn f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let (dtype, bytes) = self.raw(name, expected_shape)?;
        Ok(match dtype {
            Dtype::BF16 => u16s(bytes).map(|b| bf16::from_bits(b).to_f32()).collect(),
            Dtype::F16 => u16s(bytes).map(|b| f16::from_bits(b).to_f32()).collect(),
            Dtype::F32 => f32s(bytes).collect(),
            other => return Err(unsupported(name, other)),
        })
    }

    /// Appends a tensor as bf16 to `out`, so that fused matrices are built
    /// without an intermediate copy of each part.
    fn append_bf16(&self, name: &str, expected_shape: &[usize], out: &mut Vec<bf16>) -> Result<()> {
        let (dtype, bytes) = self.raw(name, expected_shape)?;
        match dtype {
            Dtype::BF16 => out.extend(u16s(bytes).map(bf16::from_bits)),
            Dtype::F16 => {
                out.extend(u16s(bytes).map(|b| bf16::from_f32(f16::from_bits(b).to_f32())))
            }
            Dtype::F32 => out.extend(f32s(bytes).map(bf16::from_f32)),
            other => return Err(unsupported(name, other)),
        }
        Ok(())
    }

    /// The dtype and bytes of a tensor whose shape matches.
    fn raw(&self, name: &str, expected_shape: &[usize]) -> Result<(Dtype, &[u8])> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        if entry.shape != expected_shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                got: entry.shape.clone(),
                expected: expected_shape.to_vec(),
            });
        }
        Ok((
            entry.dtype,
            &self.shards[entry.shard].map[entry.bytes.clone()],
        ))
    }
}

fn weights_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Weights {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn unsupported(name: &str, dtype: Dtype) -> ModelError {
    ModelError::TensorDType {
        name: name.to_string(),
        dtype: dtype.to_string(),
    }
}

// The mapped bytes carry no alignment guarantee for any tensor, so elements
// are decoded from little-endian byte pairs/quads rather than cast in place.
fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// One decoder layer's weights on the host, in the fused layout the model
/// uploads. Matrices are row-major `[out, in]` as in the checkpoint.
pub struct HostLayer {
    /// RMSNorm weight before attention, `[H]`.
    pub input_norm: Vec<f32>,
    /// RMSNorm weight before the MLP, `[H]`.
    pub post_attention_norm: Vec<f32>,
    /// q_proj, k_proj and v_proj rows concatenated, `[(Hq + 2 Hkv) D, H]`,
    /// so one matmul produces all three.
    pub qkv: Vec<bf16>,
    /// Per-head RMSNorm weight applied to queries, `[D]`.
    pub q_norm: Vec<f32>,
    /// Per-head RMSNorm weight applied to keys, `[D]`.
    pub k_norm: Vec<f32>,
    /// Attention output projection, `[H, Hq D]`.
    pub o_proj: Vec<bf16>,
    /// gate_proj rows then up_proj rows, `[2 I, H]`, so one matmul feeds
    /// the SiLU-gated product.
    pub gate_up: Vec<bf16>,
    /// MLP output projection, `[H, I]`.
    pub down: Vec<bf16>,
}

/// All weights of a Qwen3 checkpoint on the host.
pub struct HostWeights {
    /// Token embedding, `[V, H]`.
    pub embed: Vec<bf16>,
    /// The decoder layers, in order.
    pub layers: Vec<HostLayer>,
    /// RMSNorm weight after the last layer, `[H]`.
    pub final_norm: Vec<f32>,
    /// Output projection `[V, H]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<bf16>>,
}

/// Loads every weight the model needs from the checkpoint in `dir`, with
/// shapes checked against `cfg`. Tensors the model does not use are
/// ignored (so is `lm_head.weight` when embeddings are tied). Calls
/// `progress(done_layers, total_layers)` after each layer.
pub fn load_host_weights(
    dir: &Path,
    cfg: &Qwen3Config,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HostWeights> {
    let files = WeightFiles::open(dir)?;
    let (h, v, i, d) = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let (q_rows, kv_rows) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);

    let embed = files.bf16("model.embed_tokens.weight", &[v, h])?;
    let total = cfg.num_hidden_layers;
    let mut layers = Vec::with_capacity(total);
    for l in 0..total {
        let name = |suffix: &str| format!("model.layers.{l}.{suffix}.weight");

        let mut qkv = Vec::with_capacity((q_rows + 2 * kv_rows) * h);
        files.append_bf16(&name("self_attn.q_proj"), &[q_rows, h], &mut qkv)?;
        files.append_bf16(&name("self_attn.k_proj"), &[kv_rows, h], &mut qkv)?;
        files.append_bf16(&name("self_attn.v_proj"), &[kv_rows, h], &mut qkv)?;

        let mut gate_up = Vec::with_capacity(2 * i * h);
        files.append_bf16(&name("mlp.gate_proj"), &[i, h], &mut gate_up)?;
        files.append_bf16(&name("mlp.up_proj"), &[i, h], &mut gate_up)?;

        layers.push(HostLayer {
            input_norm: files.f32(&name("input_layernorm"), &[h])?,
            post_attention_norm: files.f32(&name("post_attention_layernorm"), &[h])?,
            qkv,
            q_norm: files.f32(&name("self_attn.q_norm"), &[d])?,
            k_norm: files.f32(&name("self_attn.k_norm"), &[d])?,
            o_proj: files.bf16(&name("self_attn.o_proj"), &[h, q_rows])?,
            gate_up,
            down: files.bf16(&name("mlp.down_proj"), &[h, i])?,
        });
        progress(l + 1, total);
    }

    let final_norm = files.f32("model.norm.weight", &[h])?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(files.bf16("lm_head.weight", &[v, h])?)
    };
    Ok(HostWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}
