//! `qwen-cli perplexity`: perplexity of a text file, exp(mean negative
//! log-likelihood of the scored tokens), with progress on stderr.
//!
//! Two windowings:
//! - default, llama.cpp's `llama-perplexity`: the token stream is cut into
//!   `floor(T / N)` chunks of N = `--context` tokens (a tail shorter than N
//!   is dropped), each chunk is evaluated from an empty cache, and only its
//!   second half is scored: the predictions of tokens `N/2 + 1 .. N - 1`
//!   of the chunk, so every scored token has at least N/2 tokens of
//!   context. (llama.cpp also swaps a BOS token into the first slot of a
//!   chunk for models that add one; Qwen3 adds none, so neither do we.
//!   llama.cpp insists on 2N tokens; one chunk is enough here.)
//! - `--stride S`, Hugging Face's sliding window: windows of up to N
//!   tokens start every S tokens; each window scores only the tokens no
//!   earlier window scored, so with S < N every token after the first is
//!   scored exactly once, with at least N − S tokens of context once the
//!   first window is past (with S = N the windows are disjoint and their
//!   first tokens go unscored). With N at least the text's length there is
//!   a single window, and this is the plain exp(mean NLL) of every next
//!   token of the text.

use std::io::Write;

use model_qwen3::{Logits, Qwen3, Sequence};
use qwen_tensor::Backend;

use crate::args::PerplexityArgs;

/// Tokens per forward call: bounds the logits buffer (tokens × vocab f32,
/// 78 MB at 128 × 151 936) however long the window is.
const PIECE: usize = 128;

/// A window to evaluate: tokens `begin..end` of the text, scoring the
/// predictions of tokens `score_from..end` (each from the logits of the
/// token before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: usize,
    pub end: usize,
    pub score_from: usize,
}

/// The windows for `n` tokens, context `ctx` and optional `stride`.
pub fn windows(n: usize, ctx: usize, stride: Option<usize>) -> Vec<Window> {
    let mut out = Vec::new();
    match stride {
        None => {
            for c in 0..n / ctx {
                let begin = c * ctx;
                out.push(Window {
                    begin,
                    end: begin + ctx,
                    score_from: begin + ctx / 2 + 1,
                });
            }
        }
        Some(s) => {
            let mut scored_to = 0; // tokens before this are scored (or the first)
            let mut begin = 0;
            loop {
                let end = (begin + ctx).min(n);
                out.push(Window {
                    begin,
                    end,
                    score_from: scored_to.max(begin + 1),
                });
                scored_to = end;
                if end == n {
                    break;
                }
                begin += s;
            }
        }
    }
    out
}

/// Running sums of the scored negative log-likelihoods.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nll {
    pub sum: f64,
    pub sum_sq: f64,
    pub count: usize,
}

impl Nll {
    pub fn ppl(&self) -> f64 {
        (self.sum / self.count as f64).exp()
    }
    /// Standard error of the perplexity estimate (delta method: the
    /// standard error of the mean NLL, times the perplexity).
    pub fn ppl_err(&self) -> f64 {
        let n = self.count as f64;
        if self.count < 2 {
            return f64::NAN;
        }
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        (var / (n - 1.0)).sqrt() * self.ppl()
    }
}

/// −log softmax(row)[target], in f64.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + sum.ln() - row[target as usize] as f64
}

/// Runs `perplexity` on `model`. Prints the result to stdout.
pub fn run<B: Backend>(model: &Qwen3<B>, ids: &[u32], args: &PerplexityArgs) -> Result<(), String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let n = ids.len();
    let ctx = args.context;
    let max_pos = model.config().max_position_embeddings;
    if ctx > max_pos {
        return Err(format!(
            "--context {ctx} exceeds the model's max_position_embeddings ({max_pos})"
        ));
    }
    if args.stride.is_none() && n < ctx {
        return Err(format!(
            "the text is {n} tokens, fewer than one --context chunk of {ctx}; lower --context, or add --stride to score a shorter text"
        ));
    }
    if n < 2 {
        return Err(format!(
            "the text is {n} token(s); perplexity needs at least 2"
        ));
    }
    let wins = windows(n, ctx, args.stride);
    let vocab = model.config().vocab_size;
    let be = model.backend();
    let mut cache = model.new_cache(ctx.min(n)).map_err(err)?;
    let mut total = Nll::default();
    eprintln!(
        "perplexity: {n} tokens, {} window(s) of up to {ctx} tokens{}",
        wins.len(),
        match args.stride {
            Some(s) => format!(", stride {s} (sliding window, every token scored once)"),
            None => ", scoring the second half of each chunk (llama.cpp)".into(),
        }
    );
    for (wi, w) in wins.iter().enumerate() {
        let mut seq = Sequence::default();
        let mut p = w.begin;
        while p < w.end {
            // Logits of token j predict token j + 1, so rows from
            // score_from - 1 on are scored: end a piece there, and the
            // rows before it skip the vocabulary projection but one.
            let mut q = (p + PIECE).min(w.end);
            if p + 1 < w.score_from && w.score_from - 1 < q {
                q = w.score_from - 1;
            }
            let needed = q >= w.score_from && p + 1 < w.end;
            let want = if needed { Logits::All } else { Logits::Last };
            let logits = model
                .forward(&mut cache, &mut [(&mut seq, &ids[p..q])], want)
                .map_err(err)?;
            if needed {
                let v = be.download(&logits).map_err(|e| e.to_string())?.to_f32();
                for j in p..q {
                    let target = j + 1;
                    if target >= w.score_from && target < w.end {
                        let row = &v[(j - p) * vocab..(j - p + 1) * vocab];
                        let x = nll(row, ids[target]);
                        total.sum += x;
                        total.sum_sq += x * x;
                        total.count += 1;
                    }
                }
            }
            p = q;
        }
        cache.release(&mut seq);
        eprintln!(
            "[{}/{}] tokens {}..{}: ppl so far {:.4}",
            wi + 1,
            wins.len(),
            w.begin,
            w.end,
            total.ppl()
        );
        let _ = std::io::stderr().flush();
    }
    if total.count == 0 {
        return Err("no token was scored (raise --context)".into());
    }
    println!(
        "perplexity: {:.4} +/- {:.4} over {} scored tokens (mean NLL {:.6}; context {ctx}{})",
        total.ppl(),
        total.ppl_err(),
        total.count,
        total.sum / total.count as f64,
        args.stride
            .map(|s| format!(", stride {s}"))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(ws: &[Window]) -> Vec<usize> {
        ws.iter().flat_map(|w| w.score_from..w.end).collect()
    }

    #[test]
    fn llama_cpp_chunks_score_second_halves() {
        let ws = windows(25, 8, None);
        assert_eq!(ws.len(), 3, "the 1-token tail is dropped");
        assert_eq!(
            ws[1],
            Window {
                begin: 8,
                end: 16,
                score_from: 13
            }
        );
        // n_ctx − n_ctx/2 − 1 predictions per chunk, as llama.cpp counts.
        assert_eq!(scored(&ws).len(), 3 * (8 - 4 - 1));
    }

    #[test]
    fn sliding_window_scores_every_token_once() {
        for (n, ctx, s) in [(20, 8, 3), (20, 8, 7), (7, 100, 5), (9, 4, 1), (5, 5, 5)] {
            let ws = windows(n, ctx, Some(s));
            assert_eq!(scored(&ws), (1..n).collect::<Vec<_>>(), "{n} {ctx} {s}");
            for w in &ws {
                assert!(w.end - w.begin <= ctx && w.score_from > w.begin);
            }
        }
        // Stride = context: disjoint windows, whose first tokens have no
        // context and go unscored (as in Hugging Face's loop).
        let ws = windows(20, 8, Some(8));
        let want: Vec<usize> = (1..20).filter(|i| i % 8 != 0).collect();
        assert_eq!(scored(&ws), want);
    }

    #[test]
    fn nll_is_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!((nll(&row, 0) - (z.ln() - 1.0)).abs() < 1e-12);
        let mut t = Nll::default();
        for x in [1.0, 3.0] {
            t.sum += x;
            t.sum_sq += x * x;
            t.count += 1;
        }
        assert!((t.ppl() - 2f64.exp()).abs() < 1e-12);
        assert!((t.ppl_err() - 2f64.exp()).abs() < 1e-9);
    }
}
