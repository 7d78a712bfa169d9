//! Command-line parsing for `qwen-cli`. Hand-written so that every mistake
//! is reported as exactly one line.

use std::path::PathBuf;

/// Which backend to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Cpu,
    Cuda,
}

/// Options of `qwen-cli generate`. `None` means "use the checkpoint's
/// generation_config.json default".
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateArgs {
    pub model: Option<PathBuf>,
    pub prompt: String,
    pub chat: bool,
    pub no_think: bool,
    pub max_tokens: usize,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub backend: BackendChoice,
    pub json: bool,
    /// Queue each decode step before reading the step before's token.
    pub overlap: bool,
}

pub const USAGE: &str = "\
qwen-cli: run Qwen3 models on the CPU or a CUDA GPU

usage: qwen-cli generate [--model DIR] --prompt TEXT [options]

options:
  --model DIR              checkpoint directory (config.json, *.safetensors, tokenizer.json);
                           without it the tiny demo checkpoint in fixtures/ is used
  --prompt TEXT            the prompt
  --chat                   wrap the prompt as a user message with the checkpoint's chat template
  --no-think               render the chat template with enable_thinking=false
  --max-tokens N           new tokens at most (default 256)
  --temperature F          0 is greedy (default: generation_config.json, else 0)
  --top-k N                keep the N most likely tokens (0: off)
  --top-p F                nucleus sampling, in (0, 1]
  --min-p F                drop tokens below F x the top probability, in [0, 1]
  --repetition-penalty F   > 0; 1 is off
  --seed N                 makes sampling reproducible (default: from the clock)
  --backend auto|cpu|cuda  where to run (default auto: CUDA when a GPU is present)
  --json                   print one JSON object instead of streaming text
  --overlap on|off         on (default): each decode step is queued before the host reads the
                           token before it (the same tokens; a stop token costs one step more);
                           off, or with a repetition penalty: every step waits for its token

usage: qwen-cli bench (--model DIR | --dummy-weights SHAPE) [options]

  --dummy-weights SHAPE    random weights of qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b,
                           qwen3-14b, qwen3-32b, or a config.json path
  --prompt-len P           prompt tokens (default 128)
  --gen-len N              new tokens (default 256)
  --seed N                 seed of the random weights and prompt (default 0)
  --backend auto|cpu|cuda
  --json                   print one JSON object
  --tensor-core-decode     generated tokens' projections on the tensor cores too (CUDA): still
                           batch-invariant, but decode no longer returns the CPU twin's bits
  --mode latency|throughput  latency (default): batch 1 decode speed; throughput: nano-vllm's
                           offline workload through the continuous-batching scheduler, reporting
                           output and total (prompt + output) tok/s and preemptions
  --overlap on|off         on (default): each step is queued before the host reads the step
                           before's tokens (overlapped scheduling); off: every step waits for them
  throughput options:
  --num-seqs N             sequences (default 256)
  --max-len L              prompt and output lengths uniform in [min(100, L), L] (default 1024)
  --kv-blocks N            KV cache blocks of 16 positions (default: from free GPU memory, less
                           a 10% margin; on the CPU at most 4 GiB; never more than the workload needs)
  --max-batched-tokens N   tokens per forward pass (default 8192)
  --max-seqs N             sequences running at once (default 256, at most --max-batched-tokens)
  --temperature F          sampling temperature, 0 greedy (default 0.6, as nano-vllm's bench)

usage: qwen-cli verify [--model DIR] --prompt TEXT [--against cpu|FILE] [--backend auto|cpu|cuda]
                       [--steps N] [--dump DIR] [--exact]

  finds the first op (layer, token position) that departs from the reference, and by how much
  --against cpu            (default) re-run every op on the CPU twin from the tested backend's own
                           inputs: exact ops must match bit for bit, tensor-core GEMMs stay within
                           their bound
  --against FILE           compare with an activation dump (a file, or a directory written by
                           --dump) from verify --dump or scripts/hf_dump.py; --prompt may be omitted
  --backend auto|cpu|cuda  the backend under test (default auto)
  --steps N                greedy decode steps after the prefill (default 3)
  --dump DIR               write every activation to DIR/activations.safetensors
  --exact                  CUDA: no tensor cores, so every op must match the CPU twin exactly
  exit status: 0 every op within its contract, 2 an op departs, 1 an error

usage: qwen-cli logits [--model DIR] --prompt TEXT [--json] [--top-k K] [--all] [--backend B]

  --json                   one JSON object: the last position's logits (else a readable list)
  --top-k K                only the K largest logits (default 10 with --all or without --json)
  --all                    the top-k of every position

usage: qwen-cli perplexity [--model DIR] --file TEXT [--context N] [--stride S] [--backend B]

  --file TEXT              the text (UTF-8)
  --context N              tokens per chunk (default 512); as llama.cpp's perplexity, each chunk
                           is evaluated on its own and its second half is scored
  --stride S               sliding window instead (Hugging Face's): windows of N tokens every S
                           tokens, each token scored once; a --context of at least the text's
                           length scores every token with all the text before it
";

/// Walks `--flag [value]` arguments: `handle(flag, value)` takes the flag's
/// value through `value()` and returns `false` for a flag it does not know,
/// which becomes the one-line "unknown option" error.
fn for_each_flag<'a>(
    args: &'a [String],
    mut handle: impl FnMut(&'a str, &mut dyn FnMut() -> Result<String, String>) -> Result<bool, String>,
) -> Result<(), String> {
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        if !handle(flag, &mut value)? {
            return Err(format!("unknown option '{flag}' (see qwen-cli --help)"));
        }
    }
    Ok(())
}

/// Parses the arguments after `generate`.
pub fn parse_generate(args: &[String]) -> Result<GenerateArgs, String> {
    let mut a = GenerateArgs::with_model(None);
    let mut prompt = None;
    for_each_flag(args, |flag, value| {
        match flag {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--prompt" => prompt = Some(value()?),
            "--chat" => a.chat = true,
            "--no-think" => a.no_think = true,
            "--json" => a.json = true,
            "--max-tokens" => a.max_tokens = number(flag, &value()?)?,
            "--temperature" => a.temperature = Some(number(flag, &value()?)?),
            "--top-k" => a.top_k = Some(number(flag, &value()?)?),
            "--top-p" => a.top_p = Some(number(flag, &value()?)?),
            "--min-p" => a.min_p = Some(number(flag, &value()?)?),
            "--repetition-penalty" => a.repetition_penalty = Some(number(flag, &value()?)?),
            "--seed" => a.seed = Some(number(flag, &value()?)?),
            "--backend" => a.backend = parse_backend(&value()?)?,
            "--overlap" => a.overlap = on_off(flag, &value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    a.prompt = prompt.ok_or("--prompt is required")?;
    if a.no_think && !a.chat {
        return Err("--no-think only applies with --chat".into());
    }
    if a.max_tokens == 0 {
        return Err("--max-tokens must be at least 1".into());
    }
    Ok(a)
}

/// The value of an `on|off` flag.
fn on_off(flag: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        v => Err(format!("{flag}: '{v}' is not on or off")),
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: '{v}' is not a valid number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<GenerateArgs, String> {
        parse_generate(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_parse() {
        let a = parse(&[
            "--prompt",
            "hi",
            "--chat",
            "--no-think",
            "--top-k",
            "5",
            "--backend",
            "cpu",
            "--seed",
            "7",
            "--overlap",
            "off",
        ])
        .unwrap();
        assert!(!a.overlap);
        assert!(parse(&["--prompt", "hi"]).unwrap().overlap);
        assert_eq!(a.prompt, "hi");
        assert!(a.chat && a.no_think);
        assert_eq!(a.top_k, Some(5));
        assert_eq!(a.backend, BackendChoice::Cpu);
        assert_eq!(a.seed, Some(7));
        assert_eq!(a.temperature, None);
    }

    #[test]
    fn mistakes_are_one_line() {
        for bad in [
            vec!["--prompt"],
            vec!["--prompt", "x", "--backend", "tpu"],
            vec!["--prompt", "x", "--top-k", "-3"],
            vec!["--prompt", "x", "--max-tokens", "0"],
            vec!["--prompt", "x", "--frobnicate"],
            vec!["--prompt", "x", "--overlap", "maybe"],
            vec!["--chat"],
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{bad:?}: {e}");
        }
    }
}

/// Parses the arguments after `bench`.
pub fn parse_bench(args: &[String]) -> Result<(crate::bench::BenchArgs, BackendChoice), String> {
    let mut a = crate::bench::BenchArgs {
        model: None,
        dummy: None,
        prompt_len: 128,
        gen_len: 256,
        seed: 0,
        json: false,
        mode: crate::throughput::BenchMode::Latency,
        throughput: Default::default(),
        tensor_core_decode: false,
        overlap: true,
    };
    let mut backend = BackendChoice::Auto;
    let mut latency_flag = None;
    for_each_flag(args, |flag, value| {
        match flag {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--dummy-weights" => a.dummy = Some(value()?),
            "--prompt-len" => {
                a.prompt_len = number(flag, &value()?)?;
                latency_flag = Some(flag);
            }
            "--gen-len" => {
                a.gen_len = number(flag, &value()?)?;
                latency_flag = Some(flag);
            }
            "--mode" => a.mode = crate::throughput::parse_mode(&value()?)?,
            f if crate::throughput::FLAGS.contains(&f) => a.throughput.set(f, &value()?)?,
            "--seed" => a.seed = number(flag, &value()?)?,
            "--json" => a.json = true,
            "--tensor-core-decode" => a.tensor_core_decode = true,
            "--overlap" => a.overlap = on_off(flag, &value()?)?,
            "--backend" => backend = parse_backend(&value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    match a.mode {
        crate::throughput::BenchMode::Latency => {
            if let Some(f) = a.throughput.given.first() {
                return Err(format!("{f} only applies to --mode throughput"));
            }
        }
        crate::throughput::BenchMode::Throughput => {
            if let Some(f) = latency_flag {
                return Err(format!("{f} only applies to --mode latency"));
            }
        }
    }
    Ok((a, backend))
}

pub fn parse_backend(v: &str) -> Result<BackendChoice, String> {
    match v {
        "auto" => Ok(BackendChoice::Auto),
        "cpu" => Ok(BackendChoice::Cpu),
        "cuda" => Ok(BackendChoice::Cuda),
        other => Err(format!(
            "unknown backend '{other}' (expected auto, cpu or cuda)"
        )),
    }
}

// ---- verify, logits, perplexity ----------------------------------------

impl GenerateArgs {
    /// `generate`'s defaults with `model` set: the other commands find
    /// their checkpoint through `generate::model_dir` with it.
    pub fn with_model(model: Option<PathBuf>) -> GenerateArgs {
        GenerateArgs {
            model,
            prompt: String::new(),
            chat: false,
            no_think: false,
            max_tokens: 256,
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: None,
            backend: BackendChoice::Auto,
            json: false,
            overlap: true,
        }
    }
}

/// What `verify` compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum AgainstChoice {
    Cpu,
    File(PathBuf),
}

/// Options of `qwen-cli verify`.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyArgs {
    pub model: Option<PathBuf>,
    pub prompt: Option<String>,
    pub against: AgainstChoice,
    pub backend: BackendChoice,
    pub steps: usize,
    pub dump: Option<PathBuf>,
    pub exact: bool,
}

/// Options of `qwen-cli logits`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsArgs {
    pub model: Option<PathBuf>,
    pub prompt: String,
    pub json: bool,
    pub top_k: Option<usize>,
    pub all: bool,
    pub backend: BackendChoice,
}

/// Options of `qwen-cli perplexity`.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityArgs {
    pub model: Option<PathBuf>,
    pub file: PathBuf,
    pub context: usize,
    pub stride: Option<usize>,
    pub backend: BackendChoice,
}

/// Most decode steps `verify` runs: each step runs the model three times
/// and prints a table, so more is a typo.
pub const MAX_VERIFY_STEPS: usize = 64;

/// Parses the arguments after `verify`.
pub fn parse_verify(args: &[String]) -> Result<VerifyArgs, String> {
    let mut a = VerifyArgs {
        model: None,
        prompt: None,
        against: AgainstChoice::Cpu,
        backend: BackendChoice::Auto,
        steps: 3,
        dump: None,
        exact: false,
    };
    for_each_flag(args, |flag, value| {
        match flag {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--prompt" => a.prompt = Some(value()?),
            "--against" => {
                a.against = match value()?.as_str() {
                    "cpu" => AgainstChoice::Cpu,
                    "" => return Err("--against needs cpu or a file".into()),
                    f => AgainstChoice::File(PathBuf::from(f)),
                }
            }
            "--backend" => a.backend = parse_backend(&value()?)?,
            "--steps" => a.steps = number(flag, &value()?)?,
            "--dump" => a.dump = Some(PathBuf::from(value()?)),
            "--exact" => a.exact = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.prompt.is_none() && a.against == AgainstChoice::Cpu {
        return Err("--prompt is required (unless --against FILE supplies the tokens)".into());
    }
    if a.steps > MAX_VERIFY_STEPS {
        return Err(format!("--steps must be at most {MAX_VERIFY_STEPS}"));
    }
    Ok(a)
}

/// Parses the arguments after `logits`.
pub fn parse_logits(args: &[String]) -> Result<LogitsArgs, String> {
    let mut a = LogitsArgs {
        model: None,
        prompt: String::new(),
        json: false,
        top_k: None,
        all: false,
        backend: BackendChoice::Auto,
    };
    let mut prompt = None;
    for_each_flag(args, |flag, value| {
        match flag {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--prompt" => prompt = Some(value()?),
            "--json" => a.json = true,
            "--all" => a.all = true,
            "--top-k" => a.top_k = Some(number(flag, &value()?)?),
            "--backend" => a.backend = parse_backend(&value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    a.prompt = prompt.ok_or("--prompt is required")?;
    if a.top_k == Some(0) {
        return Err("--top-k must be at least 1".into());
    }
    Ok(a)
}

/// Parses the arguments after `perplexity`.
pub fn parse_perplexity(args: &[String]) -> Result<PerplexityArgs, String> {
    let mut file = None;
    let mut a = PerplexityArgs {
        model: None,
        file: PathBuf::new(),
        context: 512,
        stride: None,
        backend: BackendChoice::Auto,
    };
    for_each_flag(args, |flag, value| {
        match flag {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--file" => file = Some(PathBuf::from(value()?)),
            "--context" => a.context = number(flag, &value()?)?,
            "--stride" => a.stride = Some(number(flag, &value()?)?),
            "--backend" => a.backend = parse_backend(&value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    a.file = file.ok_or("--file is required")?;
    // A chunk of N scores its last N - N/2 - 1 predictions: 3 is the
    // least that scores one. A sliding window of 2 scores one per window.
    let least = if a.stride.is_some() { 2 } else { 3 };
    if a.context < least {
        return Err(format!("--context must be at least {least}"));
    }
    if let Some(s) = a.stride {
        if s == 0 || s > a.context {
            return Err(format!(
                "--stride must be between 1 and --context ({})",
                a.context
            ));
        }
    }
    Ok(a)
}

#[cfg(test)]
mod diagnostic_tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn diagnostic_commands_parse() {
        let v = parse_verify(&strings(&[
            "--prompt",
            "hi",
            "--steps",
            "0",
            "--against",
            "d/x",
        ]))
        .unwrap();
        assert_eq!(v.steps, 0);
        assert_eq!(v.against, AgainstChoice::File("d/x".into()));
        assert!(parse_verify(&strings(&["--against", "f"]))
            .unwrap()
            .prompt
            .is_none());
        let l = parse_logits(&strings(&[
            "--prompt", "a", "--json", "--all", "--top-k", "3",
        ]))
        .unwrap();
        assert!(l.json && l.all && l.top_k == Some(3));
        let p = parse_perplexity(&strings(&[
            "--file",
            "t",
            "--context",
            "64",
            "--stride",
            "32",
        ]))
        .unwrap();
        assert_eq!((p.context, p.stride), (64, Some(32)));
        assert_eq!(
            parse_perplexity(&strings(&["--file", "t"]))
                .unwrap()
                .context,
            512
        );
    }

    #[test]
    fn diagnostic_mistakes_are_one_line() {
        let cases: [(&str, &[&str]); 10] = [
            ("verify", &[]),
            ("verify", &["--prompt", "x", "--steps", "-1"]),
            ("verify", &["--prompt", "x", "--steps", "1000"]),
            ("verify", &["--prompt", "x", "--backend", "tpu"]),
            ("logits", &["--json"]),
            ("logits", &["--prompt", "x", "--top-k", "0"]),
            ("perplexity", &[]),
            ("perplexity", &["--file", "t", "--context", "abc"]),
            ("perplexity", &["--file", "t", "--context", "1"]),
            (
                "perplexity",
                &["--file", "t", "--context", "8", "--stride", "9"],
            ),
        ];
        for (cmd, bad) in cases {
            let bad = strings(bad);
            let e = match cmd {
                "verify" => parse_verify(&bad).unwrap_err(),
                "logits" => parse_logits(&bad).unwrap_err(),
                _ => parse_perplexity(&bad).unwrap_err(),
            };
            assert!(!e.contains('\n') && !e.is_empty(), "{cmd} {bad:?}: {e}");
        }
    }
}
