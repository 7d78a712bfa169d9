//! The batch metadata a backend keeps between forward passes: `update_batch`
//! must leave it exactly as `upload_batch` would make it, including the
//! query tiles, sequence rows and block tables it may skip rewriting for
//! decode steps.

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

fn u32s(b: &CpuBackend, t: &qwen_tensor::Tensor<CpuBackend>) -> Vec<u32> {
    match b.download(t).unwrap() {
        HostVec::U32(v) => v,
        other => panic!("batch metadata is {other:?}"),
    }
}

fn tiles(b: &CpuBackend, m: &BatchMeta<CpuBackend>) -> Vec<u32> {
    u32s(b, m.query_tiles())
}

#[test]
fn update_batch_keeps_rows_and_tables_current() {
    let b = CpuBackend::new();
    let first = layout(&[3, 9], &[0, 1], 2);
    let mut m = b.upload_batch(&first).unwrap();
    let mut moved = layout(&[4, 10], &[0, 1], 2);
    moved.block_tables[5] = 7; // the second sequence's second block moved
    let swapped = layout(&[11, 5], &[1, 0], 2); // rows in the other order
    for l in [&first, &moved, &moved, &swapped, &first, &swapped] {
        b.update_batch(&mut m, l).unwrap();
        assert_eq!(u32s(&b, m.positions()), l.positions);
        assert_eq!(u32s(&b, m.seq_of_token()), l.seq_of_token);
        assert_eq!(u32s(&b, m.block_tables()), l.block_tables);
        assert_eq!(u32s(&b, m.slots()), l.slots());
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
/// upload, not an index out of range, and the metadata records the rope
/// rows and cache slots the batch needs (the ops' checks against them, on
/// both backends: kernels-cuda's tests/twin.rs).
#[test]
fn layouts_are_checked_at_upload() {
    let b = CpuBackend::new();
    assert!(
        b.upload_batch(&layout(&[70], &[0], 1)).is_err(),
        "position 70 needs a 5th block"
    );
    assert!(
        b.upload_batch(&layout(&[3], &[1], 1)).is_err(),
        "no sequence row 1"
    );
    let mut meta = b.upload_batch(&layout(&[40], &[0], 1)).unwrap();
    // Position 40 reads blocks 0, 1 and 2 of the row (0, 1, 2, 3).
    assert_eq!((meta.positions_end(), meta.slots_end()), (41, 48));
    assert!(b.update_batch(&mut meta, &layout(&[60], &[0], 1)).is_ok());
    assert_eq!((meta.positions_end(), meta.slots_end()), (61, 64));
    assert!(b.update_batch(&mut meta, &layout(&[60], &[3], 1)).is_err());
    // A failed update leaves the metadata as it was.
    assert_eq!((meta.positions_end(), meta.slots_end()), (61, 64));
    meta.set_context_capacity(10);
    assert_eq!(
        meta.max_context(),
        61,
        "never below the batch's own context"
    );
    meta.set_context_capacity(256);
    assert_eq!(meta.max_context(), 256);
}
