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

usage: qwen-cli bench (--model DIR | --dummy-weights SHAPE) [options]

  --dummy-weights SHAPE    random weights of qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen3-8b,
                           qwen3-14b, qwen3-32b, or a config.json path
  --prompt-len P           prompt tokens (default 128)
  --gen-len N              new tokens (default 256)
  --seed N                 seed of the random weights and prompt (default 0)
  --backend auto|cpu|cuda
  --json                   print one JSON object
";

/// Parses the arguments after `generate`.
pub fn parse_generate(args: &[String]) -> Result<GenerateArgs, String> {
    let mut a = GenerateArgs {
        model: None,
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
    };
    let mut prompt = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value(flag)?)),
            "--prompt" => prompt = Some(value(flag)?),
            "--chat" => a.chat = true,
            "--no-think" => a.no_think = true,
            "--json" => a.json = true,
            "--max-tokens" => a.max_tokens = number(flag, &value(flag)?)?,
            "--temperature" => a.temperature = Some(number(flag, &value(flag)?)?),
            "--top-k" => a.top_k = Some(number(flag, &value(flag)?)?),
            "--top-p" => a.top_p = Some(number(flag, &value(flag)?)?),
            "--min-p" => a.min_p = Some(number(flag, &value(flag)?)?),
            "--repetition-penalty" => a.repetition_penalty = Some(number(flag, &value(flag)?)?),
            "--seed" => a.seed = Some(number(flag, &value(flag)?)?),
            "--backend" => a.backend = parse_backend(&value(flag)?)?,
            other => return Err(format!("unknown option '{other}' (see qwen-cli --help)")),
        }
    }
    a.prompt = prompt.ok_or("--prompt is required")?;
    if a.no_think && !a.chat {
        return Err("--no-think only applies with --chat".into());
    }
    if a.max_tokens == 0 {
        return Err("--max-tokens must be at least 1".into());
    }
    Ok(a)
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
        ])
        .unwrap();
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
    };
    let mut backend = BackendChoice::Auto;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value(flag)?)),
            "--dummy-weights" => a.dummy = Some(value(flag)?),
            "--prompt-len" => a.prompt_len = number(flag, &value(flag)?)?,
            "--gen-len" => a.gen_len = number(flag, &value(flag)?)?,
            "--seed" => a.seed = number(flag, &value(flag)?)?,
            "--json" => a.json = true,
            "--backend" => backend = parse_backend(&value(flag)?)?,
            other => return Err(format!("unknown option '{other}' (see qwen-cli --help)")),
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
