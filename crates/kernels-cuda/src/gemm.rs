//! Launcher for gemm.cu and gemm_wgmma.cu: the batch-invariant tensor-core
//! GEMM that prompt rows take (see `Backend::set_tensor_core_rows`), on
//! Hopper's warpgroup MMA where the device has it (compute capability 9.0)
//! and on `mma.sync` elsewhere, for every batch size alike. It is the one
//! place the CUDA backend may differ from the CPU spec; the twin tests bound
//! the difference, and `CudaBackend::set_exact(true)` turns it off.

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;
use qwen_tensor::{AttnGeometry, BatchMeta, DType, Result};

use crate::attention::RopeArgs;
use crate::device::{bf16s, bf16s_mut, dev, f32s, f32s_mut, u32s, T};
use crate::launch::{grid, int};
use crate::{CudaBackend, Scratch};

/// A tile shape of gemm.cu or gemm_wgmma.cu: its kernel, the rows of x
/// (BM) and of w (BN, output columns) a block takes, its stages and its
/// threads, and whether a block makes a K-split weight's shares itself
/// (one block a tile, no shares through memory).
struct Tile {
    name: &'static str,
    bm: u32,
    bn: u32,
    stages: u32,
    threads: u32,
    shares_in_block: bool,
}

impl Tile {
    const fn new(name: &'static str, bm: u32, bn: u32) -> Tile {
        Tile {
            name,
            bm,
            bn,
            stages: GSTAGES,
            threads: THREADS,
            shares_in_block: false,
        }
    }

    /// A wgmma tile of one warpgroup (64 rows of x) or two (128).
    const fn wg(name: &'static str, bm: u32, bn: u32, stages: u32) -> Tile {
        Tile {
            name,
            bm,
            bn,
            stages,
            threads: THREADS * (bm / 64),
            shares_in_block: false,
        }
    }
}

const N32: Tile = Tile::new("gemm_tc_n32", 64, 32);
const N64: Tile = Tile::new("gemm_tc_n64", 64, 64);
const N128: Tile = Tile::new("gemm_tc", 64, 128);
const M128: Tile = Tile::new("gemm_tc_m128", 128, 128);
/// Threads a block of gemm.cu (2 x 2 warps) and of a one-warpgroup
/// gemm_wgmma.cu tile; a two-warpgroup tile has twice as many.
const THREADS: u32 = 128;

/// Stages of gemm_wgmma.cu (WG_STAGES, WG_STAGES_DEEP), each 128 bytes a
/// row of the tile.
const WG_STAGES: u32 = 4;
const WG_STAGES_DEEP: u32 = 8;
/// gemm_wgmma.cu's tiles: 64 rows of x by 64, 128 or 256 columns, 64 also
/// with six stages (two blocks an SM) and both narrower ones with eight
/// (one block an SM); 128 rows by 256 columns for prompt-sized row counts.
const WG64: Tile = Tile::wg("gemm_wg_n64", 64, 64, WG_STAGES);
const WG64_S6: Tile = Tile::wg("gemm_wg_n64_s6", 64, 64, 6);
const WG64_DEEP: Tile = Tile::wg("gemm_wg_n64_deep", 64, 64, WG_STAGES_DEEP);
const WG128: Tile = Tile::wg("gemm_wg_n128", 64, 128, WG_STAGES);
const WG128_DEEP: Tile = Tile::wg("gemm_wg_n128_deep", 64, 128, WG_STAGES_DEEP);
const WG256: Tile = Tile::wg("gemm_wg_n256", 64, 256, WG_STAGES);
/// 128 rows (two warpgroups sharing each stage of w) by 256 columns.
const WG_M128: Tile = Tile::wg("gemm_wg_m128_n256", 128, 256, WG_STAGES);
/// The 128 x 256 tile of a QKV projection with q/k-norm, RoPE and the
/// cache store in its epilogue (head_dim 128: two whole heads a tile).
const WG_M128_ROPE: Tile = Tile::wg("gemm_wg_m128_n256_rope_d128", 128, 256, WG_STAGES);
/// Dynamic shared memory of that tile's epilogue (WG_ROPE_SMEM in
/// gemm_wgmma.cu: the product tile in rows of 264 floats, each row's
/// 128-float rotation row, the 1,024-byte alignment), past its stages'.
const ROPE_EPILOGUE_SMEM: u32 = 128 * (256 + 8) * 4 + 128 * 128 * 4 + 1024;
/// 128 rows by 128 columns, a K-split weight's shares made in the block.
const WG_M128_SHARES: Tile = Tile {
    shares_in_block: true,
    ..Tile::wg("gemm_wg_m128_n128_shares", 128, 128, 6)
};
/// The fused gate/up + SiLU kernels as tiles: `bn` rows of w a stage (half
/// gate, half up columns), so a block makes bn / 2 output columns.
const SILU32_DEEP: Tile = Tile::wg("gemm_wg_silu_deep", 64, 64, WG_STAGES_DEEP);
const SILU32_S6: Tile = Tile::wg("gemm_wg_silu_s6", 64, 64, 6);
const SILU64: Tile = Tile::wg("gemm_wg_silu", 64, 128, WG_STAGES);
const SILU_M128: Tile = Tile::wg("gemm_wg_silu_m128", 128, 256, WG_STAGES);
const SILU_M128_N64: Tile = Tile::wg("gemm_wg_silu_m128_n64", 128, 128, 6);
/// The logits' hi/lo kernels: 64 rows of each half of x and 64 of w a
/// stage, or 128 and 128.
const HILO: Tile = Tile::wg("gemm_wg_hilo", 64, 64, WG_STAGES);
/// 128 rows (two warpgroups) of each half by 128 columns.
const HILO_M128: Tile = Tile::wg("gemm_wg_hilo_m128", 128, 128, WG_STAGES);
/// The wide tile (the halves read from L2 by two thirds as many blocks):
/// 128 rows by 192 columns.
const HILO_M128_N192: Tile = Tile::wg("gemm_wg_hilo_m128_n192", 128, 192, WG_STAGES);

/// What the tile choice needs of the device: SMs and shared memory an SM.
#[derive(Clone, Copy)]
pub(crate) struct Gpu {
    pub sms: u32,
    pub smem_per_sm: u32,
}

impl Gpu {
    /// Blocks of `tile` every SM holds at once by shared memory (the
    /// driver reserves 1 KB a block; registers allow more).
    fn resident(&self, tile: &Tile) -> u32 {
        self.sms * (self.smem_per_sm / (wg_smem(tile) + 1024))
    }
}

/// Dynamic shared memory of a wgmma tile: its stages of `bm` rows of x
/// and `bn` of w.
fn wg_smem(tile: &Tile) -> u32 {
    wg_stages_smem(tile.stages, tile.bm + tile.bn)
}

/// Dynamic shared memory of `stages` wgmma stages of `rows` rows of 128
/// bytes (64 k of bf16), plus the alignment to 1,024 bytes.
fn wg_stages_smem(stages: u32, rows: u32) -> u32 {
    stages * rows * 128 + 1024
}

/// The first of `deeper` (deepest first) whose `blocks` all fit on the
/// GPU at once, else `base`. A block streams its K through its stages one
/// tile after another, so at decode sizes (a few row tiles) the bytes a
/// block keeps in flight set the pace; deeper stages cost blocks an SM,
/// which only pays while the grid still fits in one wave (criterion,
/// BENCHMARKS.md: 0.6B at 128 rows qkv 8.36 -> 6.22 us, down 8.83 -> 7.18;
/// at 256 rows o_proj 9.14 -> 7.47-7.98).
fn deepest<'a>(blocks: u32, deeper: &[&'a Tile], base: &'a Tile, gpu: Gpu) -> &'a Tile {
    deeper
        .iter()
        .find(|tile| blocks <= gpu.resident(tile))
        .copied()
        .unwrap_or(base)
}

/// The wgmma tile for `t` rows by `n` columns in `splits` K shares: 128 x
/// 256 where [`uses_m128`] says so, else 64 rows and a width: the widest
/// that still makes enough blocks to cover the H100's
/// 132 SMs, and 64 for a single row tile (at most 64 rows) of at most two
/// blocks an SM. Its stages: see [`deepest`]. Every tile sums in the same
/// order, so the choice may follow the row count.
fn choose_wg_tile(t: u32, n: u32, splits: u32, gpu: Gpu) -> &'static Tile {
    // A split weight whose 128 x 128 tiles fill the GPU without splitting
    // K across blocks: the shares stay in the block (split over blocks, the
    // four shares of a 2,048-row o_proj are 32 MB through memory and a
    // kernel of their own).
    if splits > 1 && uses_m128(t, n.div_ceil(WG_M128_SHARES.bn), gpu) {
        return &WG_M128_SHARES;
    }
    if uses_m128(t, n.div_ceil(256) * splits, gpu) {
        return &WG_M128;
    }
    let blocks = |bn: u32| n.div_ceil(bn) * t.div_ceil(64) * splits;
    let bn = if t <= 64 && blocks(64) <= 264 {
        64
    } else if blocks(256) >= 264 {
        256
    } else if blocks(128) >= 128 {
        128
    } else {
        64
    };
    match bn {
        64 => deepest(blocks(64), &[&WG64_DEEP, &WG64_S6], &WG64, gpu),
        128 => deepest(blocks(128), &[&WG128_DEEP], &WG128, gpu),
        _ => &WG256,
    }
}

/// Whether `t` rows take a two-warpgroup tile (128 rows a block) whose
/// grid has `col_blocks` blocks a row tile: prompt-sized row counts whose
/// grid still fills every SM at least once.
fn uses_m128(t: u32, col_blocks: u32, gpu: Gpu) -> bool {
    t >= 512 && t.div_ceil(128) * col_blocks >= gpu.sms
}

/// The fused gate/up + SiLU tile for `t` rows and `i` output columns: 32
/// columns a block with eight or six stages while the grid fits in one
/// wave (criterion: 0.6B at 128 rows 16.6 -> 11.8 us with six stages),
/// then 128 rows by 64 columns while that grid does, else 64 x 64 with four.
fn choose_silu_tile(t: u32, i: u32, gpu: Gpu) -> &'static Tile {
    if uses_m128(t, i.div_ceil(SILU_M128.bn / 2), gpu) {
        return &SILU_M128;
    }
    let blocks = |tile: &Tile| t.div_ceil(tile.bm) * i.div_ceil(tile.bn / 2);
    [&SILU32_DEEP, &SILU32_S6, &SILU_M128_N64]
        .into_iter()
        .find(|tile| blocks(tile) <= gpu.resident(tile))
        .unwrap_or(&SILU64)
}

/// The hi/lo logits tile for `t` rows: 128 rows by 192 columns (128 where
/// not `wide`) once there are several 64-row tiles (every block reads its
/// rows of x_hi and x_lo whole and its columns of w whole, so bigger
/// blocks read both fewer times), else 64 x 64 (one row tile: the weight's
/// read from memory sets the pace, and 2,374 blocks spread it more evenly
/// over the SMs than 594 of 64 x 256). Every tile sums each output in the
/// same order.
fn choose_hilo_tile(t: u32, wide: bool) -> &'static Tile {
    match (t > 64, wide) {
        (true, true) => &HILO_M128_N192,
        (true, false) => &HILO_M128,
        (false, _) => &HILO,
    }
}

/// k per stage, padded shared rows, and stages, as GK, GS and GSTAGES.
const GK: u32 = 64;
const GS: u32 = GK + 8;
const GSTAGES: u32 = 3;

/// The tile for `t` rows by `n` columns in `splits` K shares. Any tile
/// sums each output in the same k order, so the choice may follow the row
/// count without changing a row's bits. The widest tile that still makes
/// enough blocks: wider tiles read x and w fewer times and keep more
/// products in flight a warp, narrower ones fill more SMs. The thresholds
/// come from a sweep of every tile on the Qwen3-0.6B shapes at 64, 256 and
/// 2,048 rows (criterion, H100, BENCHMARKS.md): 128 x 128 from 96 blocks
/// (256 rows: gate_up 22.2 -> 18.1 us against 64 x 128; qkv's 64 blocks
/// are slower, 17.2 against 13.2), 64 x 128 from 64 (256 rows: o_proj 13.3
/// against 17.4 on 64 x 64; 64 rows: qkv's 32 blocks 12.0 against 8.9 on
/// 64 x 32), 64 x 64 from 96 (64 rows: gate_up 10.1 against 11.1 on 64 x
/// 32, qkv's 64 blocks 9.6 against 8.9).
fn choose_tile(t: u32, n: u32, splits: u32) -> &'static Tile {
    let blocks = |tile: &Tile| n.div_ceil(tile.bn) * t.div_ceil(tile.bm) * splits;
    if t >= 128 && blocks(&M128) >= 96 {
        &M128
    } else if blocks(&N128) >= 64 {
        &N128
    } else if blocks(&N64) >= 96 {
        &N64
    } else {
        &N32
    }
}

/// The most K shares [`k_splits`] makes (SPLITS_MAX in norm.cu, whose
/// splits_add_rms_norm adds at most this many).
pub(crate) const MAX_K_SPLITS: u32 = 4;

/// Shares of K summed apart (split K): a function of the weight's shape
/// only, so that a row's sums never depend on its batch. Projections of at
/// most 2,048 columns (Qwen3-0.6B's o_proj and down, 1,024) give too few
/// tiles to fill the GPU at decode batch sizes; each share keeps at least
/// 512 of K.
pub(crate) fn k_splits(k: usize, n: usize) -> u32 {
    let want = if n <= 1024 {
        MAX_K_SPLITS
    } else if n <= 2048 {
        2
    } else {
        1
    };
    want.min((k / 512).max(1) as u32)
}

impl CudaBackend {
    /// The device as the tile choice sees it.
    fn gpu(&self) -> Gpu {
        Gpu {
            sms: self.dev.sm_count as u32,
            // The per-block opt-in limit is the SM's memory less the 1 KB
            // the driver reserves for a block.
            smem_per_sm: (self.dev.smem_optin + 1024) as u32,
        }
    }

    /// Whether the fused wgmma kernels (gemm_wg_silu, gemm_wg_hilo) take a
    /// `k` x `n` weight: wgmma, whole 16-byte rows of K, and K in one share.
    pub(crate) fn wg_fused_applies(&self, k: usize, n: usize) -> bool {
        self.dev.wgmma && k.is_multiple_of(8) && k_splits(k, n) == 1
    }

    /// `out[t, n] (+)= Σ_k x[t, k]·w[n, k]` for the first `t` rows of `x`
    /// and `out`: bf16 inputs, f32 accumulation and output, row-major, on
    /// the tensor cores. Callers check that the slices hold t·k, n·k and t·n
    /// elements.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tc(
        &self,
        op: &'static str,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
        t: usize,
        k: usize,
        n: usize,
        add: bool,
    ) -> Result<()> {
        if t == 0 || n == 0 {
            return Ok(());
        }
        let splits = self.gemm_shares_out(t, k, n);
        if splits == 1 {
            return self.gemm_tc_launch(op, x, w, out, None, t, k, n, add);
        }
        let len = t * n;
        let (li, si, addi) = (int(op, len)?, splits as i32, add as i32);
        self.with_gemm_shares(op, t, n, |part| {
            self.gemm_tc_launch(op, x, w, &mut *out, Some(&mut *part), t, k, n, add)?;
            let mut b = self.launch(self.kernel("gemm_splits_sum"));
            b.arg(&*part).arg(&mut *out).arg(&si).arg(&li).arg(&addi);
            // SAFETY: argument order and types match gemm_splits_sum; `part` holds
            // splits·len floats and `out` len.
            unsafe { b.launch(grid(((len as u32).div_ceil(256), 1, 1), (256, 1, 1))) }.map_err(dev)
        })
    }

    /// How many K shares of a `t` x `k` x `n` GEMM go through memory (the
    /// `part` of [`Self::gemm_tc_launch`], added by the caller): the
    /// weight's `k_splits`, or 1 where the tile makes them in the block.
    pub(crate) fn gemm_shares_out(&self, t: usize, k: usize, n: usize) -> u32 {
        let splits = k_splits(k, n);
        let in_block = self.dev.wgmma
            && k.is_multiple_of(8)
            && choose_wg_tile(t as u32, n as u32, splits, self.gpu()).shares_in_block;
        if in_block {
            1
        } else {
            splits
        }
    }

    /// Runs `f` with the scratch the K shares of a `t` x `n` GEMM go to
    /// (room for the most shares of `t` · n floats, rounded up so that
    /// nearby batch sizes reuse one buffer).
    pub(crate) fn with_gemm_shares<R>(
        &self,
        op: &'static str,
        t: usize,
        n: usize,
        f: impl FnOnce(&mut CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        let shape = [(MAX_K_SPLITS as usize * t * n).next_power_of_two()];
        self.with_scratch(Scratch::GemmSplits, &shape, DType::F32, |part| {
            f(f32s_mut(op, "splits", part)?)
        })
    }

    /// The GEMM kernel of [`Self::gemm_tc`] alone: with `part` (K split in
    /// `k_splits(k, n)` shares that go through memory,
    /// [`Self::gemm_shares_out`]) share z of every output goes to
    /// `part[z · t · n ..]` and `out` is left alone, for the caller to add
    /// the shares in z order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tc_launch(
        &self,
        op: &'static str,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
        part: Option<&mut CudaSlice<f32>>,
        t: usize,
        k: usize,
        n: usize,
        add: bool,
    ) -> Result<()> {
        let (ti, ki, ni, addi) = (int(op, t)?, int(op, k)?, int(op, n)?, add as i32);
        let splits = k_splits(k, n);
        let shares_out = self.gemm_shares_out(t, k, n);
        if (shares_out > 1) != part.is_some() {
            return Err(crate::launch::shape_err(
                op,
                format!(
                    "{splits} K shares but shares scratch given: {}",
                    part.is_some()
                ),
            ));
        }
        // wgmma needs whole 16-byte rows of K; K is the weight's, so the
        // choice never depends on the batch.
        let wgmma = self.dev.wgmma && k.is_multiple_of(8);
        let tile = if wgmma {
            choose_wg_tile(t as u32, n as u32, splits, self.gpu())
        } else {
            choose_tile(t as u32, n as u32, splits)
        };
        let (row_tiles, col_tiles) = ((t as u32).div_ceil(tile.bm), (n as u32).div_ceil(tile.bn));
        if col_tiles > 65_535 {
            return Err(crate::launch::shape_err(
                op,
                format!("{n} columns are too many for one tensor-core GEMM"),
            ));
        }
        let mut cfg = grid((row_tiles, col_tiles, shares_out), (tile.threads, 1, 1));
        cfg.shared_mem_bytes = if wgmma {
            wg_smem(tile)
        } else {
            tile.stages * (tile.bm + tile.bn) * GS * 2
        };
        let mut b = self.launch(self.kernel(tile.name));
        b.arg(x)
            .arg(w)
            .arg(out)
            .arg(&ti)
            .arg(&ki)
            .arg(&ni)
            .arg(&addi);
        // `part`: where the split shares go (null: no split).
        match part {
            Some(p) => b.arg(p),
            None => b.arg(&0u64),
        };
        let splits_arg = splits as i32;
        if tile.shares_in_block {
            b.arg(&splits_arg);
        }
        // SAFETY: argument order and types match every GEMM_KERNEL in gemm.cu
        // and GEMM_WG_KERNEL in gemm_wgmma.cu (which gets K % 8 == 0 only),
        // and gemm_wg_m128_n128_shares, which takes the shares' count after
        // them (its tile alone has shares_in_block);
        // the caller checked the slices' sizes, the kernel guards every access
        // by T, K and N, `part` (given exactly when K is split, from
        // with_gemm_shares) holds splits·t·n floats, and the dynamic shared
        // memory holds the kernel's stages.
        unsafe { b.launch(cfg) }.map_err(dev)
    }
}

/// The launch of a fused wgmma kernel (gemm_wg_silu*, gemm_wg_hilo): a
/// block per `tile.bm` rows by `block_cols` output columns, its stages of
/// `x_rows` rows of x and `tile.bn` of w ([`wg_stages_smem`]).
fn wg_fused_grid(
    op: &'static str,
    t: usize,
    (cols, block_cols): (usize, u32),
    tile: &Tile,
    x_rows: u32,
) -> Result<LaunchConfig> {
    let col_tiles = (cols as u32).div_ceil(block_cols);
    if col_tiles > 65_535 {
        return Err(crate::launch::shape_err(
            op,
            format!("{cols} columns are too many for one tensor-core GEMM"),
        ));
    }
    let mut cfg = grid(
        ((t as u32).div_ceil(tile.bm), col_tiles, 1),
        (tile.threads, 1, 1),
    );
    cfg.shared_mem_bytes = wg_stages_smem(tile.stages, x_rows + tile.bn);
    Ok(cfg)
}

impl CudaBackend {
    /// `out[t, j] = bf16(silu(g) · u)` with `g = Σ_k x[t, k]·w[j, k]` and
    /// `u = Σ_k x[t, k]·w[i + j, k]` for the first `t` rows (`w` a gate/up
    /// pair `[2i, k]`): gemm_tc then silu_mul in one kernel, the same bits,
    /// without the f32 pair going through memory. `false` (nothing done)
    /// where that kernel does not apply: no wgmma, K not whole 16-byte
    /// rows, or K split in shares.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tc_silu(
        &self,
        op: &'static str,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        t: usize,
        k: usize,
        i: usize,
    ) -> Result<bool> {
        if !self.wg_fused_applies(k, 2 * i) {
            return Ok(false);
        }
        if t == 0 || i == 0 {
            return Ok(true);
        }
        let (ti, ki, ii) = (int(op, t)?, int(op, k)?, int(op, i)?);
        // bm rows of x and bn of w (bn / 2 gate, as many up columns) a stage.
        let tile = choose_silu_tile(t as u32, i as u32, self.gpu());
        let (name, block_cols) = (tile.name, tile.bn / 2);
        let cfg = wg_fused_grid(op, t, (i, block_cols), tile, tile.bm)?;
        let mut b = self.launch(self.kernel(name));
        b.arg(x).arg(w).arg(out).arg(&ti).arg(&ki).arg(&ii);
        // SAFETY: argument order and types match gemm_wg_silu* in gemm_wgmma.cu;
        // the caller checked that x holds t·k, w 2i·k and out t·i elements, the
        // kernel guards every access by T, K and N = i, K % 8 == 0, and the
        // dynamic shared memory holds its stages.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(true)
    }

    /// Whether [`Self::gemm_tc_qkv_rope`] takes a `t`-row QKV projection of
    /// `k` x `n` (n = (Hq + 2·Hkv)·D) at head width `d`: wgmma, K in one
    /// share, head_dim 128, and enough rows for the 128 x 256 tiles that
    /// gemm_tc would pick for it (prompt steps; `QWEN_CUDA_QKV_ROPE=0`
    /// turns it off).
    pub(crate) fn qkv_rope_applies(&self, t: usize, k: usize, n: usize, d: usize) -> bool {
        self.dev.qkv_rope
            && d == 128
            && ROPE_EPILOGUE_SMEM as usize <= self.dev.smem_optin
            && self.wg_fused_applies(k, n)
            && choose_wg_tile(t as u32, n as u32, 1, self.gpu()).name == WG_M128.name
    }

    /// The QKV projection `x · wᵀ` (bf16 x `[t, k]`, the fused `w`) followed
    /// by `qk_norm_rope_store` in one kernel, the same bits, without the f32
    /// QKV output going through memory: q into `q_out`, the batch's key and
    /// value rows into the caches. Where [`Self::qkv_rope_applies`] says so;
    /// the caller has checked the projection's and the RoPE op's arguments
    /// (`check_projection`, `check_qk_norm_rope`, `check_batch`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tc_qkv_rope(
        &self,
        x: &T,
        w: &T,
        r: &RopeArgs<'_>,
        meta: &BatchMeta<CudaBackend>,
        geo: AttnGeometry,
        q_out: &mut T,
        k_cache: &mut T,
        v_cache: &mut T,
    ) -> Result<()> {
        const OP: &str = "qkv_rope";
        let (t, n) = (meta.num_tokens(), geo.qkv_width());
        let k = x.shape().get(1).copied().unwrap_or(0);
        if !self.qkv_rope_applies(t, k, n, geo.head_dim) {
            return Err(crate::launch::shape_err(
                OP,
                "the fused tile does not apply".into(),
            ));
        }
        let (ti, ki, ni) = (int(OP, t)?, int(OP, k)?, int(OP, n)?);
        let (hq, hkv) = (int(OP, geo.num_q_heads)?, int(OP, geo.num_kv_heads)?);
        let tile = &WG_M128_ROPE;
        let mut cfg = wg_fused_grid(OP, t, (n, tile.bn), tile, tile.bm)?;
        cfg.shared_mem_bytes = cfg.shared_mem_bytes.max(ROPE_EPILOGUE_SMEM);
        let mut b = self.launch(self.kernel(tile.name));
        b.arg(bf16s(OP, "x", x)?)
            .arg(bf16s(OP, "w", w)?)
            .arg(&ti)
            .arg(&ki)
            .arg(&ni)
            .arg(f32s(OP, "q_norm", r.q_norm)?)
            .arg(f32s(OP, "k_norm", r.k_norm)?)
            .arg(&r.eps)
            .arg(f32s(OP, "rope", r.rope)?)
            .arg(u32s(OP, "positions", meta.positions())?)
            .arg(u32s(OP, "slots", meta.slots())?)
            .arg(bf16s_mut(OP, "q_out", q_out)?)
            .arg(bf16s_mut(OP, "k_cache", k_cache)?)
            .arg(bf16s_mut(OP, "v_cache", v_cache)?)
            .arg(&hq)
            .arg(&hkv);
        // SAFETY: argument order and types match gemm_wg_m128_n256_rope_d128 in
        // gemm_wgmma.cu; the caller checked that x holds t·k and w n·k
        // elements, q_out t·Hq·128, that every position has a rope row and
        // every slot is in the caches (check_batch); the kernel guards its
        // rows by T and its heads by N, K % 8 == 0, and the dynamic shared
        // memory holds its stages and the epilogue's tile and rotation rows.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(())
    }

    /// `out[t, n] = Σ_k hi[t, k]·w[n, k] + Σ_k lo[t, k]·w[n, k]` for the
    /// first `t` rows: gemm_tc of `hi`, then of `lo` adding to it, in one
    /// kernel that reads `w` once (the same bits). `false` (nothing done)
    /// where that kernel does not apply, as for [`Self::gemm_tc_silu`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_tc_hilo(
        &self,
        op: &'static str,
        hi: &CudaSlice<bf16>,
        lo: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
        t: usize,
        k: usize,
        n: usize,
    ) -> Result<bool> {
        if !self.wg_fused_applies(k, n) {
            return Ok(false);
        }
        if t == 0 || n == 0 {
            return Ok(true);
        }
        let (ti, ki, ni) = (int(op, t)?, int(op, k)?, int(op, n)?);
        // bm rows of hi, bm of lo and bn of w a stage.
        let tile = choose_hilo_tile(t as u32, self.dev.hilo_wide);
        let cfg = wg_fused_grid(op, t, (n, tile.bn), tile, 2 * tile.bm)?;
        let mut b = self.launch(self.kernel(tile.name));
        b.arg(hi).arg(lo).arg(w).arg(out).arg(&ti).arg(&ki).arg(&ni);
        // SAFETY: argument order and types match the gemm_wg_hilo kernels in gemm_wgmma.cu;
        // the caller checked that hi and lo hold t·k, w n·k and out t·n
        // elements, the kernel guards every access by T, K and N, K % 8 == 0,
        // and the dynamic shared memory holds its stages.
        unsafe { b.launch(cfg) }.map_err(dev)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::{choose_silu_tile, choose_tile, choose_wg_tile, k_splits, Gpu};

    const H100: Gpu = Gpu {
        sms: 132,
        smem_per_sm: 233_472,
    };

    /// The wgmma tiles of the Qwen3-0.6B shapes on an H100: the widest that
    /// still covers the GPU, with the deepest stages that keep the grid in
    /// one wave.
    #[test]
    fn wgmma_tiles_follow_rows_and_blocks() {
        let name =
            |t: u32, k: usize, n: usize| choose_wg_tile(t, n as u32, k_splits(k, n), H100).name;
        // A 2,048-token prompt step: 128 x 256 tiles (two warpgroups), also
        // o_proj's and down's 16 x 4 x 4 blocks; not 512 rows (qkv's 4 x 16
        // such blocks would leave SMs idle).
        assert_eq!(name(2048, 1024, 6144), "gemm_wg_m128_n256");
        assert_eq!(name(2048, 1024, 4096), "gemm_wg_m128_n256");
        assert_eq!(name(2048, 2048, 1024), "gemm_wg_m128_n256");
        assert_eq!(name(512, 1024, 4096), "gemm_wg_n128");
        // The vocabulary projection at 256 rows: 64 x 256 tiles.
        assert_eq!(name(256, 1024, 151_936), "gemm_wg_n256");
        // 256 rows: 64 x 128; gate_up's 192 blocks take two an SM (four
        // stages), qkv's 128 and o_proj's and down's (four K shares of 1,024
        // columns) one an SM with eight.
        assert_eq!(name(256, 1024, 6144), "gemm_wg_n128");
        assert_eq!(name(256, 1024, 4096), "gemm_wg_n128_deep");
        assert_eq!(name(256, 2048, 1024), "gemm_wg_n128_deep");
        assert_eq!(name(256, 3072, 1024), "gemm_wg_n128_deep");
        // 128 rows: 64 x 64; o_proj's 2 x 16 x 4 blocks with eight stages,
        // gate_up's 192 with six (two an SM).
        assert_eq!(name(128, 2048, 1024), "gemm_wg_n64_deep");
        assert_eq!(name(128, 1024, 6144), "gemm_wg_n64_s6");
        // 64 rows and a single row: 64 x 64, eight stages.
        assert_eq!(name(64, 1024, 6144), "gemm_wg_n64_deep");
        assert_eq!(name(1, 1024, 4096), "gemm_wg_n64_deep");
        // But not the vocabulary projection (2,374 such blocks): 64 x 256.
        assert_eq!(name(64, 1024, 151_936), "gemm_wg_n256");
        assert_eq!(name(1, 1024, 151_936), "gemm_wg_n256");
        // A GPU with half the SMs goes one step shallower.
        let half = Gpu { sms: 66, ..H100 };
        assert_eq!(choose_wg_tile(128, 1024, 4, half).name, "gemm_wg_n64_s6");
    }

    /// The fused gate/up + SiLU tiles: 32 columns a block while the grid
    /// fits in one wave (eight stages at one block an SM, six at two),
    /// else 64 columns with four stages.
    #[test]
    fn silu_tiles_keep_the_grid_in_one_wave() {
        let name = |t: u32, i: u32| choose_silu_tile(t, i, H100).name;
        assert_eq!(name(1, 3072), "gemm_wg_silu_deep");
        assert_eq!(name(64, 3072), "gemm_wg_silu_deep");
        assert_eq!(name(128, 3072), "gemm_wg_silu_s6");
        // Two row tiles of 128 by 48 column tiles: one block an SM.
        assert_eq!(name(129, 3072), "gemm_wg_silu_m128_n64");
        assert_eq!(name(256, 3072), "gemm_wg_silu_m128_n64");
        assert_eq!(name(384, 3072), "gemm_wg_silu");
        // A prompt step: 128 rows by 128 gate and 128 up columns.
        assert_eq!(name(2048, 3072), "gemm_wg_silu_m128");
        // Qwen3-8B's 12,288 columns: 384 narrow blocks would take waves.
        assert_eq!(name(64, 12_288), "gemm_wg_silu");
    }

    /// The tiles the Qwen3-0.6B shapes get (BENCHMARKS.md has the sweep).
    #[test]
    fn tiles_follow_rows_and_blocks() {
        let name = |t: u32, k: usize, n: usize| choose_tile(t, n as u32, k_splits(k, n)).name;
        // 2,048 rows: 128 x 128 for every projection.
        for (k, n) in [
            (1024, 4096),
            (2048, 1024),
            (1024, 6144),
            (3072, 1024),
            (1024, 151_936),
        ] {
            assert_eq!(name(2048, k, n), "gemm_tc_m128");
        }
        // 256 rows: 128 x 128 for gate_up and the vocabulary projection,
        // 64 x 128 for qkv and the split-K o_proj and down.
        assert_eq!(name(256, 1024, 6144), "gemm_tc_m128");
        assert_eq!(name(256, 1024, 151_936), "gemm_tc_m128");
        assert_eq!(name(256, 1024, 4096), "gemm_tc");
        assert_eq!(name(256, 2048, 1024), "gemm_tc");
        assert_eq!(name(256, 3072, 1024), "gemm_tc");
        // 64 rows: 64 x 64 for gate_up, 64 x 32 for the others but the
        // vocabulary projection, whose 64 x 128 tiles are plenty.
        assert_eq!(name(64, 1024, 6144), "gemm_tc_n64");
        assert_eq!(name(64, 1024, 4096), "gemm_tc_n32");
        assert_eq!(name(64, 2048, 1024), "gemm_tc_n32");
        assert_eq!(name(64, 3072, 1024), "gemm_tc_n32");
        assert_eq!(name(64, 1024, 151_936), "gemm_tc");
        // A single row.
        assert_eq!(name(1, 1024, 4096), "gemm_tc_n32");
    }
}
