//! `qwen-cli verify` on the demo checkpoint, CPU only: the CPU backend
//! passes against its twin and against its own dump, and a one-ulp fault
//! injected into any op (QWEN_FAULT, debug builds) is caught and named.

mod common;

use std::path::PathBuf;

const PROMPT: &str = "The quick brown fox";

/// Runs qwen-cli with `fault` in QWEN_FAULT; returns (exit code, stdout, stderr).
fn run(args: &[&str], fault: Option<&str>) -> (i32, String, String) {
    let r = common::qwen_cli_with_fault(args, fault);
    (r.code, r.stdout, r.stderr)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qwen-cli-verify-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The verdict line.
fn verdict(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("verify: PASS") || l.starts_with("verify: FAIL"))
        .unwrap_or_else(|| panic!("no verdict in:\n{out}"))
}

/// The table rows (activation name, status) of one step.
fn rows<'a>(out: &'a str, step: &str) -> Vec<(&'a str, &'a str)> {
    out.lines()
        .skip_while(|l| !l.starts_with(&format!("== {step}:")))
        .skip(2)
        .take_while(|l| !l.is_empty() && !l.starts_with("next token"))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[0], *w.last().unwrap())
        })
        .collect()
}

#[test]
fn cpu_against_its_twin_passes_with_a_full_table() {
    let (code, out, err) = run(
        &[
            "verify",
            "--backend",
            "cpu",
            "--prompt",
            PROMPT,
            "--steps",
            "2",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(verdict(&out).starts_with("verify: PASS"), "{out}");
    for step in ["prefill", "decode-1", "decode-2"] {
        let r = rows(&out, step);
        // embed, 2 layers x 9 ops, logits.
        assert_eq!(r.len(), 1 + 2 * 9 + 1, "{step}:\n{out}");
        assert_eq!(r[0].0, "embed");
        assert_eq!(r[6].0, "layers.0.attn_residual");
        assert_eq!(r.last().unwrap().0, "logits");
        assert!(r.iter().all(|(_, s)| *s == "ok"), "{out}");
    }
    assert!(!out.contains("decode-3"), "--steps 2 runs two decode steps");
}

/// Every op of layer 1, and embed and logits: perturbing one element of
/// its output by one bf16 ulp makes verify fail and name exactly it.
#[test]
fn each_injected_fault_is_named() {
    let mut names: Vec<String> = [
        "qkv",
        "q",
        "k_cache",
        "v_cache",
        "attn",
        "attn_residual",
        "gate_up",
        "act",
        "out",
    ]
    .iter()
    .map(|op| format!("layers.1.{op}"))
    .collect();
    names.push("embed".into());
    names.push("logits".into());
    for name in &names {
        let (code, out, err) = run(
            &[
                "verify",
                "--backend",
                "cpu",
                "--prompt",
                PROMPT,
                "--steps",
                "1",
            ],
            Some(name),
        );
        assert_eq!(code, 2, "{name}: {out}\n{err}");
        let v = verdict(&out);
        assert!(
            v.starts_with(&format!("verify: FAIL - first departure: {name} (")),
            "{name}: {v}"
        );
        assert!(v.contains("at prefill"), "{v}");
        if name.starts_with("layers.1.") {
            assert!(v.contains("layer 1"), "{v}");
        }
        // Element 0 is token position 0, and one element is one bf16 ulp
        // off: 1 ulp of a bf16 activation, 2^16 ulps of an f32 one.
        assert!(v.contains("token position 0 "), "{v}");
        let bf16 =
            ["q", "k_cache", "v_cache", "attn", "act"].contains(&name.rsplit('.').next().unwrap());
        let ulps = if bf16 { "(1 ulp)" } else { "(65536 ulp)" };
        assert!(v.contains(ulps) && v.contains(" 1 of "), "{v}");
        assert!(v.ends_with("contract: exact"), "{v}");
        // The lockstep re-run isolates the op: nothing else departs.
        let departing: Vec<&str> = rows(&out, "prefill")
            .into_iter()
            .filter(|(_, s)| *s == "DEPARTS")
            .map(|(n, _)| n)
            .collect();
        assert_eq!(departing, vec![name.as_str()], "{out}");
        assert!(err.contains("perturbed"), "{err}");
    }
}

#[test]
fn fault_in_a_decode_step_reports_its_position() {
    let (code, out, _) = run(
        &[
            "verify",
            "--backend",
            "cpu",
            "--prompt",
            PROMPT,
            "--steps",
            "2",
        ],
        Some("decode-2.layers.0.act:3"),
    );
    assert_eq!(code, 2);
    let header = out
        .lines()
        .find(|l| l.starts_with("== decode-2:"))
        .unwrap()
        .to_string();
    let pos: usize = header.rsplit(' ').next().unwrap().parse().unwrap();
    let v = verdict(&out);
    assert!(
        v.contains("layers.0.act (silu_mul kernel, layer 0) at decode-2"),
        "{v}"
    );
    assert!(
        v.contains(&format!("token position {pos} (element 3 of the row)")),
        "{v}"
    );
}

#[test]
fn bad_fault_names_are_one_error() {
    for (fault, needle) in [
        ("layers.9.attn", "no activation named"),
        ("decode-7.embed", "not run"),
        ("embed:99999999", "outside"),
        ("embed:x", "QWEN_FAULT"),
    ] {
        let r = common::qwen_cli_with_fault(
            &[
                "verify",
                "--backend",
                "cpu",
                "--prompt",
                PROMPT,
                "--steps",
                "1",
            ],
            Some(fault),
        );
        common::assert_one_error(fault, &r, needle);
    }
}

#[test]
fn against_own_dump_is_exact_and_catches_a_fault() {
    let dir = scratch("dump");
    let d = dir.to_str().unwrap();
    let (code, out, err) = run(
        &[
            "verify",
            "--backend",
            "cpu",
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--dump",
            d,
        ],
        None,
    );
    assert_eq!(code, 0, "{out}\n{err}");

    // The dump is a safetensors file the reference reader accepts, with the
    // documented names and layouts.
    let bytes = std::fs::read(dir.join("activations.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["source"], "qwen-rs");
    assert_eq!(meta["tensor_cores"], "false");
    let tokens = st.tensor("prefill.tokens").unwrap();
    let t = tokens.shape()[0];
    assert_eq!(st.tensor("prefill.embed").unwrap().shape(), &[t, 64]);
    assert_eq!(
        st.tensor("prefill.layers.1.qkv").unwrap().shape(),
        &[t, (4 + 2 * 2) * 32]
    );
    assert_eq!(
        st.tensor("prefill.layers.0.k_cache").unwrap().shape(),
        &[t, 2, 32]
    );
    assert_eq!(
        st.tensor("decode-2.layers.0.v_cache").unwrap().shape(),
        &[t + 2, 2, 32]
    );
    assert_eq!(st.tensor("decode-1.logits").unwrap().shape(), &[1, 151_936]);
    assert_eq!(
        st.tensor("prefill.layers.0.q").unwrap().dtype(),
        safetensors::Dtype::BF16
    );
    assert!(st
        .names()
        .iter()
        .all(|n| n.starts_with("prefill.") || n.starts_with("decode-")));

    // Against itself: exact, passes, with and without --prompt.
    for args in [
        vec!["verify", "--backend", "cpu", "--against", d],
        vec![
            "verify",
            "--backend",
            "cpu",
            "--against",
            d,
            "--prompt",
            PROMPT,
        ],
    ] {
        let (code, out, err) = run(&args, None);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("bit for bit"), "{out}");
        assert!(
            rows(&out, "decode-2").iter().all(|(_, s)| *s == "ok"),
            "{out}"
        );
    }

    // A fault: named as the first departure; everything downstream drifts.
    let (code, out, _) = run(
        &["verify", "--backend", "cpu", "--against", d],
        Some("layers.0.gate_up:7"),
    );
    assert_eq!(code, 2, "{out}");
    let v = verdict(&out);
    assert!(
        v.contains(
            "first departure: layers.0.gate_up (rms_norm_matmul kernel, layer 0) at prefill"
        ),
        "{v}"
    );
    let r = rows(&out, "prefill");
    let i = r
        .iter()
        .position(|(n, _)| *n == "layers.0.gate_up")
        .unwrap();
    assert!(r[..i].iter().all(|(_, s)| *s == "ok"), "{out}");
    assert_eq!(r.last().unwrap(), &("logits", "DEPARTS"), "{out}");

    // A different prompt than the dump's is an error, not a comparison.
    let (code, _, err) = run(
        &[
            "verify",
            "--backend",
            "cpu",
            "--against",
            d,
            "--prompt",
            "something else",
        ],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("error: --prompt encodes to"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_or_foreign_dumps_are_one_error() {
    let dir = scratch("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file at all").unwrap();
    let missing = dir.join("missing.safetensors");
    // A valid safetensors file without our names.
    let other = dir.join("other.safetensors");
    let data = [0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &other).unwrap();
    for (path, needle) in [
        (&junk, "bad activation dump"),
        (&missing, "cannot read"),
        (&other, "no prefill.tokens"),
    ] {
        let (code, _, err) = run(
            &[
                "verify",
                "--backend",
                "cpu",
                "--against",
                path.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(code, 1, "{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(errors[0].contains(needle), "{}", errors[0]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
