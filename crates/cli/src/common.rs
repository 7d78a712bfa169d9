//! Helpers shared by the commands (`generate`, `verify`, `logits`,
//! `perplexity`): loading a checkpoint with a progress line, tokenizing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use model_qwen3::tokenizer::Tokenizer;
use model_qwen3::Qwen3;
use qwen_tensor::Backend;

use crate::args::GenerateArgs;

/// `--model`, or the demo checkpoint, found the way `generate` finds it.
pub fn model_dir(model: &Option<PathBuf>) -> Result<PathBuf, String> {
    crate::generate::model_dir(&GenerateArgs::with_model(model.clone()))
}

/// Loads the checkpoint in `dir` onto `backend`, with a progress line on
/// stderr that a failure never leaves half-written.
pub fn load<B: Backend>(backend: B, dir: &Path) -> Result<Qwen3<B>, String> {
    let started = Instant::now();
    let mut line_open = false;
    let model = Qwen3::load(backend, dir, &mut |done, total| {
        eprint!("\rloading weights: layer {done}/{total}");
        line_open = done < total;
        if !line_open {
            eprintln!();
        }
    });
    if line_open {
        // A load that failed part-way: end the progress line so the error
        // stands on a line of its own.
        eprintln!();
    }
    let model = model.map_err(|e| e.to_string())?;
    eprintln!(
        "loaded in {:.2} s on {}",
        started.elapsed().as_secs_f64(),
        model.backend().name()
    );
    Ok(model)
}

/// The checkpoint's tokenizer.
pub fn tokenizer(dir: &Path) -> Result<Tokenizer, String> {
    Tokenizer::from_dir(dir).map_err(|e| e.to_string())
}

/// Token ids of `text`; an error when there are none.
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, String> {
    let ids = tok.encode(text).map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    Ok(ids)
}

/// Index of the largest value (lowest index on ties, like the backends'
/// argmax; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || row[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}
