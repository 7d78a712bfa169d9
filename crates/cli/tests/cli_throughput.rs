//! `qwen-cli bench --mode throughput` end to end on the demo checkpoint.

mod common;

/// (stdout, stderr, success) of a qwen-cli run.
fn cli(args: &[&str]) -> (String, String, bool) {
    let r = common::qwen_cli(args);
    (r.stdout, r.stderr, r.code == 0)
}

fn tiny() -> String {
    common::tiny().display().to_string()
}

#[test]
fn a_small_workload_reports_throughput_and_preemptions() {
    // Every prompt and output is 24 tokens (47 positions, 3 blocks); 6
    // blocks admit three prompts at once but let only two grow to full
    // length, so the scheduler must preempt.
    // Overlapped steps (the default) read their tokens back before a step
    // that may preempt; plain steps wait for every step's tokens.
    let dir = tiny();
    for overlap in ["on", "off"] {
        let (out, err, ok) = cli(&[
            "bench",
            "--mode",
            "throughput",
            "--model",
            &dir,
            "--num-seqs",
            "6",
            "--max-len",
            "24",
            "--kv-blocks",
            "6",
            "--temperature",
            "0",
            "--overlap",
            overlap,
            "--backend",
            "cpu",
            "--json",
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert_eq!(v["mode"], "throughput");
        assert_eq!(v["overlap"], overlap == "on");
        assert_eq!(v["num_seqs"], 6);
        assert_eq!(v["prompt_tokens"], 6 * 24);
        assert_eq!(v["output_tokens"], 6 * 24);
        assert_eq!(v["kv_blocks"], 6);
        assert!(v["preemptions"].as_u64().unwrap() > 0, "{v}");
        // Preempted sequences were prefilled again.
        assert!(v["prefill_tokens"].as_u64().unwrap() > 6 * 24, "{v}");
        let (o, t, w) = (
            v["output_tok_s"].as_f64().unwrap(),
            v["total_tok_s"].as_f64().unwrap(),
            v["wall_s"].as_f64().unwrap(),
        );
        assert!(o > 0.0 && (t - 2.0 * o).abs() < 1e-6 * t, "{v}");
        assert!((o * w - 144.0).abs() < 1e-6 * 144.0, "{v}");
        assert!(err.contains("6/6 done"), "progress on stderr: {err}");
    }
}

#[test]
fn random_weights_of_a_config_run_with_sampling() {
    let cfg = format!("{}/config.json", tiny());
    let (out, err, ok) = cli(&[
        "bench",
        "--mode",
        "throughput",
        "--dummy-weights",
        &cfg,
        "--num-seqs",
        "3",
        "--max-len",
        "20",
        "--backend",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("output tok/s") && out.contains("| 3 | 60 | 60 |"),
        "{out}"
    );
    assert!(out.contains("temperature 0.6"), "{out}");
}

#[test]
fn throughput_mistakes_are_one_error_line() {
    let dir = tiny();
    for (args, says) in [
        (
            vec!["--mode", "throughput", "--prompt-len", "5"],
            "only applies to --mode latency",
        ),
        (vec!["--num-seqs", "3"], "only applies to --mode throughput"),
        (vec!["--mode", "fast"], "unknown --mode"),
        (
            vec!["--mode", "throughput", "--overlap", "maybe"],
            "not on or off",
        ),
        (vec!["--overlap", "maybe"], "not on or off"),
        (
            vec!["--mode", "throughput", "--num-seqs", "0"],
            "--num-seqs",
        ),
        (
            vec!["--mode", "throughput", "--max-len", "5000"],
            "positions",
        ),
        (
            vec![
                "--mode",
                "throughput",
                "--max-batched-tokens",
                "16",
                "--max-seqs",
                "32",
            ],
            "--max-seqs (32)",
        ),
        (
            vec![
                "--mode",
                "throughput",
                "--kv-blocks",
                "1",
                "--max-len",
                "40",
            ],
            "KV cache holds 16",
        ),
    ] {
        let mut full = vec!["bench", "--model", &dir, "--backend", "cpu"];
        full.extend(&args);
        let r = common::qwen_cli(&full);
        assert!(r.stdout.is_empty(), "{args:?} printed: {}", r.stdout);
        common::assert_one_error(&format!("{args:?}"), &r, says);
    }
}

#[test]
fn lengths_the_model_rules_out_fail_before_any_weights() {
    let dir = tiny();
    let m = ["--model", dir.as_str()];
    let lengths = "--prompt-len and --gen-len";
    for (args, says) in [
        ([&m[..], &["--gen-len", "0"]].concat(), lengths),
        ([&m[..], &["--prompt-len", "0"]].concat(), lengths),
        ([&m[..], &["--prompt-len", "100000"]].concat(), lengths),
        (
            [&m[..], &["--mode", "throughput", "--max-len", "5000"]].concat(),
            "positions",
        ),
        (
            vec!["--dummy-weights", "/no/such/dir/config.json"],
            "/no/such/dir/config.json",
        ),
    ] {
        let mut full = vec!["bench", "--backend", "cpu"];
        full.extend(&args);
        let r = common::qwen_cli(&full);
        common::assert_one_error(&format!("{args:?}"), &r, says);
        // Nothing slow ran first, and a missing path is not taken for a shape.
        for early in ["preparing weights", "bandwidth", "unknown shape"] {
            assert!(!r.stderr.contains(early), "{args:?}: {}", r.stderr);
        }
    }
}
