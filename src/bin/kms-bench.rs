//! `kms-bench`: a load generator that speaks KMS v2 to any plugin socket, plus the physical
//! floor (a raw Unix-socket ping-pong) and this plugin's cold-start and start-up scenarios.
//!
//! Every latency is recorded in an HDR histogram (ns resolution, 3 significant digits); every
//! failed call is counted by its gRPC code. Plaintexts are verified, never printed.

#[path = "kms_bench/cli.rs"]
mod cli;
#[path = "kms_bench/cold.rs"]
mod cold;
#[path = "kms_bench/floor.rs"]
mod floor;
#[path = "kms_bench/grpc.rs"]
mod grpc;
#[path = "kms_bench/load.rs"]
mod load;
#[path = "kms_bench/plugin.rs"]
mod plugin;
#[path = "kms_bench/report.rs"]
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// What to measure (one per subcommand; `cli.rs` documents each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Status,
    Encrypt,
    Decrypt,
    Mixed,
    Tampered,
    Floor,
    ColdStart,
    Startup,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Status => "status",
            Scenario::Encrypt => "encrypt",
            Scenario::Decrypt => "decrypt",
            Scenario::Mixed => "mixed",
            Scenario::Tampered => "tampered",
            Scenario::Floor => "floor",
            Scenario::ColdStart => "cold-start",
            Scenario::Startup => "startup",
        }
    }
}

/// What one run does, whatever subcommand set it (see `cli.rs` for what each option means).
#[derive(Debug)]
pub struct Args {
    pub scenario: Scenario,
    /// Absolute path, unix:///path or @abstract.
    pub socket: Option<String>,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    pub count: Option<u64>,
    pub warmup: Duration,
    pub json: bool,
    pub label: Option<String>,
    pub threads: usize,
    pub timeout: Duration,
    pub plaintext_bytes: usize,
    pub seeds: usize,
    pub mix: String,
    pub request_bytes: Option<usize>,
    pub response_bytes: Option<usize>,
    pub echo_threads: usize,
    pub plugin: PathBuf,
    pub keks: usize,
    pub latency: Duration,
    pub repeat: usize,
    pub backend: Option<PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            scenario: Scenario::Status,
            socket: None,
            concurrency: 1,
            connections: 1,
            duration: Duration::from_secs(10),
            count: None,
            warmup: Duration::ZERO,
            json: false,
            label: None,
            threads: 1,
            timeout: Duration::from_secs(10),
            plaintext_bytes: 32,
            seeds: 16,
            mix: String::new(),
            request_bytes: None,
            response_bytes: None,
            echo_threads: 0,
            plugin: PathBuf::new(),
            keks: 1,
            latency: Duration::ZERO,
            repeat: 1,
            backend: None,
        }
    }
}

fn main() -> ExitCode {
    let args = match cli::parse() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("kms-bench: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if args.threads > 1 {
            b.worker_threads(args.threads);
        }
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kms-bench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.scenario {
            Scenario::Status | Scenario::Encrypt | Scenario::Decrypt | Scenario::Mixed | Scenario::Tampered => {
                grpc::run(&args).await
            }
            Scenario::Floor => floor::run(&args).await,
            Scenario::ColdStart => cold::run(&args).await,
            Scenario::Startup => cold::startup(&args).await,
        }
    });
    match result {
        Ok(mut report) => {
            if let Some(label) = &args.label {
                report = report.extra("label", report::Extra::Text(label.clone()));
            }
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.errors_total() > 0 {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(msg) => {
            eprintln!("kms-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}
