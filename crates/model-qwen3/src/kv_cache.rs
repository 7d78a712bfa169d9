//! The paged KV cache: fixed-size blocks of positions per layer, handed to
//! sequences through block tables.

use qwen_tensor::{AttnGeometry, Backend, DType, Tensor};

use crate::{ModelError, Result};

/// Positions per block. 16 keeps the waste per sequence under 16 positions
/// and lets prefix caching share prompts at a fine grain, while a block of
/// one KV head (16 × 128 bf16 = 4 KiB) is still a large, aligned read; the
/// attention split (64 positions) is four whole blocks.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// One layer's K and V caches plus the free-block list.
pub struct KvCache<B: Backend> {
    /// Unique per cache: decode graphs bake in the cache's tensors.
    id: u64,
    pub(crate) k: Vec<Tensor<B>>,
    pub(crate) v: Vec<Tensor<B>>,
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
}

/// A sequence's place in the cache: its blocks and how many positions hold
/// keys and values.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub(crate) blocks: Vec<u32>,
    pub(crate) len: usize,
}

impl Sequence {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The block table.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }
}

impl<B: Backend> KvCache<B> {
    /// Allocates `num_blocks` blocks of `geo.block_size` positions for each of `layers` layers.
    pub fn new(backend: &B, layers: usize, geo: AttnGeometry, num_blocks: usize) -> Result<Self> {
        if num_blocks == 0 {
            return Err(ModelError::Request(
                "the KV cache needs at least one block".into(),
            ));
        }
        let shape = geo.cache_shape(num_blocks);
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(backend.zeros(&shape, DType::BF16)?);
            v.push(backend.zeros(&shape, DType::BF16)?);
        }
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(KvCache {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            k,
            v,
            block_size: geo.block_size,
            num_blocks,
            // Popped from the end, so blocks are handed out in increasing order.
            free: (0..num_blocks as u32).rev().collect(),
        })
    }

    /// A number no other cache of this process has.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Gives `seq` enough blocks to hold `len` positions.
    pub fn reserve(&mut self, seq: &mut Sequence, len: usize) -> Result<()> {
        let need = len.div_ceil(self.block_size);
        if need > seq.blocks.len() && need - seq.blocks.len() > self.free.len() {
            return Err(ModelError::Request(format!(
                "KV cache full: {len} positions need {need} blocks of {}, {} free",
                self.block_size,
                self.free.len() + seq.blocks.len()
            )));
        }
        while seq.blocks.len() < need {
            seq.blocks.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    /// Returns a sequence's blocks to the free list.
    pub fn release(&mut self, seq: &mut Sequence) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
    }
}
