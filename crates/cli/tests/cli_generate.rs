//! `qwen-cli generate` end to end on the demo checkpoint.

mod common;

/// (stdout, stderr, success) of a qwen-cli run.
fn cli(args: &[&str]) -> (String, String, bool) {
    let r = common::qwen_cli(args);
    (r.stdout, r.stderr, r.code == 0)
}

fn golden() -> serde_json::Value {
    let p = common::tiny().join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn json_greedy_chat_matches_golden() {
    let g = golden();
    let chat = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chat")
        .unwrap();
    let msg = g["chat_messages"][0]["content"].as_str().unwrap();
    let (out, err, ok) = cli(&[
        "generate",
        "--chat",
        "--no-think",
        "--prompt",
        msg,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--backend",
        "cpu",
        "--json",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("demo checkpoint"),
        "says it runs the demo checkpoint: {err}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(v["prompt_tokens"], chat["ids"]);
    let want: Vec<u64> = chat["greedy_f32"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let got: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // Generation may stop early on an eos token; up to there it is HF's greedy output.
    assert_eq!(got[..], want[..got.len()]);
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));
    assert!(v["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["text"].is_string());
}

#[test]
fn seeded_sampling_is_reproducible_and_streams() {
    let args = [
        "generate",
        "--prompt",
        "Grüße aus München!",
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--seed",
        "42",
        "--max-tokens",
        "16",
        "--backend",
        "cpu",
    ];
    let (a, err, ok) = cli(&args);
    assert!(ok, "{err}");
    let (b, _, _) = cli(&args);
    assert_eq!(a, b, "same seed, same text");
    // Decode steps queued ahead of their tokens (the default) or each one
    // waited for: the same text.
    let mut plain = args.to_vec();
    plain.extend(["--overlap", "off"]);
    let (p, err_p, ok_p) = cli(&plain);
    assert!(ok_p, "{err_p}");
    assert_eq!(a, p, "--overlap off gives the same text");
    assert!(err.contains("decode"), "rates on stderr: {err}");
    let mut other = args.to_vec();
    other[8] = "43";
    let (c, _, _) = cli(&other);
    assert_ne!(a, c, "a different seed samples differently");
}
