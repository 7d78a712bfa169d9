//! Shared setup for the kernel benchmarks in `benches/benches/`: the real
//! Qwen3 shapes, random inputs, the byte and FLOP accounting behind every
//! throughput figure, backend selection, device-side timing, and the
//! one-line summaries printed after each benchmark.
//!
//! Every bench binary is one op family written once, generically:
//!
//! ```text
//! fn run<B: Timed>(h: &mut Harness, dev: &Device<B>) {
//!     let x = dev.bf16(&[64, 1024], 1.0);
//!     // ...
//!     h.bench(dev, "matmul", "0.6B/qkv/T64", work, |i| dev.backend.matmul(&x, &w, &mut out));
//! }
//! qwen_benches::bench_main!(run);
//! ```
//!
//! Environment:
//! - `QWEN_BENCH_QUICK=1`: much shorter warm-up and measurement (a smoke run).
//! - `QWEN_BENCH_BACKENDS=cpu,cuda`: which backends to run (default both;
//!   CUDA only where `CudaBackend::new(0)` succeeds).
//! - `QWEN_BENCH_MAX_ITER_S=3`: benchmarks whose first iteration takes longer
//!   are skipped, with a message (the CPU's 8B batch-64 projections).
//! - `QWEN_BENCH_CUDA_EXACT=1`: bench the bit-exact CUDA matmul kernels
//!   even where a bench announces prompt rows (the tensor-core path).

use std::cell::{RefCell, RefMut};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use qwen_kernels_cpu::CpuBackend;
use qwen_kernels_cuda::CudaBackend;
use qwen_tensor::{
    bf16, AttnGeometry, Backend, BatchLayout, BatchMeta, DType, HostSlice, Result, Tensor,
};

// ---- shapes ---------------------------------------------------------------

/// The shapes of one Qwen3 model that the kernels see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Model {
    /// Short name used in benchmark ids ("0.6B", "8B").
    pub name: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

/// Qwen3-0.6B, as in its config.json.
pub const QWEN3_0_6B: Model = Model {
    name: "0.6B",
    hidden: 1024,
    intermediate: 3072,
    q_heads: 16,
    kv_heads: 8,
    head_dim: 128,
    vocab: 151_936,
};

/// Qwen3-8B, as in its config.json.
pub const QWEN3_8B: Model = Model {
    name: "8B",
    hidden: 4096,
    intermediate: 12_288,
    q_heads: 32,
    kv_heads: 8,
    head_dim: 128,
    vocab: 151_936,
};

pub const MODELS: [Model; 2] = [QWEN3_0_6B, QWEN3_8B];

/// Tokens per batch: one decode step, and a 64-token batch (64 decoding
/// sequences, or a prefill chunk).
pub const TOKENS: [usize; 2] = [1, 64];

/// KV-cache positions per block, as `model_qwen3::DEFAULT_BLOCK_SIZE`.
pub const BLOCK_SIZE: usize = 16;

/// Qwen3's rms_norm_eps.
pub const EPS: f32 = 1e-6;

/// How the model calls a projection, besides as a plain matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fused {
    /// RMSNorm fused in front (`rms_norm_matmul`): QKV and gate_up.
    NormIn,
    /// Residual add fused behind (`matmul_add`): o_proj and down.
    AddOut,
    /// The final norm and the vocabulary projection (`logits`).
    Logits,
}

/// One weight matrix `w` bf16 `[n, k]` of a layer (or the LM head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projection {
    pub name: &'static str,
    pub k: usize,
    pub n: usize,
    pub fused: Fused,
}

impl Model {
    pub fn geometry(&self) -> AttnGeometry {
        AttnGeometry {
            num_q_heads: self.q_heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: BLOCK_SIZE,
        }
    }

    /// Every projection of a forward pass, in order.
    pub fn projections(&self) -> [Projection; 5] {
        let geo = self.geometry();
        let p = |name, k, n, fused| Projection { name, k, n, fused };
        [
            p("qkv", self.hidden, geo.qkv_width(), Fused::NormIn),
            // K is q_heads * head_dim, which is not the hidden size on 0.6B.
            p("o_proj", geo.q_width(), self.hidden, Fused::AddOut),
            p("gate_up", self.hidden, 2 * self.intermediate, Fused::NormIn),
            p("down", self.intermediate, self.hidden, Fused::AddOut),
            p("lm_head", self.hidden, self.vocab, Fused::Logits),
        ]
    }
}

// ---- accounting ---------------------------------------------------------------

/// What one call of an op must move and compute: each input read once and
/// each output written once (scratch buffers an implementation adds are not
/// counted, so they show as a lower fraction of the bandwidth floor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub bytes: u64,
    pub flops: u64,
}

impl Work {
    pub fn new() -> Self {
        Self::default()
    }
    /// `elems` elements of `dtype` read.
    pub fn read(mut self, elems: usize, dtype: DType) -> Self {
        self.bytes += (elems * dtype.size()) as u64;
        self
    }
    /// `elems` elements of `dtype` written.
    pub fn write(self, elems: usize, dtype: DType) -> Self {
        // Same count: a write moves its bytes once, like a read.
        self.read(elems, dtype)
    }
    /// Floating-point operations (a multiply-add counts 2).
    pub fn flops(mut self, flops: usize) -> Self {
        self.flops += flops as u64;
        self
    }
    /// `x · wᵀ` with x `[t, k]`, w bf16 `[n, k]`: 2·t·k·n flops, w read once.
    pub fn gemm(self, t: usize, k: usize, n: usize) -> Self {
        self.read(n * k, DType::BF16).flops(2 * t * k * n)
    }
}

// ---- random inputs ---------------------------------------------------------------

/// xorshift64*: fast, and reproducible from a fixed seed so runs compare.
#[derive(Debug, Clone)]
pub struct Rng(u64);

/// Large inputs repeat a random block of this many values: generating a
/// 1.2 GB LM head value by value would dominate setup, and timing does not
/// depend on the values repeating.
const RANDOM_BLOCK: usize = 1 << 20;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// Roughly normal (a sum of four uniforms), standard deviation ≈ `scale`.
    pub fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * 1.7 * scale
    }
    /// `n` values: a random block of up to [`RANDOM_BLOCK`], repeated.
    fn tiled<T: Copy>(&mut self, n: usize, mut gen: impl FnMut(&mut Rng) -> T) -> Vec<T> {
        let block: Vec<T> = (0..n.min(RANDOM_BLOCK)).map(|_| gen(self)).collect();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let take = (n - v.len()).min(block.len());
            v.extend_from_slice(&block[..take]);
        }
        v
    }
    pub fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.tiled(n, |r| r.normal(scale))
    }
    pub fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        self.tiled(n, |r| bf16::from_f32(r.normal(scale)))
    }
    /// `n` ids uniform in `0..below`.
    pub fn ids(&mut self, n: usize, below: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(below) as u32).collect()
    }
}

/// Working set the rotated operands of one benchmark span: larger than
/// the L2 of an H100/H200 (50 MiB) and than most CPUs' last-level cache.
/// In a forward pass every layer reads its own weights and KV cache, so
/// they come from DRAM; re-reading one small copy would time the cache.
pub const ROTATE_BYTES: usize = 256 << 20;
/// At most this many copies, so small operands do not cost minutes of setup.
pub const MAX_COPIES: usize = 64;

/// Copies of an operand of `bytes` to rotate through (see [`ROTATE_BYTES`]).
pub fn copies_for(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(1, MAX_COPIES)
}

/// A paged batch over a shuffled block pool, as a cache that has served many
/// requests looks: sequence `s` has context `contexts[s].0` of which the
/// last `contexts[s].1` positions are this batch's tokens. Returns the
/// layout and the number of cache blocks it uses.
pub fn paged_layout(rng: &mut Rng, contexts: &[(usize, usize)]) -> (BatchLayout, usize) {
    let max_blocks = contexts
        .iter()
        .map(|&(c, _)| c.div_ceil(BLOCK_SIZE))
        .max()
        .unwrap_or(1);
    let total: usize = contexts.iter().map(|&(c, _)| c.div_ceil(BLOCK_SIZE)).sum();
    let mut pool: Vec<u32> = (0..total as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, rng.below(i + 1));
    }
    let mut layout = BatchLayout {
        max_blocks,
        block_size: BLOCK_SIZE,
        ..Default::default()
    };
    let mut next = 0;
    for (s, &(ctx, new)) in contexts.iter().enumerate() {
        let nb = ctx.div_ceil(BLOCK_SIZE);
        let mut table = pool[next..next + nb].to_vec();
        next += nb;
        table.resize(max_blocks, 0);
        layout.block_tables.extend(table);
        for p in ctx - new..ctx {
            layout.positions.push(p as u32);
            layout.seq_of_token.push(s as u32);
        }
    }
    (layout, total)
}

/// Bytes of the batch metadata an attention op reads (positions, sequence
/// of each token and block tables, u32 each).
pub fn meta_work(layout: &BatchLayout) -> Work {
    Work::new()
        .read(2 * layout.num_tokens(), DType::U32)
        .read(layout.block_tables.len(), DType::U32)
}

// ---- backends and timing ---------------------------------------------------------------

/// A backend the benchmarks can time.
pub trait Timed: Backend {
    /// Time `iters` calls of `f` take on the device: host time on the CPU,
    /// CUDA events on the GPU.
    fn time(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<Duration>;
}

impl Timed for CpuBackend {
    fn time(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        Ok(start.elapsed())
    }
}

impl Timed for CudaBackend {
    fn time(&self, iters: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<Duration> {
        self.time_gpu(iters, f)
    }
}

/// A backend under test with its measured bandwidth floor and a seeded
/// generator for its inputs.
pub struct Device<B> {
    pub backend: B,
    /// "cpu" or "cuda": the first component of benchmark ids after the op.
    pub label: &'static str,
    /// Copy bandwidth in bytes/s, read and write both counted.
    pub bandwidth: f64,
    rng: RefCell<Rng>,
}

impl<B: Backend> Device<B> {
    fn new(backend: B, label: &'static str, bandwidth: f64) -> Self {
        Device {
            backend,
            label,
            bandwidth,
            // The same inputs on every backend and every run.
            rng: RefCell::new(Rng::new(0x5eed_1234_5678_9abc)),
        }
    }

    /// The input generator, for ids and layouts.
    pub fn rng(&self) -> RefMut<'_, Rng> {
        self.rng.borrow_mut()
    }

    // Setup failures (out of memory, a bad shape) are bugs in the bench or
    // a machine too small for it: stop with the reason.
    fn done<T>(&self, what: &str, r: Result<T>) -> T {
        r.unwrap_or_else(|e| panic!("{} setup ({what}): {e}", self.label))
    }

    pub fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Tensor<B> {
        self.done("upload", self.backend.upload(data, shape))
    }
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Tensor<B> {
        self.done("zeros", self.backend.zeros(shape, dtype))
    }
    /// Random bf16 of standard deviation ≈ `scale`.
    pub fn bf16(&self, shape: &[usize], scale: f32) -> Tensor<B> {
        let v = self.rng().bf16s(shape.iter().product(), scale);
        self.upload(HostSlice::BF16(&v), shape)
    }
    /// Random f32 of standard deviation ≈ `scale`.
    pub fn f32(&self, shape: &[usize], scale: f32) -> Tensor<B> {
        let v = self.rng().f32s(shape.iter().product(), scale);
        self.upload(HostSlice::F32(&v), shape)
    }
    pub fn u32(&self, data: &[u32]) -> Tensor<B> {
        self.upload(HostSlice::U32(data), &[data.len()])
    }
    /// [`copies_for`] copies of one random bf16 tensor, to rotate through
    /// so each call streams its operand from memory, not from cache.
    pub fn bf16_copies(&self, shape: &[usize], scale: f32) -> Vec<Tensor<B>> {
        let n: usize = shape.iter().product();
        let v = self.rng().bf16s(n, scale);
        (0..copies_for(n * 2))
            .map(|_| self.upload(HostSlice::BF16(&v), shape))
            .collect()
    }
    pub fn batch(&self, layout: &BatchLayout) -> BatchMeta<B> {
        self.done("upload_batch", self.backend.upload_batch(layout))
    }
}

/// Measures the CPU's copy bandwidth: a `bytes`-sized buffer copied by one
/// thread per core (as the rayon-parallel kernels use them), best of 3.
pub fn cpu_copy_bandwidth(bytes: usize) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let chunk = bytes.div_ceil(threads);
    let mut copy = || {
        let start = Instant::now();
        std::thread::scope(|s| {
            for (d, from) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(from));
            }
        });
        start.elapsed()
    };
    // The first copy also faults in dst's pages: not timed.
    copy();
    let best = (0..3).map(|_| copy()).min().unwrap_or(Duration::MAX);
    2.0 * bytes as f64 / best.as_secs_f64()
}

// ---- the harness ---------------------------------------------------------------

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Criterion, configured for many benchmarks on few cores, plus the
/// summaries, skips and failures of one bench binary.
pub struct Harness {
    c: Criterion,
    /// Samples per benchmark (criterion's minimum is 10).
    sample_size: usize,
    /// Longer first iterations skip the benchmark.
    max_iter: Duration,
    /// False for `--list`: nothing runs, so skip the probe runs too.
    probe: bool,
    backends: String,
    /// `(backend/op, work, name)` of every benchmark skipped as too slow:
    /// the same op with at least as many bytes and flops is skipped unprobed.
    too_slow: Vec<(String, Work, String)>,
    summaries: Vec<String>,
    failures: usize,
}

impl Harness {
    /// Reads the environment (see the crate docs) and criterion's command line.
    pub fn from_env() -> Self {
        let quick = env_flag("QWEN_BENCH_QUICK");
        // Criterion's defaults (100 samples, 3 s warm-up, 5 s measurement)
        // would take hours over ~150 benchmarks on two cores.
        let (warm_up, measure, max_iter) = if quick {
            (0.1, 0.3, 1.0)
        } else {
            (0.5, 2.0, 3.0)
        };
        let max_iter = std::env::var("QWEN_BENCH_MAX_ITER_S")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(max_iter);
        let sample_size = 10;
        let c = Criterion::default()
            .sample_size(sample_size)
            .warm_up_time(Duration::from_secs_f64(warm_up))
            .measurement_time(Duration::from_secs_f64(measure))
            // Plots take longer than a quick benchmark and nobody reads 150 of them.
            .without_plots()
            .configure_from_args();
        Harness {
            c,
            sample_size,
            max_iter: Duration::from_secs_f64(max_iter),
            probe: !std::env::args().any(|a| a == "--list"),
            backends: std::env::var("QWEN_BENCH_BACKENDS").unwrap_or_else(|_| "cpu,cuda".into()),
            too_slow: Vec::new(),
            summaries: Vec::new(),
            failures: 0,
        }
    }

    fn wants(&self, backend: &str) -> bool {
        self.backends.split(',').any(|b| b.trim() == backend)
    }

    /// The CPU backend with its measured copy bandwidth, unless deselected.
    pub fn cpu(&self) -> Option<Device<CpuBackend>> {
        if !self.wants("cpu") {
            eprintln!(
                "skipping CPU benches: not in QWEN_BENCH_BACKENDS={}",
                self.backends
            );
            return None;
        }
        // 1 GiB: far beyond any cache; a quick run makes do with 256 MiB.
        let bytes = if env_flag("QWEN_BENCH_QUICK") {
            256 << 20
        } else {
            1 << 30
        };
        let bw = cpu_copy_bandwidth(bytes);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        eprintln!(
            "cpu: {threads} threads, copy bandwidth {:.1} GB/s ({} MiB memcpy, read+write counted)",
            bw / 1e9,
            bytes >> 20
        );
        Some(Device::new(CpuBackend::new(), "cpu", bw))
    }

    /// GPU 0 with its measured copy bandwidth, or `None` with the reason
    /// printed once.
    pub fn cuda(&self) -> Option<Device<CudaBackend>> {
        if !self.wants("cuda") {
            eprintln!(
                "skipping CUDA benches: not in QWEN_BENCH_BACKENDS={}",
                self.backends
            );
            return None;
        }
        let mut gpu = match CudaBackend::new(0) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("skipping CUDA benches: {e}");
                return None;
            }
        };
        let exact = env_flag("QWEN_BENCH_CUDA_EXACT");
        gpu.set_exact(exact);
        let bw = match gpu.measure_copy_bandwidth() {
            Ok(bw) => bw,
            Err(e) => {
                eprintln!("skipping CUDA benches: measuring copy bandwidth failed: {e}");
                return None;
            }
        };
        eprintln!(
            "cuda: {}, copy bandwidth {:.1} GB/s (1 GiB device-to-device, read+write counted, CUDA events){}",
            gpu.device_name(),
            bw / 1e9,
            if exact { "; exact matmul kernels only" } else { "" }
        );
        Some(Device::new(gpu, "cuda", bw))
    }

    /// Benchmarks `f` as `{op}/{backend}/{id}`. `f(i)` is the i-th call:
    /// use `i` to rotate through input copies. Criterion reports
    /// `work.bytes` as its throughput; the summary line adds TFLOP/s and the
    /// fraction of the bandwidth floor.
    pub fn bench<B: Timed>(
        &mut self,
        dev: &Device<B>,
        op: &str,
        id: &str,
        work: Work,
        mut f: impl FnMut(usize) -> Result<()>,
    ) {
        let name = format!("{op}/{}/{id}", dev.label);
        let key = format!("{}/{op}", dev.label);
        // A probe of the CPU's 8B batch-64 LM head alone takes tens of
        // seconds: infer that it is too slow from a smaller shape instead.
        if let Some((_, _, smaller)) = self
            .too_slow
            .iter()
            .find(|(k, w, _)| *k == key && w.bytes <= work.bytes && w.flops <= work.flops)
        {
            eprintln!("skipping {name}: at least as much work as {smaller}, which was too slow");
            return;
        }
        // One call outside criterion first: it fails loudly on a broken op,
        // loads lazily compiled kernels, and finds ops too slow to sample.
        if self.probe {
            match dev.backend.time(1, &mut || f(0)) {
                Err(e) => {
                    eprintln!("FAILED {name}: {e}");
                    self.failures += 1;
                    return;
                }
                Ok(d) if d > self.max_iter => {
                    eprintln!(
                        "skipping {name}: one iteration takes {} (over {}; set QWEN_BENCH_MAX_ITER_S to run it)",
                        fmt_time(d),
                        fmt_time(self.max_iter)
                    );
                    self.too_slow.push((key, work, name));
                    return;
                }
                Ok(_) => {}
            }
        }
        // (iterations, time) of every routine call criterion makes: warm-up
        // calls first, then one per sample.
        let mut calls: Vec<(u64, Duration)> = Vec::new();
        let mut next = 1;
        let mut group = self.c.benchmark_group(op);
        // Decimal (GB/s), like the device bandwidth figures it is compared with.
        group.throughput(Throughput::BytesDecimal(work.bytes));
        group.bench_function(format!("{}/{id}", dev.label), |b| {
            b.iter_custom(|iters| {
                let mut i = next;
                next += iters as usize;
                let elapsed = dev
                    .backend
                    .time(iters, &mut || {
                        i += 1;
                        f(i - 1)
                    })
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                calls.push((iters, elapsed));
                elapsed
            })
        });
        group.finish();
        if calls.is_empty() {
            return; // filtered out or listed
        }
        let samples = &calls[calls.len().saturating_sub(self.sample_size)..];
        let mut per_iter: Vec<f64> = samples
            .iter()
            .map(|&(n, d)| d.as_secs_f64() / n.max(1) as f64)
            .collect();
        per_iter.sort_by(f64::total_cmp);
        let median = per_iter[per_iter.len() / 2];
        let line = summary_line(&name, work, median, dev.bandwidth);
        eprintln!("  {line}");
        self.summaries.push(line);
    }

    /// Prints every summary line again as one table, and exits non-zero if
    /// any benchmark failed.
    pub fn finish(self) {
        self.c.final_summary();
        if !self.summaries.is_empty() {
            eprintln!("\nsummary (median time per call; GB/s of bytes read+written; %floor = achieved / measured copy bandwidth):");
            for s in &self.summaries {
                eprintln!("  {s}");
            }
        }
        if self.failures > 0 {
            eprintln!("{} benchmark(s) FAILED", self.failures);
            std::process::exit(1);
        }
    }
}

/// `name  time  GB/s  %floor  [TFLOP/s]`, aligned for a table.
pub fn summary_line(name: &str, work: Work, secs: f64, bandwidth: f64) -> String {
    let gbs = work.bytes as f64 / secs / 1e9;
    let floor = 100.0 * work.bytes as f64 / bandwidth / secs;
    let mut s = format!(
        "{name:<40} {:>10}  {:>7} GB/s  {:>5}% floor",
        fmt_time(Duration::from_secs_f64(secs)),
        fmt_num(gbs),
        fmt_num(floor)
    );
    if work.flops > 0 {
        s += &format!("  {:>7} TFLOP/s", fmt_num(work.flops as f64 / secs / 1e12));
    }
    s
}

/// Three significant digits (at least), without exponents.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        // Enough decimals for 3 significant digits.
        let decimals = 2 - a.log10().floor() as i32;
        format!("{v:.*}", decimals.clamp(3, 9) as usize)
    }
}

/// A duration with a unit that keeps 3-4 significant digits.
pub fn fmt_time(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.2} µs", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

/// The `main` of a bench binary: runs `$run(&mut harness, &device)` on
/// the GPU (if any) and the CPU, then prints the summary table.
#[macro_export]
macro_rules! bench_main {
    ($run:ident) => {
        fn main() {
            let mut h = $crate::Harness::from_env();
            // Both devices first, so both bandwidth floors print at the start.
            let cuda = h.cuda();
            let cpu = h.cpu();
            if let Some(dev) = &cuda {
                $run(&mut h, dev);
            }
            if let Some(dev) = &cpu {
                $run(&mut h, dev);
            }
            h.finish();
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_shapes_are_qwen3s() {
        let [qkv, o, gu, down, head] = QWEN3_0_6B.projections();
        assert_eq!((qkv.k, qkv.n), (1024, 4096));
        assert_eq!((o.k, o.n), (2048, 1024));
        assert_eq!((gu.k, gu.n), (1024, 6144));
        assert_eq!((down.k, down.n), (3072, 1024));
        assert_eq!((head.k, head.n), (1024, 151_936));
        let [qkv, o, ..] = QWEN3_8B.projections();
        assert_eq!((qkv.k, qkv.n), (4096, 6144));
        assert_eq!((o.k, o.n), (4096, 4096));
    }

    #[test]
    fn work_counts_bytes_and_flops() {
        // matmul at T=2, K=3, N=4: x bf16, w bf16, out f32.
        let w = Work::new()
            .read(2 * 3, DType::BF16)
            .gemm(2, 3, 4)
            .write(2 * 4, DType::F32);
        assert_eq!(w.bytes, 12 + 24 + 32);
        assert_eq!(w.flops, 48);
    }

    #[test]
    fn copies_cover_the_cache_but_stay_bounded() {
        assert_eq!(copies_for(1 << 30), 1);
        assert_eq!(copies_for(128 << 20), 2);
        assert_eq!(copies_for(1024), MAX_COPIES);
    }

    #[test]
    fn layouts_use_distinct_blocks() {
        let mut rng = Rng::new(7);
        let (l, blocks) = paged_layout(&mut rng, &[(40, 1), (17, 17)]);
        assert_eq!(blocks, 3 + 2);
        assert_eq!(l.num_tokens(), 18);
        assert_eq!(l.max_context(), 40);
        let mut slots = l.slots();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), 18, "each token writes its own slot");
    }

    #[test]
    fn summary_reports_rates() {
        let w = Work {
            bytes: 2_000_000_000,
            flops: 4_000_000_000_000,
        };
        let s = summary_line("matmul/cpu/x", w, 1.0, 4e9);
        assert!(s.contains("2.00 GB/s"), "{s}");
        assert!(s.contains("50.0% floor"), "{s}");
        assert!(s.contains("4.00 TFLOP/s"), "{s}");
        assert_eq!(fmt_num(3350.4), "3350");
        assert_eq!(fmt_num(0.0123), "0.0123");
        assert_eq!(fmt_num(0.5), "0.500");
    }
}
