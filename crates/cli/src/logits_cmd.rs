//! `qwen-cli logits`: the raw next-token logits of a prompt, for comparing
//! with other implementations by script. With `--json` one JSON object on
//! stdout; without it a readable top-k list.

use model_qwen3::tokenizer::Tokenizer;
use model_qwen3::{Logits, Qwen3, Sequence};
use qwen_tensor::Backend;

use crate::args::LogitsArgs;
use crate::common::argmax;

/// Top-k used by `--all` (and the text output) when `--top-k` is not given.
pub const DEFAULT_TOP_K: usize = 10;

/// The `k` largest logits of a row, largest first (lower id first on ties).
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let key = |i: &u32| row[*i as usize];
    let order = |a: &u32, b: &u32| key(b).total_cmp(&key(a)).then(a.cmp(b));
    // Select the k first, then sort only those: a vocabulary is large.
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx.into_iter().map(|i| (i, row[i as usize])).collect()
}

fn top_json(tok: &Tokenizer, top: &[(u32, f32)]) -> serde_json::Value {
    top.iter()
        .map(|&(id, logit)| {
            serde_json::json!({
                "id": id,
                "logit": logit,
                "token": tok.id_to_token(id),
            })
        })
        .collect()
}

/// Runs `logits` on `model`.
pub fn run<B: Backend>(model: &Qwen3<B>, tok: &Tokenizer, args: &LogitsArgs) -> Result<(), String> {
    let err = |e: model_qwen3::ModelError| e.to_string();
    let ids = crate::common::encode(tok, &args.prompt)?;
    let mut cache = model.new_cache(ids.len()).map_err(err)?;
    let mut seq = Sequence::default();
    let want = if args.all { Logits::All } else { Logits::Last };
    let logits = model
        .forward(&mut cache, &mut [(&mut seq, &ids[..])], want)
        .map_err(err)?;
    let v = model
        .backend()
        .download(&logits)
        .map_err(|e| e.to_string())?
        .to_f32();
    let vocab = model.config().vocab_size;
    let rows: Vec<&[f32]> = v.chunks(vocab).collect();
    let k = args.top_k.unwrap_or(DEFAULT_TOP_K);
    let first = if args.all { 0 } else { ids.len() - 1 };

    if args.json {
        let obj = if args.all {
            let positions: Vec<serde_json::Value> = rows
                .iter()
                .enumerate()
                .map(|(p, row)| {
                    serde_json::json!({
                        "position": p,
                        "token": ids[p],
                        "argmax": argmax(row),
                        "top": top_json(tok, &top_k(row, k)),
                    })
                })
                .collect();
            serde_json::json!({ "prompt_tokens": ids, "positions": positions })
        } else {
            let row = rows[0];
            let mut o = serde_json::json!({
                "prompt_tokens": ids,
                "position": first,
                "argmax": argmax(row),
            });
            match args.top_k {
                Some(k) => o["top"] = top_json(tok, &top_k(row, k)),
                None => o["logits"] = serde_json::json!(row),
            }
            o
        };
        println!("{obj}");
        return Ok(());
    }
    for (r, row) in rows.iter().enumerate() {
        let p = first + r;
        println!(
            "position {p} (token {} {:?}): top {k}",
            ids[p],
            tok.id_to_token(ids[p]).unwrap_or_default()
        );
        for (id, logit) in top_k(row, k) {
            println!(
                "  {id:>8}  {logit:>12.5}  {:?}",
                tok.id_to_token(id).unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_id() {
        let row = [0.5, 2.0, -1.0, 2.0, f32::NEG_INFINITY];
        assert_eq!(top_k(&row, 3), vec![(1, 2.0), (3, 2.0), (0, 0.5)]);
        assert_eq!(top_k(&row, 9).len(), 5);
        assert_eq!(argmax(&row), 1);
    }
}
