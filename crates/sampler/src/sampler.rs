//! Per-sequence sampling state and the batched sampling step, written once
//! against [`Backend`].

use qwen_tensor::{Backend, DType, HostSlice, SampleParams, Tensor};

use crate::{uniform, SamplerError, SamplingConfig};

/// One sequence's sampler: its validated settings and its position in the
/// random stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    config: SamplingConfig,
    stream: u64,
    step: u64,
}

impl Sampler {
    /// A sampler for the sequence identified by `stream`, starting at step 0.
    /// Fails if `config` does not [validate](SamplingConfig::validate).
    pub fn new(config: SamplingConfig, stream: u64) -> Result<Self, SamplerError> {
        config.validate()?;
        Ok(Sampler {
            config,
            stream,
            step: 0,
        })
    }

    /// The settings this sampler was built with.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The stream id passed to [`Sampler::new`].
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// How many tokens this sampler has produced; the next draw uses
    /// [`uniform`]`(seed, stream, step)`.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The uniform for the next draw.
    fn next_uniform(&self) -> f32 {
        uniform(self.config.seed, self.stream, self.step)
    }

    /// Picks the next token from `logits` (f32 `[1, V]`): applies the
    /// repetition penalty over `history` (which modifies `logits`), then takes
    /// the argmax if the temperature is 0 and samples otherwise. Advances the
    /// step only on success.
    pub fn sample<B: Backend>(
        &mut self,
        backend: &B,
        logits: &mut Tensor<B>,
        history: &[u32],
    ) -> Result<u32, SamplerError> {
        let rows = rows_of(logits)?;
        if rows != 1 {
            return Err(SamplerError::Batch(format!(
                "Sampler::sample takes logits [1, V], got {:?}; use sample_batch",
                logits.shape()
            )));
        }
        Ok(sample_batch(backend, logits, &mut [self], &[history])?[0])
    }
}

fn rows_of<B: Backend>(logits: &Tensor<B>) -> Result<usize, SamplerError> {
    Ok(qwen_tensor::expect_2d("sampler", "logits", logits)?.0)
}

/// Picks one token per row of `logits` (f32 `[B, V]`), row `b` with
/// `samplers[b]` and `histories[b]`, making at most one backend call per
/// primitive for the whole batch: one `repetition_penalty` if any row has a
/// penalty, one `argmax` if any row is greedy, one `sample` if any row is
/// not. Each row's token is the one [`Sampler::sample`] would give it alone.
/// Every sampler's step advances only if the whole batch succeeds.
pub fn sample_batch<B: Backend>(
    backend: &B,
    logits: &mut Tensor<B>,
    samplers: &mut [&mut Sampler],
    histories: &[&[u32]],
) -> Result<Vec<u32>, SamplerError> {
    let rows = rows_of(logits)?;
    if samplers.len() != rows || histories.len() != rows {
        return Err(SamplerError::Batch(format!(
            "{rows} logit rows but {} samplers and {} histories",
            samplers.len(),
            histories.len()
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }

    if samplers.iter().any(|s| s.config.repetition_penalty != 1.0) {
        let penalty: Vec<f32> = samplers
            .iter()
            .map(|s| s.config.repetition_penalty)
            .collect();
        // Rows without a penalty get an empty history: the op would leave
        // their logits bit-identical anyway (x / 1 = x * 1 = x), but this
        // skips the work.
        let hist: Vec<Vec<u32>> = samplers
            .iter()
            .zip(histories)
            .map(|(s, h)| {
                if s.config.repetition_penalty != 1.0 {
                    h.to_vec()
                } else {
                    Vec::new()
                }
            })
            .collect();
        backend.repetition_penalty(logits, &penalty, &hist)?;
    }

    let any_greedy = samplers.iter().any(|s| s.config.is_greedy());
    let any_random = samplers.iter().any(|s| !s.config.is_greedy());
    let greedy = if any_greedy {
        backend.argmax(logits)?
    } else {
        Vec::new()
    };
    let drawn = if any_random {
        // Greedy rows still need valid parameters; top-k 1 keeps their
        // (discarded) draw at O(V).
        let filler = SampleParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 0.0,
        };
        let (params, us): (Vec<SampleParams>, Vec<f32>) = samplers
            .iter()
            .map(|s| {
                if s.config.is_greedy() {
                    (filler, 0.0)
                } else {
                    (s.config.sample_params(), s.next_uniform())
                }
            })
            .unzip();
        backend.sample(logits, &params, &us)?
    } else {
        Vec::new()
    };

    let pick = |out: &[u32], r: usize| {
        out.get(r).copied().ok_or_else(|| {
            SamplerError::Batch(format!(
                "backend {} returned {} tokens for {rows} rows",
                backend.name(),
                out.len()
            ))
        })
    };
    let tokens = samplers
        .iter()
        .enumerate()
        .map(|(r, s)| {
            if s.config.is_greedy() {
                pick(&greedy, r)
            } else {
                pick(&drawn, r)
            }
        })
        .collect::<Result<Vec<u32>, _>>()?;
    for s in samplers.iter_mut() {
        s.step += 1;
    }
    Ok(tokens)
}

/// [`sample_batch`] with the tokens left on the device (u32 `[B]`), for
/// overlapped scheduling: one `argmax_to` when every row is greedy, one
/// `sample_to` when none is, the same tokens [`sample_batch`] picks. A
/// batch mixing the two is sampled on the host and uploaded. A repetition
/// penalty needs each row's whole history, which overlapped steps do not
/// have on the host, so it is refused.
pub fn sample_batch_on_device<B: Backend>(
    backend: &B,
    logits: &mut Tensor<B>,
    samplers: &mut [&mut Sampler],
) -> Result<Tensor<B>, SamplerError> {
    let rows = rows_of(logits)?;
    // Every element is written below.
    let mut out = backend.empty(&[rows], DType::U32)?;
    sample_batch_on_device_into(backend, logits, samplers, &mut out)?;
    Ok(out)
}

/// [`sample_batch_on_device`] into `out` (u32 `[B]`), which a loop of
/// single-sequence steps can reuse: the stream runs each step's reads of
/// the token before this write.
pub fn sample_batch_on_device_into<B: Backend>(
    backend: &B,
    logits: &mut Tensor<B>,
    samplers: &mut [&mut Sampler],
    out: &mut Tensor<B>,
) -> Result<(), SamplerError> {
    let rows = rows_of(logits)?;
    if samplers.len() != rows {
        return Err(SamplerError::Batch(format!(
            "{rows} logit rows but {} samplers",
            samplers.len()
        )));
    }
    if samplers.iter().any(|s| s.config.repetition_penalty != 1.0) {
        return Err(SamplerError::Batch(
            "a repetition penalty needs the whole history on the host; sample with sample_batch"
                .into(),
        ));
    }
    qwen_tensor::expect_dtype("sampler", "out", out, DType::U32)?;
    qwen_tensor::expect_shape("sampler", "out", out, &[rows])?;
    if rows > 0 {
        if samplers.iter().all(|s| s.config.is_greedy()) {
            backend.argmax_to(logits, out)?;
        } else if samplers.iter().all(|s| !s.config.is_greedy()) {
            let (params, us): (Vec<SampleParams>, Vec<f32>) = samplers
                .iter()
                .map(|s| (s.config.sample_params(), s.next_uniform()))
                .unzip();
            backend.sample_to(logits, &params, &us, out)?;
        } else {
            let none: Vec<&[u32]> = vec![&[]; rows];
            let picked = sample_batch(backend, logits, samplers, &none)?;
            backend.write(out, HostSlice::U32(&picked))?;
            return Ok(());
        }
    }
    for s in samplers.iter_mut() {
        s.step += 1;
    }
    Ok(())
}
