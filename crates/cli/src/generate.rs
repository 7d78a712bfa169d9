//! `qwen-cli generate`: load a checkpoint, render the prompt, prefill,
//! decode with the sampler, and stream text (or print one JSON object).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use model_qwen3::chat::{ChatMessage, ChatTemplate};
use model_qwen3::generation_config::GenerationConfig;
use model_qwen3::tokenizer::{StreamDecoder, Tokenizer};
use model_qwen3::{Logits, Sequence};
use qwen_sampler::{FinishReason, Sampler, SamplingConfig, StopCriteria};
use qwen_tensor::Backend;

use crate::args::GenerateArgs;
use crate::decode::{decode, DecodeIn, Decoded};

/// What one generation produced.
pub struct Outcome {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The checkpoint to run: `--model`, or the demo checkpoint shipped in the
/// repo (looked up from the working directory, then from this crate).
pub fn model_dir(args: &GenerateArgs) -> Result<PathBuf, String> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let candidates = [
        PathBuf::from("fixtures/tiny-qwen3"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen3"),
    ];
    let dir = candidates
        .into_iter()
        .find(|d| d.join("config.json").is_file())
        .ok_or("no --model given and the demo checkpoint fixtures/tiny-qwen3 was not found")?;
    eprintln!(
        "no --model given: running the demo checkpoint {} (tiny, random weights: the text is gibberish)",
        dir.display()
    );
    Ok(dir)
}

/// Sampling settings: the user's flags over the checkpoint's defaults.
pub fn sampling_config(args: &GenerateArgs, gen: &GenerationConfig) -> SamplingConfig {
    let sampling = gen.do_sample.unwrap_or(gen.temperature.is_some());
    let default_temp = if sampling {
        gen.temperature.unwrap_or(1.0)
    } else {
        0.0
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    SamplingConfig {
        temperature: args.temperature.unwrap_or(default_temp),
        top_k: args.top_k.or(gen.top_k).unwrap_or(0),
        top_p: args.top_p.or(gen.top_p).unwrap_or(1.0),
        min_p: args.min_p.or(gen.min_p).unwrap_or(0.0),
        repetition_penalty: args
            .repetition_penalty
            .or(gen.repetition_penalty)
            .unwrap_or(1.0),
        seed,
    }
}

/// Runs `generate` on `backend`; streams text to stdout unless `--json`.
pub fn run<B: Backend>(backend: B, args: &GenerateArgs, dir: &Path) -> Result<Outcome, String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let gen = GenerationConfig::from_dir(dir).map_err(err)?;
    let sampling = sampling_config(args, &gen);
    sampling.validate().map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_dir(dir).map_err(err)?;
    let text = if args.chat {
        let template = ChatTemplate::from_dir(dir).map_err(err)?;
        template
            .render(
                &[ChatMessage::user(args.prompt.as_str())],
                true,
                !args.no_think,
            )
            .map_err(err)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text).map_err(err)?;
    if prompt.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }

    let model = crate::common::load(backend, dir)?;
    let cfg = model.config();
    let max_pos = cfg.max_position_embeddings;
    if prompt.len() >= max_pos {
        return Err(format!(
            "the prompt is {} tokens; the model takes at most {} positions (max_position_embeddings)",
            prompt.len(),
            max_pos
        ));
    }
    let max_new = args.max_tokens.min(max_pos - prompt.len());
    let mut eos = gen.eos_token_ids.clone();
    if eos.is_empty() {
        eos = cfg.eos_token_ids.clone();
    }
    let stop = StopCriteria {
        eos_token_ids: eos,
        max_new_tokens: max_new,
    };
    let mut sampler = Sampler::new(sampling, 0).map_err(|e| e.to_string())?;
    let mut cache = model.new_cache(prompt.len() + max_new).map_err(err)?;
    let mut seq = Sequence::default();
    let mut history = prompt.clone();
    let mut decoder = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    let mut text_out = String::new();
    let mut emit = |chunk: Option<String>, out: &mut std::io::StdoutLock| {
        if let Some(c) = chunk {
            if !args.json {
                let _ = out.write_all(c.as_bytes());
                let _ = out.flush();
            }
            text_out.push_str(&c);
        }
    };

    let t0 = Instant::now();
    let mut logits = model
        .forward(&mut cache, &mut [(&mut seq, &prompt[..])], Logits::Last)
        .map_err(err)?;
    let be = model.backend();
    let first = sampler
        .sample(be, &mut logits, &history)
        .map_err(|e| e.to_string())?;
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let Decoded {
        tokens,
        finish,
        steps,
    } = decode(
        DecodeIn {
            model: &model,
            cache: &mut cache,
            seq: &mut seq,
            sampler: &mut sampler,
            history: &mut history,
            stop: &stop,
        },
        first,
        args.overlap,
        &mut |tok, reason| {
            if reason != Some(FinishReason::Stop) {
                emit(decoder.push(&tokenizer, tok).map_err(err)?, &mut out);
            }
            Ok(())
        },
    )?;
    let decode_s = t1.elapsed().as_secs_f64();
    emit(decoder.finish(), &mut out);
    if !args.json {
        let _ = writeln!(out);
    }
    let outcome = Outcome {
        prompt_tokens: prompt.clone(),
        tokens,
        text: text_out,
        finish,
        prefill_tok_s: seq_rate(prompt.len(), prefill_s),
        decode_tok_s: seq_rate(steps, decode_s),
    };
    eprintln!(
        "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | finish: {}",
        outcome.prompt_tokens.len(),
        outcome.prefill_tok_s,
        steps,
        outcome.decode_tok_s,
        finish.as_str()
    );
    Ok(outcome)
}

fn seq_rate(tokens: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// The `--json` object.
pub fn to_json(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": o.prompt_tokens,
        "tokens": o.tokens,
        "text": o.text,
        "finish_reason": o.finish.as_str(),
        "prefill_tok_s": o.prefill_tok_s,
        "decode_tok_s": o.decode_tok_s,
    })
}
