//! The kernel trace (`QWEN_CUDA_TRACE`, trace.rs): a run of two dependent
//! kernels leaves one record each, with their grids and in order; a
//! decode batch's q/k-norm, RoPE and tensor-core attention leave one; and a
//! prompt layer's QKV projection makes RoPE itself. In a
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

/// Qwen3-0.6B's attention heads, in blocks of 16 positions.
fn qwen3_06b_heads() -> AttnGeometry {
    AttnGeometry {
        num_q_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        block_size: 16,
    }
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
        let geo = qwen3_06b_heads();
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

    prompt_layer_makes_rope_in_the_projection();
}

/// A prompt of 2,200 tokens through a Qwen3-0.6B-shaped layer whose rows
/// are all on the tensor cores, its input norm handed in: the QKV
/// projection (a 128 x 256 tile a block, 18 x 16 blocks of 256 threads)
/// makes q/k-norm, RoPE and the cache store itself, so the next kernel is
/// attention (a block per query tile, kv head and 1,024-key span: grid y
/// 3), where the ops would launch qk_norm_rope_store (grid y 1) between.
/// (A part of the one test: see the file's comment.)
fn prompt_layer_makes_rope_in_the_projection() {
    use qwen_tensor::{LayerActs, LayerInputs, LayerWeights};
    let Some(recs) = traced(|g| {
        let geo = qwen3_06b_heads();
        let (t, h, i, d) = (2200usize, 1024usize, 3072usize, geo.head_dim);
        let blocks = t.div_ceil(16);
        let l = BatchLayout {
            positions: (0..t as u32).collect(),
            seq_of_token: vec![0; t],
            block_tables: (0..blocks as u32).collect(),
            max_blocks: blocks,
            block_size: 16,
        };
        let meta = g.upload_batch(&l).unwrap();
        let f = |v: f32, s: &[usize]| {
            let n = s.iter().product();
            g.upload(HostSlice::F32(&vec![v; n]), s).unwrap()
        };
        let b = |v: f32, s: &[usize]| {
            let n = s.iter().product();
            let data = vec![half::bf16::from_f32(v); n];
            g.upload(HostSlice::BF16(&data), s).unwrap()
        };
        let (norm_h, norm_d) = (f(1.0, &[h]), f(1.0, &[d]));
        let qkv_w = b(0.01, &[geo.qkv_width(), h]);
        let o_w = b(0.01, &[h, geo.q_width()]);
        let gu_w = b(0.01, &[2 * i, h]);
        let down_w = b(0.01, &[h, i]);
        let w = LayerWeights {
            input_norm: &norm_h,
            qkv: &qkv_w,
            q_norm: &norm_d,
            k_norm: &norm_d,
            o_proj: &o_w,
            post_attention_norm: &norm_h,
            gate_up: &gu_w,
            down: &down_w,
            next_input_norm: Some(&norm_h),
        };
        let rope = f(0.5, &[t, d]);
        let shape = geo.cache_shape(blocks);
        let (mut kc, mut vc) = (b(0.0, &shape), b(0.0, &shape));
        let mut x = f(0.5, &[t, h]);
        let (mut qkv, mut q, mut attn) = (
            f(0.0, &[t, geo.qkv_width()]),
            b(0.0, &[t, geo.q_width()]),
            b(0.0, &[t, geo.q_width()]),
        );
        let (mut gate_up, mut act, mut normed) =
            (f(0.0, &[t, 2 * i]), b(0.0, &[t, i]), b(0.5, &[t, h]));
        let inp = LayerInputs {
            rope: &rope,
            eps: 1e-6,
            meta: &meta,
            geo,
            scale: 0.1,
            normed_input: true,
        };
        let acts = LayerActs {
            qkv: &mut qkv,
            q: &mut q,
            attn: &mut attn,
            gate_up: &mut gate_up,
            act: &mut act,
            normed: &mut normed,
        };
        g.set_tensor_core_rows(t);
        g.decoder_layer(&w, inp, &mut x, &mut kc, &mut vc, acts)
            .unwrap();
    }) else {
        return;
    };
    assert!(recs.len() >= 2, "{recs:?}");
    assert_eq!(&recs[0][1..], &[18, 16, 256], "{recs:?}");
    assert_eq!(recs[1][2], 3, "{recs:?}");
}
