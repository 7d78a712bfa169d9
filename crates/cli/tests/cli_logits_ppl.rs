//! `qwen-cli logits` and `qwen-cli perplexity` on the demo checkpoint,
//! checked against the Hugging Face golden data in fixtures/tiny-qwen3.

mod common;

use std::path::PathBuf;

use common::tiny as fixtures;

/// (exit code, stdout, stderr) of a qwen-cli run.
fn run(args: &[&str]) -> (i32, String, String) {
    let r = common::qwen_cli(args);
    (r.code, r.stdout, r.stderr)
}

fn prompt(name: &str) -> serde_json::Value {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("reference.json")).unwrap())
            .unwrap();
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

/// The golden per-token NLLs of a prompt: `nll[i]` is token i + 1's.
fn golden_nll(name: &str) -> Vec<f64> {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(&format!("{name}.nll_f32")).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
        .collect()
}

fn text_file(tag: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("qwen-cli-ppl-{}-{tag}.txt", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

/// The number after "perplexity: " on stdout.
fn ppl_of(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("perplexity: "))
        .unwrap_or_else(|| panic!("no result line in {out}"));
    line["perplexity: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn logits_json_argmax_is_golden_greedy() {
    for name in ["plain", "code"] {
        let p = prompt(name);
        let (code, out, err) = run(&[
            "logits",
            "--json",
            "--backend",
            "cpu",
            "--prompt",
            p["text"].as_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["prompt_tokens"], p["ids"]);
        let logits: Vec<f64> = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(logits.len(), 151_936);
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        assert_eq!(best as u64, p["greedy_f32"][0].as_u64().unwrap(), "{name}");
        assert_eq!(v["argmax"].as_u64().unwrap(), best as u64);
        assert_eq!(
            v["position"].as_u64().unwrap() + 1,
            p["ids"].as_array().unwrap().len() as u64
        );
    }
}

#[test]
fn logits_all_positions_top_k() {
    let p = prompt("plain");
    let ids = p["ids"].as_array().unwrap();
    let (code, out, err) = run(&[
        "logits",
        "--json",
        "--all",
        "--top-k",
        "3",
        "--backend",
        "cpu",
        "--prompt",
        p["text"].as_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let pos = v["positions"].as_array().unwrap();
    assert_eq!(pos.len(), ids.len());
    for (i, row) in pos.iter().enumerate() {
        assert_eq!(row["position"].as_u64().unwrap(), i as u64);
        assert_eq!(row["token"], ids[i]);
        let top = row["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let l: Vec<f64> = top.iter().map(|t| t["logit"].as_f64().unwrap()).collect();
        assert!(l[0] >= l[1] && l[1] >= l[2], "{row}");
        assert_eq!(top[0]["id"], row["argmax"]);
    }
    // The last position's top token is the golden greedy token.
    assert_eq!(pos.last().unwrap()["argmax"], p["greedy_f32"][0]);

    // Text output: a readable list of the last position.
    let (code, out, _) = run(&[
        "logits",
        "--backend",
        "cpu",
        "--prompt",
        "Hello",
        "--top-k",
        "2",
    ]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
}

#[test]
fn perplexity_of_whole_text_is_golden_ppl() {
    let p = prompt("long");
    let file = text_file("long", p["text"].as_str().unwrap());
    let want = p["ppl_f32"].as_f64().unwrap();
    let n = p["ids"].as_array().unwrap().len();
    // One window covering the whole text scores every next token.
    let (code, out, err) = run(&[
        "perplexity",
        "--backend",
        "cpu",
        "--file",
        file.to_str().unwrap(),
        "--context",
        "512",
        "--stride",
        "256",
    ]);
    assert_eq!(code, 0, "{err}");
    let got = ppl_of(&out);
    assert!(
        (got / want - 1.0).abs() < 0.01,
        "perplexity {got}, golden {want}"
    );
    assert!(
        out.contains(&format!("over {} scored tokens", n - 1)),
        "{out}"
    );
    assert!(err.contains("[1/1]"), "progress on stderr: {err}");
    let _ = std::fs::remove_file(file);
}

#[test]
fn perplexity_chunks_score_second_halves_like_llama_cpp() {
    let p = prompt("long");
    let file = text_file("chunks", p["text"].as_str().unwrap());
    let n = p["ids"].as_array().unwrap().len();
    let nll = golden_nll("long");
    // One chunk of the whole text: its second half is scored, each token
    // with all the text before it as context, so the golden per-token NLLs
    // of tokens n/2 + 1 .. n - 1 give the expected value.
    let (code, out, err) = run(&[
        "perplexity",
        "--backend",
        "cpu",
        "--file",
        file.to_str().unwrap(),
        "--context",
        &n.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let half = &nll[n / 2..];
    assert_eq!(half.len(), n - n / 2 - 1);
    let want = (half.iter().sum::<f64>() / half.len() as f64).exp();
    let got = ppl_of(&out);
    assert!(
        (got / want - 1.0).abs() < 0.01,
        "perplexity {got}, expected {want}"
    );

    // Several chunks: progress per chunk, the tail dropped.
    let (code, out, err) = run(&[
        "perplexity",
        "--backend",
        "cpu",
        "--file",
        file.to_str().unwrap(),
        "--context",
        "100",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("[1/2]") && err.contains("[2/2]"), "{err}");
    assert!(out.contains("over 98 scored tokens"), "{out}");
    let _ = std::fs::remove_file(file);
}

#[test]
fn bad_input_is_one_error_line() {
    let short = text_file("short", "Just a few words.");
    let binary = std::env::temp_dir().join(format!("qwen-cli-ppl-{}-bin", std::process::id()));
    std::fs::write(&binary, [0xffu8, 0xfe, 0x00, 0x80]).unwrap();
    let s = short.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["perplexity", "--context", "64"], "--file is required"),
        (
            vec!["perplexity", "--file", s, "--context", "0"],
            "--context must be at least",
        ),
        (
            vec!["perplexity", "--file", s, "--context", "many"],
            "not a valid number",
        ),
        (
            vec!["perplexity", "--file", s, "--context", "8", "--stride", "0"],
            "--stride",
        ),
        (
            vec!["perplexity", "--file", "/no/such/file.txt"],
            "cannot read --file",
        ),
        (
            vec!["perplexity", "--file", binary.to_str().unwrap()],
            "not UTF-8",
        ),
        (
            vec![
                "perplexity",
                "--backend",
                "cpu",
                "--file",
                s,
                "--context",
                "64",
            ],
            "fewer than one --context chunk",
        ),
        (
            vec![
                "perplexity",
                "--backend",
                "cpu",
                "--file",
                s,
                "--context",
                "100000",
            ],
            "max_position_embeddings",
        ),
        (vec!["logits", "--json"], "--prompt is required"),
        (vec!["logits", "--prompt", "x", "--top-k", "0"], "--top-k"),
        (vec!["verify", "--backend", "cpu"], "--prompt is required"),
        (
            vec!["verify", "--prompt", "x", "--steps", "x"],
            "not a valid number",
        ),
        (
            vec![
                "verify",
                "--backend",
                "cpu",
                "--prompt",
                "x",
                "--model",
                "/no/such/dir",
            ],
            "/no/such/dir",
        ),
    ];
    for (args, needle) in cases {
        common::fails_with(&args, needle);
    }
    let _ = std::fs::remove_file(short);
    let _ = std::fs::remove_file(binary);
}
