//! # qwen-kernels-cuda
//!
//! The CUDA backend of the Qwen3 engine. Every op returns the same bits as
//! its CPU twin in `qwen-kernels-cpu` (whose doc comments are the spec):
//! the kernels follow the same reduction orders, the same `exp`, IEEE sqrt
//! and division, and are compiled by NVRTC with `--fmad=false`.
//!
//! The driver and NVRTC are loaded at run time, so this crate builds and
//! links on machines without CUDA; [`CudaBackend::new`] then returns an
//! error instead of a GPU.
//!
//! ```
//! match qwen_kernels_cuda::CudaBackend::new(0) {
//!     Ok(gpu) => println!("running on {}", gpu.device_name()),
//!     Err(e) => println!("no GPU: {e}"),
//! }
//! ```

mod activation;
mod attention;
mod attention_tc;
mod compile;
mod device;
mod embedding;
mod gemm;
mod launch;
mod layer;
mod layer_tc;
mod matmul;
mod norm;
mod numerics;
mod rope;
mod sampling;
mod timing;
mod trace;
mod transfer;

pub use compile::cuda_include_dir;
pub use device::CudaStorage;

use qwen_tensor::{
    AttnGeometry, Backend, BatchMeta, DType, Error, HostSlice, HostVec, LayerActs, LayerInputs,
    LayerWeights, Result, SampleParams, Tensor,
};

use device::{dev, Device, T};

/// One GPU, with its compiled kernels and a stream all work is queued on.
pub struct CudaBackend {
    dev: Device,
    exact: bool,
    /// Leading rows of the coming projections that may use the tensor
    /// cores (`Backend::set_tensor_core_rows`).
    tc_rows: std::sync::atomic::AtomicUsize,
    /// Scratch tensors reused across calls (one per [`Scratch`] slot), so a
    /// decode step allocates nothing. One stream orders every use.
    scratch: std::sync::Mutex<Vec<Option<T>>>,
    /// Scratch tensors that graphs point into: kept for the backend's life,
    /// one per (slot, shape, dtype), so a replayed graph never reads freed memory.
    pinned: std::sync::Mutex<std::collections::HashMap<PinnedKey, T>>,
    /// Set while `capture` runs: scratch then comes from `pinned`.
    capturing: std::sync::atomic::AtomicBool,
    /// Page-locked buffers for `download_start` (transfer.rs).
    host_buffers: transfer::HostBuffers,
}

/// (scratch slot, shape, dtype) of a pinned scratch tensor.
type PinnedKey = (usize, Vec<usize>, DType);

/// A captured CUDA graph.
pub struct CudaGraphHandle(cudarc::driver::CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it
// are serialised; the model keeps its graphs behind a mutex and replays them
// on the backend's single stream.
unsafe impl Send for CudaGraphHandle {}

/// Slots of [`CudaBackend::with_scratch`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scratch {
    AttnPartials = 0,
    NormBf16 = 1,
    NormF32 = 2,
    SplitHi = 3,
    SplitLo = 4,
    ArgmaxValues = 5,
    ArgmaxIndices = 6,
    ArgmaxOut = 7,
    AttnDone = 8,
    GemmSplits = 9,
    TcSpans = 10,
    TcDone = 11,
    LayerSync = 12,
}

/// How many [`Scratch`] slots there are.
const SCRATCH_SLOTS: usize = 13;

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBackend({})", self.dev.name)
    }
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with a one-line error when there is no
    /// driver, no GPU, no NVRTC or no CUDA headers.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics when a library it loads lazily is missing; turn any
        // such panic into an error so callers can fall back to the CPU.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| device::open(ordinal));
        std::panic::set_hook(prev);
        match opened {
            Ok(r) => {
                let dev = r?;
                Ok(CudaBackend {
                    dev,
                    exact: false,
                    tc_rows: Default::default(),
                    scratch: std::sync::Mutex::new((0..SCRATCH_SLOTS).map(|_| None).collect()),
                    pinned: Default::default(),
                    capturing: Default::default(),
                    host_buffers: Default::default(),
                })
            }
            Err(_) => Err(Error::Unsupported(
                "the CUDA libraries could not be loaded".into(),
            )),
        }
    }

    /// `true`: every op returns exactly the CPU twin's bits, prompt rows
    /// included (no tensor cores). `false` (the default): the prompt rows
    /// announced by `Backend::set_tensor_core_rows` run on the tensor cores.
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
    }

    /// Whether the logits' hi/lo GEMM takes its wide tile (128 rows by 192
    /// columns, past 64 rows; on by default, `QWEN_CUDA_HILO_WIDE=0` at
    /// start turns it off) or 128 x 128: the same bits either way, to
    /// measure and test both.
    pub fn set_hilo_wide(&mut self, on: bool) {
        self.dev.hilo_wide = on;
    }

    /// Whether the tensor-core GEMMs run on Hopper's warpgroup MMA
    /// (gemm_wgmma.cu) rather than gemm.cu's mma.sync.
    pub fn has_wgmma(&self) -> bool {
        self.dev.wgmma
    }

    /// `true`: a batch-1 decode layer of a suitable shape (Qwen3-0.6B's)
    /// runs as one kernel (layer.cu, compiled on first use), with the same
    /// bits as the ops one by one. Off by default: it measures slower so
    /// far (BENCHMARKS.md); `QWEN_CUDA_LAYER_KERNEL=1` turns it on at start.
    /// Its grid barriers need every block resident at once, one per SM:
    /// a GPU shared with other processes' kernels could stall it.
    pub fn set_layer_kernel(&mut self, on: bool) -> Result<()> {
        if on {
            self.dev.enable_layer_kernel()
        } else {
            self.dev.layer_kernel = false;
            Ok(())
        }
    }

    /// Runs `f` on the scratch tensor of `slot`, reallocated only when the
    /// shape or dtype asked for changes; while a graph is being captured, on
    /// a pinned one that lives as long as the backend. Its contents are
    /// whatever the last user left.
    pub(crate) fn with_scratch<R>(
        &self,
        slot: Scratch,
        shape: &[usize],
        dtype: DType,
        f: impl FnOnce(&mut T) -> Result<R>,
    ) -> Result<R> {
        fn poisoned<E>(_: E) -> Error {
            Error::Device("scratch lock poisoned".into())
        }
        // The tensor is taken out while `f` runs (so `f` may use other
        // slots) and put back afterwards; its device memory never moves.
        if self.capturing.load(std::sync::atomic::Ordering::Relaxed) {
            let key = (slot as usize, shape.to_vec(), dtype);
            let taken = self.pinned.lock().map_err(poisoned)?.remove(&key);
            let mut t = match taken {
                Some(t) => t,
                None => self.zeros(shape, dtype)?,
            };
            let r = f(&mut t);
            self.pinned.lock().map_err(poisoned)?.insert(key, t);
            return r;
        }
        let taken = self.scratch.lock().map_err(poisoned)?[slot as usize].take();
        let mut t = match taken {
            Some(t) if t.shape() == shape && t.dtype() == dtype => t,
            _ => self.zeros(shape, dtype)?,
        };
        let r = f(&mut t);
        self.scratch.lock().map_err(poisoned)?[slot as usize] = Some(t);
        r
    }

    /// How many of a projection's `tokens` leading rows run on the tensor
    /// cores: the prompt rows the model announced, none in exact mode.
    pub(crate) fn tensor_core_rows(&self, tokens: usize) -> usize {
        if self.exact {
            return 0;
        }
        tokens.min(self.tc_rows.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The GPU's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.dev.ctx.mem_get_info().map_err(dev)
    }
}

macro_rules! alloc_zeros {
    ($s:expr, $ty:ty, $n:expr) => {
        $s.alloc_zeros::<$ty>($n).map_err(dev)?
    };
}

impl Backend for CudaBackend {
    type Storage = CudaStorage;
    type Graph = CudaGraphHandle;

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<CudaGraphHandle>> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        use std::sync::atomic::Ordering::Relaxed;
        self.capturing.store(true, Relaxed);
        // The eager run allocates every scratch tensor the ops need (pinned),
        // so the recorded run allocates nothing.
        let eager = f();
        if let Err(e) = eager {
            self.capturing.store(false, Relaxed);
            return Err(e);
        }
        let s = &self.dev.stream;
        if let Err(e) = s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            self.capturing.store(false, Relaxed);
            return Err(dev(e));
        }
        let recorded = f();
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        self.capturing.store(false, Relaxed);
        recorded?;
        Ok(graph.map_err(dev)?.map(CudaGraphHandle))
    }

    fn replay(&self, graph: &CudaGraphHandle) -> Result<()> {
        graph.0.launch().map_err(dev)
    }

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn set_tensor_core_rows(&self, rows: usize) {
        self.tc_rows
            .store(rows, std::sync::atomic::Ordering::Relaxed);
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n: usize = shape.iter().product::<usize>().max(1);
        let s = &self.dev.stream;
        let st = match dtype {
            DType::BF16 => CudaStorage::BF16(alloc_zeros!(s, half::bf16, n)),
            DType::F16 => CudaStorage::F16(alloc_zeros!(s, half::f16, n)),
            DType::F32 => CudaStorage::F32(alloc_zeros!(s, f32, n)),
            DType::U32 => CudaStorage::U32(alloc_zeros!(s, u32, n)),
        };
        Ok(Tensor::from_parts(st, shape.to_vec(), dtype))
    }

    fn empty(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n: usize = shape.iter().product::<usize>().max(1);
        let s = &self.dev.stream;
        // SAFETY: uninitialised device memory is no hazard to the host: the
        // tensor's contents are unspecified by contract until an op writes
        // them, and reading them on the device yields arbitrary bits, not UB.
        let st = unsafe {
            match dtype {
                DType::BF16 => CudaStorage::BF16(s.alloc::<half::bf16>(n).map_err(dev)?),
                DType::F16 => CudaStorage::F16(s.alloc::<half::f16>(n).map_err(dev)?),
                DType::F32 => CudaStorage::F32(s.alloc::<f32>(n).map_err(dev)?),
                DType::U32 => CudaStorage::U32(s.alloc::<u32>(n).map_err(dev)?),
            }
        };
        Ok(Tensor::from_parts(st, shape.to_vec(), dtype))
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} elements for shape {:?}", data.len(), shape),
            });
        }
        if n == 0 {
            return self.zeros(shape, data.dtype());
        }
        let s = &self.dev.stream;
        let st = match data {
            HostSlice::BF16(v) => CudaStorage::BF16(s.clone_htod(v).map_err(dev)?),
            HostSlice::F16(v) => CudaStorage::F16(s.clone_htod(v).map_err(dev)?),
            HostSlice::F32(v) => CudaStorage::F32(s.clone_htod(v).map_err(dev)?),
            HostSlice::U32(v) => CudaStorage::U32(s.clone_htod(v).map_err(dev)?),
        };
        Ok(Tensor::from_parts(st, shape.to_vec(), data.dtype()))
    }

    fn write(&self, dst: &mut T, data: HostSlice<'_>) -> Result<()> {
        if dst.dtype() != data.dtype() || dst.numel() != data.len() {
            return Err(Error::Shape {
                op: "write",
                msg: format!(
                    "{:?} x {} into {:?} {:?}",
                    data.dtype(),
                    data.len(),
                    dst.dtype(),
                    dst.shape()
                ),
            });
        }
        let s = &self.dev.stream;
        match (dst.storage_mut(), data) {
            (CudaStorage::BF16(d), HostSlice::BF16(v)) => s.memcpy_htod(v, d),
            (CudaStorage::F16(d), HostSlice::F16(v)) => s.memcpy_htod(v, d),
            (CudaStorage::F32(d), HostSlice::F32(v)) => s.memcpy_htod(v, d),
            (CudaStorage::U32(d), HostSlice::U32(v)) => s.memcpy_htod(v, d),
            _ => unreachable!("dtypes checked above"),
        }
        .map_err(dev)
    }

    fn write_many(&self, writes: &mut [(&mut T, HostSlice<'_>)]) -> Result<()> {
        self.write_many_impl(writes)
    }

    fn download(&self, t: &T) -> Result<HostVec> {
        let s = &self.dev.stream;
        let n = t.numel();
        Ok(match t.storage() {
            CudaStorage::BF16(v) => HostVec::BF16(s.clone_dtoh(v).map_err(dev)?[..n].to_vec()),
            CudaStorage::F16(v) => HostVec::F16(s.clone_dtoh(v).map_err(dev)?[..n].to_vec()),
            CudaStorage::F32(v) => HostVec::F32(s.clone_dtoh(v).map_err(dev)?[..n].to_vec()),
            CudaStorage::U32(v) => HostVec::U32(s.clone_dtoh(v).map_err(dev)?[..n].to_vec()),
        })
    }

    fn download_start(&self, t: &T) -> Result<qwen_tensor::Download> {
        self.download_start_impl(t)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.stream.synchronize().map_err(dev)
    }

    fn embedding(&self, table: &T, ids: &T, out: &mut T) -> Result<()> {
        self.embedding_impl(table, ids, out)
    }

    fn rms_norm(&self, x: &T, w: &T, eps: f32, out: &mut T) -> Result<()> {
        qwen_tensor::expect_dtype("rms_norm", "out", out, DType::BF16)?;
        self.rms_norm_impl(x, w, eps, out)
    }

    fn matmul(&self, x: &T, w: &T, out: &mut T) -> Result<()> {
        qwen_tensor::expect_dtype("matmul", "x", x, DType::BF16)?;
        self.project("matmul", x, w, out, false)
    }

    fn matmul_add(&self, x: &T, w: &T, acc: &mut T) -> Result<()> {
        qwen_tensor::expect_dtype("matmul_add", "x", x, DType::BF16)?;
        self.project("matmul_add", x, w, acc, true)
    }

    fn rms_norm_matmul(&self, x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
        self.norm_project(x, norm_w, eps, w, out, DType::BF16)
    }

    fn rms_norm_matmul_silu(
        &self,
        x: &T,
        norm_w: &T,
        eps: f32,
        w: &T,
        gate_up: &mut T,
        out: &mut T,
    ) -> Result<()> {
        self.norm_project_silu(x, norm_w, eps, w, gate_up, out)
    }

    fn logits(&self, x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
        if self.tensor_core_rows(x.shape().first().copied().unwrap_or(0)) > 0 {
            return self.logits_tensor_cores(x, norm_w, eps, w, out);
        }
        self.norm_project(x, norm_w, eps, w, out, DType::F32)
    }

    fn qk_norm_rope_store(
        &self,
        qkv: &T,
        q_norm: &T,
        k_norm: &T,
        eps: f32,
        rope: &T,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        q_out: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
    ) -> Result<()> {
        self.qk_norm_rope_store_impl(
            qkv, q_norm, k_norm, eps, rope, meta, geo, q_out, k_cache, v_cache,
        )
    }

    fn attention(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut T,
    ) -> Result<()> {
        self.attention_impl(q, k_cache, v_cache, meta, geo, scale, out)
    }

    fn qk_norm_rope_attention(
        &self,
        qkv: &T,
        q_norm: &T,
        k_norm: &T,
        eps: f32,
        rope: &T,
        meta: &BatchMeta<Self>,
        geo: AttnGeometry,
        scale: f32,
        q_out: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        out: &mut T,
    ) -> Result<()> {
        let r = attention::RopeArgs {
            qkv,
            q_norm,
            k_norm,
            eps,
            rope,
        };
        self.rope_attention_impl(r, meta, geo, scale, q_out, k_cache, v_cache, out)
    }

    fn decoder_layer(
        &self,
        w: &LayerWeights<'_, Self>,
        inp: LayerInputs<'_, Self>,
        x: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
        acts: LayerActs<'_, Self>,
    ) -> Result<()> {
        self.decoder_layer_impl(w, inp, x, k_cache, v_cache, acts)
    }

    fn silu_mul(&self, gate_up: &T, out: &mut T) -> Result<()> {
        self.silu_mul_impl(gate_up, out)
    }

    fn gather_rows(&self, src: &T, rows: &T, out: &mut T) -> Result<()> {
        self.gather_rows_impl(src, rows, out)
    }

    fn feed_ids(&self, tokens: &T, feed: &[(usize, usize)], ids: &mut T) -> Result<()> {
        self.feed_ids_impl(tokens, feed, ids)
    }

    fn argmax(&self, logits: &T) -> Result<Vec<u32>> {
        self.argmax_impl(logits)
    }

    fn argmax_to(&self, logits: &T, out: &mut T) -> Result<()> {
        self.argmax_to_impl(logits, out)
    }

    fn repetition_penalty(
        &self,
        logits: &mut T,
        penalty: &[f32],
        history: &[Vec<u32>],
    ) -> Result<()> {
        self.repetition_penalty_impl(logits, penalty, history)
    }

    fn sample(&self, logits: &T, params: &[SampleParams], uniform: &[f32]) -> Result<Vec<u32>> {
        self.sample_impl(logits, params, uniform)
    }

    fn sample_to(
        &self,
        logits: &T,
        params: &[SampleParams],
        uniform: &[f32],
        out: &mut T,
    ) -> Result<()> {
        self.sample_to_impl(logits, params, uniform, out)
    }
}
