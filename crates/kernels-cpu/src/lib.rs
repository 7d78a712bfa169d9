//! # qwen-kernels-cpu
//!
//! The CPU backend of the Qwen3 engine and the **executable specification**
//! of every op: each op's doc comment states where bf16 rounding happens,
//! the accumulation dtype and the reduction order, and the CUDA backend
//! must return the same bits. Work is spread over cores with rayon; results
//! never depend on the number of threads.
//!
//! ```
//! use qwen_kernels_cpu::CpuBackend;
//! use qwen_tensor::{bf16, Backend, DType, HostSlice, HostVec};
//!
//! let cpu = CpuBackend::new();
//! let x: Vec<bf16> = [1.0f32, 2.0, 3.0].iter().map(|&v| bf16::from_f32(v)).collect();
//! let w: Vec<bf16> = [1.0f32, 0.0, 1.0, 0.5, 0.5, 0.5].iter().map(|&v| bf16::from_f32(v)).collect();
//! let x = cpu.upload(HostSlice::BF16(&x), &[1, 3]).unwrap();
//! let w = cpu.upload(HostSlice::BF16(&w), &[2, 3]).unwrap();
//! let mut y = cpu.zeros(&[1, 2], DType::F32).unwrap();
//! cpu.matmul(&x, &w, &mut y).unwrap();
//! assert_eq!(cpu.download(&y).unwrap(), HostVec::F32(vec![4.0, 3.0]));
//! ```

mod activation;
mod attention;
mod attention_bound;
mod embedding;
mod matmul;
mod norm;
pub mod numerics;
mod rope;
mod sampling;
mod storage;
#[cfg(test)]
mod test_bits;
#[cfg(test)]
mod test_rng;

pub use activation::silu_mul;
pub use attention::{attention, ATTN_CHUNK};
pub use attention_bound::{attention_tc_magnitudes, TC_ATTENTION_FACTOR};
pub use embedding::{check_feed, embedding, feed_ids, gather_rows};
pub use matmul::{logits, matmul, matmul_add, rms_norm_matmul, widen};
pub use norm::{inv_rms, rms_norm};
pub use rope::qk_norm_rope_store;
pub use sampling::{
    argmax, argmax_row, check_params as check_sample_params, repetition_penalty, sample,
};
pub use storage::CpuStorage;

use qwen_tensor::{
    AttnGeometry, Backend, BatchMeta, DType, Error, HostSlice, HostVec, Result, SampleParams,
    Tensor,
};

/// The CPU backend. Cheap to create; uses rayon's global thread pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

type T = Tensor<CpuBackend>;

fn host_to_storage(data: HostSlice<'_>) -> CpuStorage {
    match data {
        HostSlice::BF16(s) => CpuStorage::BF16(storage::huge_page_copy(s)),
        HostSlice::F16(s) => CpuStorage::F16(s.to_vec()),
        HostSlice::F32(s) => CpuStorage::F32(s.to_vec()),
        HostSlice::U32(s) => CpuStorage::U32(s.to_vec()),
    }
}

impl Backend for CpuBackend {
    type Storage = CpuStorage;
    /// The CPU has nothing to replay.
    type Graph = ();

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<()>> {
        f()?;
        Ok(None)
    }

    fn replay(&self, _graph: &()) -> Result<()> {
        Err(Error::Unsupported("the CPU backend has no graphs".into()))
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<T> {
        let n: usize = shape.iter().product();
        let s = match dtype {
            DType::BF16 => CpuStorage::BF16(storage::huge_page_fill(n, qwen_tensor::bf16::ZERO)),
            DType::F16 => CpuStorage::F16(vec![qwen_tensor::f16::ZERO; n]),
            DType::F32 => CpuStorage::F32(storage::huge_page_fill(n, 0.0)),
            DType::U32 => CpuStorage::U32(vec![0; n]),
        };
        Ok(Tensor::from_parts(s, shape.to_vec(), dtype))
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize]) -> Result<T> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} elements for shape {:?}", data.len(), shape),
            });
        }
        Ok(Tensor::from_parts(
            host_to_storage(data),
            shape.to_vec(),
            data.dtype(),
        ))
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
        *dst.storage_mut() = host_to_storage(data);
        Ok(())
    }

    fn download(&self, t: &T) -> Result<HostVec> {
        Ok(match t.storage() {
            CpuStorage::BF16(v) => HostVec::BF16(v.clone()),
            CpuStorage::F16(v) => HostVec::F16(v.clone()),
            CpuStorage::F32(v) => HostVec::F32(v.clone()),
            CpuStorage::U32(v) => HostVec::U32(v.clone()),
        })
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, table: &T, ids: &T, out: &mut T) -> Result<()> {
        embedding::embedding(table, ids, out)
    }

    fn rms_norm(&self, x: &T, w: &T, eps: f32, out: &mut T) -> Result<()> {
        norm::rms_norm(x, w, eps, out)
    }

    fn matmul(&self, x: &T, w: &T, out: &mut T) -> Result<()> {
        matmul::matmul(x, w, out)
    }

    fn matmul_add(&self, x: &T, w: &T, acc: &mut T) -> Result<()> {
        matmul::matmul_add(x, w, acc)
    }

    fn rms_norm_matmul(&self, x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
        matmul::rms_norm_matmul(x, norm_w, eps, w, out)
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
        activation::rms_norm_matmul_silu(x, norm_w, eps, w, gate_up, out)
    }

    fn logits(&self, x: &T, norm_w: &T, eps: f32, w: &T, out: &mut T) -> Result<()> {
        matmul::logits(x, norm_w, eps, w, out)
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
        rope::qk_norm_rope_store(
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
        attention::attention(q, k_cache, v_cache, meta, geo, scale, out)
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
        rope::qk_norm_rope_store(
            qkv, q_norm, k_norm, eps, rope, meta, geo, q_out, k_cache, v_cache,
        )?;
        attention::attention(q_out, k_cache, v_cache, meta, geo, scale, out)
    }

    fn silu_mul(&self, gate_up: &T, out: &mut T) -> Result<()> {
        activation::silu_mul(gate_up, out)
    }

    fn gather_rows(&self, src: &T, rows: &T, out: &mut T) -> Result<()> {
        embedding::gather_rows(src, rows, out)
    }

    fn feed_ids(&self, tokens: &T, feed: &[(usize, usize)], ids: &mut T) -> Result<()> {
        embedding::feed_ids(tokens, feed, ids)
    }

    fn argmax(&self, logits: &T) -> Result<Vec<u32>> {
        sampling::argmax(logits)
    }

    fn repetition_penalty(
        &self,
        logits: &mut T,
        penalty: &[f32],
        history: &[Vec<u32>],
    ) -> Result<()> {
        sampling::repetition_penalty(logits, penalty, history)
    }

    fn sample(&self, logits: &T, params: &[SampleParams], uniform: &[f32]) -> Result<Vec<u32>> {
        sampling::sample(logits, params, uniform)
    }
}
