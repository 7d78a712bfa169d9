//! The kernel trace (`QWEN_CUDA_TRACE`, trace.rs): a run of two dependent
//! kernels leaves one record each, with their grids and in order. In a test
//! binary of its own, because the variable applies to every backend the
//! process opens.

use qwen_kernels_cuda::CudaBackend;
use qwen_tensor::{Backend, DType, HostSlice};

#[test]
fn trace_records_each_kernel_in_order() {
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
            return;
        }
    };
    let (t, h, n) = (2, 1024, 64);
    let x = g
        .upload(HostSlice::F32(&vec![0.5; t * h]), &[t, h])
        .unwrap();
    let w = g.upload(HostSlice::F32(&vec![1.0; h]), &[h]).unwrap();
    let wm = vec![half::bf16::from_f32(0.25); n * h];
    let wm = g.upload(HostSlice::BF16(&wm), &[n, h]).unwrap();
    let mut normed = g.zeros(&[t, h], DType::BF16).unwrap();
    let mut y = g.zeros(&[t, n], DType::F32).unwrap();
    // RMSNorm of rows of 1,024 (a warp a row: 1 block of 4 warps), then the
    // tiled projection (8 rows a block: 8 blocks of 256 threads).
    g.rms_norm(&x, &w, 1e-6, &mut normed).unwrap();
    g.matmul(&normed, &wm, &mut y).unwrap();
    g.synchronize().unwrap();
    drop((x, w, wm, normed, y));
    // The records are written when the backend goes.
    drop(g);
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let recs: Vec<[u64; 4]> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().map(|f| f.parse().unwrap()).collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect();
    assert_eq!(recs.len(), 2, "{text}");
    assert_eq!(&recs[0][1..], &[1, 1, 128], "{text}");
    assert_eq!(&recs[1][1..], &[8, 1, 256], "{text}");
    assert!(recs[0][0] <= recs[1][0], "{text}");
}
