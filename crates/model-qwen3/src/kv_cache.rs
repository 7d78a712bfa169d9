//! The paged KV cache: fixed-size blocks of positions per layer, handed to
//! sequences through block tables.
//!
//! Blocks are reference-counted so that sequences can share the blocks of a
//! common prefix (names of prefixes: `prefix_cache.rs`): a block returns to the free
//! list when its last sequence releases it, and a full block that has been
//! given a name keeps its keys and values while it sits there, so that a
//! later sequence with the same prefix can take it back instead of
//! recomputing it. Named free blocks are overwritten last, least recently
//! freed first.

use std::collections::VecDeque;

use qwen_tensor::{AttnGeometry, Backend, DType, Tensor};

pub use crate::prefix_cache::BlockHash;
use crate::prefix_cache::PrefixIndex;
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
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Free blocks in the order they are handed out: anonymous ones at the
    /// front, named ones behind them from least to most recently freed.
    /// An entry is live only while its block is free and its stamp is the
    /// block's `freed_at`: taking a named block back out of the middle of
    /// the queue just leaves its entry stale (O(1) instead of a search).
    free: VecDeque<(u32, u64)>,
    /// When each block last became free (a counter, not a clock).
    freed_at: Vec<u64>,
    clock: u64,
    num_free: usize,
    prefix: PrefixIndex,
}

/// A sequence's place in the cache: its blocks and how many positions hold
/// keys and values.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub(crate) blocks: Vec<u32>,
    pub(crate) len: usize,
    /// Positions below this are prompt tokens (see [`Sequence::for_prompt`]).
    pub(crate) prompt_len: Option<usize>,
}

impl Sequence {
    /// An empty sequence whose first `prompt_len` positions are its prompt.
    /// Prompt rows may run on a backend's tensor cores
    /// (`Backend::set_tensor_core_rows`); every later position is a
    /// generated token and always takes the exact path, so its keys, values
    /// and logits are the same bits whatever batch it runs in, and when it
    /// is recomputed after a preemption. A [`Sequence::default`] takes the
    /// tokens of its first forward pass as its prompt.
    pub fn for_prompt(prompt_len: usize) -> Self {
        Sequence {
            prompt_len: Some(prompt_len),
            ..Default::default()
        }
    }
    /// Length of the prompt, once known.
    pub fn prompt_len(&self) -> Option<usize> {
        self.prompt_len
    }
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
            refs: vec![0; num_blocks],
            // Blocks are handed out in increasing order at first.
            free: (0..num_blocks as u32).map(|b| (b, 0)).collect(),
            freed_at: vec![0; num_blocks],
            clock: 0,
            num_free: num_blocks,
            prefix: PrefixIndex::new(num_blocks),
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
    /// Blocks no sequence holds: what [`reserve`](Self::reserve) can hand
    /// out now (named free blocks included; handing one out drops its name).
    pub fn free_blocks(&self) -> usize {
        self.num_free
    }

    /// Gives `seq` enough blocks to hold `len` positions.
    pub fn reserve(&mut self, seq: &mut Sequence, len: usize) -> Result<()> {
        let need = len.div_ceil(self.block_size);
        if need > seq.blocks.len() && need - seq.blocks.len() > self.num_free {
            return Err(ModelError::Request(format!(
                "KV cache full: {len} positions need {need} blocks of {}, {} free",
                self.block_size,
                self.num_free + seq.blocks.len()
            )));
        }
        while seq.blocks.len() < need {
            let b = self.take_free();
            seq.blocks.push(b);
        }
        Ok(())
    }

    /// Drops `seq`'s hold on its blocks; those no other sequence holds
    /// return to the free list. Leaves `seq` empty.
    pub fn release(&mut self, seq: &mut Sequence) {
        // Last block first: among named blocks the queue overwrites the
        // earliest freed first, and a prefix is useless without its start,
        // so a sequence's tail should go before its head.
        for b in seq.blocks.drain(..).rev() {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released more often than held");
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            self.clock += 1;
            self.freed_at[b as usize] = self.clock;
            self.num_free += 1;
            if self.prefix.hash_of(b).is_some() {
                self.free.push_back((b, self.clock));
            } else {
                // Anonymous blocks hold nothing worth keeping: reuse them
                // first. Pushed to the front in reverse, so a sequence's
                // blocks come back out in their original order.
                self.free.push_front((b, self.clock));
            }
        }
        seq.len = 0;
        // Stale entries pile up only when named blocks are taken back out of
        // the queue; sweep them once they outnumber the blocks.
        if self.free.len() > 2 * self.num_blocks {
            let (refs, freed_at) = (&self.refs, &self.freed_at);
            self.free
                .retain(|&(b, t)| refs[b as usize] == 0 && freed_at[b as usize] == t);
        }
    }

    /// Pops the next free block, dropping the name of the prefix it held.
    /// The caller has checked that one is free.
    fn take_free(&mut self) -> u32 {
        loop {
            let (b, t) = self.free.pop_front().expect("num_free counts a live entry");
            if self.refs[b as usize] == 0 && self.freed_at[b as usize] == t {
                self.prefix.forget(b);
                self.refs[b as usize] = 1;
                self.num_free -= 1;
                return b;
            }
        }
    }

    // ---- sharing blocks by content ----------------------------------------

    /// How many sequences hold `block` (0 for a block the cache lacks).
    pub fn block_refs(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// How many blocks carry a name (held or free), ready to be shared.
    pub fn named_blocks(&self) -> usize {
        self.prefix.len()
    }

    /// The name of a full block holding `tokens` (exactly
    /// [`block_size`](Self::block_size) of them) after the prefix named
    /// `parent` (`None` for a sequence's first block). Names are private to
    /// this cache.
    pub fn block_hash(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size);
        self.prefix.chain(parent, tokens)
    }

    /// The blocks holding the longest run of `hashes` (a sequence's block
    /// names from its first block on) that this cache has.
    pub fn lookup(&self, hashes: &[BlockHash]) -> Vec<u32> {
        hashes.iter().map_while(|&h| self.prefix.get(h)).collect()
    }

    /// Of `blocks`, how many no sequence holds: sharing them takes that many
    /// blocks off the free list.
    pub fn unheld(&self, blocks: &[u32]) -> usize {
        blocks.iter().filter(|&&b| self.block_refs(b) == 0).count()
    }

    /// Starts the empty `seq` on `blocks` (from [`lookup`](Self::lookup)):
    /// it holds them and its first `blocks.len() × block_size` positions
    /// count as cached, so its next forward pass starts after them.
    pub fn share(&mut self, seq: &mut Sequence, blocks: &[u32]) -> Result<()> {
        if !seq.blocks.is_empty() || seq.len != 0 {
            return Err(ModelError::Request(
                "only an empty sequence can start on shared blocks".into(),
            ));
        }
        if let Some(&b) = blocks
            .iter()
            .find(|&&b| b as usize >= self.num_blocks || self.prefix.hash_of(b).is_none())
        {
            // An anonymous block may be partly written or about to be
            // overwritten: only named (full, final) blocks are shareable.
            return Err(ModelError::Request(format!(
                "block {b} holds no named prefix and cannot be shared"
            )));
        }
        for &b in blocks {
            let r = &mut self.refs[b as usize];
            if *r == 0 {
                // Its queue entry goes stale (see `free`).
                self.num_free -= 1;
            }
            *r += 1;
        }
        seq.blocks.extend_from_slice(blocks);
        seq.len = blocks.len() * self.block_size;
        Ok(())
    }

    /// Names block `index` of `seq` by `hash` so later sequences can share
    /// it. The block must be full: all its positions hold keys and values
    /// (they are never written again, as a sequence only appends). Returns
    /// false, changing nothing, if another block already holds that prefix
    /// or this one already has a name.
    pub fn publish(&mut self, seq: &Sequence, index: usize, hash: BlockHash) -> Result<bool> {
        if (index + 1) * self.block_size > seq.len || index >= seq.blocks.len() {
            return Err(ModelError::Request(format!(
                "block {index} of a sequence of {} positions is not full",
                seq.len
            )));
        }
        Ok(self.prefix.insert(seq.blocks[index], hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_kernels_cpu::CpuBackend;

    fn cache(blocks: usize) -> KvCache<CpuBackend> {
        let geo = AttnGeometry {
            num_q_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            block_size: 4,
        };
        KvCache::new(&CpuBackend::new(), 1, geo, blocks).unwrap()
    }

    /// A sequence holding `n` positions, the first `named` of its full
    /// blocks published under names of `tokens`.
    fn filled(
        c: &mut KvCache<CpuBackend>,
        tokens: &[u32],
        named: usize,
    ) -> (Sequence, Vec<BlockHash>) {
        let mut s = Sequence::default();
        c.reserve(&mut s, tokens.len()).unwrap();
        s.len = tokens.len();
        let mut hashes = Vec::new();
        for (i, chunk) in tokens.chunks_exact(4).take(named).enumerate() {
            let h = c.block_hash(hashes.last().copied(), chunk);
            assert!(c.publish(&s, i, h).unwrap());
            hashes.push(h);
        }
        (s, hashes)
    }

    #[test]
    fn plain_reserve_and_release_hand_blocks_back_in_order() {
        let mut c = cache(4);
        let mut a = Sequence::default();
        c.reserve(&mut a, 9).unwrap();
        assert_eq!(a.blocks(), [0, 1, 2]);
        assert_eq!(c.free_blocks(), 1);
        assert!(c.reserve(&mut Sequence::default(), 8).is_err());
        c.release(&mut a);
        assert!(a.blocks().is_empty() && a.is_empty());
        assert_eq!(c.free_blocks(), 4);
        let mut b = Sequence::default();
        c.reserve(&mut b, 16).unwrap();
        assert_eq!(b.blocks(), [0, 1, 2, 3]);
    }

    #[test]
    fn shared_blocks_are_counted_and_outlive_their_first_holder() {
        let mut c = cache(6);
        let toks: Vec<u32> = (0..10).collect();
        let (mut a, hashes) = filled(&mut c, &toks, 2);
        assert_eq!(c.named_blocks(), 2);
        let hit = c.lookup(&hashes);
        assert_eq!(hit, a.blocks()[..2]);
        assert_eq!(c.unheld(&hit), 0);

        let mut b = Sequence::default();
        c.share(&mut b, &hit).unwrap();
        assert_eq!(b.len(), 8);
        assert_eq!(c.block_refs(hit[0]), 2);
        let free = c.free_blocks();
        c.release(&mut a);
        // Only a's third (unshared) block came free.
        assert_eq!(c.free_blocks(), free + 1);
        assert_eq!(c.block_refs(hit[0]), 1);
        c.release(&mut b);
        assert_eq!(c.free_blocks(), 6);
        // Free but named: still found, and taking them back costs free blocks.
        assert_eq!(c.lookup(&hashes), hit);
        assert_eq!(c.unheld(&hit), 2);
        let mut d = Sequence::default();
        c.share(&mut d, &hit).unwrap();
        assert_eq!(c.free_blocks(), 4);
        c.reserve(&mut d, 12).unwrap();
        assert!(!d.blocks()[2..].iter().any(|b| hit.contains(b)));
    }

    #[test]
    fn named_free_blocks_are_overwritten_last_and_then_forgotten() {
        let mut c = cache(4);
        let toks: Vec<u32> = (100..108).collect();
        let (mut a, hashes) = filled(&mut c, &toks, 2);
        let mut anon = Sequence::default();
        c.reserve(&mut anon, 8).unwrap();
        c.release(&mut a);
        c.release(&mut anon);
        // The two anonymous blocks go first.
        let mut e = Sequence::default();
        c.reserve(&mut e, 8).unwrap();
        assert_eq!(c.lookup(&hashes).len(), 2, "named blocks survive");
        // Then the named ones, tail first (block 1 was freed before block 0).
        c.reserve(&mut e, 12).unwrap();
        assert_eq!(*e.blocks().last().unwrap(), 1);
        assert_eq!(
            c.lookup(&hashes),
            [0],
            "the overwritten block lost its name"
        );
        c.reserve(&mut e, 16).unwrap();
        assert!(c.lookup(&hashes).is_empty());
        assert_eq!(c.named_blocks(), 0);
    }

    #[test]
    fn only_full_named_blocks_are_shared() {
        let mut c = cache(4);
        let (s, _) = filled(&mut c, &[1, 2, 3, 4, 5, 6], 0);
        let h = c.block_hash(None, &[1, 2, 3, 4]);
        assert!(
            c.publish(&s, 1, h).is_err(),
            "block 1 holds 2 of 4 positions"
        );
        assert!(c.share(&mut Sequence::default(), &s.blocks()[..1]).is_err());
        assert!(c.publish(&s, 0, h).unwrap());
        let mut t = Sequence::default();
        c.reserve(&mut t, 1).unwrap();
        assert!(c.share(&mut t, &s.blocks()[..1]).is_err(), "t is not empty");
        assert!(c.share(&mut Sequence::default(), &[99]).is_err());
        assert_eq!(c.block_refs(99), 0);
    }

    #[test]
    fn stale_queue_entries_are_swept() {
        let mut c = cache(2);
        let (mut a, hashes) = filled(&mut c, &[1, 2, 3, 4, 5, 6, 7, 8], 2);
        c.release(&mut a);
        for _ in 0..20 {
            let mut s = Sequence::default();
            c.share(&mut s, &c.lookup(&hashes)).unwrap();
            c.release(&mut s);
        }
        assert!(c.free.len() <= 4, "queue holds {} entries", c.free.len());
        let mut all = Sequence::default();
        c.reserve(&mut all, 8).unwrap();
        assert_eq!(c.free_blocks(), 0);
    }
}
