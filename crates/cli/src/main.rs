//! `qwen-cli`: the command-line front end. Every failure ends as one
//! `error: ...` line on stderr and exit code 1 (`verify` exits 2 when it
//! ran fine and found an op beyond its contract).

mod args;
mod bench;
mod common;
mod compare;
mod decode;
mod dumpfile;
mod fault;
mod generate;
mod logits_cmd;
mod perplexity;
mod throughput;
mod verify;

use args::{BackendChoice, GenerateArgs};
use qwen_kernels_cpu::CpuBackend;
use qwen_kernels_cuda::CudaBackend;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = dispatch(&argv) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn dispatch(argv: &[String]) -> Result<(), String> {
    match argv.first().map(String::as_str) {
        Some("generate") => {
            let args = args::parse_generate(&argv[1..])?;
            generate_cmd(&args)
        }
        Some("bench") => {
            let (a, backend) = args::parse_bench(&argv[1..])?;
            bench_cmd(&a, backend)
        }
        Some("verify") => {
            let a = args::parse_verify(&argv[1..])?;
            if !verify_cmd(&a)? {
                // The report is on stdout; a departure is not an error in
                // the command, so it gets its own exit status.
                std::process::exit(2);
            }
            Ok(())
        }
        Some("logits") => logits_cmd(&args::parse_logits(&argv[1..])?),
        Some("perplexity") => perplexity_cmd(&args::parse_perplexity(&argv[1..])?),
        Some("--help" | "-h" | "help") | None => {
            print!("{}", args::USAGE);
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}' (see qwen-cli --help)")),
    }
}

fn generate_cmd(args: &GenerateArgs) -> Result<(), String> {
    let dir = generate::model_dir(args)?;
    let outcome = match args.backend {
        BackendChoice::Cpu => generate::run(CpuBackend::new(), args, &dir)?,
        BackendChoice::Cuda => {
            let gpu = CudaBackend::new(0).map_err(|e| format!("--backend cuda: {e}"))?;
            eprintln!("backend: cuda ({})", gpu.device_name());
            generate::run(gpu, args, &dir)?
        }
        BackendChoice::Auto => match CudaBackend::new(0) {
            Ok(gpu) => {
                eprintln!("backend: cuda ({})", gpu.device_name());
                generate::run(gpu, args, &dir)?
            }
            Err(e) => {
                eprintln!("backend: cpu (no GPU: {e})");
                generate::run(CpuBackend::new(), args, &dir)?
            }
        },
    };
    if args.json {
        println!("{}", generate::to_json(&outcome));
    }
    Ok(())
}

fn bench_cmd(a: &bench::BenchArgs, backend: BackendChoice) -> Result<(), String> {
    let gpu = match backend {
        BackendChoice::Cpu => None,
        BackendChoice::Cuda => {
            Some(CudaBackend::new(0).map_err(|e| format!("--backend cuda: {e}"))?)
        }
        BackendChoice::Auto => CudaBackend::new(0).ok(),
    };
    if a.mode == throughput::BenchMode::Throughput {
        return throughput::run_cmd(a, gpu);
    }
    // Flags the model rules out fail before the bandwidth and the weights.
    bench::check_lengths(&bench::config(a)?, a)?;
    let result = match gpu {
        Some(g) => {
            eprintln!(
                "backend: cuda ({}); measuring device bandwidth",
                g.device_name()
            );
            let bw = g.measure_copy_bandwidth().map_err(|e| e.to_string())?;
            let (m, shape) = bench::load(g, a)?;
            if std::env::var_os("QWEN_PROFILE").is_some() {
                for (op, us) in bench::op_profile(&m, 1, a.prompt_len, 16)? {
                    eprintln!("profile: {op:>14} {us:9.1} us/token");
                }
            }
            bench::latency(&m, a, &shape, bw)?
        }
        None => {
            eprintln!("backend: cpu; measuring memory bandwidth");
            let bw = bench::host_read_bandwidth();
            let (m, shape) = bench::load(CpuBackend::new(), a)?;
            let result = bench::latency(&m, a, &shape, bw)?;
            // Measured again after the run: the floor takes the faster.
            result.at_best_bandwidth(bench::host_read_bandwidth())
        }
    };
    if a.json {
        println!("{}", result.to_json());
    } else {
        println!("{}", result.table());
    }
    Ok(())
}

// ---- verify, logits, perplexity ----------------------------------------

/// A backend chosen by `--backend`, opened.
enum Opened {
    Cpu(CpuBackend),
    /// Boxed: the CUDA backend's state is far larger than the CPU's.
    Cuda(Box<CudaBackend>),
}

/// Opens the backend `--backend` names, saying which on stderr.
fn open_backend(choice: BackendChoice) -> Result<Opened, String> {
    Ok(match choice {
        BackendChoice::Cpu => Opened::Cpu(CpuBackend::new()),
        BackendChoice::Cuda => {
            let gpu = CudaBackend::new(0).map_err(|e| format!("--backend cuda: {e}"))?;
            eprintln!("backend: cuda ({})", gpu.device_name());
            Opened::Cuda(Box::new(gpu))
        }
        BackendChoice::Auto => match CudaBackend::new(0) {
            Ok(gpu) => {
                eprintln!("backend: cuda ({})", gpu.device_name());
                Opened::Cuda(Box::new(gpu))
            }
            Err(e) => {
                eprintln!("backend: cpu (no GPU: {e})");
                Opened::Cpu(CpuBackend::new())
            }
        },
    })
}

/// Runs `verify`; `Ok(false)` when an op departs from its contract.
fn verify_cmd(a: &args::VerifyArgs) -> Result<bool, String> {
    let fault = fault::Fault::from_env()?;
    let dir = common::model_dir(&a.model)?;
    let against_file = match &a.against {
        args::AgainstChoice::File(p) => {
            let path = dumpfile::resolve(p);
            Some((dumpfile::Dump::read(&path)?, path))
        }
        args::AgainstChoice::Cpu => None,
    };
    let tok = common::tokenizer(&dir)?;
    let prompt = match &a.prompt {
        Some(p) => Some(common::encode(&tok, p)?),
        None => None,
    };
    let mut opts = verify::Options {
        model_dir: &dir,
        prompt,
        prompt_text: a.prompt.clone(),
        steps: a.steps,
        dump: a.dump.clone(),
        tensor_core_prompts: false,
        backend_label: String::new(),
        fault,
    };
    match open_backend(a.backend)? {
        Opened::Cpu(cpu) => {
            if a.exact {
                eprintln!("note: --exact only changes the CUDA backend");
            }
            opts.backend_label = "cpu".into();
            let model = common::load(cpu, &dir)?;
            let against = match against_file {
                Some((dump, path)) => verify::Against::File { dump, path },
                // The tested model is its own twin: the CPU forward pass
                // holds no state besides the caches verify gives it.
                None => verify::Against::Cpu(&model),
            };
            verify::run(&model, against, &opts)
        }
        Opened::Cuda(mut gpu) => {
            gpu.set_exact(a.exact);
            opts.backend_label = format!(
                "cuda ({}{})",
                gpu.device_name(),
                if a.exact { ", exact mode" } else { "" }
            );
            opts.tensor_core_prompts = !a.exact;
            let model = common::load(*gpu, &dir)?;
            let cpu;
            let against = match against_file {
                Some((dump, path)) => verify::Against::File { dump, path },
                None => {
                    cpu = common::load(CpuBackend::new(), &dir)?;
                    verify::Against::Cpu(&cpu)
                }
            };
            verify::run(&model, against, &opts)
        }
    }
}

fn logits_cmd(a: &args::LogitsArgs) -> Result<(), String> {
    let dir = common::model_dir(&a.model)?;
    let tok = common::tokenizer(&dir)?;
    match open_backend(a.backend)? {
        Opened::Cpu(b) => logits_cmd::run(&common::load(b, &dir)?, &tok, a),
        Opened::Cuda(b) => logits_cmd::run(&common::load(*b, &dir)?, &tok, a),
    }
}

fn perplexity_cmd(a: &args::PerplexityArgs) -> Result<(), String> {
    let text = std::fs::read(&a.file)
        .map_err(|e| format!("cannot read --file {}: {e}", a.file.display()))?;
    let text = String::from_utf8(text)
        .map_err(|_| format!("--file {} is not UTF-8 text", a.file.display()))?;
    let dir = common::model_dir(&a.model)?;
    let ids = common::tokenizer(&dir)?
        .encode(&text)
        .map_err(|e| e.to_string())?;
    match open_backend(a.backend)? {
        Opened::Cpu(b) => perplexity::run(&common::load(b, &dir)?, &ids, a),
        Opened::Cuda(b) => perplexity::run(&common::load(*b, &dir)?, &ids, a),
    }
}
