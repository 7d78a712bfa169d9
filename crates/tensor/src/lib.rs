//! # qwen-tensor
//!
//! The bottom layer of the Qwen3 engine: element types, the device-agnostic
//! [`Tensor`] handle, the paged-attention metadata, errors, and the
//! [`Backend`] trait listing every op the model and sampler need. Backends
//! (`qwen-kernels-cpu`, `qwen-kernels-cuda`) implement the trait; the model is
//! written once against it.
//!
//! ```
//! use qwen_tensor::{AttnGeometry, BatchLayout, DType};
//!
//! // Two sequences in one batch: a 3-token prefill and a 1-token decode step.
//! let layout = BatchLayout {
//!     positions: vec![0, 1, 2, 7],
//!     seq_of_token: vec![0, 0, 0, 1],
//!     block_tables: vec![4, 0, 2, 5],
//!     max_blocks: 2,
//!     block_size: 4,
//! };
//! assert_eq!(layout.slots(), vec![16, 17, 18, 5 * 4 + 3]);
//! assert_eq!(layout.max_context(), 8);
//!
//! let geo = AttnGeometry { num_q_heads: 16, num_kv_heads: 8, head_dim: 128, block_size: 16 };
//! assert_eq!(geo.qkv_width(), 4096);
//! assert_eq!(DType::BF16.size(), 2);
//! ```

mod attention;
mod backend;
mod checks;
mod download;
mod dtype;
mod error;
mod layer;
mod tensor;

pub use attention::{AttnGeometry, BatchLayout, BatchMeta, QUERY_TILE};
pub use backend::{Backend, SampleParams};
pub use checks::{
    check_attention, check_batch, check_cache, check_geometry, check_norm_projection,
    check_projection, check_qk_norm_rope, check_silu_mul,
};
pub use download::Download;
pub use dtype::{DType, HostSlice, HostVec};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use layer::{decoder_layer_attention, decoder_layer_ops, LayerActs, LayerInputs, LayerWeights};
pub use tensor::{expect_2d, expect_dtype, expect_shape, Tensor};
