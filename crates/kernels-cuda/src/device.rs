//! Opening a GPU, device memory behind a CUDA tensor, and typed access to it.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError};
use half::{bf16, f16};
use qwen_tensor::{DType, Error, Result, Tensor};

use crate::trace::Trace;
use crate::{compile, CudaBackend};

/// A CUDA tensor's buffer.
#[derive(Debug, Clone)]
pub enum CudaStorage {
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
    F32(CudaSlice<f32>),
    U32(CudaSlice<u32>),
}

pub(crate) type T = Tensor<CudaBackend>;

/// Every kernel module: (name, source files in order, kernels it defines).
/// A module of several files uses the device functions of the ones before.
const MODULES: &[(&str, &[&str], &[&str])] = &[
    (
        "embedding",
        &[include_str!("embedding.cu")],
        &["embedding", "gather_rows", "feed_ids", "feed_ids_few"],
    ),
    (
        "norm",
        &[include_str!("norm.cu")],
        &[
            "rms_norm_bf16",
            "rms_norm_f32",
            "rms_norm_warp_bf16",
            "rms_norm_warp_f32",
            "splits_add_rms_norm_warp_bf16",
        ],
    ),
    (
        "matmul",
        &[include_str!("matmul.cu")],
        &[
            "matmul_bf16",
            "matmul_bf16_t1",
            "matmul_bf16_t1_deep",
            "matmul_f32x",
            "matmul_f32x_t1",
            "matmul_silu_t1",
            "matmul_silu_ring_t1",
            "matmul_bf16_tiled",
            "matmul_f32x_tiled",
            "split_hi_lo",
        ],
    ),
    (
        "gemm",
        &[include_str!("gemm.cu")],
        &[
            "gemm_tc",
            "gemm_tc_n64",
            "gemm_tc_n32",
            "gemm_tc_m128",
            "gemm_splits_sum",
        ],
    ),
    ("rope", &[include_str!("rope.cu")], &["qk_norm_rope_store"]),
    (
        "transfer",
        &[include_str!("transfer.cu")],
        &["set_words", "download_u32"],
    ),
    (
        "attention",
        &[include_str!("attention.cu")],
        &[
            "attn_chunk",
            "attn_rope_chunk",
            "attn_rope_chunk_g2",
            "attn_rope_cluster",
            "attn_rope_cluster_g2",
            "attn_rope_cluster_g4",
            "attn_rope_chunk_g4",
            "attn_tile",
            "attn_span",
        ],
    ),
    (
        "attention_tc",
        &[include_str!("rope.cu"), include_str!("attention_tc.cu")],
        crate::attention_tc::KERNELS,
    ),
    (
        "activation",
        &[include_str!("activation.cu")],
        &["silu_mul"],
    ),
    (
        "numerics",
        &[include_str!("numerics.cu")],
        &["numerics_exp"],
    ),
    (
        "sampling",
        &[include_str!("sampling.cu")],
        &[
            "argmax_slices",
            "argmax_finish",
            "repetition_penalty",
            "sample_rows",
            "sample_slices",
            "sample_merge",
            "draw_slice_max",
            "draw_slice_sum",
            "draw_finish",
        ],
    ),
];

/// The opt-in one-kernel decoder layer, compiled and loaded only when
/// asked for (`CudaBackend::set_layer_kernel`): it carries norm.cu and
/// attention.cu again, whose device functions it calls.
const LAYER_MODULE: (&str, &[&str], &[&str]) = (
    "layer",
    &[
        include_str!("norm.cu"),
        include_str!("attention.cu"),
        include_str!("layer.cu"),
    ],
    &["decoder_layer_t1"],
);

/// The tensor-core GEMM on Hopper's warpgroup MMA, compiled for sm_90a
/// (the architecture's own features) and loaded on compute capability 9.0
/// only; every other device takes gemm.cu's kernels. rope.cu comes first:
/// the QKV projection with RoPE in its epilogue uses its device functions.
const WGMMA_MODULE: (&str, &[&str], &[&str]) = (
    "gemm_wgmma",
    &[include_str!("rope.cu"), include_str!("gemm_wgmma.cu")],
    WGMMA_KERNELS,
);
const WGMMA_KERNELS: &[&str] = &[
    "gemm_wg_n64",
    "gemm_wg_n128",
    "gemm_wg_n256",
    "gemm_wg_n64_deep",
    "gemm_wg_n64_s6",
    "gemm_wg_n128_deep",
    "gemm_wg_m128_n256",
    "gemm_wg_m128_n128_shares",
    "gemm_wg_m128_n256_rope_d128",
    "gemm_wg_silu",
    "gemm_wg_silu_m128",
    "gemm_wg_silu_deep",
    "gemm_wg_silu_s6",
    "gemm_wg_silu_m128_n64",
    "gemm_wg_hilo",
    "gemm_wg_hilo_m128",
    "gemm_wg_hilo_m128_n192",
];

/// Kernels whose dynamic shared memory grows with the shape (a norm row in
/// f32, an attention chunk's keys and values) and may pass 48 KB; so do
/// all of attention_tc.cu's and gemm_wgmma.cu's.
const LARGE_DYNAMIC_SMEM: &[&str] = &[
    "rms_norm_bf16",
    "rms_norm_f32",
    "attn_chunk",
    "attn_rope_chunk",
    "attn_rope_chunk_g2",
    "attn_rope_cluster",
    "attn_rope_cluster_g2",
    "attn_rope_cluster_g4",
    "attn_rope_chunk_g4",
    "attn_tile",
    "attn_span",
    "gemm_tc",
    "gemm_tc_n64",
    "gemm_tc_n32",
    "gemm_tc_m128",
    "decoder_layer_t1",
];

/// Above 48 KB a kernel must opt in to dynamic shared memory; done once at
/// load, up to what the device allows a block beside the kernel's static
/// shared memory. A launch asking for more still fails, with the driver's error.
fn allow_all_dynamic_smem(f: &CudaFunction, optin: i32) -> Result<()> {
    let fixed = f
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .map_err(dev)?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        optin - fixed,
    )
    .map_err(dev)
}

pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub kernels: HashMap<&'static str, CudaFunction>,
    pub name: String,
    /// The architecture kernels are compiled for, e.g. "sm_90".
    pub arch: String,
    /// Whether kernels go out with programmatic dependent launch.
    pub dependent_launch: bool,
    /// The most blocks attn_rope_cluster may take as one cluster: 16 (the
    /// non-portable size Hopper allows, opted in at load), 0 without
    /// clusters (before compute capability 9.0, or `QWEN_CUDA_CLUSTERS=0`).
    pub max_cluster: usize,
    /// Shared memory a block may have, static and dynamic together.
    pub smem_optin: usize,
    /// Streaming multiprocessors: the grid of a kernel that keeps one
    /// block on each (layer.cu).
    pub sm_count: usize,
    /// Whether a batch-1 decode layer may run as one kernel (layer.rs; its
    /// module is then loaded): off unless `QWEN_CUDA_LAYER_KERNEL=1` or
    /// `set_layer_kernel` (it measures slower than the kernels one by one;
    /// BENCHMARKS.md).
    pub layer_kernel: bool,
    /// Whether tensor-core GEMMs take gemm_wgmma.cu (Hopper) rather than
    /// gemm.cu: one or the other for every batch, never a mix.
    pub wgmma: bool,
    /// Whether decode batches on the tensor cores make q/k-norm and RoPE
    /// inside the attention kernel (attn_tc_rope): on unless
    /// `QWEN_CUDA_TC_ROPE=0`, to measure what it gains.
    pub tc_rope: bool,
    /// Whether a prompt step's QKV projection makes q/k-norm, RoPE and the
    /// cache store in its epilogue (gemm_wg_m128_n256_rope_d128): on unless
    /// `QWEN_CUDA_QKV_ROPE=0`, to measure what it gains.
    pub qkv_rope: bool,
    /// Whether the logits' hi/lo GEMM takes its wide tiles (gemm.rs): on
    /// unless `QWEN_CUDA_HILO_WIDE=0`, to measure them (the same bits).
    pub hilo_wide: bool,
    /// The kernel trace (`QWEN_CUDA_TRACE`), written out on drop.
    trace: Option<Trace>,
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(t) = &self.trace {
            if let Err(e) = t.write(&self.stream) {
                eprintln!("QWEN_CUDA_TRACE: {e}");
            }
        }
    }
}

/// Maps a driver error to ours, keeping out-of-memory distinct.
pub(crate) fn dev(e: DriverError) -> Error {
    if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(e.to_string())
    } else {
        Error::Device(e.to_string())
    }
}

/// Opens GPU `ordinal`, compiling (or loading cached) kernels.
pub(crate) fn open(ordinal: usize) -> Result<Device> {
    // SAFETY: only probes whether the shared libraries can be loaded.
    let (driver, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(Error::Unsupported(
            "no CUDA driver found (libcuda could not be loaded)".into(),
        ));
    }
    if !nvrtc {
        return Err(Error::Unsupported(
            "CUDA driver found but NVRTC (libnvrtc) could not be loaded".into(),
        ));
    }
    let count = CudaContext::device_count().map_err(dev)?;
    if ordinal as i32 >= count {
        return Err(Error::Unsupported(format!(
            "no CUDA GPU {ordinal} ({count} found)"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(dev)?;
    // SAFETY: we order all work on one stream ourselves; cudarc's per-argument
    // event tracking only adds overhead to every launch (a known decode slowdown).
    unsafe { ctx.disable_event_tracking() };
    // A stream of our own: the legacy default stream cannot be captured into graphs.
    let stream = ctx.new_stream().map_err(dev)?;
    let (major, minor) = ctx.compute_capability().map_err(dev)?;
    let arch = format!("sm_{major}{minor}");
    let smem_optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(dev)?;
    let mut kernels = HashMap::new();
    let sm_count = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(dev)?;
    let trace = Trace::from_env(&stream)?;
    for m in MODULES {
        load_module(
            &ctx,
            &stream,
            *m,
            &arch,
            smem_optin,
            trace.as_ref(),
            &mut kernels,
        )?;
    }
    // `QWEN_CUDA_WGMMA=0` keeps gemm.cu's kernels on Hopper too (to compare).
    let wgmma = arch == "sm_90" && std::env::var("QWEN_CUDA_WGMMA").map_or(true, |v| v != "0");
    if wgmma {
        load_module(
            &ctx,
            &stream,
            WGMMA_MODULE,
            "sm_90a",
            smem_optin,
            trace.as_ref(),
            &mut kernels,
        )?;
    }
    let name = ctx.name().map_err(dev)?;
    let mut d = Device {
        ctx,
        stream,
        kernels,
        name,
        arch,
        dependent_launch: dependent_launch(major),
        max_cluster: if clusters(major) {
            NON_PORTABLE_CLUSTER
        } else {
            0
        },
        smem_optin: smem_optin.max(0) as usize,
        sm_count: sm_count.max(0) as usize,
        layer_kernel: false,
        wgmma,
        tc_rope: std::env::var("QWEN_CUDA_TC_ROPE").map_or(true, |v| v != "0"),
        qkv_rope: std::env::var("QWEN_CUDA_QKV_ROPE").map_or(true, |v| v != "0"),
        hilo_wide: std::env::var("QWEN_CUDA_HILO_WIDE").map_or(true, |v| v != "0"),
        trace,
    };
    if std::env::var("QWEN_CUDA_LAYER_KERNEL").is_ok_and(|v| v == "1") {
        d.enable_layer_kernel()?;
    }
    Ok(d)
}

/// Compiles (or takes from the cache) one module, adds its kernels, and
/// hands the module the kernel trace's buffer when there is one.
fn load_module(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    (file, parts, names): (&str, &[&str], &[&'static str]),
    arch: &str,
    smem_optin: i32,
    trace: Option<&Trace>,
    kernels: &mut HashMap<&'static str, CudaFunction>,
) -> Result<()> {
    let ptx = compile::compile(file, &parts.concat(), arch)?;
    let module = ctx.load_module(ptx).map_err(dev)?;
    for &n in names.iter() {
        let f = module.load_function(n).map_err(dev)?;
        if LARGE_DYNAMIC_SMEM.contains(&n)
            || crate::attention_tc::KERNELS.contains(&n)
            || WGMMA_KERNELS.contains(&n)
        {
            allow_all_dynamic_smem(&f, smem_optin)?;
        }
        if CLUSTER_KERNELS.contains(&n) && clusters(arch_major(arch)) {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .map_err(dev)?;
        }
        kernels.insert(n, f);
    }
    if let Some(t) = trace {
        t.attach(&module, stream)?;
    }
    Ok(())
}

impl Device {
    /// Loads the one-kernel layer (once) and lets layer.rs use it.
    pub(crate) fn enable_layer_kernel(&mut self) -> Result<()> {
        if !self.kernels.contains_key("decoder_layer_t1") {
            let optin = i32::try_from(self.smem_optin).unwrap_or(i32::MAX);
            load_module(
                &self.ctx,
                &self.stream,
                LAYER_MODULE,
                &self.arch,
                optin,
                self.trace.as_ref(),
                &mut self.kernels,
            )?;
        }
        self.layer_kernel = true;
        Ok(())
    }
}

/// The compute capability's major number of an `sm_XY` arch name.
fn arch_major(arch: &str) -> i32 {
    arch.trim_start_matches("sm_")
        .parse::<i32>()
        .map_or(0, |v| v / 10)
}

/// Kernels launched as thread block clusters of up to NON_PORTABLE_CLUSTER blocks.
const CLUSTER_KERNELS: &[&str] = &[
    "attn_rope_cluster",
    "attn_rope_cluster_g2",
    "attn_rope_cluster_g4",
];
const NON_PORTABLE_CLUSTER: usize = 16;

/// Thread block clusters need compute capability 9.0 (Hopper);
/// `QWEN_CUDA_CLUSTERS=0` turns them off, to measure what they gain.
fn clusters(major: i32) -> bool {
    major >= 9 && std::env::var("QWEN_CUDA_CLUSTERS").map_or(true, |v| v != "0")
}

/// Programmatic dependent launch needs compute capability 9.0 (Hopper);
/// `QWEN_CUDA_DEPENDENT_LAUNCH=0` turns it off, to measure what it gains
/// or to rule it out when chasing a fault.
fn dependent_launch(major: i32) -> bool {
    major >= 9 && std::env::var("QWEN_CUDA_DEPENDENT_LAUNCH").map_or(true, |v| v != "0")
}

fn wrong(op: &'static str, arg: &'static str, want: DType, t: &T) -> Error {
    Error::DType {
        op,
        arg,
        expected: want,
        got: t.dtype(),
    }
}

macro_rules! accessor {
    ($name:ident, $name_mut:ident, $variant:ident, $ty:ty, $dt:expr) => {
        pub(crate) fn $name<'a>(
            op: &'static str,
            arg: &'static str,
            t: &'a T,
        ) -> Result<&'a CudaSlice<$ty>> {
            match t.storage() {
                CudaStorage::$variant(v) => Ok(v),
                _ => Err(wrong(op, arg, $dt, t)),
            }
        }
        #[allow(dead_code)]
        pub(crate) fn $name_mut<'a>(
            op: &'static str,
            arg: &'static str,
            t: &'a mut T,
        ) -> Result<&'a mut CudaSlice<$ty>> {
            let e = wrong(op, arg, $dt, t);
            match t.storage_mut() {
                CudaStorage::$variant(v) => Ok(v),
                _ => Err(e),
            }
        }
    };
}

accessor!(f32s, f32s_mut, F32, f32, DType::F32);
accessor!(bf16s, bf16s_mut, BF16, bf16, DType::BF16);
accessor!(u32s, u32s_mut, U32, u32, DType::U32);
