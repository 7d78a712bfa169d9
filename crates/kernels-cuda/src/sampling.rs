//! Launchers for sampling.cu, and filtered sampling.

use cudarc::driver::PushKernelArg;
use qwen_kernels_cpu::CpuBackend;
use qwen_tensor::{expect_2d, Backend, HostSlice, Result, SampleParams};

use crate::device::{dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int, shape_err};
use crate::CudaBackend;

impl CudaBackend {
    pub(crate) fn argmax_impl(&self, logits: &T) -> Result<Vec<u32>> {
        const OP: &str = "argmax";
        let (b_rows, v) = expect_2d(OP, "logits", logits)?;
        if v == 0 {
            return Err(shape_err(OP, "empty vocabulary".into()));
        }
        let vi = int(OP, v)?;
        let mut out = self.zeros(&[b_rows], qwen_tensor::DType::U32)?;
        let mut b = self.dev.stream.launch_builder(self.kernel("argmax_rows"));
        b.arg(f32s(OP, "logits", logits)?)
            .arg(&vi)
            .arg(u32s_mut(OP, "out", &mut out)?);
        // SAFETY: argument order and types match argmax_rows in sampling.cu (1024 threads).
        unsafe { b.launch(grid((b_rows as u32, 1, 1), (1024, 1, 1))) }.map_err(dev)?;
        let host = self
            .dev
            .stream
            .clone_dtoh(u32s(OP, "out", &out)?)
            .map_err(dev)?;
        Ok(host)
    }

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
        let mut b = self
            .dev
            .stream
            .launch_builder(self.kernel("repetition_penalty"));
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

    /// Filtered sampling runs the CPU spec on the downloaded logits, so its
    /// tokens equal the CPU twin's by construction (a GPU kernel is to come).
    pub(crate) fn sample_impl(
        &self,
        logits: &T,
        params: &[SampleParams],
        uniform: &[f32],
    ) -> Result<Vec<u32>> {
        let host = self.download(logits)?;
        let cpu = CpuBackend::new();
        let t = cpu.upload(host.as_slice(), logits.shape())?;
        cpu.sample(&t, params, uniform)
    }
}
