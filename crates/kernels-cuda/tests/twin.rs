//! Twin tests: every CUDA op against its CPU spec on random inputs (a fresh
//! seed each run, printed), with outputs poisoned before each run, at real
//! Qwen3 shapes and odd ones. Exact ops must match bit for bit. Skips, with
//! a message, where there is no GPU.

use half::bf16;
use qwen_kernels_cpu::{attention_tc_magnitudes, CpuBackend, TC_ATTENTION_FACTOR};
use qwen_kernels_cuda::CudaBackend;
use qwen_tensor::{
    decoder_layer_ops, AttnGeometry, Backend, BatchLayout, DType, HostSlice, HostVec, LayerActs,
    LayerInputs, LayerWeights, SampleParams, Tensor,
};

/// The GPU in exact mode: every op, GEMMs included, must match the CPU bits.
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(mut g) => {
            g.set_exact(true);
            Some(g)
        }
        Err(e) => {
            // On the GPU machine (scripts/gpu-run.sh) a missing GPU is a failure.
            assert!(
                std::env::var_os("QWEN_REQUIRE_GPU").is_none(),
                "no GPU: {e}"
            );
            println!("skipping GPU twin test: {e}");
            None
        }
    }
}

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn new(what: &str) -> Rng {
        let seed = std::env::var("TWIN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        println!("{what}: seed {seed} (rerun with TWIN_SEED={seed})");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Roughly normal, scaled.
    fn normal(&mut self, scale: f32) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * 1.7 * scale
    }
    fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal(scale)).collect()
    }
    /// Uniform in [0, 1) on the 2^-24 grid, as `sample` takes it.
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn bf16s(&mut self, n: usize, scale: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.normal(scale))).collect()
    }
}

/// A tensor of `shape` filled with NaN (or 0xFFFFFFFF ids): an op that
/// forgets to write an element shows up as a mismatch.
fn poisoned<B: Backend>(b: &B, shape: &[usize], dtype: DType) -> Tensor<B> {
    let n: usize = shape.iter().product();
    match dtype {
        DType::F32 => b.upload(HostSlice::F32(&vec![f32::NAN; n]), shape),
        DType::BF16 => b.upload(HostSlice::BF16(&vec![bf16::NAN; n]), shape),
        DType::U32 => b.upload(HostSlice::U32(&vec![u32::MAX; n]), shape),
        DType::F16 => unreachable!(),
    }
    .unwrap()
}

fn same_bits(what: &str, cpu: &HostVec, gpu: &HostVec) {
    let (c, g) = (cpu.to_bits(), gpu.to_bits());
    assert_eq!(c.len(), g.len(), "{what}: lengths");
    let diff: Vec<usize> = (0..c.len()).filter(|&i| c[i] != g[i]).collect();
    if let Some(&i) = diff.first() {
        let (cf, gf) = (cpu.to_f32(), gpu.to_f32());
        panic!(
            "{what}: {} of {} elements differ; first at {i}: cpu {} gpu {}",
            diff.len(),
            c.len(),
            cf[i],
            gf[i]
        );
    }
}

fn matmul_on<B: Backend>(
    b: &B,
    x: &[bf16],
    w: &[bf16],
    acc: &[f32],
    t: usize,
    k: usize,
    n: usize,
) -> (HostVec, HostVec) {
    let xt = b.upload(HostSlice::BF16(x), &[t, k]).unwrap();
    let wt = b.upload(HostSlice::BF16(w), &[n, k]).unwrap();
    let mut out = poisoned(b, &[t, n], DType::F32);
    b.matmul(&xt, &wt, &mut out).unwrap();
    let mut a = b.upload(HostSlice::F32(acc), &[t, n]).unwrap();
    b.matmul_add(&xt, &wt, &mut a).unwrap();
    (b.download(&out).unwrap(), b.download(&a).unwrap())
}

#[test]
fn matmul_and_matmul_add() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("matmul");
    // (tokens, K, N): Qwen3-0.6B and 8B projections at batch 1 and 64 (the
    // tiled kernel: K whole slabs of 1,024), odd sizes. At one token: 8B's
    // down projection (more weight batches than the ring has stages), rows
    // with a tail past the last full chunk, a row shorter than one chunk,
    // and rows not a multiple of 8 long; 0.6B's o_proj and down (the
    // three-stage ring, weights under 32 MB) and 8B's qkv (two stages).
    for (t, k, n) in [
        (1, 1024, 4096),
        (1, 12_288, 300),
        (1, 1000, 77),
        (1, 200, 33),
        (1, 37, 9),
        (64, 1024, 3072),
        (1, 3072, 1024),
        (1, 2048, 1024),
        (1, 4096, 6144),
        (64, 4096, 4096),
        (256, 1024, 512),
        // The tiled kernel with a partial tile of tokens and of rows.
        (13, 2048, 1001),
        (3, 1000, 77),
        (5, 37, 9),
        (2, 264, 130),
    ] {
        let x = r.bf16s(t * k, 1.0);
        let w = r.bf16s(n * k, 0.05);
        let acc = r.f32s(t * n, 2.0);
        let (c1, c2) = matmul_on(&cpu, &x, &w, &acc, t, k, n);
        let (g1, g2) = matmul_on(&g, &x, &w, &acc, t, k, n);
        same_bits(&format!("matmul {t}x{k}x{n}"), &c1, &g1);
        same_bits(&format!("matmul_add {t}x{k}x{n}"), &c2, &g2);
    }
}

/// Tensor-core GEMMs (prompt rows, announced by `set_tensor_core_rows`)
/// may differ from the CPU spec only by summation order:
/// |gpu − cpu| ≤ 1e-5 · Σ_k |x_k·w_k|. f32 accumulation over K terms rounds
/// at most K·2⁻²⁴ of that sum (2.4e-4 at K = 4096) and in practice about
/// √K·2⁻²⁴; a wrong GEMM is off by ~1. Rows after the announced ones take
/// the exact kernel and must match bit for bit.
#[test]
fn tensor_core_matmul_within_bound() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let cpu = CpuBackend::new();
    let mut r = Rng::new("tensor-core matmul");
    let mut worst = 0.0f64;
    // (tokens, tensor-core rows, K, N): real shapes, a partial last tile,
    // one prompt row, K not a multiple of 8 (the unvectorised path).
    for (t, tc, k, n) in [
        (64, 64, 1024, 4096),
        (256, 200, 4096, 1024),
        (100, 100, 3072, 1024),
        (65, 65, 200, 70),
        (9, 1, 1024, 3072),
        (20, 13, 37, 130),
        // K in unequal shares (split K): 3 shares of 50 tiles, and 2 of a
        // K that is not a multiple of 8.
        (70, 70, 1600, 500),
        (33, 20, 1031, 300),
        // Enough rows and columns for 128 x 128 tiles, the last one partial.
        (600, 590, 256, 16_384),
        // Prompt-sized: Hopper's 128-row tiles, the last one partial.
        (1100, 1090, 1024, 4096),
        // A split weight at a row count whose 128 x 128 tiles fill the GPU:
        // the K shares made inside the blocks.
        (2200, 2190, 2048, 1024),
    ] {
        g.set_tensor_core_rows(tc);
        let x = r.bf16s(t * k, 1.0);
        let w = r.bf16s(n * k, 0.05);
        let acc = r.f32s(t * n, 2.0);
        let (c1, c2) = matmul_on(&cpu, &x, &w, &acc, t, k, n);
        let (g1, g2) = matmul_on(&g, &x, &w, &acc, t, k, n);
        let ax: Vec<bf16> = x.iter().map(|v| bf16::from_f32(v.to_f32().abs())).collect();
        let aw: Vec<bf16> = w.iter().map(|v| bf16::from_f32(v.to_f32().abs())).collect();
        let (mag, _) = matmul_on(&cpu, &ax, &aw, &acc, t, k, n);
        let mag = mag.to_f32();
        for (cpu_out, gpu_out) in [(c1, g1), (c2, g2)] {
            let (cb, gb) = (cpu_out.to_bits(), gpu_out.to_bits());
            let (cpu_out, gpu_out) = (cpu_out.to_f32(), gpu_out.to_f32());
            for i in 0..cpu_out.len() {
                if i >= tc * n {
                    assert_eq!(cb[i], gb[i], "{t}x{k}x{n} exact row element {i}");
                    continue;
                }
                let ratio = (cpu_out[i] - gpu_out[i]).abs() as f64 / (mag[i] as f64).max(1e-30);
                worst = worst.max(ratio);
                assert!(
                    ratio <= 1e-5,
                    "{t}x{k}x{n} element {i}: cpu {} gpu {} (sum |terms| {})",
                    cpu_out[i],
                    gpu_out[i],
                    mag[i]
                );
            }
        }
    }
    g.set_tensor_core_rows(0);
    println!("tensor-core matmul: worst |gpu - cpu| / sum|x w| = {worst:.3e} (bound 1e-5)");
}

/// A prompt row's tensor-core result depends on nothing but that row: the
/// same bits alone, in a batch of 200 (or 600) at any place, in batches
/// whose size leaves a partial tile, and whichever tile shape the batch
/// size picks, with or without an accumulator to add to.
#[test]
fn tensor_core_matmul_is_batch_invariant() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let mut r = Rng::new("tensor-core invariance");
    // (64, 9000): the full batch takes 128-wide tiles, small sub-batches
    // 64-wide ones; (256, 16384): the full batch and the sub-batches of
    // 512 take 128 x 128 tiles, the latter starting mid-tile; (1024, 4096)
    // at 1,100 rows: the full batch and 1,063 rows from row 37 take the
    // 128-row wgmma tiles, 600 rows the 64-row ones; (2048, 1024) and
    // (3072, 1024) at 2,200 rows: the full batch makes o_proj's and
    // down's K shares inside its blocks, 1,200 rows and fewer split them
    // over blocks and add them afterwards.
    for (k, n, t) in [
        (2048, 1024, 2200),
        (3072, 1024, 2200),
        (1024, 4096, 1100),
        (1024, 4096, 200),
        (3072, 1024, 200),
        (37, 130, 200),
        (64, 9000, 200),
        (256, 16_384, 600),
    ] {
        let x = r.bf16s(t * k, 1.0);
        let w = r.bf16s(n * k, 0.05);
        let acc = r.f32s(t * n, 2.0);
        g.set_tensor_core_rows(t);
        let (full, full_add) = matmul_on(&g, &x, &w, &acc, t, k, n);
        let (full, full_add) = (full.to_bits(), full_add.to_bits());
        // Sub-batches starting at various rows, of various sizes.
        let mut subs = vec![(0, 1), (137, 1), (5, 63), (64, 64), (150, 50), (1, 199)];
        if t == 600 {
            subs.extend([(0, 512), (88, 512), (300, 300)]);
        }
        if t == 1100 {
            subs.extend([(37, 1063), (0, 600), (500, 600)]);
        }
        if t == 2200 {
            subs.extend([(0, 1200), (1000, 1200), (2137, 63)]);
        }
        for (start, len) in subs {
            g.set_tensor_core_rows(len);
            let xs = &x[start * k..(start + len) * k];
            let acc_rows = &acc[start * n..(start + len) * n];
            let (part, part_add) = matmul_on(&g, xs, &w, acc_rows, len, k, n);
            let rows = start * n..(start + len) * n;
            assert_eq!(
                part.to_bits(),
                full[rows.clone()],
                "rows {start}..{} of {k}x{n} differ from the full batch",
                start + len
            );
            assert_eq!(
                part_add.to_bits(),
                full_add[rows],
                "rows {start}..{} of {k}x{n} added to an accumulator differ from the full batch",
                start + len
            );
        }
    }
    g.set_tensor_core_rows(0);
}

/// The logits op's prompt rows run on the tensor cores as a bf16 GEMM of
/// the f32 input split as hi + lo: the same bound as a GEMM,
/// 1e-5·Σ|y·w|; the other rows are exact.
#[test]
fn tensor_core_logits_within_bound() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let cpu = CpuBackend::new();
    let mut r = Rng::new("tensor-core logits");
    let mut worst = 0.0f64;
    for (t, tc, h, n) in [(64, 64, 1024, 4096), (70, 50, 256, 1000), (3, 1, 128, 515)] {
        g.set_tensor_core_rows(tc);
        let x = r.f32s(t * h, 3.0);
        let nw = r.f32s(h, 1.0);
        let w = r.bf16s(n * h, 0.05);
        let cn = norms_on(&cpu, &x, &nw, &w, t, h, n);
        let gn = norms_on(&g, &x, &nw, &w, t, h, n);
        let (c, gg) = (cn[2].to_f32(), gn[2].to_f32());
        let (cb, gb) = (cn[2].to_bits(), gn[2].to_bits());
        for ti in 0..t {
            let row = &x[ti * h..(ti + 1) * h];
            let ms: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / h as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for ni in 0..n {
                let i = ti * n + ni;
                if ti >= tc {
                    assert_eq!(cb[i], gb[i], "{t}x{h}x{n} exact logits row {ti}");
                    continue;
                }
                let mag: f64 = (0..h)
                    .map(|k| {
                        (nw[k] as f64 * row[k] as f64 * inv * w[ni * h + k].to_f32() as f64).abs()
                    })
                    .sum();
                let ratio = (c[i] - gg[i]).abs() as f64 / mag.max(1e-30);
                worst = worst.max(ratio);
                assert!(
                    ratio <= 1e-5,
                    "{t}x{h}x{n} [{ti},{ni}]: cpu {} gpu {} (sum |terms| {mag})",
                    c[i],
                    gg[i]
                );
            }
        }
    }
    g.set_tensor_core_rows(0);
    println!("tensor-core logits: worst |gpu - cpu| / sum|y w| = {worst:.3e} (bound 1e-5)");
}

/// Appends `a` and `b` interleaved 16 at a time (16 of a, then the same 16
/// of b), both padded with zeros to `k16`.
fn interleave16(a: &[bf16], b: &[bf16], k16: usize, out: &mut Vec<bf16>) {
    let at = |v: &[bf16], k: usize| v.get(k).copied().unwrap_or(bf16::from_f32(0.0));
    for c in (0..k16).step_by(16) {
        out.extend((c..c + 16).map(|k| at(a, k)));
        out.extend((c..c + 16).map(|k| at(b, k)));
    }
}

/// The logits op's tensor-core rows are the normalised f32 row split as
/// hi and lo in bf16 and projected in one f32 accumulator: on Hopper
/// (gemm_wgmma.cu) each 16 k of hi then the same 16 k of lo, which must
/// give the bits of a plain tensor-core GEMM of the halves interleaved 16 k
/// at a time against w's rows repeated likewise (K' = 2K, K padded to 16
/// with zeros), with the wide tile and the narrow one, at row counts that
/// take 64- and 128-row tiles and end mid-tile, a vocabulary that ends
/// mid-tile and K not a multiple of 64. (Vocabularies of at most 2,048
/// columns split K and take the two GEMMs of the other GPUs.)
#[test]
fn tensor_core_logits_equal_one_gemm_of_interleaved_halves() {
    let Some(mut g) = gpu() else { return };
    if !g.has_wgmma() {
        println!("skipped: the interleaved hi/lo kernel needs Hopper's wgmma");
        return;
    }
    g.set_exact(false);
    let mut r = Rng::new("tensor-core logits hi lo");
    for (t, h, n) in [
        (256, 1024, 8192),
        (200, 1024, 2115),
        (70, 1024, 2115),
        (64, 1024, 2115),
        (5, 200, 2115),
    ] {
        g.set_tensor_core_rows(t);
        let x = r.f32s(t * h, 3.0);
        let nw = r.f32s(h, 1.0);
        let w = r.bf16s(n * h, 0.05);
        let xt = g.upload(HostSlice::F32(&x), &[t, h]).unwrap();
        let nwt = g.upload(HostSlice::F32(&nw), &[h]).unwrap();
        let wt = g.upload(HostSlice::BF16(&w), &[n, h]).unwrap();
        // The spec's f32 row y = w_k · (x_k · inv) and the op's split of
        // it, on the host: hi = bf16(y), lo = bf16(y - hi).
        let k16 = h.div_ceil(16) * 16;
        let mut xcat = Vec::with_capacity(t * 2 * k16);
        for row in x.chunks(h) {
            let inv = qwen_kernels_cpu::inv_rms(row, 1e-6);
            let y: Vec<f32> = row
                .iter()
                .zip(&nw)
                .map(|(&xk, &wk)| wk * (xk * inv))
                .collect();
            let hi: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
            let lo: Vec<bf16> = y
                .iter()
                .zip(&hi)
                .map(|(&v, hb)| bf16::from_f32(v - hb.to_f32()))
                .collect();
            interleave16(&hi, &lo, k16, &mut xcat);
        }
        let mut wcat = Vec::with_capacity(n * 2 * k16);
        for col in w.chunks(h) {
            interleave16(col, col, k16, &mut wcat);
        }
        let xct = g.upload(HostSlice::BF16(&xcat), &[t, 2 * k16]).unwrap();
        let wct = g.upload(HostSlice::BF16(&wcat), &[n, 2 * k16]).unwrap();
        let mut plain = poisoned(&g, &[t, n], DType::F32);
        g.matmul(&xct, &wct, &mut plain).unwrap();
        let plain = g.download(&plain).unwrap();
        for wide in [true, false] {
            g.set_hilo_wide(wide);
            let mut logits = poisoned(&g, &[t, n], DType::F32);
            g.logits(&xt, &nwt, 1e-6, &wt, &mut logits).unwrap();
            same_bits(
                &format!("tensor-core logits {t}x{h}x{n}, wide tiles {wide}"),
                &plain,
                &g.download(&logits).unwrap(),
            );
        }
        g.set_hilo_wide(true);
    }
    g.set_tensor_core_rows(0);
}

#[test]
fn out_of_memory_is_an_error_not_a_crash() {
    let Some(g) = gpu() else { return };
    let e = g.zeros(&[1 << 40], DType::F32).unwrap_err();
    assert!(matches!(e, qwen_tensor::Error::OutOfMemory(_)), "{e}");
    assert!(!e.to_string().contains('\n'));
    // The device still works afterwards.
    let t = g.upload(HostSlice::F32(&[1.0, 2.0]), &[2]).unwrap();
    assert_eq!(g.download(&t).unwrap(), HostVec::F32(vec![1.0, 2.0]));
}

fn norms_on<B: Backend>(
    b: &B,
    x: &[f32],
    nw: &[f32],
    w: &[bf16],
    t: usize,
    h: usize,
    n: usize,
) -> [HostVec; 3] {
    let xt = b.upload(HostSlice::F32(x), &[t, h]).unwrap();
    let nwt = b.upload(HostSlice::F32(nw), &[h]).unwrap();
    let wt = b.upload(HostSlice::BF16(w), &[n, h]).unwrap();
    let mut normed = poisoned(b, &[t, h], DType::BF16);
    b.rms_norm(&xt, &nwt, 1e-6, &mut normed).unwrap();
    let mut fused = poisoned(b, &[t, n], DType::F32);
    b.rms_norm_matmul(&xt, &nwt, 1e-6, &wt, &mut fused).unwrap();
    let mut logits = poisoned(b, &[t, n], DType::F32);
    b.logits(&xt, &nwt, 1e-6, &wt, &mut logits).unwrap();
    [
        b.download(&normed).unwrap(),
        b.download(&fused).unwrap(),
        b.download(&logits).unwrap(),
    ]
}

#[test]
fn rms_norm_fused_qkv_and_logits() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("rms_norm");
    // (tokens, hidden, N): the QKV of 0.6B (1024 -> 4096) and 8B (4096 ->
    // 6144) at one token and at 64, the vocabulary projection, odd sizes,
    // and rows over 48 KB in f32 (the norm's block opts in to more shared
    // memory); one token at rows of one, two and three chunks of 256 (the
    // warp norm) with a partial block.
    for (t, h, n) in [
        (1, 1024, 4096),
        (1, 256, 1001),
        (1, 512, 4096),
        (1, 768, 77),
        (1, 4096, 6144),
        (1, 100, 9001),
        (2, 13_000, 16),
        (64, 4096, 6144),
        (1, 1024, 151_936),
        (4, 5120, 512),
        (7, 100, 33),
        (1, 64, 151_936),
    ] {
        let x = r.f32s(t * h, 3.0);
        let nw = r.f32s(h, 1.0);
        let w = r.bf16s(n * h, 0.05);
        let c = norms_on(&cpu, &x, &nw, &w, t, h, n);
        let gg = norms_on(&g, &x, &nw, &w, t, h, n);
        for (i, name) in ["rms_norm", "rms_norm_matmul", "logits"].iter().enumerate() {
            same_bits(&format!("{name} {t}x{h}x{n}"), &c[i], &gg[i]);
        }
    }
}

fn norm_silu_on<B: Backend>(
    b: &B,
    x: &[f32],
    nw: &[f32],
    w: &[bf16],
    t: usize,
    h: usize,
    i: usize,
) -> HostVec {
    let xt = b.upload(HostSlice::F32(x), &[t, h]).unwrap();
    let nwt = b.upload(HostSlice::F32(nw), &[h]).unwrap();
    let wt = b.upload(HostSlice::BF16(w), &[2 * i, h]).unwrap();
    let mut gate_up = poisoned(b, &[t, 2 * i], DType::F32);
    let mut act = poisoned(b, &[t, i], DType::BF16);
    b.rms_norm_matmul_silu(&xt, &nwt, 1e-6, &wt, &mut gate_up, &mut act)
        .unwrap();
    b.download(&act).unwrap()
}

#[test]
fn rms_norm_gate_up_silu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("rms_norm_matmul_silu");
    // (tokens, hidden, intermediate): 0.6B (the ring kernel) and 8B
    // (matmul_silu_t1) at batch 1; over that kernel's 64 MB, an odd
    // intermediate (a block with one unit) and rows with a tail; the ring
    // kernel with a partial block, rows of several batches, a tail, and
    // rows not a multiple of 8 long (projection, then silu_mul); a batch
    // with a partial token tile; odd sizes; the ring kernel after a warp
    // norm of one, two and three chunks of 256, with partial blocks.
    for (t, h, i) in [
        (1, 1024, 3072),
        (1, 256, 33),
        (1, 512, 1001),
        (1, 768, 3071),
        (1, 2048, 1001),
        (1, 1000, 77),
        (1, 4096, 12_288),
        (1, 4104, 4097),
        (1, 100, 33),
        (1, 12_000, 40),
        (5, 1024, 3072),
        (7, 100, 33),
        (3, 8192, 64),
    ] {
        let x = r.f32s(t * h, 3.0);
        let nw = r.f32s(h, 1.0);
        let w = r.bf16s(2 * i * h, 0.05);
        let c = norm_silu_on(&cpu, &x, &nw, &w, t, h, i);
        let gg = norm_silu_on(&g, &x, &nw, &w, t, h, i);
        same_bits(&format!("rms_norm_matmul_silu {t}x{h}x{i}"), &c, &gg);
    }
}

/// With every row on the tensor cores the CUDA op may apply the SiLU gate
/// inside the GEMM (gemm_wgmma.cu on Hopper): its bits must still be those
/// of the projection followed by `silu_mul`, the op's own definition.
#[test]
fn tensor_core_gate_up_silu_equals_projection_then_gate() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let mut r = Rng::new("tensor-core rms_norm_matmul_silu");
    // (tokens, hidden, intermediate): the 0.6B shape at prompt sizes (the
    // 128-row tiles, one ending mid-tile), at decode batches (128 rows by
    // 64 columns at 256 and 200 rows, at 150 also with K not a multiple of
    // 64) and a partial row tile, the 8B shape, K not a multiple of 64 with an intermediate
    // that ends mid-tile, K not a multiple of 8 (gemm.cu).
    for (t, h, i) in [
        (1100, 1024, 3072),
        (777, 1024, 3072),
        (256, 1024, 3072),
        (200, 1024, 3072),
        (150, 200, 100),
        (70, 1024, 3072),
        (64, 4096, 12_288),
        (65, 200, 100),
        (3, 96, 40),
        (9, 100, 33),
    ] {
        g.set_tensor_core_rows(t);
        let x = r.f32s(t * h, 3.0);
        let nw = r.f32s(h, 1.0);
        let w = r.bf16s(2 * i * h, 0.05);
        let fused = norm_silu_on(&g, &x, &nw, &w, t, h, i);
        let xt = g.upload(HostSlice::F32(&x), &[t, h]).unwrap();
        let nwt = g.upload(HostSlice::F32(&nw), &[h]).unwrap();
        let wt = g.upload(HostSlice::BF16(&w), &[2 * i, h]).unwrap();
        let mut gate_up = poisoned(&g, &[t, 2 * i], DType::F32);
        let mut act = poisoned(&g, &[t, i], DType::BF16);
        g.rms_norm_matmul(&xt, &nwt, 1e-6, &wt, &mut gate_up)
            .unwrap();
        g.silu_mul(&gate_up, &mut act).unwrap();
        let two = g.download(&act).unwrap();
        same_bits(
            &format!("tensor-core gate/up + SiLU {t}x{h}x{i}"),
            &two,
            &fused,
        );
    }
    g.set_tensor_core_rows(0);
}

fn embed_on<B: Backend>(
    b: &B,
    table: &[bf16],
    ids: &[u32],
    v: usize,
    h: usize,
    rows: &[u32],
) -> (HostVec, HostVec) {
    let tab = b.upload(HostSlice::BF16(table), &[v, h]).unwrap();
    let idt = b.upload(HostSlice::U32(ids), &[ids.len()]).unwrap();
    let mut out = poisoned(b, &[ids.len(), h], DType::F32);
    b.embedding(&tab, &idt, &mut out).unwrap();
    let rt = b.upload(HostSlice::U32(rows), &[rows.len()]).unwrap();
    let mut g = poisoned(b, &[rows.len(), h], DType::F32);
    b.gather_rows(&out, &rt, &mut g).unwrap();
    (b.download(&out).unwrap(), b.download(&g).unwrap())
}

#[test]
fn embedding_gather_and_silu_mul() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("embedding");
    let (v, h) = (151_936, 1024);
    let table = r.bf16s(v * h, 0.3);
    let ids: Vec<u32> = (0..37).map(|_| (r.next() % v as u64) as u32).collect();
    let rows = vec![36, 0, 5, 5];
    let (c1, c2) = embed_on(&cpu, &table, &ids, v, h, &rows);
    let (g1, g2) = embed_on(&g, &table, &ids, v, h, &rows);
    same_bits("embedding", &c1, &g1);
    same_bits("gather_rows", &c2, &g2);

    for (t, i) in [(1, 3072), (64, 12_288), (3, 77)] {
        let gu = r.f32s(t * 2 * i, 4.0);
        let run = |b: &dyn Fn(&[f32]) -> HostVec| b(&gu);
        let c = run(&|gu| silu_on(&cpu, gu, t, i));
        let gg = run(&|gu| silu_on(&g, gu, t, i));
        same_bits(&format!("silu_mul {t}x{i}"), &c, &gg);
    }
}

/// Both forms of the exp the kernels use (numerics.cuh's q_exp and
/// q_exp_branchy) against the CPU's `numerics::exp`, bit for bit: NaNs
/// (their payloads kept), infinities, zeros, subnormals, the overflow and
/// underflow bounds and the floats beside them, a sweep of the range where
/// exp is finite and nonzero, and random bit patterns of every kind.
#[test]
fn exp_matches_cpu_on_every_kind_of_input() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new("exp");
    let mut xs = vec![
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7fc0_1234),
        f32::from_bits(0xff80_0001),
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x8000_0001),
        f32::MAX,
        f32::MIN,
        1e30,
        -1e30,
        1.0,
        -1.0,
    ];
    for b in [
        qwen_kernels_cpu::numerics::EXP_HI,
        qwen_kernels_cpu::numerics::EXP_LO,
    ] {
        let bits = b.to_bits();
        xs.extend((bits - 3..=bits + 3).map(f32::from_bits));
    }
    let mut x = -110.0f32;
    while x < 95.0 {
        xs.push(x);
        x += 0.0173;
    }
    xs.extend((0..200_000).map(|_| f32::from_bits(r.next() as u32)));
    xs.extend((0..100_000).map(|_| (r.unit() - 0.5) * 220.0));
    let want: Vec<f32> = xs
        .iter()
        .map(|&x| qwen_kernels_cpu::numerics::exp(x))
        .collect();
    let xt = g.upload(HostSlice::F32(&xs), &[xs.len()]).unwrap();
    let mut out = poisoned(&g, &[2, xs.len()], DType::F32);
    g.numerics_exp(&xt, &mut out).unwrap();
    // to_f32 of f32 keeps every bit (NaN payloads included).
    let got = g.download(&out).unwrap().to_f32();
    let (straight, branchy) = got.split_at(xs.len());
    same_bits(
        "q_exp",
        &HostVec::F32(want.clone()),
        &HostVec::F32(straight.to_vec()),
    );
    same_bits(
        "q_exp_branchy",
        &HostVec::F32(want),
        &HostVec::F32(branchy.to_vec()),
    );
}

/// Sampled ids fed into the next step's ids (`feed_ids`), and downloads
/// waited for later: the CPU's ids, the CPU's errors, the tokens back.
#[test]
fn fed_ids_and_later_downloads() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("feed_ids");
    for (t, n, fed) in [(1, 1, 1), (300, 256, 200), (40, 7, 7), (5000, 4000, 3000)] {
        let ids: Vec<u32> = (0..t).map(|_| (r.next() % 151_936) as u32).collect();
        let tokens: Vec<u32> = (0..n).map(|_| (r.next() % 151_936) as u32).collect();
        let mut rows: Vec<usize> = (0..t).collect();
        for i in (1..t).rev() {
            rows.swap(i, (r.next() % (i as u64 + 1)) as usize);
        }
        let feed: Vec<(usize, usize)> = rows[..fed]
            .iter()
            .map(|&row| (row, (r.next() % n as u64) as usize))
            .collect();
        let run = |b: &dyn Fn(&[u32], &[u32]) -> HostVec| b(&ids, &tokens);
        let c = run(&|ids, tokens| feed_on(&cpu, ids, tokens, &feed));
        let gg = run(&|ids, tokens| feed_on(&g, ids, tokens, &feed));
        same_bits(&format!("feed_ids {t} ids, {n} tokens, {fed} fed"), &c, &gg);
    }
    // An unspecified tensor has its shape and dtype; an op then fills it.
    let mut e = g.empty(&[3, 5], DType::U32).unwrap();
    assert_eq!((e.shape(), e.dtype()), (&[3usize, 5][..], DType::U32));
    g.write(&mut e, HostSlice::U32(&[9; 15])).unwrap();
    assert_eq!(g.download(&e).unwrap(), HostVec::U32(vec![9; 15]));
    // Bad pairs are errors on both, and write nothing.
    for bad in [vec![(3, 0)], vec![(0, 2)], vec![(1, 0), (1, 1)]] {
        assert!(feed_fails(&cpu, &bad), "{bad:?} accepted on the CPU");
        assert!(feed_fails(&g, &bad), "{bad:?} accepted on the GPU");
    }

    // Downloads waited for out of order, one larger than the first buffers,
    // one dropped unread while later work is queued.
    let big: Vec<u32> = (0..10_000).map(|_| r.next() as u32).collect();
    let small: Vec<u32> = (0..3).map(|_| r.next() as u32).collect();
    let (bt, st) = (
        g.upload(HostSlice::U32(&big), &[big.len()]).unwrap(),
        g.upload(HostSlice::U32(&small), &[3]).unwrap(),
    );
    let (db, ds) = (
        g.download_start(&bt).unwrap(),
        g.download_start(&st).unwrap(),
    );
    let dropped = g.download_start(&bt).unwrap();
    let gu = g
        .upload(HostSlice::F32(&r.f32s(1 << 21, 2.0)), &[1 << 10, 1 << 11])
        .unwrap();
    let mut act = poisoned(&g, &[1 << 10, 1 << 10], DType::BF16);
    g.silu_mul(&gu, &mut act).unwrap();
    drop(dropped);
    assert_eq!(ds.wait().unwrap(), HostVec::U32(small));
    assert_eq!(db.wait().unwrap(), HostVec::U32(big));
    assert!(g
        .download(&act)
        .unwrap()
        .to_f32()
        .iter()
        .all(|x| x.is_finite()));

    // A download larger than one pass of the copying grid, and downloads
    // whose tensors are overwritten right after (by a copy, by a launch):
    // each reads what the tensor held when it was started.
    let huge: Vec<u32> = (0..100_003).map(|_| r.next() as u32).collect();
    let mut ht = g.upload(HostSlice::U32(&huge), &[huge.len()]).unwrap();
    let dh = g.download_start(&ht).unwrap();
    g.write(&mut ht, HostSlice::U32(&vec![7; huge.len()]))
        .unwrap();
    assert_eq!(dh.wait().unwrap(), HostVec::U32(huge));
    let two = [r.next() as u32, r.next() as u32];
    let mut tt = g.upload(HostSlice::U32(&two), &[2]).unwrap();
    let dt = g.download_start(&tt).unwrap();
    g.write_many(&mut [(&mut tt, HostSlice::U32(&[1, 2]))])
        .unwrap();
    let dt2 = g.download_start(&tt).unwrap();
    assert_eq!(dt2.wait().unwrap(), HostVec::U32(vec![1, 2]));
    assert_eq!(dt.wait().unwrap(), HostVec::U32(two.to_vec()));
}

/// Several small writes at once (`write_many`: merged into one launch up to
/// four tensors and 16 words, else written one by one): every tensor holds
/// what it was given, as on the CPU, and a length that does not match is an
/// error on both.
#[test]
fn small_writes_merged() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("write_many");
    for lens in [
        vec![1, 1],
        vec![1],
        vec![4, 4, 4, 4],
        vec![3, 0, 7, 6],
        vec![16],
        vec![17],
        vec![1, 1, 1, 1, 1],
        vec![300, 2],
    ] {
        let data: Vec<Vec<u32>> = lens
            .iter()
            .map(|&n| (0..n).map(|_| r.next() as u32).collect())
            .collect();
        let c = writes_on(&cpu, &data);
        let gg = writes_on(&g, &data);
        assert_eq!(c, gg, "write_many {lens:?}");
        assert_eq!(
            c,
            data.iter()
                .map(|d| HostVec::U32(d.clone()))
                .collect::<Vec<_>>()
        );
    }
    assert!(bad_write_fails(&cpu) && bad_write_fails(&g));
}

/// Tensors of `data`'s lengths, first filled with 7s, then given `data` by
/// one `write_many`; what they hold afterwards.
fn writes_on<B: Backend>(b: &B, data: &[Vec<u32>]) -> Vec<HostVec> {
    let mut ts: Vec<_> = data
        .iter()
        .map(|d| {
            b.upload(HostSlice::U32(&vec![7; d.len()]), &[d.len()])
                .unwrap()
        })
        .collect();
    let mut writes: Vec<_> = ts
        .iter_mut()
        .zip(data)
        .map(|(t, d)| (t, HostSlice::U32(d)))
        .collect();
    b.write_many(&mut writes).unwrap();
    ts.iter().map(|t| b.download(t).unwrap()).collect()
}

/// Whether `write_many` refuses two words for a one-word tensor.
fn bad_write_fails<B: Backend>(b: &B) -> bool {
    let mut t = b.upload(HostSlice::U32(&[5]), &[1]).unwrap();
    b.write_many(&mut [(&mut t, HostSlice::U32(&[1, 2]))])
        .is_err()
}

fn feed_on<B: Backend>(b: &B, ids: &[u32], tokens: &[u32], feed: &[(usize, usize)]) -> HostVec {
    let mut it = b.upload(HostSlice::U32(ids), &[ids.len()]).unwrap();
    let tt = b.upload(HostSlice::U32(tokens), &[tokens.len()]).unwrap();
    b.feed_ids(&tt, feed, &mut it).unwrap();
    b.download(&it).unwrap()
}

/// Whether `feed_ids` refuses `feed` over 3 ids and 2 tokens.
fn feed_fails<B: Backend>(b: &B, feed: &[(usize, usize)]) -> bool {
    let mut ids = b.upload(HostSlice::U32(&[7, 8, 9]), &[3]).unwrap();
    let tokens = b.upload(HostSlice::U32(&[1, 2]), &[2]).unwrap();
    let failed = b.feed_ids(&tokens, feed, &mut ids).is_err();
    failed && b.download(&ids).unwrap() == HostVec::U32(vec![7, 8, 9])
}

fn silu_on<B: Backend>(b: &B, gu: &[f32], t: usize, i: usize) -> HostVec {
    let x = b.upload(HostSlice::F32(gu), &[t, 2 * i]).unwrap();
    let mut out = poisoned(b, &[t, i], DType::BF16);
    b.silu_mul(&x, &mut out).unwrap();
    b.download(&out).unwrap()
}

/// A batch of sequences with the given contexts, each adding `new` tokens,
/// over a shuffled block pool.
fn layout(r: &mut Rng, contexts: &[(usize, usize)], bs: usize) -> (BatchLayout, usize) {
    let max_blocks = contexts.iter().map(|&(c, _)| c.div_ceil(bs)).max().unwrap();
    let total: usize = contexts.iter().map(|&(c, _)| c.div_ceil(bs)).sum();
    let mut pool: Vec<u32> = (0..total as u32).collect();
    for i in (1..pool.len()).rev() {
        pool.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    let mut l = BatchLayout {
        max_blocks,
        block_size: bs,
        ..Default::default()
    };
    let mut next = 0;
    for (s, &(ctx, new)) in contexts.iter().enumerate() {
        let nb = ctx.div_ceil(bs);
        let mut table = pool[next..next + nb].to_vec();
        next += nb;
        table.resize(max_blocks, 0);
        l.block_tables.extend(table);
        for p in ctx - new..ctx {
            l.positions.push(p as u32);
            l.seq_of_token.push(s as u32);
        }
    }
    (l, total)
}

fn geometry(
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
) -> AttnGeometry {
    AttnGeometry {
        num_q_heads,
        num_kv_heads,
        head_dim,
        block_size,
    }
}

struct AttnCase {
    geo: AttnGeometry,
    layout: BatchLayout,
    blocks: usize,
    qkv: Vec<f32>,
    qn: Vec<f32>,
    kn: Vec<f32>,
    kc: Vec<bf16>,
    vc: Vec<bf16>,
    rope: Vec<f32>,
}

/// Qwen3's rotation table (rope_theta 1e6) for positions `0..max_pos`:
/// cosines in the first d/2 columns of a row, sines in the rest.
fn rope_table(max_pos: usize, d: usize) -> Vec<f32> {
    let mut rope = vec![0.0f32; max_pos * d];
    for (p, row) in rope.chunks_mut(d).enumerate() {
        for i in 0..d / 2 {
            let a = p as f64 * 1e6f64.powf(-(2.0 * i as f64) / d as f64);
            row[i] = a.cos() as f32;
            row[d / 2 + i] = a.sin() as f32;
        }
    }
    rope
}

/// Random inputs of q/k-norm, RoPE and attention for sequences given as
/// (context, new tokens), the caches' blocks shuffled; k_norm has one of
/// Qwen3's huge channels.
fn attn_case(r: &mut Rng, geo: AttnGeometry, ctxs: &[(usize, usize)]) -> AttnCase {
    let (d, bs) = (geo.head_dim, geo.block_size);
    let (layout, blocks) = layout(r, ctxs, bs);
    let t = layout.num_tokens();
    let rope = rope_table(layout.max_context(), d);
    let mut kn = r.f32s(d, 1.0);
    kn[1] = 96.5;
    AttnCase {
        geo,
        qkv: r.f32s(t * geo.qkv_width(), 2.0),
        qn: r.f32s(d, 1.0),
        kn,
        kc: r.bf16s(blocks * bs * geo.num_kv_heads * d, 1.0),
        vc: r.bf16s(blocks * bs * geo.num_kv_heads * d, 1.0),
        rope,
        layout,
        blocks,
    }
}

/// q/k-norm + RoPE + cache store, then attention: as two ops, or as the
/// fused `qk_norm_rope_attention` (`fused`).
fn attn_on<B: Backend>(b: &B, c: &AttnCase, fused: bool) -> [HostVec; 4] {
    let geo = c.geo;
    let t = c.layout.num_tokens();
    let meta = b.upload_batch(&c.layout).unwrap();
    let qkv = b
        .upload(HostSlice::F32(&c.qkv), &[t, geo.qkv_width()])
        .unwrap();
    let qn = b.upload(HostSlice::F32(&c.qn), &[geo.head_dim]).unwrap();
    let kn = b.upload(HostSlice::F32(&c.kn), &[geo.head_dim]).unwrap();
    let max_pos = c.rope.len() / geo.head_dim;
    let rope = b
        .upload(HostSlice::F32(&c.rope), &[max_pos, geo.head_dim])
        .unwrap();
    let shape = geo.cache_shape(c.blocks);
    let mut kc = b.upload(HostSlice::BF16(&c.kc), &shape).unwrap();
    let mut vc = b.upload(HostSlice::BF16(&c.vc), &shape).unwrap();
    let mut q = poisoned(b, &[t, geo.q_width()], DType::BF16);
    let mut out = poisoned(b, &[t, geo.q_width()], DType::BF16);
    let scale = 1.0 / (geo.head_dim as f32).sqrt();
    if fused {
        b.qk_norm_rope_attention(
            &qkv, &qn, &kn, 1e-6, &rope, &meta, geo, scale, &mut q, &mut kc, &mut vc, &mut out,
        )
        .unwrap();
    } else {
        b.qk_norm_rope_store(
            &qkv, &qn, &kn, 1e-6, &rope, &meta, geo, &mut q, &mut kc, &mut vc,
        )
        .unwrap();
        b.attention(&q, &kc, &vc, &meta, geo, scale, &mut out)
            .unwrap();
    }
    [
        b.download(&q).unwrap(),
        b.download(&kc).unwrap(),
        b.download(&vc).unwrap(),
        b.download(&out).unwrap(),
    ]
}

#[test]
fn qk_norm_rope_and_attention() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("attention");
    let bs = 16;
    // (q heads, kv heads, head_dim, sequences as (context, new tokens)).
    type Case = (usize, usize, usize, Vec<(usize, usize)>);
    let cases: Vec<Case> = vec![
        (16, 8, 128, vec![(1, 1)]),
        (32, 8, 128, vec![(8192, 1)]),
        (16, 8, 128, (0..64).map(|i| (100 + 37 * i, 1)).collect()),
        (32, 8, 128, vec![(300, 300)]),
        (16, 8, 128, vec![(70, 70), (1000, 1), (65, 3)]),
        (4, 2, 32, vec![(77, 77), (5, 1)]),
        (12, 4, 64, vec![(129, 2)]),
        // Qwen3-32B's group of 8; head_dim 256 (over 48 KB of shared memory).
        (64, 8, 128, vec![(130, 1), (64, 2)]),
        // Qwen3-14B's group of 5: a second, partial pass of query heads.
        (40, 8, 128, vec![(150, 1), (33, 2)]),
        (8, 1, 256, vec![(200, 2)]),
        // Large decode batches (attn_span: spans of 4 chunks, two stages):
        // groups of 5 and 1, head widths 32 and 256.
        (40, 8, 128, (0..16).map(|i| (1 + 97 * i, 1)).collect()),
        (4, 2, 32, (0..64).map(|i| (300 + 5 * i, 1)).collect()),
        (8, 1, 256, (0..64).map(|i| (600 + 3 * i, 1)).collect()),
        // Query tiles (prompt runs cut into 16 tokens): a chunk of a prompt
        // beside decode tokens, 17-token runs, and groups of 8 and 5 whose
        // tile rows take several passes of 32 (the last one partial).
        (16, 8, 128, vec![(300, 40), (33, 1), (90, 17), (1, 1)]),
        (64, 8, 128, vec![(100, 40)]),
        (40, 8, 128, vec![(70, 20), (17, 17)]),
        (4, 2, 32, vec![(150, 150), (3, 2)]),
        // One token per sequence (the fused op's single kernel): new rows
        // that open a chunk, end one, or sit alone; every head width and
        // group. (The 64 sequences above exceed the one-kernel grid: two
        // kernels.)
        (16, 8, 128, vec![(64, 1), (65, 1), (128, 1), (2, 1)]),
        // Clusters of 8 and 16 chunks (attn_rope_cluster; the 1,000-position
        // case below is a group of 8 in clusters of 16).
        (16, 8, 128, vec![(500, 1)]),
        (16, 8, 128, vec![(1024, 1)]),
        (40, 8, 128, vec![(150, 1), (33, 1)]),
        (8, 1, 256, vec![(200, 1)]),
        (4, 2, 32, vec![(5, 1), (77, 1)]),
        (12, 4, 64, vec![(129, 1)]),
        (64, 8, 128, vec![(1000, 1)]),
        // Groups of 1, 3 and 4 in one pass (the _g2 and _g4 kernels),
        // clustered and not, 4 at head_dim 256 (PV in two rounds).
        (8, 8, 64, vec![(90, 1)]),
        (24, 8, 128, vec![(100, 1), (700, 1)]),
        (24, 8, 128, vec![(2000, 1)]),
        (32, 8, 128, vec![(300, 1)]),
        (32, 8, 128, vec![(1000, 1)]),
        (32, 8, 128, vec![(1500, 1)]),
        (8, 2, 256, vec![(200, 1)]),
        (8, 2, 256, vec![(1100, 1)]),
    ];
    for (hq, hkv, d, ctxs) in cases {
        let case = attn_case(&mut r, geometry(hq, hkv, d, bs), &ctxs);
        let t = case.layout.num_tokens();
        let c = attn_on(&cpu, &case, false);
        assert_eq!(
            attn_on(&cpu, &case, true),
            c,
            "the CPU's fused op is the two ops"
        );
        let what = format!("{hq}/{hkv} heads, d {d}, {} seqs, {t} tokens", ctxs.len());
        // Twice each: the second run reuses the chunk counters the first left behind.
        for run in ["first", "second", "fused", "fused again"] {
            let gg = attn_on(&g, &case, run.starts_with("fused"));
            for (i, name) in ["q", "k_cache", "v_cache", "attention"].iter().enumerate() {
                same_bits(&format!("{name} ({run} run): {what}"), &c[i], &gg[i]);
            }
        }
    }
}

/// A decode batch on the tensor cores: q/k-norm, RoPE, the cache store and
/// attention as one kernel (`qk_norm_rope_attention`, attn_tc_rope) give
/// the bits of the two ops (qk_norm_rope_store, then tensor-core
/// attention): q, both caches and the output. New rows at the start, end
/// and middle of a 64-key step and of a 1,024-key span, contexts of one to
/// three spans, every head width and groups of 1 to 16 q heads a kv head.
/// (tests/trace.rs checks that the one kernel is what runs.)
#[test]
fn tensor_core_rope_attention_equals_its_ops() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let mut r = Rng::new("tensor-core rope attention");
    let bs = 16;
    let spread: Vec<(usize, usize)> = (0..40).map(|i| (1 + 53 * i, 1)).collect();
    let edges: Vec<(usize, usize)> = [
        1, 2, 63, 64, 65, 128, 1023, 1024, 1025, 1090, 2048, 2049, 2600,
    ]
    .iter()
    .map(|&c| (c, 1))
    .collect();
    // (q heads, kv heads, head_dim, sequences as (context, new tokens)).
    type Case<'a> = (usize, usize, usize, &'a [(usize, usize)]);
    let cases: Vec<Case> = vec![
        (16, 8, 128, &edges),
        (16, 8, 128, &spread),
        (32, 8, 128, &edges),
        (64, 8, 128, &spread),
        (40, 8, 128, &edges),
        (4, 2, 32, &edges),
        (12, 4, 64, &spread),
        (16, 1, 64, &edges),
        (8, 1, 256, &edges),
    ];
    for (hq, hkv, d, ctxs) in cases {
        let case = attn_case(&mut r, geometry(hq, hkv, d, bs), ctxs);
        let t = case.layout.num_tokens();
        g.set_tensor_core_rows(t);
        let ops = attn_on(&g, &case, false);
        let what = format!("{hq}/{hkv} heads, d {d}, {t} tokens");
        // Twice: the second run reuses the span counters the first left behind.
        for run in ["fused", "fused again"] {
            let one = attn_on(&g, &case, true);
            for (i, name) in ["q", "k_cache", "v_cache", "attention"].iter().enumerate() {
                same_bits(&format!("{name} ({run}): {what}"), &ops[i], &one[i]);
            }
        }
        g.set_tensor_core_rows(0);
    }
}

/// Argmax, then the repetition penalty, then filtered sampling of the
/// penalised logits, on one backend.
fn sampling_on<B: Backend>(
    b: &B,
    l: &[f32],
    shape: [usize; 2],
    pen: &[f32],
    hist: &[Vec<u32>],
    p: &[SampleParams],
    u: &[f32],
) -> (Vec<u32>, HostVec, Vec<u32>) {
    let mut t = b.upload(HostSlice::F32(l), &shape).unwrap();
    let am = b.argmax(&t).unwrap();
    b.repetition_penalty(&mut t, pen, hist).unwrap();
    let s = b.sample(&t, p, u).unwrap();
    (am, b.download(&t).unwrap(), s)
}

#[test]
fn sampling_primitives() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("sampling");
    let (rows, v) = (8, 151_936);
    let mut logits = r.f32s(rows * v, 3.0);
    logits[v + 17] = 1e4; // a clear winner in row 1
    logits[2 * v + 5] = 50.0; // a tie in row 2: lowest index wins
    logits[2 * v + 9] = 50.0;
    let history: Vec<Vec<u32>> = (0..rows)
        .map(|i| {
            (0..50)
                .map(|j| ((i * 7919 + j * 104_729) % v) as u32)
                .collect()
        })
        .collect();
    let penalty: Vec<f32> = (0..rows).map(|i| 1.0 + 0.1 * i as f32).collect();
    let params: Vec<SampleParams> = (0..rows)
        .map(|i| SampleParams {
            temperature: 0.5 + 0.2 * i as f32,
            top_k: [0, 20, 1, 100][i % 4],
            top_p: [1.0, 0.95, 0.5, 0.8][i % 4],
            min_p: [0.0, 0.05][i % 2],
        })
        .collect();
    let uniform: Vec<f32> = (0..rows).map(|_| r.unit()).collect();
    let shape = [rows, v];
    let c = sampling_on(&cpu, &logits, shape, &penalty, &history, &params, &uniform);
    let gg = sampling_on(&g, &logits, shape, &penalty, &history, &params, &uniform);
    assert_eq!(c.0, gg.0, "argmax");
    let lt = g.upload(HostSlice::F32(&logits), &shape).unwrap();
    let mut on_device = poisoned(&g, &[rows], DType::U32);
    g.argmax_to(&lt, &mut on_device).unwrap();
    let later = g.download_start(&on_device).unwrap().wait().unwrap();
    assert_eq!(later, HostVec::U32(c.0.clone()), "argmax_to");
    assert_eq!(c.0[1], 17);
    assert_eq!(c.0[2], 5);
    same_bits("repetition_penalty", &c.1, &gg.1);
    assert_eq!(c.2, gg.2, "sample");
}

/// The largest f32 below 1, the largest uniform `sample` accepts.
const U_MAX: f32 = 1.0 - f32::EPSILON / 2.0;

/// One row of `v` logits in one of the shapes the sampler must survive.
fn sample_row(r: &mut Rng, kind: usize, v: usize) -> Vec<f32> {
    let mut row: Vec<f32> = match kind {
        // Peaked: one clear favourite over noise.
        0 => {
            let mut row = r.f32s(v, 1.0);
            row[(r.next() % v as u64) as usize] = 25.0;
            row
        }
        // Flat: every token ties, every weight is 2^40.
        1 => vec![1.25; v],
        // Coarse values: many ties at every level.
        2 => (0..v)
            .map(|_| (r.normal(2.0) * 2.0).round() * 0.5)
            .collect(),
        // Wide: most tokens fall below the q = 0 cut-off.
        3 => r.f32s(v, 30.0),
        // Nothing finite: NaN and -inf only, so the row is uniform.
        4 => (0..v)
            .map(|_| {
                if r.next().is_multiple_of(2) {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect(),
        // Typical logits, around a normal spread.
        _ => r.f32s(v, 3.0),
    };
    // Sprinkle specials: -inf, a few NaN, the odd +inf (which then ties).
    if kind >= 5 && v > 1 {
        for x in row.iter_mut() {
            match r.next() % 1000 {
                0..=99 if kind == 6 => *x = f32::NEG_INFINITY,
                100..=102 if kind >= 6 => *x = f32::NAN,
                103 if kind == 7 => *x = f32::INFINITY,
                _ => {}
            }
        }
    }
    row
}

/// Random parameters covering every filter and its disabled value.
fn sample_params(r: &mut Rng, v: usize) -> SampleParams {
    let pick = |r: &mut Rng, n: usize| (r.next() % n as u64) as usize;
    SampleParams {
        temperature: [0.3, 0.7, 1.0, 1.3, 2.0][pick(r, 5)],
        top_k: [0, 0, 1, 2, 20, 1000, v - 1, v, v + 5][pick(r, 9)],
        top_p: [1.0, 1.0, 0.1, 0.5, 0.8, 0.95, 0.999][pick(r, 7)],
        min_p: [0.0, 0.0, 0.01, 0.1, 0.5][pick(r, 5)],
    }
}

/// GPU and CPU tokens for one batch under several sets of uniforms,
/// including 0, the largest below 1, and exact multiples of 1/8.
fn check_sample_batch(g: &CudaBackend, r: &mut Rng, logits: &[f32], p: &[SampleParams]) -> usize {
    let cpu = CpuBackend::new();
    let rows = p.len();
    let v = logits.len() / rows;
    let ct = cpu.upload(HostSlice::F32(logits), &[rows, v]).unwrap();
    let gt = g.upload(HostSlice::F32(logits), &[rows, v]).unwrap();
    let mut cases = 0;
    for set in 0..6 {
        let u: Vec<f32> = (0..rows)
            .map(|i| match (set + i) % 6 {
                0 => 0.0,
                1 => U_MAX,
                2 => (r.next() % 8) as f32 / 8.0,
                _ => r.unit(),
            })
            .collect();
        let want = cpu.sample(&ct, p, &u).unwrap();
        let got = g.sample(&gt, p, &u).unwrap();
        for i in 0..rows {
            assert_eq!(
                got[i], want[i],
                "V {v}, row {i}: {:?}, u {}: gpu {} cpu {}",
                p[i], u[i], got[i], want[i]
            );
        }
        // The same draw left on the device and read back later.
        let mut on_device = poisoned(g, &[rows], DType::U32);
        g.sample_to(&gt, p, &u, &mut on_device).unwrap();
        let later = g.download_start(&on_device).unwrap().wait().unwrap();
        assert_eq!(later, HostVec::U32(want), "V {v}: sample_to");
        cases += rows;
    }
    cases
}

#[test]
fn sample_matches_cpu_on_random_rows() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new("sample");
    let mut cases = 0;
    // (rows, V, cut): Qwen3's vocabulary at batch 64 and 256, odd sizes
    // below and above one block's 1024 threads, a single token; rows with
    // mixed filters (Mixed) take sample_rows. Small: every row cut to a
    // small top-k (at most 27: 75 slices of Qwen3's vocabulary hand the
    // merge 2,025 keys), which takes the sliced kernels (sample_slices,
    // sample_merge). None: no row cut by top-k or top-p (temperature and
    // min-p only), which takes the index-order draw over slices
    // (draw_slice_max, draw_slice_sum, draw_finish); 2,049 and 4,097 leave
    // a last slice of one token.
    #[derive(Clone, Copy, PartialEq)]
    enum Cut {
        Mixed,
        Small,
        None,
    }
    for (rows, v, cut) in [
        (64, 151_936, Cut::Mixed),
        (256, 151_936, Cut::Mixed),
        (64, 1000, Cut::Mixed),
        (32, 1025, Cut::Mixed),
        (16, 3, Cut::Mixed),
        (8, 1, Cut::Mixed),
        (1, 151_936, Cut::Small),
        (16, 151_936, Cut::Small),
        (64, 151_936, Cut::Small),
        (24, 5000, Cut::Small),
        (8, 40, Cut::Small),
        (1, 151_936, Cut::None),
        (16, 151_936, Cut::None),
        (256, 151_936, Cut::None),
        (64, 2049, Cut::None),
        (8, 4097, Cut::None),
        // Rows of whole 16-byte groups whose last slice ends mid-group.
        (8, 4100, Cut::None),
        (16, 3, Cut::None),
        (4, 1, Cut::None),
    ] {
        let mut logits = Vec::with_capacity(rows * v);
        let mut params = Vec::with_capacity(rows);
        for i in 0..rows {
            logits.extend(sample_row(&mut r, i % 8, v));
            let mut p = sample_params(&mut r, v);
            match cut {
                Cut::Mixed => {}
                Cut::Small => p.top_k = [1, 2, 5, 20, 27][(r.next() % 5) as usize].min(v - 1),
                Cut::None => {
                    p.top_k = [0, v, v + 5][(r.next() % 3) as usize];
                    p.top_p = 1.0;
                }
            }
            params.push(p);
        }
        cases += check_sample_batch(&g, &mut r, &logits, &params);
    }
    println!("sample: {cases} (row, uniform) cases equal");
}

#[test]
fn sample_matches_cpu_on_exact_boundaries() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new("sample boundaries");
    let p = |top_k, top_p, min_p| SampleParams {
        temperature: 1.0,
        top_k,
        top_p,
        min_p,
    };
    // 256 equal weights: u = i/256 lands exactly between two tokens.
    let flat = vec![1.5f32; 256];
    let rows: Vec<f32> = flat.repeat(256);
    let ps = vec![p(0, 1.0, 0.0); 256];
    let us: Vec<f32> = (0..256).map(|i| i as f32 / 256.0).collect();
    let gt = g.upload(HostSlice::F32(&rows), &[256, 256]).unwrap();
    let got = g.sample(&gt, &ps, &us).unwrap();
    assert_eq!(got, (0..256).collect::<Vec<u32>>());
    // top_p whose tau equals a prefix sum exactly (4 x 2^40, top_p 0.5),
    // a tail weight that only just counts (e^-27 · 2^40 ≈ 2), min_p at 1.
    let mut logits = Vec::new();
    let mut params = Vec::new();
    for (row, top_p) in [
        (vec![0.0f32; 4], 0.5),
        (vec![0.0; 4], 0.5001),
        (vec![0.0; 4], 0.25),
        (vec![0.0, 0.0, -27.0, -27.0], 0.5),
        (vec![0.0, 0.0, -200.0, f32::NAN], 0.5),
        (vec![3.0, 3.0, 1.0, f32::INFINITY], 0.75),
    ] {
        for (top_k, min_p) in [(0, 0.0), (3, 0.0), (0, 1.0), (2, 1e-12)] {
            logits.extend_from_slice(&row);
            params.push(p(top_k, top_p, min_p));
        }
    }
    let cases = check_sample_batch(&g, &mut r, &logits, &params);
    println!("sample boundaries: {} cases equal", 256 + cases);
}

#[test]
fn sample_rejects_bad_inputs_like_cpu() {
    let Some(g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let ok = SampleParams::default();
    let with = |f: fn(&mut SampleParams)| {
        let mut p = ok;
        f(&mut p);
        p
    };
    let bad: Vec<(SampleParams, f32)> = vec![
        (with(|p| p.temperature = 0.0), 0.5),
        (with(|p| p.temperature = -1.0), 0.5),
        (with(|p| p.temperature = f32::NAN), 0.5),
        (with(|p| p.temperature = f32::INFINITY), 0.5),
        (with(|p| p.top_p = 0.0), 0.5),
        (with(|p| p.top_p = 1.5), 0.5),
        (with(|p| p.top_p = f32::NAN), 0.5),
        (with(|p| p.min_p = -0.1), 0.5),
        (with(|p| p.min_p = 1.1), 0.5),
        (with(|p| p.min_p = f32::NAN), 0.5),
        (ok, 1.0),
        (ok, -0.1),
        (ok, f32::NAN),
    ];
    /// Every call's outcome, errors as (kind, message).
    fn outcomes<B: Backend>(b: &B, bad: &[(SampleParams, f32)]) -> Vec<String> {
        let l = b
            .upload(HostSlice::F32(&[1.0, 2.0, 3.0, 4.0]), &[2, 2])
            .unwrap();
        let ok = SampleParams::default();
        let show = |r: qwen_tensor::Result<Vec<u32>>| match r {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => format!("{e:?}"),
        };
        let mut out: Vec<String> = bad
            .iter()
            // The bad row second: row numbers appear in the message.
            .map(|&(p, u)| show(b.sample(&l, &[ok, p], &[0.5, u])))
            .collect();
        out.push(show(b.sample(&l, &[ok], &[0.5, 0.5])));
        out.push(show(b.sample(&l, &[ok, ok], &[0.5])));
        let empty = b.zeros(&[2, 0], DType::F32).unwrap();
        out.push(show(b.sample(&empty, &[ok, ok], &[0.5, 0.5])));
        let ids = b.zeros(&[2, 2], DType::U32).unwrap();
        out.push(show(b.sample(&ids, &[ok, ok], &[0.5, 0.5])));
        let none = b.zeros(&[0, 5], DType::F32).unwrap();
        out.push(show(b.sample(&none, &[], &[])));
        out
    }
    let (c, gg) = (outcomes(&cpu, &bad), outcomes(&g, &bad));
    for (i, (c, gg)) in c.iter().zip(&gg).enumerate() {
        assert!(c.starts_with("Unsupported") || i >= bad.len(), "{c}");
        assert_eq!(c, gg, "case {i}");
    }
    assert_eq!(c.len(), gg.len());
}

#[test]
fn sample_time_per_row() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::new("sample timing");
    let v = 151_936;
    // (rows, row kind of `sample_row`, top_k): Qwen3's recommended filters
    // on a peaked row (few live tokens) and on rows where every token is
    // live, then no top-k at all (the passes run over the whole vocabulary).
    for (rows, kind, top_k) in [
        (1, 0, 20),
        (1, 5, 20),
        (1, 5, 0),
        (1, 1, 0),
        (64, 0, 20),
        (64, 5, 20),
        (64, 5, 0),
        (256, 5, 0),
    ] {
        let logits: Vec<f32> = (0..rows)
            .flat_map(|_| sample_row(&mut r, kind, v))
            .collect();
        let t = g.upload(HostSlice::F32(&logits), &[rows, v]).unwrap();
        let p = vec![
            SampleParams {
                temperature: 0.7,
                top_k,
                top_p: 0.95,
                min_p: 0.0,
            };
            rows
        ];
        let u = vec![0.3; rows];
        g.sample(&t, &p, &u).unwrap();
        let reps = 10;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            g.sample(&t, &p, &u).unwrap();
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / reps as f64;
        let what = ["peaked", "flat", "", "", "", "typical"][kind];
        println!("sample {what}, top_k {top_k}: B {rows}, V {v}: {us:.0} µs per call");
    }
}

/// Attention of the rows announced as prompt rows runs on the tensor
/// cores, within the bound `qwen_kernels_cpu::attention_tc_magnitudes`
/// states (1e-5·mag + 2⁻⁷·|cpu|) of the CPU spec; the rows after them
/// keep the exact kernels and match bit for bit, also inside a query tile
/// the boundary cuts and in one-token-per-sequence batches.
#[test]
fn tensor_core_attention_within_bound() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let cpu = CpuBackend::new();
    let mut r = Rng::new("tensor-core attention");
    // (q heads, kv heads, head_dim, sequences as (context, new tokens),
    // tensor-core rows), in blocks of 16 positions.
    type Case = (usize, usize, usize, Vec<(usize, usize)>, usize);
    let cases: Vec<Case> = vec![
        (16, 8, 128, vec![(300, 300)], 300),
        (32, 8, 128, vec![(1000, 20), (64, 64)], 84),
        // Rows in one span of 1,024 keys and in two.
        (16, 8, 128, vec![(1100, 100)], 100),
        // The boundary inside a 16-token tile, and beside decode tokens.
        (16, 8, 128, vec![(300, 40), (33, 1), (90, 17), (1, 1)], 45),
        (40, 8, 128, vec![(70, 20), (17, 17)], 30),
        (64, 8, 128, vec![(100, 40)], 40),
        (4, 2, 32, vec![(150, 150), (3, 2)], 151),
        (12, 4, 64, vec![(129, 2)], 1),
        (8, 1, 256, vec![(200, 2)], 2),
        // A group of 16: rows in passes of 128.
        (16, 1, 128, vec![(50, 20)], 20),
        // Five spans (the merge's loads four spans at a time, then one), and
        // 23 for a tile of 256 rows: more factors than the merge keeps at
        // once (head_dim 32), so its rows merge in two rounds.
        (16, 8, 128, vec![(4500, 40)], 40),
        (16, 1, 32, vec![(23000, 16)], 16),
        // One token per sequence: some, or all, on the tensor cores.
        (16, 8, 128, (0..64).map(|i| (100 + 37 * i, 1)).collect(), 10),
        (16, 8, 128, (0..64).map(|i| (1 + 29 * i, 1)).collect(), 64),
    ];
    // Other block sizes: smaller than the rows between a thread's copies,
    // not dividing a 64-key step, larger than a step, and one block a
    // sequence (as `verify` lays them out).
    let other_blocks: Vec<(usize, Case)> = vec![
        (5, (16, 8, 128, vec![(1100, 100), (70, 1)], 101)),
        (3, (4, 2, 32, vec![(150, 150), (3, 2)], 151)),
        (
            40,
            (16, 8, 128, (0..16).map(|i| (100 + 97 * i, 1)).collect(), 16),
        ),
        (100, (12, 4, 64, vec![(300, 120), (129, 2)], 121)),
        (1200, (16, 8, 128, vec![(1100, 100)], 100)),
    ];
    let cases = cases.into_iter().map(|c| (16, c)).chain(other_blocks);
    let mut worst = 0.0f64;
    for (bs, (hq, hkv, d, ctxs, tc)) in cases {
        let geo = geometry(hq, hkv, d, bs);
        let (layout, blocks) = layout(&mut r, &ctxs, bs);
        let t = layout.num_tokens();
        let q = r.bf16s(t * geo.q_width(), 1.0);
        let mut kc = r.bf16s(blocks * bs * hkv * d, 1.0);
        for (i, k) in kc.iter_mut().enumerate() {
            if i % d == 1 {
                *k = bf16::from_f32(k.to_f32() * 96.5); // Qwen3's huge k_norm channels
            }
        }
        let vc = r.bf16s(blocks * bs * hkv * d, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let c = attention_only(&cpu, geo, &layout, blocks, &q, &kc, &vc, scale);
        g.set_tensor_core_rows(tc);
        let gg = attention_only(&g, geo, &layout, blocks, &q, &kc, &vc, scale);
        g.set_tensor_core_rows(0);
        let what =
            format!("{hq}/{hkv} heads, d {d}, {t} tokens, {tc} on tensor cores, blocks of {bs}");
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let mag = attention_tc_magnitudes(geo, &layout, &f(&q), &f(&kc), &f(&vc), scale);
        let (cb, gb, cf, gf) = (c.to_bits(), gg.to_bits(), c.to_f32(), gg.to_f32());
        let row = hq * d;
        for i in 0..cf.len() {
            if i >= tc * row {
                assert_eq!(cb[i], gb[i], "{what}: exact row element {i}");
                continue;
            }
            let diff = (cf[i] as f64 - gf[i] as f64).abs();
            let allowed =
                TC_ATTENTION_FACTOR * mag[i] as f64 + 2f64.powi(-7) * (cf[i] as f64).abs();
            assert!(
                diff <= allowed,
                "{what}: element {i} (token {}): cpu {} gpu {}, bound {allowed:.3e}",
                i / row,
                cf[i],
                gf[i]
            );
            if diff > 0.0 {
                worst = worst.max(diff / allowed);
            }
        }
    }
    println!("tensor-core attention: worst |gpu - cpu| / bound = {worst:.3e}");
}

/// Attention alone (no RoPE) on one backend, q and the caches given.
#[allow(clippy::too_many_arguments)]
fn attention_only<B: Backend>(
    b: &B,
    geo: AttnGeometry,
    layout: &BatchLayout,
    blocks: usize,
    q: &[bf16],
    kc: &[bf16],
    vc: &[bf16],
    scale: f32,
) -> HostVec {
    let t = layout.num_tokens();
    let meta = b.upload_batch(layout).unwrap();
    let qt = b.upload(HostSlice::BF16(q), &[t, geo.q_width()]).unwrap();
    let shape = geo.cache_shape(blocks);
    let kt = b.upload(HostSlice::BF16(kc), &shape).unwrap();
    let vt = b.upload(HostSlice::BF16(vc), &shape).unwrap();
    let mut out = poisoned(b, &[t, geo.q_width()], DType::BF16);
    b.attention(&qt, &kt, &vt, &meta, geo, scale, &mut out)
        .unwrap();
    b.download(&out).unwrap()
}

/// A tensor-core attention row depends on nothing but the row: a prompt's
/// rows give the same bits as one batch, in chunks that start mid-tile or
/// straddle a span of keys, behind other sequences' rows, and one token at
/// a time among other sequences' decode tokens.
#[test]
fn tensor_core_attention_is_batch_invariant() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let mut r = Rng::new("tensor-core attention invariance");
    let bs = 16;
    // Groups of 2, 4, 8 and 16 q heads a kv head.
    for (hq, hkv, d) in [
        (16, 8, 128),
        (32, 8, 128),
        (4, 2, 32),
        (64, 8, 128),
        (16, 1, 64),
    ] {
        let geo = geometry(hq, hkv, d, bs);
        // Sequence 0: a 1,300-token prompt (two spans of 1,024 keys); sequences
        // 1..: others of 90 (decode batches of 21, 11 and 6 tokens: grids of
        // 2.5, 1.3 and 0.7 blocks an H100 SM at 8 kv heads).
        let (len, others) = (1300, 20);
        let (base, blocks) = layout(
            &mut r,
            &std::iter::once((len, len))
                .chain((0..others).map(|_| (90, 90)))
                .collect::<Vec<_>>(),
            bs,
        );
        let kc = r.bf16s(blocks * bs * hkv * d, 1.0);
        let vc = r.bf16s(blocks * bs * hkv * d, 1.0);
        // q of sequence 0's positions, and of the others' (row 300 + 90s + p).
        let qw = geo.q_width();
        let qall = r.bf16s(base.num_tokens() * qw, 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        // A batch of (sequence, positions) runs; returns sequence 0's rows by position.
        let batch = |runs: &[(usize, std::ops::Range<usize>)]| -> Vec<(usize, Vec<u32>)> {
            let mut l = BatchLayout {
                max_blocks: base.max_blocks,
                block_size: bs,
                block_tables: base.block_tables.clone(),
                ..Default::default()
            };
            let mut q = Vec::new();
            for (s, ps) in runs {
                for p in ps.clone() {
                    l.positions.push(p as u32);
                    l.seq_of_token.push(*s as u32);
                    let row = if *s == 0 { p } else { len + 90 * (s - 1) + p };
                    q.extend_from_slice(&qall[row * qw..][..qw]);
                }
            }
            g.set_tensor_core_rows(l.num_tokens());
            let out = attention_only(&g, geo, &l, blocks, &q, &kc, &vc, scale).to_bits();
            g.set_tensor_core_rows(0);
            let mut rows = Vec::new();
            let mut i = 0;
            for (s, ps) in runs {
                for p in ps.clone() {
                    if *s == 0 {
                        rows.push((p, out[i * qw..][..qw].to_vec()));
                    }
                    i += 1;
                }
            }
            rows
        };
        let whole: Vec<Vec<u32>> = batch(&[(0, 0..len)]).into_iter().map(|(_, v)| v).collect();
        let arrangements: Vec<Vec<(usize, std::ops::Range<usize>)>> = vec![
            vec![(0, 0..37)],
            vec![(0, 37..120), (1, 0..90)],
            vec![(2, 0..7), (0, 120..300), (3, 50..90)],
            vec![(0, 300..505), (4, 0..90)],
            vec![(0, 505..1100)],
            vec![(1, 3..90), (0, 1100..1300)],
            (0..others)
                .map(|s| (s + 1, 89..90))
                .chain([(0, 200..201)])
                .collect(),
            (0..others)
                .map(|s| (s + 1, 89..90))
                .chain([(0, 1050..1051)])
                .collect(),
            (0..10)
                .map(|s| (s + 1, 89..90))
                .chain([(0, 700..701)])
                .collect(),
            (0..5)
                .map(|s| (s + 1, 89..90))
                .chain([(0, 1200..1201)])
                .collect(),
            vec![(0, 1299..1300)],
            // Decode tokens ahead of a prompt chunk (as the scheduler orders
            // a step), one of them over two spans; and behind one.
            (0..others)
                .map(|s| (s + 1, 89..90))
                .chain([(0, 700..900)])
                .collect(),
            vec![(0, 1100..1101), (1, 3..90), (2, 89..90)],
            vec![(0, 900..1000), (1, 89..90), (2, 89..90)],
        ];
        for runs in arrangements {
            for (p, bits) in batch(&runs) {
                assert_eq!(
                    bits, whole[p],
                    "{hq}/{hkv} d {d}: position {p} differs in {runs:?} from the whole prompt"
                );
            }
        }
    }
}

/// One decoder layer's weights on the host, random at the given shape
/// (k_norm with one of Qwen3's huge channels).
struct LayerHost {
    input_norm: Vec<f32>,
    qkv: Vec<bf16>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    o_proj: Vec<bf16>,
    post_norm: Vec<f32>,
    gate_up: Vec<bf16>,
    down: Vec<bf16>,
}

fn layer_host(r: &mut Rng, geo: AttnGeometry, h: usize, i: usize) -> LayerHost {
    let (d, qw) = (geo.head_dim, geo.q_width());
    let mut k_norm = r.f32s(d, 1.0);
    k_norm[3] = 96.5;
    LayerHost {
        input_norm: r.f32s(h, 1.0),
        qkv: r.bf16s(geo.qkv_width() * h, 0.05),
        q_norm: r.f32s(d, 1.0),
        k_norm,
        o_proj: r.bf16s(h * qw, 0.03),
        post_norm: r.f32s(h, 1.0),
        gate_up: r.bf16s(2 * i * h, 0.05),
        down: r.bf16s(h * i, 0.03),
    }
}

/// A layer's eight weights on backend `b`, in `LayerWeights`' field order.
fn upload_layer<B: Backend>(
    b: &B,
    l: &LayerHost,
    geo: AttnGeometry,
    (h, i): (usize, usize),
) -> [Tensor<B>; 8] {
    let up_f = |v: &[f32], s: &[usize]| b.upload(HostSlice::F32(v), s).unwrap();
    let up_b = |v: &[bf16], s: &[usize]| b.upload(HostSlice::BF16(v), s).unwrap();
    [
        up_f(&l.input_norm, &[h]),
        up_b(&l.qkv, &[geo.qkv_width(), h]),
        up_f(&l.q_norm, &[geo.head_dim]),
        up_f(&l.k_norm, &[geo.head_dim]),
        up_b(&l.o_proj, &[h, geo.q_width()]),
        up_f(&l.post_norm, &[h]),
        up_b(&l.gate_up, &[2 * i, h]),
        up_b(&l.down, &[h, i]),
    ]
}

/// The weights of [`upload_layer`] as the layer op takes them.
fn layer_weights<B: Backend>(w: &[Tensor<B>; 8]) -> LayerWeights<'_, B> {
    LayerWeights {
        input_norm: &w[0],
        qkv: &w[1],
        q_norm: &w[2],
        k_norm: &w[3],
        o_proj: &w[4],
        post_attention_norm: &w[5],
        gate_up: &w[6],
        down: &w[7],
        next_input_norm: None,
    }
}

/// `layers` decoder layers in sequence over one token (x, every layer's
/// caches), through `Backend::decoder_layer`, each layer handing the next
/// its input norm: returns x after each layer, then each layer's k and v
/// caches, q, attention output and act, then the norm each layer but the
/// last wrote for the next.
fn layers_on<B: Backend>(
    b: &B,
    layers: &[LayerHost],
    geo: AttnGeometry,
    (h, i): (usize, usize),
    c: &AttnCase,
    x0: &[f32],
) -> Vec<HostVec> {
    let up_f = |v: &[f32], s: &[usize]| b.upload(HostSlice::F32(v), s).unwrap();
    let up_b = |v: &[bf16], s: &[usize]| b.upload(HostSlice::BF16(v), s).unwrap();
    let meta = b.upload_batch(&c.layout).unwrap();
    let max_pos = c.rope.len() / geo.head_dim;
    let rope = up_f(&c.rope, &[max_pos, geo.head_dim]);
    let mut x = up_f(x0, &[1, h]);
    let mut normed = poisoned(b, &[1, h], DType::BF16);
    let ws: Vec<_> = layers
        .iter()
        .map(|l| upload_layer(b, l, geo, (h, i)))
        .collect();
    let mut out = Vec::new();
    let mut tail = Vec::new();
    let mut norms = Vec::new();
    for (li, w) in ws.iter().enumerate() {
        let mut lw = layer_weights(w);
        lw.next_input_norm = ws.get(li + 1).map(|n| &n[0]);
        let shape = geo.cache_shape(c.blocks);
        let mut kc = up_b(&c.kc, &shape);
        let mut vc = up_b(&c.vc, &shape);
        let mut qkv = poisoned(b, &[1, geo.qkv_width()], DType::F32);
        let mut q = poisoned(b, &[1, geo.q_width()], DType::BF16);
        let mut attn = poisoned(b, &[1, geo.q_width()], DType::BF16);
        let mut gate_up = poisoned(b, &[1, 2 * i], DType::F32);
        let mut act = poisoned(b, &[1, i], DType::BF16);
        let inp = LayerInputs {
            rope: &rope,
            eps: 1e-6,
            meta: &meta,
            geo,
            scale: 1.0 / (geo.head_dim as f32).sqrt(),
            normed_input: li > 0,
        };
        let acts = LayerActs {
            qkv: &mut qkv,
            q: &mut q,
            attn: &mut attn,
            gate_up: &mut gate_up,
            act: &mut act,
            normed: &mut normed,
        };
        b.decoder_layer(&lw, inp, &mut x, &mut kc, &mut vc, acts)
            .unwrap();
        out.push(b.download(&x).unwrap());
        for t in [&kc, &vc, &qkv, &q, &attn, &act] {
            tail.push(b.download(t).unwrap());
        }
        if li + 1 < ws.len() {
            norms.push(b.download(&normed).unwrap());
        }
    }
    out.extend(tail);
    out.extend(norms);
    out
}

#[test]
fn decoder_layer_at_one_token() {
    let Some(mut g) = gpu() else { return };
    let cpu = CpuBackend::new();
    let mut r = Rng::new("decoder_layer");
    let bs = 16;
    // Qwen3-0.6B's layer (one kernel on the GPU at one token) and an odd
    // shape that takes the ops one by one; contexts of one position, a
    // partial chunk, many chunks, and more (kv head, chunk) pairs than SMs.
    let shapes = [(16, 8, 1024, 3072), (4, 2, 96, 80)];
    for (hq, hkv, h, i) in shapes {
        let d = if h == 96 { 32 } else { 128 };
        let geo = geometry(hq, hkv, d, bs);
        for ctx in [1, 100, 700, 3000] {
            let (layout, blocks) = layout(&mut r, &[(ctx, 1)], bs);
            let rope = rope_table(ctx, d);
            let case = AttnCase {
                geo,
                qkv: Vec::new(),
                qn: Vec::new(),
                kn: Vec::new(),
                kc: r.bf16s(blocks * bs * hkv * d, 1.0),
                vc: r.bf16s(blocks * bs * hkv * d, 1.0),
                rope,
                layout,
                blocks,
            };
            let layers: Vec<LayerHost> = (0..3).map(|_| layer_host(&mut r, geo, h, i)).collect();
            let x0 = r.f32s(h, 3.0);
            let c = layers_on(&cpu, &layers, geo, (h, i), &case, &x0);
            let names = ["k_cache", "v_cache", "qkv", "q", "attn", "act"];
            let n = layers.len();
            // Twice: the second run reuses the barrier and chunk counters
            // the first left behind. Then the default path: the layer kernel
            // off, the layers as ops, each handing the next its norm.
            for run in ["first", "second", "ops"] {
                g.set_layer_kernel(run != "ops").unwrap();
                let gg = layers_on(&g, &layers, geo, (h, i), &case, &x0);
                assert_eq!(gg.len(), c.len());
                for (j, (cv, gv)) in c.iter().zip(&gg).enumerate() {
                    let name = if j < n {
                        format!("x after layer {j}")
                    } else if j < n + n * names.len() {
                        let k = j - n;
                        format!("layer {} {}", k / names.len(), names[k % names.len()])
                    } else {
                        format!("layer {} next input norm", j - n - n * names.len())
                    };
                    let what =
                        format!("{name} ({run} run): {hq}/{hkv} heads, h {h}, i {i}, ctx {ctx}");
                    same_bits(&what, cv, gv);
                }
            }
        }
    }
}

/// A layer whose rows are all on the tensor cores takes decoder_layer_tc
/// (o_proj's split-K sum, residual add and post-attention norm in one
/// kernel, and down's with the next layer's input norm; from 512 prompt
/// rows at head_dim 128 the QKV projection with q/k-norm, RoPE and the
/// cache store in its epilogue) where it applies: every output, the next
/// layer's norm included, the same bits as the ops one by one
/// (`decoder_layer_ops` on the same backend), for a prompt (of 300 and of
/// 2,200 tokens, the input norm made by the layer or handed in), decode
/// tokens beside it, and 256 decode tokens; and an odd shape it does not
/// take (the ops themselves). `qkv` is a workspace of the layer op (the
/// fused epilogue never writes it), so it is not compared.
#[test]
fn tensor_core_decoder_layer_equals_its_ops() {
    let Some(mut g) = gpu() else { return };
    g.set_exact(false);
    let mut r = Rng::new("tensor-core decoder_layer");
    let bs = 16;
    for (hq, hkv, h, i) in [(16, 8, 1024, 3072), (4, 2, 96, 80)] {
        let d = if h == 96 { 32 } else { 128 };
        let geo = geometry(hq, hkv, d, bs);
        // (sequences, whether the layer's input norm is handed in).
        let runs: Vec<(Vec<(usize, usize)>, bool)> = vec![
            (vec![(300, 300)], false),
            // Enough rows for o_proj's and down's K shares in the blocks,
            // and for the QKV projection's RoPE epilogue.
            (vec![(2200, 2200)], false),
            (vec![(2200, 2200)], true),
            (
                std::iter::once((120, 57))
                    .chain((0..20).map(|j| (40 + 31 * j, 1)))
                    .collect(),
                false,
            ),
            ((0..256).map(|j| (1 + 3 * j, 1)).collect(), false),
        ];
        for (seqs, normed_input) in runs {
            let (l, blocks) = layout(&mut r, &seqs, bs);
            let t = l.num_tokens();
            let lh = layer_host(&mut r, geo, h, i);
            let kc0 = r.bf16s(blocks * bs * hkv * d, 1.0);
            let vc0 = r.bf16s(blocks * bs * hkv * d, 1.0);
            let x0 = r.f32s(t * h, 3.0);
            let next_norm = r.f32s(h, 1.0);
            let normed0 = r.bf16s(t * h, 1.0);
            let max_pos = l.positions.iter().max().map_or(1, |&p| p as usize + 1);
            let rope = rope_table(max_pos, d);
            let run = |fused: bool| -> Vec<HostVec> {
                let up_f = |v: &[f32], s: &[usize]| g.upload(HostSlice::F32(v), s).unwrap();
                let up_b = |v: &[bf16], s: &[usize]| g.upload(HostSlice::BF16(v), s).unwrap();
                let w = upload_layer(&g, &lh, geo, (h, i));
                let next = up_f(&next_norm, &[h]);
                let mut lw = layer_weights(&w);
                lw.next_input_norm = Some(&next);
                let meta = g.upload_batch(&l).unwrap();
                let rope_t = up_f(&rope, &[max_pos, d]);
                let shape = geo.cache_shape(blocks);
                let (mut kc, mut vc) = (up_b(&kc0, &shape), up_b(&vc0, &shape));
                let mut x = up_f(&x0, &[t, h]);
                let mut qkv = poisoned(&g, &[t, geo.qkv_width()], DType::F32);
                let mut q = poisoned(&g, &[t, geo.q_width()], DType::BF16);
                let mut attn = poisoned(&g, &[t, geo.q_width()], DType::BF16);
                let mut gate_up = poisoned(&g, &[t, 2 * i], DType::F32);
                let mut act = poisoned(&g, &[t, i], DType::BF16);
                let mut normed = if normed_input {
                    up_b(&normed0, &[t, h])
                } else {
                    poisoned(&g, &[t, h], DType::BF16)
                };
                let inp = LayerInputs {
                    rope: &rope_t,
                    eps: 1e-6,
                    meta: &meta,
                    geo,
                    scale: 1.0 / (d as f32).sqrt(),
                    normed_input,
                };
                let acts = LayerActs {
                    qkv: &mut qkv,
                    q: &mut q,
                    attn: &mut attn,
                    gate_up: &mut gate_up,
                    act: &mut act,
                    normed: &mut normed,
                };
                g.set_tensor_core_rows(t);
                if fused {
                    g.decoder_layer(&lw, inp, &mut x, &mut kc, &mut vc, acts)
                        .unwrap();
                } else {
                    decoder_layer_ops(&g, &lw, inp, &mut x, &mut kc, &mut vc, acts).unwrap();
                }
                g.set_tensor_core_rows(0);
                [&x, &kc, &vc, &q, &attn, &gate_up, &act, &normed]
                    .iter()
                    .map(|t| g.download(t).unwrap())
                    .collect()
            };
            let (fused, ops) = (run(true), run(false));
            let names = [
                "x",
                "k_cache",
                "v_cache",
                "q",
                "attn",
                "gate_up",
                "act",
                "next input norm",
            ];
            for ((name, a), b) in names.iter().zip(&fused).zip(&ops) {
                same_bits(
                    &format!("{name}: h {h}, {t} rows, normed input {normed_input}"),
                    b,
                    a,
                );
            }
        }
    }
}

/// Which of these fail on backend `b`: uploading layouts with a position
/// past its block-table row or a missing row, then q/k-norm + RoPE and
/// attention with a rope table or caches too small for the batch, or
/// blocks of another size.
fn bad_batch_results<B: Backend>(b: &B) -> Vec<bool> {
    let l = |pos: u32, seq: u32| BatchLayout {
        positions: vec![pos],
        seq_of_token: vec![seq],
        block_tables: vec![3, 0, 1, 2],
        max_blocks: 4,
        block_size: 16,
    };
    let mut res = vec![
        b.upload_batch(&l(70, 0)).is_ok(),
        b.upload_batch(&l(3, 1)).is_ok(),
    ];
    let meta = b.upload_batch(&l(40, 0)).unwrap();
    let geo = geometry(2, 1, 32, 16);
    for (rope_rows, blocks, bs) in [(41, 4, 16), (40, 4, 16), (41, 3, 16), (41, 8, 8)] {
        let geo = AttnGeometry {
            block_size: bs,
            ..geo
        };
        let z = |s: &[usize], d| b.zeros(s, d).unwrap();
        let qkv = z(&[1, geo.qkv_width()], DType::F32);
        let (qn, kn) = (z(&[32], DType::F32), z(&[32], DType::F32));
        let rope = z(&[rope_rows, 32], DType::F32);
        let (mut q, mut out) = (z(&[1, 64], DType::BF16), z(&[1, 64], DType::BF16));
        let mut kc = z(&geo.cache_shape(blocks), DType::BF16);
        let mut vc = z(&geo.cache_shape(blocks), DType::BF16);
        let (mut q2, mut out2) = (z(&[1, 64], DType::BF16), z(&[1, 64], DType::BF16));
        res.push(
            b.qk_norm_rope_store(
                &qkv, &qn, &kn, 1e-6, &rope, &meta, geo, &mut q, &mut kc, &mut vc,
            )
            .is_ok(),
        );
        res.push(b.attention(&q, &kc, &vc, &meta, geo, 1.0, &mut out).is_ok());
        res.push(
            b.qk_norm_rope_attention(
                &qkv, &qn, &kn, 1e-6, &rope, &meta, geo, 1.0, &mut q2, &mut kc, &mut vc, &mut out2,
            )
            .is_ok(),
        );
    }
    b.synchronize().unwrap();
    res
}

#[test]
fn bad_batches_are_errors_as_on_the_cpu() {
    // Uploads: both bad. Then per case (rope, attention, fused): all fine;
    // rope one row short; caches one block short; blocks of 8, not 16.
    let c = bad_batch_results(&CpuBackend::new());
    let want = [
        false, false, true, true, true, false, true, false, false, false, false, false, false,
        false,
    ];
    assert_eq!(c, want);
    let Some(g) = gpu() else { return };
    assert_eq!(bad_batch_results(&g), c);
}
