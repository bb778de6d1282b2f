//! `kms-bench`: a load generator that speaks KMS v2 to any plugin socket, plus the physical
//! floor (a raw Unix-socket ping-pong) and this plugin's cold-start and start-up scenarios.
//!
//! Every latency is recorded in an HDR histogram (ns resolution, 3 significant digits); every
//! failed call is counted by its gRPC code. Plaintexts are verified, never printed.

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

use clap::{Parser, ValueEnum};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Status calls (answered from memory by a good plugin).
    Status,
    /// Encrypt of fresh 32-byte seeds.
    Encrypt,
    /// Hot Decrypt: a few seeds are encrypted first, then decrypted over and over (verified).
    Decrypt,
    /// Status, Encrypt and hot Decrypt interleaved by --mix.
    Mixed,
    /// Decrypts with tampered annotations (every call should fail; codes are counted): what
    /// refusing costs the target. Every worker's k-th call carries the same tampered KEK, so
    /// each round's calls wait on one unwrap, as a hostile local peer's would.
    Tampered,
    /// Raw Unix-socket request/response ping-pong of the same sizes against an in-process
    /// echo server: the physical floor for one call.
    Floor,
    /// This plugin only: seal --seeds seeds under --keks local KEKs, then decrypt them all on a
    /// fresh plugin whose backend answers after --latency; counts backend unwraps in its log.
    ColdStart,
    /// This plugin only: time from spawning the process to its first healthy Status.
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

#[derive(Parser, Debug)]
#[command(name = "kms-bench", version, about = "Load generator for KMS v2 plugins")]
pub struct Args {
    /// Scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Plugin socket (path, unix:///path or @abstract); required by status/encrypt/decrypt/mixed.
    #[arg(long)]
    pub socket: Option<String>,
    /// Concurrent workers (calls in flight).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections; workers are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to measure (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, conflicts_with = "count")]
    pub duration: Duration,
    /// Measure exactly this many calls instead of a duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Calls made but not recorded before measuring starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// A free-form tag copied into the report (e.g. how the run was placed on CPUs).
    #[arg(long)]
    pub label: Option<String>,
    /// Worker threads of the load generator's runtime (0: one per core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Per-call deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Plaintext size for Encrypt and Decrypt (the apiserver sends 32 bytes).
    #[arg(long, default_value_t = 32)]
    pub plaintext_bytes: usize,
    /// Seeds to encrypt first for decrypt/mixed (default 16), or to seal for cold-start
    /// (default 10000).
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Weights of Status:Encrypt:Decrypt in the mixed scenario.
    #[arg(long, default_value = "1:1:8")]
    pub mix: String,
    /// floor: request size in bytes (default: a gRPC-framed Decrypt request of this plugin).
    #[arg(long)]
    pub request_bytes: Option<usize>,
    /// floor: response size in bytes (default: a gRPC-framed Decrypt response for 32 bytes).
    #[arg(long)]
    pub response_bytes: Option<usize>,
    /// floor: worker threads of the echo server's runtime (0: one per core, like the plugin;
    /// 1: a current-thread runtime).
    #[arg(long, default_value_t = 0)]
    pub echo_threads: usize,
    /// cold-start/startup: the plugin binary to spawn. It inherits this environment, so
    /// `KMS_PLUGIN_*` variables reach it (e.g. a free port for an HTTP endpoint).
    #[arg(long, default_value = "target/release/kms-plugin")]
    pub plugin: PathBuf,
    /// cold-start: distinct local KEKs to seal the seeds under (one short-lived plugin each).
    #[arg(long, default_value_t = 8)]
    pub keks: usize,
    /// cold-start: backend latency injected into the fresh plugin (`[bench] backend_latency`).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// startup: how many times to start the plugin.
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// cold-start, startup: a TOML file with a `[backend]` table (any backend, e.g. a Vault
    /// server) to use instead of a new local root key; then consider `--latency 0s`.
    #[arg(long, value_name = "FILE")]
    pub backend: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.concurrency == 0 || args.connections == 0 {
        eprintln!("kms-bench: --concurrency and --connections must be at least 1");
        return ExitCode::FAILURE;
    }
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
