//! Launchers for attention.cu: per-chunk partials, then the in-order combine.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::PushKernelArg;
use qwen_tensor::{expect_shape, AttnGeometry, BatchMeta, DType, Result};

use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, T};
use crate::launch::{grid, int};
use crate::rope::{check_cache, check_geometry};
use crate::{CudaBackend, Scratch};

/// Positions per split; must equal qwen_kernels_cpu::ATTN_CHUNK and CHUNK in attention.cu.
const CHUNK: usize = 64;
const _: () = assert!(CHUNK == qwen_kernels_cpu::ATTN_CHUNK);

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_impl(
        &self,
        q: &T,
        k_cache: &T,
        v_cache: &T,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        scale: f32,
        out: &mut T,
    ) -> Result<()> {
        const OP: &str = "attention";
        check_geometry(OP, geo)?;
        let tokens = meta.num_tokens;
        let d = geo.head_dim;
        expect_shape(OP, "q", q, &[tokens, geo.q_width()])?;
        expect_shape(OP, "out", out, &[tokens, geo.q_width()])?;
        check_cache(OP, k_cache, geo)?;
        check_cache(OP, v_cache, geo)?;
        if tokens == 0 {
            return Ok(());
        }
        let max_chunks = meta.max_context.div_ceil(CHUNK).max(1);
        let rows = tokens * geo.num_q_heads;
        self.with_scratch(
            Scratch::AttnPartials,
            &[rows * max_chunks * (d + 2)],
            DType::F32,
            |part| {
                let (mb, bs) = (int(OP, meta.max_blocks)?, int(OP, geo.block_size)?);
                let (hq, hkv, di, mc) = (
                    int(OP, geo.num_q_heads)?,
                    int(OP, geo.num_kv_heads)?,
                    int(OP, d)?,
                    int(OP, max_chunks)?,
                );
                // Keys and values of a chunk, then the group's scores.
                let group = geo.num_q_heads / geo.num_kv_heads;
                let smem = 2 * CHUNK * d * 2 + group * CHUNK * 4;
                let f = self.kernel("attn_chunk");
                if smem > 48 * 1024 {
                    // Above 48 KB a kernel must opt in to dynamic shared memory.
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        int(OP, smem)?,
                    )
                    .map_err(dev)?;
                }
                let mut b = self.dev.stream.launch_builder(f);
                b.arg(bf16s(OP, "q", q)?)
                    .arg(bf16s(OP, "k_cache", k_cache)?)
                    .arg(bf16s(OP, "v_cache", v_cache)?)
                    .arg(u32s(OP, "positions", &meta.positions)?)
                    .arg(u32s(OP, "seq_of_token", &meta.seq_of_token)?)
                    .arg(u32s(OP, "block_tables", &meta.block_tables)?)
                    .arg(&mb)
                    .arg(&bs)
                    .arg(&hq)
                    .arg(&hkv)
                    .arg(&di)
                    .arg(&scale)
                    .arg(&mc)
                    .arg(f32s_mut(OP, "partials", part)?);
                let mut cfg = grid(
                    ((tokens * geo.num_kv_heads) as u32, max_chunks as u32, 1),
                    (128, 1, 1),
                );
                cfg.shared_mem_bytes = smem as u32;
                // SAFETY: argument order and types match attn_chunk in attention.cu; the
                // partials buffer holds max_chunks entries for every (token, q head), and
                // the dynamic shared memory holds a chunk's keys, values and scores.
                unsafe { b.launch(cfg) }.map_err(dev)?;
                let mut b = self.dev.stream.launch_builder(self.kernel("attn_combine"));
                b.arg(f32s(OP, "partials", part)?)
                    .arg(u32s(OP, "positions", &meta.positions)?)
                    .arg(&hq)
                    .arg(&di)
                    .arg(&mc)
                    .arg(bf16s_mut(OP, "out", out)?);
                // SAFETY: argument order and types match attn_combine in attention.cu.
                unsafe { b.launch(grid((rows as u32, 1, 1), (128, 1, 1))) }.map_err(dev)?;
                Ok(())
            },
        )
    }
}
