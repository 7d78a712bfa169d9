//! Launchers for embedding.cu.

use qwen_tensor::{expect_2d, expect_shape, Result};

use crate::device::{bf16s, dev, f32s, f32s_mut, u32s, u32s_mut, T};
use crate::launch::{grid, int};
use crate::CudaBackend;

/// Pairs `feed_ids_few` takes by value (its eight parameters).
const FEED_FEW: usize = 8;

impl CudaBackend {
    pub(crate) fn embedding_impl(&self, table: &T, ids: &T, out: &mut T) -> Result<()> {
        const OP: &str = "embedding";
        let (v, h) = expect_2d(OP, "table", table)?;
        let n = ids.numel();
        expect_shape(OP, "out", out, &[n, h])?;
        let (vi, hi) = (int(OP, v)?, int(OP, h)?);
        let mut b = self.launch(self.kernel("embedding"));
        b.arg(bf16s(OP, "table", table)?)
            .arg(u32s(OP, "ids", ids)?)
            .arg(f32s_mut(OP, "out", out)?)
            .arg(&vi)
            .arg(&hi);
        // SAFETY: argument order and types match `embedding` in embedding.cu; shapes checked above.
        unsafe { b.launch(grid((n as u32, 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }

    /// Twin of `qwen_kernels_cpu::feed_ids`: the pairs are checked here as
    /// the CPU checks them, then applied a thread each: up to FEED_FEW of
    /// them passed as kernel parameters (a decode step's few sequences),
    /// more copied up first.
    pub(crate) fn feed_ids_impl(
        &self,
        tokens: &T,
        feed: &[(usize, usize)],
        ids: &mut T,
    ) -> Result<()> {
        const OP: &str = "feed_ids";
        let src = u32s(OP, "tokens", tokens)?;
        qwen_kernels_cpu::check_feed(OP, feed, tokens.numel(), ids.numel())?;
        if feed.is_empty() {
            return Ok(());
        }
        let n = int(OP, feed.len())?;
        if feed.len() <= FEED_FEW {
            // (row, k) packed as row | k << 32, both below 2^32 (tensor sizes).
            let mut packed = [0u64; FEED_FEW];
            for (p, &(row, k)) in packed.iter_mut().zip(feed) {
                *p = row as u64 | (k as u64) << 32;
            }
            let mut b = self.launch(self.kernel("feed_ids_few"));
            b.arg(src).arg(u32s_mut(OP, "ids", ids)?).arg(&n);
            for p in &packed {
                b.arg(p);
            }
            // SAFETY: argument order and types match `feed_ids_few` in
            // embedding.cu (tokens, ids, n, then eight packed pairs, of which
            // the first n are used); every pair was checked above (row <
            // ids.numel(), k < tokens.numel(), no row twice).
            return unsafe { b.launch(grid((1, 1, 1), (32, 1, 1))) }.map_err(dev);
        }
        let pairs: Vec<u32> = feed
            .iter()
            .flat_map(|&(row, k)| [row as u32, k as u32])
            .collect();
        let pairs = self.dev.stream.clone_htod(&pairs).map_err(dev)?;
        let mut b = self.launch(self.kernel("feed_ids"));
        b.arg(src)
            .arg(&pairs)
            .arg(u32s_mut(OP, "ids", ids)?)
            .arg(&n);
        // SAFETY: argument order and types match `feed_ids` in embedding.cu;
        // `pairs` holds n (row, k) pairs with row < ids.numel() and
        // k < tokens.numel() (checked above, both below 2^32 as tensor sizes).
        let blocks = (feed.len() as u32).div_ceil(256);
        unsafe { b.launch(grid((blocks, 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }

    pub(crate) fn gather_rows_impl(&self, src: &T, rows: &T, out: &mut T) -> Result<()> {
        const OP: &str = "gather_rows";
        let (_, h) = expect_2d(OP, "src", src)?;
        let r = rows.numel();
        expect_shape(OP, "out", out, &[r, h])?;
        let hi = int(OP, h)?;
        let mut b = self.launch(self.kernel("gather_rows"));
        b.arg(f32s(OP, "src", src)?)
            .arg(u32s(OP, "rows", rows)?)
            .arg(f32s_mut(OP, "out", out)?)
            .arg(&hi);
        // SAFETY: argument order and types match `gather_rows` in embedding.cu.
        unsafe { b.launch(grid((r as u32, 1, 1), (256, 1, 1))) }.map_err(dev)?;
        Ok(())
    }
}
