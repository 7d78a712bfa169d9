//! The kernel trace (`QWEN_CUDA_TRACE`, trace.rs): a run of two dependent
//! kernels leaves one record each, with their grids and in order; and a
//! decode batch's q/k-norm, RoPE and tensor-core attention leave one. In a
//! test binary of its own, because the variable applies to every backend
//! the process opens (so one test, its parts one after another).

use qwen_kernels_cuda::CudaBackend;
use qwen_tensor::{AttnGeometry, Backend, BatchLayout, DType, HostSlice};

/// Runs `f` on a backend that traces its kernels; their records (time,
/// grid x, grid y, threads), or None without a GPU.
fn traced(f: impl FnOnce(&CudaBackend)) -> Option<Vec<[u64; 4]>> {
    let path = std::env::temp_dir().join(format!("qwen-trace-{}.txt", std::process::id()));
    std::env::set_var("QWEN_CUDA_TRACE", &path);
    let g = match CudaBackend::new(0) {
        Ok(g) => g,
        Err(e) => {
            // On the GPU machine (scripts/gpu-run.sh) a missing GPU is a failure.
            assert!(
                std::env::var_os("QWEN_REQUIRE_GPU").is_none(),
                "no GPU: {e}"
            );
            println!("skipping GPU trace test: {e}");
            return None;
        }
    };
    f(&g);
    g.synchronize().unwrap();
    // The records are written when the backend goes.
    drop(g);
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let v: Vec<u64> = l.split_whitespace().map(|f| f.parse().unwrap()).collect();
                [v[0], v[1], v[2], v[3]]
            })
            .collect(),
    )
}

#[test]
fn trace_records_each_kernel_in_order() {
    let Some(recs) = traced(|g| {
        let (t, h, n) = (2, 1024, 64);
        let x = g
            .upload(HostSlice::F32(&vec![0.5; t * h]), &[t, h])
            .unwrap();
        let w = g.upload(HostSlice::F32(&vec![1.0; h]), &[h]).unwrap();
        let wm = vec![half::bf16::from_f32(0.25); n * h];
        let wm = g.upload(HostSlice::BF16(&wm), &[n, h]).unwrap();
        let mut normed = g.zeros(&[t, h], DType::BF16).unwrap();
        let mut y = g.zeros(&[t, n], DType::F32).unwrap();
        // RMSNorm of rows of 1,024 (a warp a row: 1 block of 4 warps), then
        // the tiled projection (8 rows a block: 8 blocks of 256 threads).
        g.rms_norm(&x, &w, 1e-6, &mut normed).unwrap();
        g.matmul(&normed, &wm, &mut y).unwrap();
    }) else {
        return;
    };
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(&recs[0][1..], &[1, 1, 128], "{recs:?}");
    assert_eq!(&recs[1][1..], &[8, 1, 256], "{recs:?}");
    assert!(recs[0][0] <= recs[1][0], "{recs:?}");

    // Three sequences' decode tokens on the tensor cores (Qwen3-0.6B's
    // heads; contexts of one and two 1,024-key spans): one attn_tc_rope
    // kernel, a block per (token, kv head) and span, where the two ops
    // would launch qk_norm_rope_store first.
    let Some(recs) = traced(|g| {
        let geo = AttnGeometry {
            num_q_heads: 16,
            num_kv_heads: 8,
            head_dim: 128,
            block_size: 16,
        };
        let contexts = [5usize, 70, 1100];
        let max_blocks = 1100usize.div_ceil(16);
        let mut l = BatchLayout {
            max_blocks,
            block_size: 16,
            ..Default::default()
        };
        let mut next = 0u32;
        for (s, &c) in contexts.iter().enumerate() {
            let nb = c.div_ceil(16);
            let mut row: Vec<u32> = (next..next + nb as u32).collect();
            next += nb as u32;
            row.resize(max_blocks, 0);
            l.block_tables.extend(row);
            l.positions.push(c as u32 - 1);
            l.seq_of_token.push(s as u32);
        }
        let (t, d) = (contexts.len(), geo.head_dim);
        let meta = g.upload_batch(&l).unwrap();
        let qkv = vec![0.25f32; t * geo.qkv_width()];
        let qkv = g
            .upload(HostSlice::F32(&qkv), &[t, geo.qkv_width()])
            .unwrap();
        let norm = g.upload(HostSlice::F32(&vec![1.0; d]), &[d]).unwrap();
        let rope = vec![0.5f32; 1100 * d];
        let rope = g.upload(HostSlice::F32(&rope), &[1100, d]).unwrap();
        let shape = geo.cache_shape(next as usize);
        let mut kc = g.zeros(&shape, DType::BF16).unwrap();
        let mut vc = g.zeros(&shape, DType::BF16).unwrap();
        let mut q = g.zeros(&[t, geo.q_width()], DType::BF16).unwrap();
        let mut out = g.zeros(&[t, geo.q_width()], DType::BF16).unwrap();
        g.set_tensor_core_rows(t);
        g.qk_norm_rope_attention(
            &qkv, &norm, &norm, 1e-6, &rope, &meta, geo, 0.1, &mut q, &mut kc, &mut vc, &mut out,
        )
        .unwrap();
    }) else {
        return;
    };
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(&recs[0][1..], &[3 * 8, 2, 128], "{recs:?}");
}
