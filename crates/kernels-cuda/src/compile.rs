//! Kernel compilation: NVRTC at first use for the device's architecture,
//! cached on disk by a hash of the source, architecture, options and NVRTC
//! version, so a second start compiles nothing.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx};
use qwen_tensor::{Error, Result};

/// The shared headers, prepended to every module.
const NUMERICS: &str = include_str!("numerics.cuh");
const DEPENDENT_LAUNCH: &str = include_str!("dependent_launch.cuh");
const ASYNC_COPY: &str = include_str!("async_copy.cuh");
const TENSOR_CORE: &str = include_str!("tensor_core.cuh");

/// Options every kernel is compiled with: no FMA contraction, IEEE division
/// and sqrt, denormals kept, exactly as the CPU spec computes.
fn options(arch: &str, include: &Path) -> CompileOptions {
    CompileOptions {
        ftz: Some(false),
        prec_sqrt: Some(true),
        prec_div: Some(true),
        fmad: Some(false),
        use_fast_math: Some(false),
        include_paths: vec![include.display().to_string()],
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    }
}

/// Finds the CUDA include directory holding `cuda_bf16.h`: `$CUDA_HOME`,
/// `$CUDA_PATH`, then `/usr/local/cuda`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let mut tried = Vec::new();
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .chain([PathBuf::from("/usr/local/cuda")]);
    for root in roots {
        let inc = root.join("include");
        if inc.join("cuda_bf16.h").is_file() {
            return Ok(inc);
        }
        tried.push(inc.display().to_string());
    }
    Err(Error::Device(format!(
        "cannot find cuda_bf16.h (looked in {}); set CUDA_HOME to the CUDA toolkit",
        tried.join(", ")
    )))
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change
/// between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("QWEN_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("qwen-rs").join("kernels"))
}

fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion only writes the two ints we pass; the library was
    // found present before any kernel is compiled (see `device::open`).
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    format!("{major}.{minor}")
}

/// Compiles (or loads from the cache) one kernel module's PTX.
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Ptx> {
    let include = cuda_include_dir()?;
    let trace = crate::trace::define();
    let full = format!("{trace}{NUMERICS}\n{DEPENDENT_LAUNCH}\n{ASYNC_COPY}\n{TENSOR_CORE}\n{src}");
    let opts = format!("{:?}", options(arch, Path::new("")).options);
    let key = fnv1a(&[
        full.as_bytes(),
        arch.as_bytes(),
        opts.as_bytes(),
        nvrtc_version().as_bytes(),
    ]);
    let cached = cache_dir().map(|d| d.join(format!("{name}-{key:016x}.ptx")));
    if let Some(path) = &cached {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Ok(Ptx::from_src(text));
        }
    }
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&full, options(arch, &include))
        .map_err(|e| Error::Device(format!("NVRTC failed on {name}.cu: {e}")))?;
    if let Some(path) = &cached {
        // A cache we cannot write only costs a recompile next time.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_are_stable_and_sensitive() {
        assert_eq!(fnv1a(&[b"abc"]), fnv1a(&[b"abc"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"sm_90"]), fnv1a(&[b"sm_80"]));
    }
}
