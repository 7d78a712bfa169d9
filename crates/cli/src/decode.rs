//! `generate`'s decode loop, one token at a time: plain (each step waits
//! for its token) or overlapped (step k + 1 is queued before the host reads
//! token k, as `bench` and the scheduler's overlapped steps do). Both give
//! the same tokens; the overlapped loop keeps the GPU from waiting on the
//! host between steps.

use std::collections::VecDeque;

use model_qwen3::{Feed, KvCache, Logits, Qwen3, Sequence};
use qwen_sampler::{sample_batch_on_device_into, FinishReason, Sampler, StopCriteria};
use qwen_tensor::{Backend, Download, HostSlice, HostVec, Tensor};

/// What a decode loop produced after the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Every generated token, `first` included, a stop token included.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// Forward passes whose token was kept.
    pub steps: usize,
}

/// Where the loop runs and what it stops on.
pub struct DecodeIn<'a, B: Backend> {
    pub model: &'a Qwen3<B>,
    pub cache: &'a mut KvCache<B>,
    pub seq: &'a mut Sequence,
    pub sampler: &'a mut Sampler,
    /// The prompt; each generated token is appended as it is taken.
    pub history: &'a mut Vec<u32>,
    pub stop: &'a StopCriteria,
}

/// Decodes from `first` (the token the prompt's logits gave) until `stop`
/// says so, handing each token and whether it ends the generation to
/// `on_token` in order; an error from it ends the loop. Overlapped when
/// `overlap` is set and the sampler has no repetition penalty (which needs
/// the whole history on the host).
pub fn decode<B: Backend>(
    d: DecodeIn<'_, B>,
    first: u32,
    overlap: bool,
    on_token: &mut dyn FnMut(u32, Option<FinishReason>) -> Result<(), String>,
) -> Result<Decoded, String> {
    if overlap && d.sampler.config().repetition_penalty == 1.0 {
        decode_overlapped(d, first, on_token)
    } else {
        decode_plain(d, first, on_token)
    }
}

/// Takes a generated token: appends it, asks `stop`, tells `on_token`
/// (whose error ends the loop).
fn take(
    d: &mut DecodeIn<'_, impl Backend>,
    tokens: &mut Vec<u32>,
    tok: u32,
    on_token: &mut dyn FnMut(u32, Option<FinishReason>) -> Result<(), String>,
) -> Result<Option<FinishReason>, String> {
    d.history.push(tok);
    tokens.push(tok);
    let reason = d.stop.check(tok, tokens.len());
    on_token(tok, reason)?;
    Ok(reason)
}

fn decode_plain<B: Backend>(
    mut d: DecodeIn<'_, B>,
    first: u32,
    on_token: &mut dyn FnMut(u32, Option<FinishReason>) -> Result<(), String>,
) -> Result<Decoded, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let mut tokens = Vec::new();
    let mut steps = 0;
    let mut tok = first;
    loop {
        if let Some(finish) = take(&mut d, &mut tokens, tok, on_token)? {
            return Ok(Decoded {
                tokens,
                finish,
                steps,
            });
        }
        let mut logits = d
            .model
            .forward(d.cache, &mut [(&mut *d.seq, &[tok])], Logits::Last)
            .map_err(err)?;
        tok = d
            .sampler
            .sample(d.model.backend(), &mut logits, d.history)
            .map_err(|e| e.to_string())?;
        steps += 1;
    }
}

fn decode_overlapped<B: Backend>(
    mut d: DecodeIn<'_, B>,
    first: u32,
    on_token: &mut dyn FnMut(u32, Option<FinishReason>) -> Result<(), String>,
) -> Result<Decoded, String> {
    let be = d.model.backend();
    let mut tokens = Vec::new();
    if let Some(finish) = take(&mut d, &mut tokens, first, on_token)? {
        return Ok(Decoded {
            tokens,
            finish,
            steps: 0,
        });
    }
    // The newest token on the device: each step is fed from it, then
    // samples over it, and its download reads it; the stream runs these in
    // the order they are queued, so one buffer serves every step.
    let mut newest = be
        .upload(HostSlice::U32(&[first]), &[1])
        .map_err(|e| e.to_string())?;
    // Each step is queued before the token of the step before it is read,
    // so the GPU has the next step while the host takes a token.
    let mut in_flight = VecDeque::from([queue_step(&mut d, &mut newest)?]);
    let mut steps = 0;
    loop {
        // The next step, unless the tokens taken and in flight already
        // reach the limit.
        if tokens.len() + in_flight.len() < d.stop.max_new_tokens {
            in_flight.push_back(queue_step(&mut d, &mut newest)?);
        }
        let next = in_flight
            .pop_front()
            .ok_or("the decode loop ran out of queued steps before it stopped")?;
        let tok = match next.wait().map_err(|e| e.to_string())? {
            HostVec::U32(v) if v.len() == 1 => v[0],
            _ => return Err("the sampled token came back in another shape or dtype".into()),
        };
        steps += 1;
        // A step queued after a stop token is dropped with its download.
        if let Some(finish) = take(&mut d, &mut tokens, tok, on_token)? {
            return Ok(Decoded {
                tokens,
                finish,
                steps,
            });
        }
    }
}

/// Queues one step fed from `newest`, samples its token into `newest` and
/// starts that token's download.
fn queue_step<B: Backend>(
    d: &mut DecodeIn<'_, B>,
    newest: &mut Tensor<B>,
) -> Result<Download, String> {
    let be = d.model.backend();
    let feed = Feed {
        tokens: newest,
        entries: &[(0, 0)],
    };
    let mut logits = d
        .model
        .forward_fed(
            d.cache,
            &mut [(&mut *d.seq, &[0])],
            Logits::Last,
            Some(feed),
        )
        .map_err(|e| e.to_string())?;
    sample_batch_on_device_into(be, &mut logits, &mut [&mut *d.sampler], newest)
        .map_err(|e| e.to_string())?;
    be.download_start(newest).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_kernels_cpu::CpuBackend;
    use qwen_sampler::SamplingConfig;
    use std::path::Path;

    fn tiny() -> Qwen3<CpuBackend> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3");
        Qwen3::load(CpuBackend::new(), &dir, &mut |_, _| {}).unwrap()
    }

    /// Runs the loop on `prompt` with `sampling`, stopping on `eos` or
    /// after `max_new` tokens; the tokens `on_token` saw must be the ones
    /// returned, each with its finish reason. Also returns how many
    /// positions the sequence ran through the model.
    fn run(
        model: &Qwen3<CpuBackend>,
        sampling: &SamplingConfig,
        eos: &[u32],
        max_new: usize,
        overlap: bool,
    ) -> (Decoded, usize) {
        let prompt = [3u32, 141, 59, 26, 53];
        let mut cache = model.new_cache(prompt.len() + max_new).unwrap();
        let mut seq = Sequence::default();
        let mut sampler = Sampler::new(*sampling, 0).unwrap();
        let mut history = prompt.to_vec();
        let mut logits = model
            .forward(&mut cache, &mut [(&mut seq, &prompt[..])], Logits::Last)
            .unwrap();
        let first = sampler
            .sample(model.backend(), &mut logits, &history)
            .unwrap();
        let stop = StopCriteria {
            eos_token_ids: eos.to_vec(),
            max_new_tokens: max_new,
        };
        let mut seen = Vec::new();
        let d = decode(
            DecodeIn {
                model,
                cache: &mut cache,
                seq: &mut seq,
                sampler: &mut sampler,
                history: &mut history,
                stop: &stop,
            },
            first,
            overlap,
            &mut |t, r| {
                seen.push((t, r));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), d.tokens);
        assert!(seen[..seen.len() - 1].iter().all(|s| s.1.is_none()));
        assert_eq!(seen.last().unwrap().1, Some(d.finish));
        assert_eq!(history[prompt.len()..], d.tokens[..]);
        (d, seq.len())
    }

    #[test]
    fn overlapped_decoding_equals_plain() {
        let model = tiny();
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..SamplingConfig::default()
        };
        let sampled = SamplingConfig {
            temperature: 1.3,
            top_k: 40,
            seed: 11,
            ..SamplingConfig::default()
        };
        for sampling in [&greedy, &sampled] {
            for max_new in [1, 2, 3, 20] {
                let (plain, ran) = run(&model, sampling, &[], max_new, false);
                assert_eq!(plain.tokens.len(), max_new);
                assert_eq!(plain.finish, FinishReason::Length);
                assert_eq!(run(&model, sampling, &[], max_new, true), (plain, ran));
            }
            // A stop token the plain loop meets mid-way (the first token
            // whose first appearance is past the second) ends both loops
            // there.
            let (free, _) = run(&model, sampling, &[], 20, false);
            let stop_at = (2..20)
                .find(|&i| !free.tokens[..i].contains(&free.tokens[i]))
                .expect("a token new after the second");
            let stop = [free.tokens[stop_at]];
            let (plain, ran) = run(&model, sampling, &stop, 20, false);
            assert_eq!(plain.tokens, free.tokens[..=stop_at]);
            assert_eq!(plain.finish, FinishReason::Stop);
            // The overlapped loop had queued the step after the stop token
            // before it read it: it runs one step ahead of its tokens.
            assert_eq!(run(&model, sampling, &stop, 20, true), (plain, ran + 1));
        }
        // A repetition penalty takes the plain loop whatever `overlap` says.
        let penalised = SamplingConfig {
            repetition_penalty: 1.3,
            ..greedy
        };
        assert_eq!(
            run(&model, &penalised, &[], 12, true),
            run(&model, &penalised, &[], 12, false)
        );
    }
}
