//! Content addresses for KV-cache blocks, so that sequences starting with
//! the same tokens (a shared system prompt, a resumed sequence) can share the
//! blocks that hold those tokens' keys and values instead of recomputing them.
//!
//! A full block is named by a hash of *every* token from the start of the
//! sequence to the end of the block, built as a chain: the hash of block `i`
//! covers the hash of block `i - 1` and block `i`'s own tokens. Two blocks
//! with equal names therefore hold the keys and values of equal prefixes at
//! equal positions, which is exactly when their contents are
//! interchangeable (a token's K and V depend on it and everything before it).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

/// The name of a full block: a 128-bit hash of all tokens from position 0
/// to the end of the block.
///
/// 128 bits from two independently keyed SipHash streams: a false match
/// would hand a sequence someone else's keys and values, so the name must be
/// long enough that an accidental collision never happens (birthday bound
/// 2⁻⁶⁴ even after 2³² blocks), and keyed at random per cache so that nobody
/// can craft prompts that collide on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

/// The map from block names to the blocks that hold them, and back.
#[derive(Debug)]
pub(crate) struct PrefixIndex {
    keys: (RandomState, RandomState),
    by_hash: HashMap<BlockHash, u32>,
    of_block: Vec<Option<BlockHash>>,
}

impl PrefixIndex {
    pub(crate) fn new(num_blocks: usize) -> Self {
        PrefixIndex {
            keys: (RandomState::new(), RandomState::new()),
            by_hash: HashMap::new(),
            of_block: vec![None; num_blocks],
        }
    }

    /// The name of a block holding `tokens` after the prefix named `parent`
    /// (`None` for the first block of a sequence).
    pub(crate) fn chain(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let half = |keys: &RandomState| {
            let mut h = keys.build_hasher();
            // The parent's presence is hashed too, so that a first block can
            // never equal a later block whose parent hash happens to be 0.
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        BlockHash(((half(&self.keys.0) as u128) << 64) | half(&self.keys.1) as u128)
    }

    /// The block holding the prefix named `hash`, if one does.
    pub(crate) fn get(&self, hash: BlockHash) -> Option<u32> {
        self.by_hash.get(&hash).copied()
    }

    /// The name `block` is registered under.
    pub(crate) fn hash_of(&self, block: u32) -> Option<BlockHash> {
        self.of_block[block as usize]
    }

    /// Registers `block` as holding the prefix `hash`. Refused (false) when
    /// another block already holds that prefix, so lookups stay unambiguous
    /// (the other block's copy is kept; this one stays anonymous and is
    /// reused first when freed), or when `block` already has a name.
    pub(crate) fn insert(&mut self, block: u32, hash: BlockHash) -> bool {
        if self.of_block[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return false;
        }
        self.by_hash.insert(hash, block);
        self.of_block[block as usize] = Some(hash);
        true
    }

    /// Drops `block`'s name: it is about to be overwritten with other keys
    /// and values.
    pub(crate) fn forget(&mut self, block: u32) {
        if let Some(hash) = self.of_block[block as usize].take() {
            self.by_hash.remove(&hash);
        }
    }

    /// How many blocks have a name.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_whole_prefix() {
        let ix = PrefixIndex::new(4);
        let a = ix.chain(None, &[1, 2, 3]);
        assert_eq!(a, ix.chain(None, &[1, 2, 3]), "deterministic per index");
        assert_ne!(a, ix.chain(None, &[1, 2, 4]));
        // Same block tokens after different prefixes: different names.
        let b1 = ix.chain(Some(a), &[9, 9, 9]);
        let b2 = ix.chain(Some(ix.chain(None, &[1, 2, 4])), &[9, 9, 9]);
        assert_ne!(b1, b2);
        assert_ne!(ix.chain(None, &[9, 9, 9]), b1);
    }

    #[test]
    fn one_block_per_name_and_one_name_per_block() {
        let mut ix = PrefixIndex::new(4);
        let h = ix.chain(None, &[5; 16]);
        let g = ix.chain(None, &[6; 16]);
        assert!(ix.insert(2, h));
        assert!(!ix.insert(3, h), "a second holder of a name is refused");
        assert!(!ix.insert(2, g), "a named block keeps its name");
        assert_eq!(ix.get(h), Some(2));
        assert_eq!(ix.hash_of(2), Some(h));
        assert_eq!(ix.len(), 1);
        ix.forget(2);
        assert_eq!(ix.get(h), None);
        assert_eq!(ix.hash_of(2), None);
        assert!(ix.insert(3, h));
        assert_eq!(ix.get(h), Some(3));
    }
}
