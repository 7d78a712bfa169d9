//! The batch metadata a backend keeps between forward passes: `update_batch`
//! must leave it exactly as `upload_batch` would make it, including the
//! query tiles it may skip rewriting for decode steps.

use qwen_kernels_cpu::CpuBackend;
use qwen_tensor::{Backend, BatchLayout, BatchMeta, HostVec};

fn layout(positions: &[u32], seqs: &[u32], n_seqs: usize) -> BatchLayout {
    BatchLayout {
        positions: positions.to_vec(),
        seq_of_token: seqs.to_vec(),
        block_tables: (0..n_seqs as u32 * 4).collect(),
        max_blocks: 4,
        block_size: 16,
    }
}

fn tiles(b: &CpuBackend, m: &BatchMeta<CpuBackend>) -> Vec<u32> {
    match b.download(m.query_tiles()).unwrap() {
        HostVec::U32(v) => v,
        other => panic!("query tiles are {other:?}"),
    }
}

#[test]
fn update_batch_keeps_query_tiles_current() {
    let b = CpuBackend::new();
    // Three tokens of one prompt, then three decode tokens, twice.
    let prompt = layout(&[0, 1, 2], &[0, 0, 0], 1);
    let decode = layout(&[3, 9, 5], &[0, 1, 2], 3);
    let decode2 = layout(&[4, 10, 6], &[0, 1, 2], 3);
    let mut m = b.upload_batch(&prompt).unwrap();
    assert_eq!(tiles(&b, &m), vec![0, 3]);
    for l in [&decode, &decode2, &prompt, &decode] {
        b.update_batch(&mut m, l).unwrap();
        assert_eq!(tiles(&b, &m), l.query_tiles());
        assert_eq!(m.num_query_tiles(), l.query_tiles().len() / 2);
        assert_eq!(
            m.tiles_are_tokens(),
            BatchLayout::tiles_are_tokens(&l.query_tiles())
        );
    }
    // Same token count, same tile count, different tiles: rewritten.
    let two_runs = layout(&[0, 1, 7], &[0, 0, 1], 2);
    let other_runs = layout(&[5, 0, 1], &[0, 1, 1], 2);
    b.update_batch(&mut m, &two_runs).unwrap();
    assert_eq!(tiles(&b, &m), vec![0, 2, 2, 1]);
    b.update_batch(&mut m, &other_runs).unwrap();
    assert_eq!(tiles(&b, &m), vec![0, 1, 1, 2]);
}

/// A layout naming a missing block-table row or block is an error at
/// upload, and a batch whose positions or slots reach past the rope table
/// or the caches an op gets is an error from the op, never an index out of
/// range (the CUDA backend relies on the same checks: tests/twin.rs).
#[test]
fn batches_past_their_tables_or_caches_are_errors() {
    use qwen_tensor::{AttnGeometry, DType};
    let b = CpuBackend::new();
    let mut bad = layout(&[70], &[0], 1);
    assert!(
        b.upload_batch(&bad).is_err(),
        "position 70 needs a 5th block"
    );
    bad = layout(&[3], &[1], 1);
    assert!(b.upload_batch(&bad).is_err(), "no sequence row 1");
    let meta = b.upload_batch(&layout(&[40], &[0], 1)).unwrap();
    assert_eq!((meta.positions_end(), meta.slots_end()), (41, 48));
    let geo = AttnGeometry {
        num_q_heads: 2,
        num_kv_heads: 1,
        head_dim: 32,
        block_size: 16,
    };
    let run = |rope_rows: usize, blocks: usize, geo: AttnGeometry| {
        let z = |s: &[usize], d| b.zeros(s, d).unwrap();
        let qkv = z(&[1, geo.qkv_width()], DType::F32);
        let (qn, kn) = (z(&[32], DType::F32), z(&[32], DType::F32));
        let rope = z(&[rope_rows, 32], DType::F32);
        let mut q = z(&[1, 64], DType::BF16);
        let mut out = z(&[1, 64], DType::BF16);
        let mut kc = z(&geo.cache_shape(blocks), DType::BF16);
        let mut vc = z(&geo.cache_shape(blocks), DType::BF16);
        let r = b.qk_norm_rope_store(
            &qkv, &qn, &kn, 1e-6, &rope, &meta, geo, &mut q, &mut kc, &mut vc,
        );
        let a = b.attention(&q, &kc, &vc, &meta, geo, 1.0, &mut out);
        (r.is_ok(), a.is_ok())
    };
    assert_eq!(run(41, 3, geo), (true, true));
    assert_eq!(run(40, 3, geo), (false, true), "rope table one row short");
    assert_eq!(run(41, 2, geo), (false, false), "caches one block short");
    let other = AttnGeometry {
        block_size: 8,
        ..geo
    };
    assert_eq!(run(41, 6, other), (false, false), "blocks of another size");
}
