//! `qwen-cli`: the command-line front end. Every failure ends as one
//! `error: ...` line on stderr and exit code 1.

mod args;
mod bench;
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
        Some("bench") => {
            let (a, backend) = args::parse_bench(&argv[1..])?;
            bench_cmd(&a, backend)
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

fn bench_cmd(a: &bench::BenchArgs, backend: BackendChoice) -> Result<(), String> {
    let gpu = match backend {
        BackendChoice::Cpu => None,
        BackendChoice::Cuda => {
            Some(CudaBackend::new(0).map_err(|e| format!("--backend cuda: {e}"))?)
        }
        BackendChoice::Auto => CudaBackend::new(0).ok(),
    };
    let result = match gpu {
        Some(g) => {
            eprintln!(
                "backend: cuda ({}); measuring device bandwidth",
                g.device_name()
            );
            let bw = g.measure_copy_bandwidth().map_err(|e| e.to_string())?;
            let (m, shape) = bench::load(g, a)?;
            bench::latency(&m, a, &shape, bw)?
        }
        None => {
            eprintln!("backend: cpu; measuring memory bandwidth");
            let bw = bench::host_read_bandwidth();
            let (m, shape) = bench::load(CpuBackend::new(), a)?;
            bench::latency(&m, a, &shape, bw)?
        }
    };
    if a.json {
        println!("{}", result.to_json());
    } else {
        println!("{}", result.table());
    }
    Ok(())
}
