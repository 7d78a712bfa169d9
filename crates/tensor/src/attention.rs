//! Attention geometry, the paged KV-cache layout and the per-batch metadata
//! every attention op reads.

use crate::{Backend, Tensor};

/// Shape of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnGeometry {
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    /// From the config, not hidden/heads (Qwen3 uses 128 on real models).
    pub head_dim: usize,
    /// Positions per KV-cache block.
    pub block_size: usize,
}

impl AttnGeometry {
    /// Width of the fused QKV projection output: q heads, then k heads, then v heads.
    pub fn qkv_width(&self) -> usize {
        (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
    }
    pub fn q_width(&self) -> usize {
        self.num_q_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Shape of one layer's K (or V) cache: `[blocks, block_size, kv_heads, head_dim]`.
    pub fn cache_shape(&self, num_blocks: usize) -> [usize; 4] {
        [
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        ]
    }
}

/// Most tokens in one query tile ([`BatchLayout::query_tiles`]): a backend
/// may read each key once for a whole tile of a prompt. Grouping never
/// changes a token's result, only how much work shares a key.
pub const QUERY_TILE: usize = 16;

/// Host-side description of which sequence and position each token of a
/// batch is. Tokens of one sequence may be many (prefill) or one (decode);
/// sequences of both kinds mix freely in one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchLayout {
    /// Absolute position of each token in its sequence.
    pub positions: Vec<u32>,
    /// Index of each token's sequence into `block_tables`.
    pub seq_of_token: Vec<u32>,
    /// One row per sequence, `max_blocks` entries each; unused entries are 0.
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    pub block_size: usize,
}

impl BatchLayout {
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }
    pub fn num_seqs(&self) -> usize {
        self.block_tables
            .len()
            .checked_div(self.max_blocks)
            .unwrap_or(0)
    }
    /// KV-cache slot (`block * block_size + offset`) each token writes.
    pub fn slots(&self) -> Vec<u32> {
        self.positions
            .iter()
            .zip(&self.seq_of_token)
            .map(|(&p, &s)| {
                let p = p as usize;
                let block = self.block_tables[s as usize * self.max_blocks + p / self.block_size];
                (block as usize * self.block_size + p % self.block_size) as u32
            })
            .collect()
    }

    /// The batch's tokens cut into query tiles, as `(first token, count)`
    /// pairs flattened: runs of consecutive tokens of one sequence at
    /// consecutive positions (a prompt or a chunk of one), each cut into
    /// pieces of at most [`QUERY_TILE`] from its start, the pieces of a run
    /// listed last first. A decode token is a tile alone. (A run's last
    /// pieces attend over the most keys; a backend that gives each tile a
    /// block in this order then starts the longest first and ends a step on
    /// short ones.)
    pub fn query_tiles(&self) -> Vec<u32> {
        let mut tiles = Vec::new();
        let mut t = 0;
        while t < self.positions.len() {
            let mut len = 1;
            while t + len < self.positions.len()
                && self.seq_of_token[t + len] == self.seq_of_token[t]
                && self.positions[t + len] == self.positions[t] + len as u32
            {
                len += 1;
            }
            let pieces = len.div_ceil(QUERY_TILE);
            for p in (0..pieces).rev() {
                let first = p * QUERY_TILE;
                tiles.extend([(t + first) as u32, QUERY_TILE.min(len - first) as u32]);
            }
            t += len;
        }
        tiles
    }

    /// Whether `tiles` (from [`query_tiles`](Self::query_tiles)) is one
    /// tile per token, in token order.
    pub fn tiles_are_tokens(tiles: &[u32]) -> bool {
        tiles
            .chunks(2)
            .enumerate()
            .all(|(i, p)| p[0] == i as u32 && p[1] == 1)
    }

    /// Checks that every token names a sequence row of the block tables
    /// and that its context's blocks are in that row; returns one past the
    /// largest cache slot the contexts reach (0 for no tokens).
    pub fn checked_slots_end(&self) -> crate::Result<usize> {
        let bad = |msg: String| crate::Error::Shape {
            op: "batch layout",
            msg,
        };
        let t = self.positions.len();
        if self.seq_of_token.len() != t {
            return Err(bad(format!(
                "{t} positions but {} sequence indices",
                self.seq_of_token.len()
            )));
        }
        if t == 0 {
            return Ok(0);
        }
        if self.block_size == 0 || self.max_blocks == 0 {
            return Err(bad(
                "block size and blocks per sequence must be positive".into()
            ));
        }
        if !self.block_tables.len().is_multiple_of(self.max_blocks) {
            return Err(bad(format!(
                "{} block table entries are not rows of {}",
                self.block_tables.len(),
                self.max_blocks
            )));
        }
        let seqs = self.num_seqs();
        let mut end = 0usize;
        for (&p, &s) in self.positions.iter().zip(&self.seq_of_token) {
            let blocks = p as usize / self.block_size + 1;
            if s as usize >= seqs || blocks > self.max_blocks {
                return Err(bad(format!(
                    "position {p} of sequence {s}: no block table entry ({seqs} rows of {})",
                    self.max_blocks
                )));
            }
            let row = &self.block_tables[s as usize * self.max_blocks..][..blocks];
            let top = row.iter().map(|&b| b as usize).max().unwrap_or(0);
            end = end.max((top + 1) * self.block_size);
        }
        Ok(end)
    }

    /// Longest context any token of the batch attends over.
    pub fn max_context(&self) -> usize {
        self.positions
            .iter()
            .map(|&p| p as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

/// A [`BatchLayout`] uploaded to a backend: every layer of one forward pass
/// reads the same metadata. Only [`Backend::upload_batch`] and
/// [`Backend::update_batch`] make or change one, from a layout they have
/// checked, so the bounds it records ([`positions_end`](Self::positions_end),
/// [`slots_end`](Self::slots_end)) hold for the tensors it holds: a backend
/// that cannot read them back cheaply (a GPU) checks an op's rope table and
/// caches against those bounds instead.
pub struct BatchMeta<B: Backend> {
    pub(crate) positions: Tensor<B>,
    pub(crate) slots: Tensor<B>,
    pub(crate) seq_of_token: Tensor<B>,
    pub(crate) block_tables: Tensor<B>,
    pub(crate) query_tiles: Tensor<B>,
    pub(crate) num_tokens: usize,
    pub(crate) num_query_tiles: usize,
    pub(crate) tiles_are_tokens: bool,
    pub(crate) max_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) max_context: usize,
    pub(crate) positions_end: usize,
    pub(crate) slots_end: usize,
    /// What `seq_of_token` and `block_tables` hold, so that a refresh
    /// writes them only when they change (a decode step's block tables
    /// change once every block_size steps).
    pub(crate) host_seq_of_token: Vec<u32>,
    pub(crate) host_block_tables: Vec<u32>,
}

impl<B: Backend> BatchMeta<B> {
    /// u32 `[tokens]`: each token's position.
    pub fn positions(&self) -> &Tensor<B> {
        &self.positions
    }
    /// u32 `[tokens]`: the cache slot each token writes.
    pub fn slots(&self) -> &Tensor<B> {
        &self.slots
    }
    /// u32 `[tokens]`: each token's row of the block tables.
    pub fn seq_of_token(&self) -> &Tensor<B> {
        &self.seq_of_token
    }
    /// u32 `[seqs, max_blocks]`.
    pub fn block_tables(&self) -> &Tensor<B> {
        &self.block_tables
    }
    /// u32 `[tiles, 2]`: [`BatchLayout::query_tiles`].
    pub fn query_tiles(&self) -> &Tensor<B> {
        &self.query_tiles
    }
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    pub fn num_query_tiles(&self) -> usize {
        self.num_query_tiles
    }
    /// Every query tile is one token, in token order (a decode batch):
    /// a decode step's update then leaves `query_tiles` as it is.
    pub fn tiles_are_tokens(&self) -> bool {
        self.tiles_are_tokens
    }
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }
    /// Positions per cache block of the layout.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// The longest context any token attends over, or more where
    /// [`set_context_capacity`](Self::set_context_capacity) raised it (a
    /// backend sizes its attention grids by it).
    pub fn max_context(&self) -> usize {
        self.max_context
    }
    /// Sizes the attention grids for contexts up to `capacity` (never
    /// below the batch's own longest), so that a recorded graph serves
    /// later steps whose contexts grow.
    pub fn set_context_capacity(&mut self, capacity: usize) {
        self.max_context = capacity.max(self.positions_end);
    }
    /// One past the largest position of any token: a rope table needs
    /// this many rows.
    pub fn positions_end(&self) -> usize {
        self.positions_end
    }
    /// One past the largest cache slot any token's context reads or its
    /// new row writes: a cache needs this many slots.
    pub fn slots_end(&self) -> usize {
        self.slots_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_tiles_follow_runs_of_one_sequence() {
        // Sequence 0: a 35-token prompt chunk from position 5; sequence 1:
        // one decode token; sequence 2: positions 0, 1, then a gap (3, 4).
        let mut positions: Vec<u32> = (5..40).collect();
        let mut seqs = vec![0u32; 35];
        positions.extend([9, 0, 1, 3, 4]);
        seqs.extend([1, 2, 2, 2, 2]);
        let l = BatchLayout {
            positions,
            seq_of_token: seqs,
            block_tables: vec![0; 3],
            max_blocks: 1,
            block_size: 64,
        };
        assert_eq!(
            l.query_tiles(),
            vec![32, 3, 16, 16, 0, 16, 35, 1, 36, 2, 38, 2]
        );
        assert!(BatchLayout::default().query_tiles().is_empty());
        assert!(!BatchLayout::tiles_are_tokens(&l.query_tiles()));
        assert!(BatchLayout::tiles_are_tokens(&[0, 1, 1, 1, 2, 1]));
        assert!(!BatchLayout::tiles_are_tokens(&[0, 1, 2, 1]));
    }

    #[test]
    fn layouts_are_checked_and_their_slots_bounded() {
        // Two sequences, blocks of 4: sequence 0 at position 5 reads its
        // blocks 7 and 2, sequence 1 at position 1 its block 9.
        let l = BatchLayout {
            positions: vec![5, 1],
            seq_of_token: vec![0, 1],
            block_tables: vec![7, 2, 9, 0],
            max_blocks: 2,
            block_size: 4,
        };
        assert_eq!(l.checked_slots_end().unwrap(), 40);
        assert_eq!(BatchLayout::default().checked_slots_end().unwrap(), 0);
        let bad = |f: &dyn Fn(&mut BatchLayout)| {
            let mut b = l.clone();
            f(&mut b);
            b.checked_slots_end().unwrap_err().to_string()
        };
        assert!(bad(&|b| b.positions[0] = 8).contains("position 8 of sequence 0"));
        assert!(bad(&|b| b.seq_of_token[1] = 2).contains("no block table entry"));
        assert!(bad(&|b| b.seq_of_token.push(0)).contains("2 positions but 3"));
        assert!(bad(&|b| b.block_size = 0).contains("must be positive"));
        assert!(bad(&|b| b.block_tables.pop().map(drop).unwrap()).contains("rows of 2"));
    }
}
