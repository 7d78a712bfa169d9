//! The activation dump format shared by `qwen-cli verify --dump` and
//! `scripts/hf_dump.py`: one safetensors file, `activations.safetensors`,
//! whose tensors are named `{step}.{activation}` (`prefill.layers.0.qkv`,
//! `decode-1.logits`, ...) plus `{step}.tokens`, the token ids fed to that
//! forward step. Free-form facts (who wrote it, the prompt, whether tensor
//! cores ran) go in the header's `__metadata__`.
//!
//! The reader and writer are written here against the published format
//! (an 8-byte little-endian header length, a JSON header, then the raw
//! little-endian tensor bytes) because the file is small and this keeps the
//! CLI's dependencies to what it already links; `tests/cli_verify.rs`
//! checks our files with the `safetensors` crate itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use qwen_tensor::{bf16, f16, HostVec};

/// File name inside a `--dump DIR`.
pub const FILE_NAME: &str = "activations.safetensors";

/// Value of `__metadata__.format`, bumped if names or layouts ever change.
pub const FORMAT: &str = "qwen-activations/1";

/// One named tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub shape: Vec<usize>,
    pub data: HostVec,
}

/// A whole dump: tensors by name plus the header metadata.
#[derive(Debug, Default)]
pub struct Dump {
    pub tensors: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
}

/// `--against PATH` and `--dump DIR` accept a directory holding
/// [`FILE_NAME`] or the file itself.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_path_buf()
    }
}

fn dtype_name(v: &HostVec) -> &'static str {
    match v {
        HostVec::BF16(_) => "BF16",
        HostVec::F16(_) => "F16",
        HostVec::F32(_) => "F32",
        HostVec::U32(_) => "U32",
    }
}

fn host_len(v: &HostVec) -> usize {
    match v {
        HostVec::BF16(x) => x.len(),
        HostVec::F16(x) => x.len(),
        HostVec::F32(x) => x.len(),
        HostVec::U32(x) => x.len(),
    }
}

fn push_bytes(out: &mut Vec<u8>, v: &HostVec) {
    match v {
        HostVec::BF16(x) => x.iter().for_each(|e| out.extend(e.to_bits().to_le_bytes())),
        HostVec::F16(x) => x.iter().for_each(|e| out.extend(e.to_bits().to_le_bytes())),
        HostVec::F32(x) => x.iter().for_each(|e| out.extend(e.to_le_bytes())),
        HostVec::U32(x) => x.iter().for_each(|e| out.extend(e.to_le_bytes())),
    }
}

impl Dump {
    /// Serialises the dump to safetensors bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        if !self.metadata.is_empty() {
            let meta: serde_json::Map<String, serde_json::Value> = self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            header.insert("__metadata__".into(), meta.into());
        }
        let mut data = Vec::new();
        for (name, e) in &self.tensors {
            let begin = data.len();
            push_bytes(&mut data, &e.data);
            header.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": dtype_name(&e.data),
                    "shape": e.shape,
                    "data_offsets": [begin, data.len()],
                }),
            );
        }
        let mut head = serde_json::Value::Object(header).to_string().into_bytes();
        // Pad the header with spaces so the tensor data starts 8-byte
        // aligned, as the reference writer does (readers may then map it).
        head.resize(head.len().div_ceil(8) * 8, b' ');
        let mut out = Vec::with_capacity(8 + head.len() + data.len());
        out.extend((head.len() as u64).to_le_bytes());
        out.extend(head);
        out.extend(data);
        out
    }

    /// Writes the dump to `path`.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        std::fs::write(path, self.to_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Reads a dump written by [`Dump::write`] or by `safetensors` in
    /// Python. Every malformation is a one-line error naming the file.
    pub fn read(path: &Path) -> Result<Dump, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| format!("bad activation dump {}: {e}", path.display()))
    }

    /// Parses safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Dump, String> {
        if bytes.len() < 8 {
            return Err("too short to be a safetensors file".into());
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let data = bytes
            .get(8..)
            .and_then(|rest| Some((rest.get(..n)?, rest.get(n..)?)));
        let Some((head, data)) = data else {
            return Err(format!("header length {n} runs past the end of the file"));
        };
        let head: serde_json::Value =
            serde_json::from_slice(head).map_err(|e| format!("header is not valid JSON ({e})"))?;
        let serde_json::Value::Object(head) = head else {
            return Err("header is not a JSON object".into());
        };
        let mut dump = Dump::default();
        for (name, info) in head {
            if name == "__metadata__" {
                if let serde_json::Value::Object(m) = info {
                    for (k, v) in m {
                        let v = v.as_str().map(str::to_string).unwrap_or(v.to_string());
                        dump.metadata.insert(k, v);
                    }
                }
                continue;
            }
            let entry = parse_entry(&name, &info, data)?;
            dump.tensors.insert(name, entry);
        }
        Ok(dump)
    }
}

fn parse_entry(name: &str, info: &serde_json::Value, data: &[u8]) -> Result<Entry, String> {
    let bad = |what: &str| format!("tensor {name}: {what}");
    let dtype = info["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
    let shape: Vec<usize> = info["shape"]
        .as_array()
        .ok_or_else(|| bad("no shape"))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("shape is not a list of sizes"))?;
    let offs = info["data_offsets"]
        .as_array()
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
        .ok_or_else(|| bad("data_offsets is not [begin, end]"))?;
    let raw = data
        .get(offs.0..offs.1)
        .ok_or_else(|| bad("data_offsets lie outside the file"))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let size = match dtype {
        "BF16" | "F16" => 2,
        "F32" | "U32" | "I32" => 4,
        "I64" => 8,
        other => return Err(bad(&format!("unsupported dtype {other}"))),
    };
    if numel.checked_mul(size) != Some(raw.len()) {
        return Err(bad(&format!(
            "{} bytes do not hold shape {shape:?} of {dtype}",
            raw.len()
        )));
    }
    let u16s = || {
        raw.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    let u32s = || {
        raw.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    };
    let data = match dtype {
        "BF16" => HostVec::BF16(u16s().map(bf16::from_bits).collect()),
        "F16" => HostVec::F16(u16s().map(f16::from_bits).collect()),
        "F32" => HostVec::F32(u32s().map(f32::from_bits).collect()),
        "U32" => HostVec::U32(u32s().collect()),
        // Token ids from PyTorch come as signed integers; they are stored
        // as U32 here, and an id that does not fit is an error.
        "I32" => HostVec::U32(
            u32s()
                .map(|v| (v as i32).try_into().ok())
                .collect::<Option<_>>()
                .ok_or_else(|| bad("negative id"))?,
        ),
        _ => HostVec::U32(
            raw.chunks_exact(8)
                .map(|c| {
                    i64::from_le_bytes(c.try_into().expect("8 bytes"))
                        .try_into()
                        .ok()
                })
                .collect::<Option<_>>()
                .ok_or_else(|| bad("id outside 0..2^32"))?,
        ),
    };
    debug_assert_eq!(host_len(&data), numel);
    Ok(Entry { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut d = Dump::default();
        d.metadata.insert("source".into(), "qwen-rs".into());
        d.tensors.insert(
            "prefill.embed".into(),
            Entry {
                shape: vec![2, 2],
                data: HostVec::F32(vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE]),
            },
        );
        d.tensors.insert(
            "prefill.layers.0.q".into(),
            Entry {
                shape: vec![3],
                data: HostVec::BF16(vec![bf16::from_f32(1.5); 3]),
            },
        );
        d.tensors.insert(
            "prefill.tokens".into(),
            Entry {
                shape: vec![2],
                data: HostVec::U32(vec![7, 151_000]),
            },
        );
        let bytes = d.to_bytes();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "data is 8-byte aligned");
        let back = Dump::from_bytes(&bytes).unwrap();
        assert_eq!(back.tensors, d.tensors);
        assert_eq!(back.metadata, d.metadata);
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(Dump::from_bytes(b"abc").is_err());
        assert!(Dump::from_bytes(&100u64.to_le_bytes()).is_err());
        let mut b = 4u64.to_le_bytes().to_vec();
        b.extend(b"nope");
        assert!(Dump::from_bytes(&b).is_err());
        let head = br#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#;
        let mut b = (head.len() as u64).to_le_bytes().to_vec();
        b.extend(head);
        b.extend([0u8; 8]);
        let e = Dump::from_bytes(&b).unwrap_err();
        assert!(e.contains("tensor x"), "{e}");
        let head = br#"{"t":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut b = (head.len() as u64).to_le_bytes().to_vec();
        b.extend(head);
        b.extend(42i64.to_le_bytes());
        let d = Dump::from_bytes(&b).unwrap();
        assert_eq!(d.tensors["t"].data, HostVec::U32(vec![42]));
    }
}
