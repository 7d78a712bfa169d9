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
    /// pieces of at most [`QUERY_TILE`]. A decode token is a tile alone.
    pub fn query_tiles(&self) -> Vec<u32> {
        let mut tiles = Vec::new();
        let mut t = 0;
        while t < self.positions.len() {
            let mut n = 1;
            while t + n < self.positions.len()
                && n < QUERY_TILE
                && self.seq_of_token[t + n] == self.seq_of_token[t]
                && self.positions[t + n] == self.positions[t] + n as u32
            {
                n += 1;
            }
            tiles.extend([t as u32, n as u32]);
            t += n;
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
/// reads the same metadata.
pub struct BatchMeta<B: Backend> {
    /// u32 `[tokens]`
    pub positions: Tensor<B>,
    /// u32 `[tokens]`
    pub slots: Tensor<B>,
    /// u32 `[tokens]`
    pub seq_of_token: Tensor<B>,
    /// u32 `[seqs, max_blocks]`
    pub block_tables: Tensor<B>,
    /// u32 `[tiles, 2]`: [`BatchLayout::query_tiles`].
    pub query_tiles: Tensor<B>,
    pub num_tokens: usize,
    pub num_query_tiles: usize,
    /// Every query tile is one token, in token order (a decode batch):
    /// a decode step's update then leaves `query_tiles` as it is.
    pub tiles_are_tokens: bool,
    pub max_blocks: usize,
    pub max_context: usize,
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
            vec![0, 16, 16, 16, 32, 3, 35, 1, 36, 2, 38, 2]
        );
        assert!(BatchLayout::default().query_tiles().is_empty());
        assert!(!BatchLayout::tiles_are_tokens(&l.query_tiles()));
        assert!(BatchLayout::tiles_are_tokens(&[0, 1, 1, 1, 2, 1]));
        assert!(!BatchLayout::tiles_are_tokens(&[0, 1, 2, 1]));
    }
}
