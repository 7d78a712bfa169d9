//! The sampler crate against the CPU backend: reproducibility, greedy,
//! penalties, validation and batch independence.

use qwen_kernels_cpu::CpuBackend;
use qwen_sampler::{
    sample_batch, sample_batch_on_device, sample_batch_on_device_into, uniform, Sampler,
    SamplerError, SamplingConfig,
};
use qwen_tensor::{Backend, DType, HostSlice, HostVec, Tensor};

type T = Tensor<CpuBackend>;

fn upload(rows: &[&[f32]]) -> T {
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    CpuBackend
        .upload(HostSlice::F32(&flat), &[rows.len(), rows[0].len()])
        .unwrap()
}

fn download(t: &T) -> Vec<f32> {
    match CpuBackend.download(t).unwrap() {
        HostVec::F32(v) => v,
        other => panic!("expected f32, got {other:?}"),
    }
}

fn random(seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature: 1.0,
        seed,
        ..Default::default()
    }
}

/// `steps` tokens from fresh copies of `row` (no history feedback).
fn run(config: SamplingConfig, stream: u64, row: &[f32], steps: usize) -> Vec<u32> {
    let mut s = Sampler::new(config, stream).unwrap();
    (0..steps)
        .map(|_| s.sample(&CpuBackend, &mut upload(&[row]), &[]).unwrap())
        .collect()
}

#[test]
fn same_seed_same_sequence() {
    let row: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
    let config = SamplingConfig {
        temperature: 0.9,
        top_k: 50,
        top_p: 0.95,
        min_p: 0.01,
        seed: 1234,
        ..Default::default()
    };
    let a = run(config, 3, &row, 200);
    assert_eq!(a, run(config, 3, &row, 200));
    // Not degenerate: the filters leave several tokens in play.
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert!(distinct.len() > 5, "{distinct:?}");
}

#[test]
fn different_seed_or_stream_different_sequence() {
    // Uniform logits over 1000 tokens: two independent 50-step runs agree
    // everywhere with probability 1000^-50.
    let row = vec![0.0f32; 1000];
    let a = run(random(1), 0, &row, 50);
    assert_ne!(a, run(random(2), 0, &row, 50));
    assert_ne!(a, run(random(1), 1, &row, 50));
}

#[test]
fn draws_follow_the_counter_based_stream() {
    // With equal logits over 1000 tokens the token is floor(u * 1000), so
    // the sampler must be using uniform(seed, stream, step) with step 0, 1, ...
    let row = vec![0.0f32; 1000];
    let got = run(random(9), 4, &row, 20);
    let want: Vec<u32> = (0..20)
        .map(|step| (uniform(9, 4, step) as f64 * 1000.0) as u32)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn greedy_returns_argmax_and_advances_step() {
    let row = [0.1f32, -3.0, 7.5, 7.5, 2.0];
    let mut s = Sampler::new(SamplingConfig::default(), 0).unwrap();
    for step in 0..5 {
        assert_eq!(s.step(), step);
        assert_eq!(s.sample(&CpuBackend, &mut upload(&[&row]), &[]).unwrap(), 2);
    }
    assert_eq!(s.step(), 5);
}

#[test]
fn repetition_penalty_lowers_repeated_tokens() {
    let config = SamplingConfig {
        repetition_penalty: 2.0,
        ..Default::default()
    };
    let mut s = Sampler::new(config, 0).unwrap();
    let mut logits = upload(&[&[3.0, 2.0, -1.0, 0.5]]);
    // Token 0 (positive) is halved, token 2 (negative) doubled; repeats in
    // the history count once.
    let tok = s.sample(&CpuBackend, &mut logits, &[0, 2, 0, 0]).unwrap();
    assert_eq!(download(&logits), vec![1.5, 2.0, -2.0, 0.5]);
    assert_eq!(tok, 1, "the penalty moved the argmax");

    // Penalty 1 leaves logits untouched even with a history.
    let mut s = Sampler::new(SamplingConfig::default(), 0).unwrap();
    let mut logits = upload(&[&[3.0, 2.0, -1.0, 0.5]]);
    assert_eq!(s.sample(&CpuBackend, &mut logits, &[0, 2]).unwrap(), 0);
    assert_eq!(download(&logits), vec![3.0, 2.0, -1.0, 0.5]);
}

#[test]
fn validate_rejects_out_of_range_settings() {
    let ok = SamplingConfig::default();
    assert!(ok.validate().is_ok());
    assert!(random(0).validate().is_ok());
    let err = |c: SamplingConfig| match Sampler::new(c, 0) {
        Err(e @ SamplerError::InvalidConfig { .. }) => e.to_string(),
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert_eq!(
        err(SamplingConfig {
            temperature: -1.0,
            ..ok
        }),
        "temperature must be >= 0, got -1"
    );
    assert!(err(SamplingConfig {
        temperature: f32::NAN,
        ..ok
    })
    .contains("temperature"));
    assert!(err(SamplingConfig {
        temperature: f32::INFINITY,
        ..ok
    })
    .contains("temperature must be finite"));
    for top_p in [0.0, 1.5, -0.5, f32::NAN] {
        assert!(err(SamplingConfig { top_p, ..ok }).starts_with("top_p must be in (0, 1]"));
    }
    for min_p in [-0.1, 1.01, f32::NAN] {
        assert!(err(SamplingConfig { min_p, ..ok }).starts_with("min_p must be in [0, 1]"));
    }
    for repetition_penalty in [0.0, -1.0, f32::INFINITY, f32::NAN] {
        assert!(err(SamplingConfig {
            repetition_penalty,
            ..ok
        })
        .starts_with("repetition_penalty"));
    }
    // Boundaries that are allowed.
    let edge = SamplingConfig {
        top_p: 1.0,
        min_p: 1.0,
        top_k: 1,
        ..random(0)
    };
    assert!(edge.validate().is_ok());
    assert!(SamplingConfig {
        min_p: 0.0,
        top_p: 1e-6,
        ..ok
    }
    .validate()
    .is_ok());
}

#[test]
fn batch_rows_match_sampling_each_row_alone() {
    let rows: Vec<Vec<f32>> = (0..5)
        .map(|r| {
            (0..300)
                .map(|i| ((i * (r + 3) * 31) % 97) as f32 * 0.07)
                .collect()
        })
        .collect();
    let configs = [
        SamplingConfig::default(),
        SamplingConfig {
            temperature: 0.7,
            top_k: 20,
            seed: 5,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.3,
            top_p: 0.8,
            repetition_penalty: 1.5,
            seed: 6,
            ..Default::default()
        },
        SamplingConfig {
            repetition_penalty: 3.0,
            ..Default::default()
        },
        SamplingConfig {
            temperature: 1.0,
            min_p: 0.2,
            seed: 5,
            ..Default::default()
        },
    ];
    let histories: Vec<Vec<u32>> = (0..5u32).map(|r| vec![r * 7, r * 7 + 1, 250]).collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let hist_refs: Vec<&[u32]> = histories.iter().map(|h| h.as_slice()).collect();

    let mut batched: Vec<Sampler> = configs
        .iter()
        .enumerate()
        .map(|(i, &c)| Sampler::new(c, i as u64).unwrap())
        .collect();
    let mut alone = batched.clone();
    for step in 0..30 {
        let mut logits = upload(&refs);
        let mut views: Vec<&mut Sampler> = batched.iter_mut().collect();
        let got = sample_batch(&CpuBackend, &mut logits, &mut views, &hist_refs).unwrap();
        for r in 0..5 {
            let want = alone[r]
                .sample(&CpuBackend, &mut upload(&[&rows[r]]), hist_refs[r])
                .unwrap();
            assert_eq!(got[r], want, "step {step} row {r}");
        }
    }
    assert!(batched.iter().all(|s| s.step() == 30));
}

#[test]
fn batch_shape_errors_leave_steps_alone() {
    let mut a = Sampler::new(random(1), 0).unwrap();
    let mut logits = upload(&[&[1.0, 2.0], &[3.0, 4.0]]);
    let e = sample_batch(&CpuBackend, &mut logits, &mut [&mut a], &[&[]]).unwrap_err();
    assert!(matches!(e, SamplerError::Batch(_)), "{e}");
    let e = a.sample(&CpuBackend, &mut logits, &[]).unwrap_err();
    assert!(matches!(e, SamplerError::Batch(_)), "{e}");
    // A backend error (history id outside the vocabulary) is passed through.
    let mut p = Sampler::new(
        SamplingConfig {
            repetition_penalty: 1.2,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let e = p
        .sample(&CpuBackend, &mut upload(&[&[1.0, 2.0]]), &[5])
        .unwrap_err();
    assert!(matches!(e, SamplerError::Backend(_)), "{e}");
    assert_eq!((a.step(), p.step()), (0, 0));
    // An empty batch is fine.
    let mut empty = CpuBackend.zeros(&[0, 4], qwen_tensor::DType::F32).unwrap();
    assert!(sample_batch(&CpuBackend, &mut empty, &mut [], &[])
        .unwrap()
        .is_empty());
}

/// Tokens left on the device are the tokens `sample_batch` picks, for all
/// greedy, all random and mixed batches; a repetition penalty is refused.
#[test]
fn on_device_batches_pick_what_host_batches_pick() {
    let rows: Vec<Vec<f32>> = (0..4)
        .map(|r| {
            (0..500)
                .map(|i| ((i * (r + 5) * 37) % 101) as f32 * 0.05)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
    let greedy = SamplingConfig::default();
    let warm = SamplingConfig {
        temperature: 0.6,
        seed: 9,
        ..Default::default()
    };
    for configs in [[greedy; 4], [warm; 4], [greedy, warm, warm, greedy]] {
        let make = || -> Vec<Sampler> {
            configs
                .iter()
                .enumerate()
                .map(|(i, &c)| Sampler::new(c, i as u64).unwrap())
                .collect()
        };
        let (mut host, mut device, mut into) = (make(), make(), make());
        // One tensor reused by every step of the `_into` form.
        let mut out = CpuBackend.zeros(&[4], DType::U32).unwrap();
        for step in 0..20 {
            let mut views: Vec<&mut Sampler> = host.iter_mut().collect();
            let none: [&[u32]; 4] = [&[]; 4];
            let want = sample_batch(&CpuBackend, &mut upload(&refs), &mut views, &none).unwrap();
            let mut views: Vec<&mut Sampler> = device.iter_mut().collect();
            let got = sample_batch_on_device(&CpuBackend, &mut upload(&refs), &mut views).unwrap();
            assert_eq!(
                CpuBackend.download(&got).unwrap(),
                HostVec::U32(want.clone()),
                "step {step}"
            );
            let mut views: Vec<&mut Sampler> = into.iter_mut().collect();
            sample_batch_on_device_into(&CpuBackend, &mut upload(&refs), &mut views, &mut out)
                .unwrap();
            assert_eq!(
                CpuBackend.download(&out).unwrap(),
                HostVec::U32(want),
                "into, step {step}"
            );
        }
        assert!(device.iter().all(|s| s.step() == 20));
        assert!(into.iter().all(|s| s.step() == 20));
    }
    // An output of the wrong length is an error, and no sampler moves on.
    let mut short = CpuBackend.zeros(&[3], DType::U32).unwrap();
    let mut samplers: Vec<Sampler> = (0..4).map(|i| Sampler::new(greedy, i).unwrap()).collect();
    let mut views: Vec<&mut Sampler> = samplers.iter_mut().collect();
    let r = sample_batch_on_device_into(&CpuBackend, &mut upload(&refs), &mut views, &mut short);
    assert!(r.is_err(), "{r:?}");
    assert!(samplers.iter().all(|s| s.step() == 0));
    let mut s = Sampler::new(
        SamplingConfig {
            repetition_penalty: 1.2,
            ..Default::default()
        },
        0,
    )
    .unwrap();
    let r = sample_batch_on_device(&CpuBackend, &mut upload(&refs[..1]), &mut [&mut s]);
    assert!(matches!(r, Err(SamplerError::Batch(_))), "{r:?}");
    assert_eq!(s.step(), 0);
}
