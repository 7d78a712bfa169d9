//! `qwen-cli`: the command-line front end. Every failure ends as one
//! `error: ...` line on stderr and exit code 1.

mod args;
mod generate;

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
