//! Launchers for sampling.cu: argmax, the repetition penalty and filtered
//! sampling, each returning what its CPU twin in `qwen-kernels-cpu` returns.

use qwen_tensor::{expect_2d, Backend, DType, HostSlice, Result, SampleParams};

use cudarc::driver::CudaSlice;

use crate::device::{dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::{CudaBackend, Scratch};

/// Blocks per row of the argmax's first pass (ARGMAX_SLICES in sampling.cu).
const ARGMAX_SLICES: u32 = 32;

impl CudaBackend {
    /// Argmax per row (twin of `qwen_kernels_cpu::argmax`): 32 blocks per
    /// row reduce slices, then a warp per row reduces the slices.
    pub(crate) fn argmax_impl(&self, logits: &T) -> Result<Vec<u32>> {
        let (rows, _) = expect_2d("argmax", "logits", logits)?;
        self.with_scratch(Scratch::ArgmaxOut, &[rows], DType::U32, |out| {
            self.argmax_to_impl(logits, out)?;
            if rows == 0 {
                return Ok(Vec::new());
            }
            self.dev
                .stream
                .clone_dtoh(u32s("argmax", "out", out)?)
                .map_err(dev)
                .map(|mut h| {
                    h.truncate(rows);
                    h
                })
        })
    }

    /// [`argmax_impl`](Self::argmax_impl) into `out` (u32 `[B]`), nothing
    /// downloaded.
    pub(crate) fn argmax_to_impl(&self, logits: &T, out: &mut T) -> Result<()> {
        const OP: &str = "argmax";
        let (rows, v) = expect_2d(OP, "logits", logits)?;
        if v == 0 {
            return Err(shape_err(OP, "empty vocabulary".into()));
        }
        qwen_tensor::expect_shape(OP, "out", out, &[rows])?;
        if rows == 0 {
            return Ok(());
        }
        let vi = int(OP, v)?;
        let parts = [rows * ARGMAX_SLICES as usize];
        self.with_scratch(Scratch::ArgmaxValues, &parts, DType::F32, |pv| {
            self.with_scratch(Scratch::ArgmaxIndices, &parts, DType::U32, |pi| {
                let mut b = self.launch(self.kernel("argmax_slices"));
                b.arg(f32s(OP, "logits", logits)?)
                    .arg(&vi)
                    .arg(f32s_mut(OP, "partial values", pv)?)
                    .arg(u32s_mut(OP, "partial indices", pi)?);
                let cfg = grid((rows as u32, ARGMAX_SLICES, 1), (256, 1, 1));
                // SAFETY: argument order and types match argmax_slices in sampling.cu;
                // the partial buffers hold ARGMAX_SLICES entries per row.
                unsafe { b.launch(cfg) }.map_err(dev)?;
                let mut b = self.launch(self.kernel("argmax_finish"));
                b.arg(f32s(OP, "partial values", pv)?)
                    .arg(u32s(OP, "partial indices", pi)?)
                    .arg(u32s_mut(OP, "out", out)?);
                // SAFETY: argument order and types match argmax_finish in sampling.cu
                // (one warp per row, one lane per slice); out holds one index per row.
                unsafe { b.launch(grid((rows as u32, 1, 1), (ARGMAX_SLICES, 1, 1))) }.map_err(dev)
            })
        })
    }

    /// The repetition penalty (twin of `qwen_kernels_cpu::repetition_penalty`):
    /// ids are deduplicated and range-checked on the host before any logit
    /// changes, then one thread per (row, id) pair applies HF's rule.
    pub(crate) fn repetition_penalty_impl(
        &self,
        logits: &mut T,
        penalty: &[f32],
        history: &[Vec<u32>],
    ) -> Result<()> {
        const OP: &str = "repetition_penalty";
        let (rows, v) = expect_2d(OP, "logits", logits)?;
        if penalty.len() != rows || history.len() != rows {
            return Err(shape_err(
                OP,
                format!(
                    "{rows} rows but {} penalties and {} histories",
                    penalty.len(),
                    history.len()
                ),
            ));
        }
        let mut pairs = Vec::new();
        for (r, hist) in history.iter().enumerate() {
            let mut seen = hist.clone();
            seen.sort_unstable();
            seen.dedup();
            if let Some(&bad) = seen.iter().find(|&&id| id as usize >= v) {
                return Err(shape_err(OP, format!("token {bad} outside vocabulary {v}")));
            }
            pairs.extend(seen.into_iter().flat_map(|id| [r as u32, id]));
        }
        let n = pairs.len() / 2;
        if n == 0 {
            return Ok(());
        }
        let pairs = self.upload(HostSlice::U32(&pairs), &[2 * n])?;
        let pen = self.upload(HostSlice::F32(penalty), &[rows])?;
        let (vi, ni) = (int(OP, v)?, int(OP, n)?);
        let mut b = self.launch(self.kernel("repetition_penalty"));
        b.arg(f32s_mut(OP, "logits", logits)?)
            .arg(&vi)
            .arg(u32s(OP, "pairs", &pairs)?)
            .arg(f32s(OP, "penalty", &pen)?)
            .arg(&ni);
        // SAFETY: argument order and types match repetition_penalty in sampling.cu;
        // every (row, id) pair is in range and distinct.
        unsafe { b.launch(grid(((n as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }

    /// Filtered sampling on the GPU, token for token the CPU spec
    /// (`qwen_kernels_cpu::sample`): parameters are checked here exactly as
    /// the CPU checks them, the per-row parameters are uploaded, one block
    /// per row runs `sample_rows` (sampling.cu says why it is exact) or,
    /// when every row has a small top-k, `sample_slices` and
    /// `sample_merge`, or when no row has a top-k or top-p cut,
    /// `draw_slice_max`, `draw_slice_sum` and `draw_finish`; only the `B`
    /// token ids come back.
    pub(crate) fn sample_impl(
        &self,
        logits: &T,
        params: &[SampleParams],
        uniform: &[f32],
    ) -> Result<Vec<u32>> {
        const OP: &str = "sample";
        let (rows, _) = expect_2d(OP, "logits", logits)?;
        let s = &self.dev.stream;
        // The paths write every row's id before anything reads it.
        let mut out = s.alloc_zeros::<u32>(rows.max(1)).map_err(dev)?;
        self.sample_launch(logits, params, uniform, &mut out)?;
        let mut h = s.clone_dtoh(&out).map_err(dev)?;
        h.truncate(rows);
        Ok(h)
    }

    /// [`sample_impl`](Self::sample_impl) into `out` (u32 `[B]`), nothing
    /// downloaded.
    pub(crate) fn sample_to_impl(
        &self,
        logits: &T,
        params: &[SampleParams],
        uniform: &[f32],
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "sample";
        let (rows, _) = expect_2d(OP, "logits", logits)?;
        qwen_tensor::expect_shape(OP, "out", out, &[rows])?;
        self.sample_launch(logits, params, uniform, u32s_mut(OP, "out", out)?)
    }

    /// Checks the parameters and launches the sampling path that fits them,
    /// writing one id per row into `out`.
    fn sample_launch(
        &self,
        logits: &T,
        params: &[SampleParams],
        uniform: &[f32],
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        const OP: &str = "sample";
        let (rows, v) = expect_2d(OP, "logits", logits)?;
        let l = f32s(OP, "logits", logits)?;
        if params.len() != rows || uniform.len() != rows {
            return Err(shape_err(
                OP,
                format!(
                    "{rows} rows but {} params and {} uniforms",
                    params.len(),
                    uniform.len()
                ),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        if v == 0 {
            return Err(shape_err(
                OP,
                "logits have an empty vocabulary (V = 0)".into(),
            ));
        }
        let vi = int(OP, v)?;
        for (r, (p, &u)) in params.iter().zip(uniform).enumerate() {
            qwen_kernels_cpu::check_sample_params(r, p, u)?;
        }
        // Bits of a token index in the kernel's packed rank key.
        let nb = (usize::BITS - (v - 1).leading_zeros()) as i32;
        let packed: Vec<u32> = params
            .iter()
            .zip(uniform)
            .flat_map(|(p, &u)| {
                // top_k = 0 and top_k >= V both keep every token.
                let k = if p.top_k > 0 { p.top_k.min(v) } else { v };
                [
                    p.temperature.to_bits(),
                    k as u32,
                    p.top_p.to_bits(),
                    p.min_p.to_bits(),
                    u.to_bits(),
                ]
            })
            .collect();
        let packed = self.dev.stream.clone_htod(&packed).map_err(dev)?;
        let job = SampleJob {
            logits: l,
            rows,
            v,
            vi,
            nb,
            packed: &packed,
        };
        let slices = v.div_ceil(SHARED_CAP);
        let kout = params.iter().map(|p| p.top_k).max().unwrap_or(0);
        if params.iter().all(|p| p.top_k > 0 && p.top_k < v) && slices * kout <= SHARED_CAP {
            self.sample_sliced_top_k(&job, kout, out)
        } else if params.iter().all(|p| draw_in_index_order(p, v)) {
            self.sample_index_order(&job, out)
        } else {
            self.sample_by_rows(&job, out)
        }
    }

    /// Every row cut to a small top-k (at most `kout`): the rows' slices
    /// spread over the GPU (sample_slices), then a block a row
    /// (sample_merge).
    fn sample_sliced_top_k(
        &self,
        job: &SampleJob,
        kout: usize,
        out: &mut CudaSlice<u32>,
    ) -> Result<()> {
        const OP: &str = "sample";
        let (s, rows, v) = (&self.dev.stream, job.rows, job.v);
        let slices = v.div_ceil(SHARED_CAP);
        let (si, sli, ki) = (
            int(OP, slices)?,
            int(OP, v.div_ceil(slices))?,
            int(OP, kout)?,
        );
        // SAFETY (the three allocations): uninitialised device memory;
        // sample_slices writes every (row, slice)'s count and maximum and
        // its first `count` keys, and sample_merge reads no more.
        let mut keys = unsafe { s.alloc::<u64>(rows * slices * kout) }.map_err(dev)?;
        let mut counts = unsafe { s.alloc::<u32>(rows * slices) }.map_err(dev)?;
        let mut zmax = unsafe { s.alloc::<f32>(rows * slices) }.map_err(dev)?;
        let mut b = self.launch(self.kernel("sample_slices"));
        b.arg(job.logits)
            .arg(&job.vi)
            .arg(&job.nb)
            .arg(job.packed)
            .arg(&sli)
            .arg(&ki)
            .arg(&mut keys)
            .arg(&mut counts)
            .arg(&mut zmax);
        // SAFETY: argument order and types match sample_slices in
        // sampling.cu; logits hold rows x V floats, params 5 words per row;
        // a (row, slice) of at most SHARED_CAP tokens writes at most its
        // row's k <= kout keys and one count and maximum, all in range.
        let cfg = grid((slices as u32, rows as u32, 1), (SLICE_THREADS, 1, 1));
        unsafe { b.launch(cfg) }.map_err(dev)?;
        let mut b = self.launch(self.kernel("sample_merge"));
        b.arg(&job.vi)
            .arg(&job.nb)
            .arg(job.packed)
            .arg(&si)
            .arg(&ki)
            .arg(&keys)
            .arg(&counts)
            .arg(&zmax)
            .arg(out);
        // SAFETY: argument order and types match sample_merge; it reads
        // what sample_slices wrote (at most slices·kout <= SHARED_CAP keys
        // a row) and writes one id per row; 1024-thread blocks.
        unsafe { b.launch(grid((rows as u32, 1, 1), (SAMPLE_THREADS, 1, 1))) }.map_err(dev)?;
        Ok(())
    }

    /// No row cut by top-k or top-p: the index-order draw, its rows' slices
    /// spread over the GPU (draw_slice_max, draw_slice_sum), then a block a
    /// row (draw_finish).
    fn sample_index_order(&self, job: &SampleJob, out: &mut CudaSlice<u32>) -> Result<()> {
        const OP: &str = "sample";
        let (s, rows) = (&self.dev.stream, job.rows);
        let slices = job.v.div_ceil(SHARED_CAP);
        let (si, sli) = (int(OP, slices)?, int(OP, SHARED_CAP)?);
        // SAFETY (the three allocations): uninitialised device memory that
        // draw_slice_max and draw_slice_sum write in full (one entry per
        // block of their (slices, rows) grids) before draw_slice_sum and
        // draw_finish read it.
        let mut zmax = unsafe { s.alloc::<f32>(rows * slices) }.map_err(dev)?;
        let mut sums = unsafe { s.alloc::<u64>(rows * slices) }.map_err(dev)?;
        let mut tops = unsafe { s.alloc::<u32>(rows * slices) }.map_err(dev)?;
        let cfg = grid((slices as u32, rows as u32, 1), (SLICE_THREADS, 1, 1));
        let mut b = self.launch(self.kernel("draw_slice_max"));
        b.arg(job.logits)
            .arg(&job.vi)
            .arg(job.packed)
            .arg(&sli)
            .arg(&mut zmax);
        // SAFETY: argument order and types match draw_slice_max in
        // sampling.cu; logits hold rows x V floats, params 5 words per row;
        // block (slice, row) writes zmax[row · slices + slice].
        unsafe { b.launch(cfg) }.map_err(dev)?;
        let mut b = self.launch(self.kernel("draw_slice_sum"));
        b.arg(job.logits)
            .arg(&job.vi)
            .arg(&job.nb)
            .arg(job.packed)
            .arg(&sli)
            .arg(&zmax)
            .arg(&mut sums)
            .arg(&mut tops);
        // SAFETY: as above; it reads the row's slices' maxima and writes one
        // sum and one top token per (row, slice).
        unsafe { b.launch(cfg) }.map_err(dev)?;
        let mut b = self.launch(self.kernel("draw_finish"));
        b.arg(job.logits)
            .arg(&job.vi)
            .arg(&job.nb)
            .arg(job.packed)
            .arg(&sli)
            .arg(&si)
            .arg(&zmax)
            .arg(&sums)
            .arg(&tops)
            .arg(out);
        // SAFETY: argument order and types match draw_finish; it reads what
        // the two kernels above wrote and one slice of its row, and writes
        // one id per row.
        unsafe { b.launch(grid((rows as u32, 1, 1), (SLICE_THREADS, 1, 1))) }.map_err(dev)?;
        Ok(())
    }

    /// Any other rows: a block a row over the whole vocabulary
    /// (sample_rows).
    fn sample_by_rows(&self, job: &SampleJob, out: &mut CudaSlice<u32>) -> Result<()> {
        let mut b = self.launch(self.kernel("sample_rows"));
        b.arg(job.logits)
            .arg(&job.vi)
            .arg(&job.nb)
            .arg(job.packed)
            .arg(out);
        // SAFETY: argument order and types match sample_rows in sampling.cu;
        // logits hold rows x V floats, params 5 words per row, out one id
        // per row; the kernel is compiled for 1024-thread blocks.
        unsafe { b.launch(grid((job.rows as u32, 1, 1), (SAMPLE_THREADS, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}

/// What every sampling path reads: the logits, their shape (`vi`: V as a
/// kernel int; `nb`: bits of a token index in the packed rank key) and the
/// rows' packed parameters (5 words a row).
struct SampleJob<'a> {
    logits: &'a CudaSlice<f32>,
    rows: usize,
    v: usize,
    vi: i32,
    nb: i32,
    packed: &'a CudaSlice<u32>,
}

/// Whether the spec draws `p`'s row in index order: no top-k cut (0 or at
/// least the vocabulary) and no top-p cut (sampling.cu's `k == V && !(top_p
/// < 1)`; checked parameters have no NaN top_p).
fn draw_in_index_order(p: &SampleParams, v: usize) -> bool {
    (p.top_k == 0 || p.top_k >= v) && p.top_p >= 1.0
}

/// Threads per `sample_rows` and `sample_merge` block (`SAMPLE_THREADS` in
/// sampling.cu), and per `sample_slices` and `draw_*` block (`SLICE_THREADS`).
const SAMPLE_THREADS: u32 = 1024;
const SLICE_THREADS: u32 = 256;
/// Candidates sampling.cu keeps in shared memory (`SHARED_CAP`): the most
/// tokens a slice has, and the most keys the slices hand a row's merge.
const SHARED_CAP: usize = 2048;
