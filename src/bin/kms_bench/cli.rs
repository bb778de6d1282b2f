//! The command line: one subcommand per scenario, each with only the options it reads, so
//! `kms-bench decrypt --help` documents decrypt. Parsed values become one plain [`Args`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};

use crate::{Args, Scenario};

#[derive(Parser, Debug)]
#[command(name = "kms-bench", version, about = "Load generator for KMS v2 plugins")]
struct Cli {
    #[command(subcommand)]
    scenario: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Status calls (answered from memory by a good plugin).
    Status(Target),
    /// Encrypt of fresh 32-byte seeds.
    Encrypt(Target),
    /// Hot Decrypt: a few seeds are encrypted first, then decrypted over and over (verified).
    Decrypt(Target),
    /// Status, Encrypt and hot Decrypt interleaved by --mix.
    Mixed {
        #[command(flatten)]
        target: Target,
        /// Weights of Status:Encrypt:Decrypt.
        #[arg(long, default_value = "1:1:8")]
        mix: String,
    },
    /// Decrypts with tampered annotations: what refusing costs the target.
    ///
    /// Every call should fail; codes are counted. Every worker's k-th call carries the same tampered KEK, so
    /// each round's calls wait on one unwrap, as a hostile local peer's would.
    Tampered(Target),
    /// The physical floor for one call: a raw Unix-socket ping-pong.
    ///
    /// Request/response of the same sizes as a Decrypt, against an in-process echo server.
    Floor {
        #[command(flatten)]
        load: Load,
        /// Request size in bytes (default: a gRPC-framed Decrypt request of this plugin).
        #[arg(long)]
        request_bytes: Option<usize>,
        /// Response size in bytes (default: a gRPC-framed Decrypt response for 32 bytes).
        #[arg(long)]
        response_bytes: Option<usize>,
        /// Worker threads of the echo server's runtime (0: one per core, like the plugin;
        /// 1: a current-thread runtime).
        #[arg(long, default_value_t = 0)]
        echo_threads: usize,
    },
    /// This plugin only: decrypt many seeds on a fresh plugin with empty caches.
    ///
    /// Seals --seeds seeds under --keks local KEKs, then decrypts them all on a fresh plugin
    /// whose backend answers after --latency; counts backend unwraps in its log.
    ColdStart {
        #[command(flatten)]
        load: Load,
        #[command(flatten)]
        spawn: Spawn,
        /// Seeds to seal.
        #[arg(long, default_value_t = 10_000)]
        seeds: usize,
        /// Plaintext size (the apiserver sends 32 bytes).
        #[arg(long, default_value_t = 32)]
        plaintext_bytes: usize,
        /// Distinct local KEKs to seal the seeds under (one short-lived plugin each).
        #[arg(long, default_value_t = 8)]
        keks: usize,
        /// Backend latency injected into the fresh plugin (`[bench] backend_latency`).
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        latency: Duration,
    },
    /// This plugin only: time from spawning the process to its first healthy Status.
    Startup {
        #[command(flatten)]
        spawn: Spawn,
        /// How many times to start the plugin.
        #[arg(long, default_value_t = 10)]
        repeat: usize,
        #[command(flatten)]
        output: Output,
    },
}

/// A running plugin to load: status, encrypt, decrypt, mixed, tampered.
#[derive(ClapArgs, Debug)]
struct Target {
    /// Plugin socket: a path (relative to the current directory), unix:///path or @abstract.
    #[arg(long)]
    socket: String,
    /// Plaintext size for Encrypt and Decrypt (the apiserver sends 32 bytes).
    #[arg(long, default_value_t = 32)]
    plaintext_bytes: usize,
    /// Seeds to encrypt first for the Decrypts.
    #[arg(long, default_value_t = 16)]
    seeds: usize,
    #[command(flatten)]
    load: Load,
}

/// How much load, for how long.
#[derive(ClapArgs, Debug)]
struct Load {
    /// Concurrent workers (calls in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections; workers are spread over them round-robin.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// How long to measure (after the warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, conflicts_with = "count")]
    duration: Duration,
    /// Measure exactly this many calls instead of a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Calls made but not recorded before measuring starts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Worker threads of the load generator's runtime (0: one per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Per-call deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    output: Output,
}

/// The plugin processes kms-bench starts itself (cold-start, startup).
#[derive(ClapArgs, Debug)]
struct Spawn {
    /// The plugin binary to spawn (default: kms-plugin next to kms-bench). It inherits this
    /// environment, so `KMS_PLUGIN_*` variables reach it (e.g. a free port for an HTTP endpoint).
    #[arg(long)]
    plugin: Option<PathBuf>,
    /// A TOML file with a `[backend]` table (any backend, e.g. a Vault server) to use instead of
    /// a new local root key; then consider `--latency 0s`.
    #[arg(long, value_name = "FILE")]
    backend: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
struct Output {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A free-form tag copied into the report (e.g. how the run was placed on CPUs).
    #[arg(long)]
    label: Option<String>,
}

/// Parses the command line (clap prints help and errors and exits), then resolves paths.
pub fn parse() -> Result<Args, String> {
    from_cli(Cli::parse())
}

fn from_cli(cli: Cli) -> Result<Args, String> {
    let mut args = Args::default();
    match cli.scenario {
        Command::Status(t) => target(&mut args, Scenario::Status, t)?,
        Command::Encrypt(t) => target(&mut args, Scenario::Encrypt, t)?,
        Command::Decrypt(t) => target(&mut args, Scenario::Decrypt, t)?,
        Command::Tampered(t) => target(&mut args, Scenario::Tampered, t)?,
        Command::Mixed { target: t, mix } => {
            target(&mut args, Scenario::Mixed, t)?;
            args.mix = mix;
        }
        Command::Floor {
            load: l,
            request_bytes,
            response_bytes,
            echo_threads,
        } => {
            args.scenario = Scenario::Floor;
            load(&mut args, l);
            args.request_bytes = request_bytes;
            args.response_bytes = response_bytes;
            args.echo_threads = echo_threads;
        }
        Command::ColdStart {
            load: l,
            spawn: s,
            seeds,
            plaintext_bytes,
            keks,
            latency,
        } => {
            args.scenario = Scenario::ColdStart;
            load(&mut args, l);
            spawn(&mut args, s)?;
            args.seeds = seeds;
            args.plaintext_bytes = plaintext_bytes;
            args.keks = keks;
            args.latency = latency;
        }
        Command::Startup {
            spawn: s,
            repeat,
            output: o,
        } => {
            args.scenario = Scenario::Startup;
            spawn(&mut args, s)?;
            args.repeat = repeat;
            output(&mut args, o);
        }
    }
    if args.concurrency == 0 || args.connections == 0 {
        return Err("--concurrency and --connections must be at least 1".into());
    }
    Ok(args)
}

fn target(args: &mut Args, scenario: Scenario, t: Target) -> Result<(), String> {
    args.scenario = scenario;
    args.socket = Some(socket_arg(&t.socket)?);
    args.plaintext_bytes = t.plaintext_bytes;
    args.seeds = t.seeds;
    load(args, t.load);
    Ok(())
}

fn load(args: &mut Args, l: Load) {
    args.concurrency = l.concurrency;
    args.connections = l.connections;
    args.duration = l.duration;
    args.count = l.count;
    args.warmup = l.warmup;
    args.threads = l.threads;
    args.timeout = l.timeout;
    output(args, l.output);
}

fn output(args: &mut Args, o: Output) {
    args.json = o.json;
    args.label = o.label;
}

fn spawn(args: &mut Args, s: Spawn) -> Result<(), String> {
    args.plugin = match s.plugin {
        Some(p) => p,
        None => beside_self("kms-plugin")?,
    };
    args.backend = s.backend;
    Ok(())
}

/// `name` in kms-bench's own directory: a build puts both binaries side by side, and so does an
/// install, whatever the current directory is.
fn beside_self(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("locating kms-bench itself: {e}"))?;
    Ok(me.with_file_name(name))
}

/// A socket path relative to the current directory becomes absolute (as `kms-plugin status`
/// takes it); `@name` and `unix://` forms pass through.
fn socket_arg(socket: &str) -> Result<String, String> {
    let path = Path::new(socket);
    if socket.starts_with('@') || socket.starts_with("unix://") || path.is_absolute() {
        return Ok(socket.to_string());
    }
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| format!("--socket: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(argv: &[&str]) -> Result<Args, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("kms-bench").chain(argv.iter().copied())).map_err(|e| e.to_string())?;
        from_cli(cli)
    }

    #[test]
    fn a_relative_socket_is_taken_from_the_current_directory() {
        let args = parse_args(&["decrypt", "--socket", "kms-dev/kms.sock"]).unwrap();
        let want = std::env::current_dir().unwrap().join("kms-dev/kms.sock");
        assert_eq!(args.socket.as_deref(), Some(want.to_str().unwrap()));
        let args = parse_args(&["status", "--socket", "@kms"]).unwrap();
        assert_eq!(args.socket.as_deref(), Some("@kms"));
    }

    #[test]
    fn spawned_plugin_defaults_to_the_binary_beside_kms_bench() {
        let args = parse_args(&["startup"]).unwrap();
        let me = std::env::current_exe().unwrap();
        assert_eq!(args.plugin, me.with_file_name("kms-plugin"));
        let args = parse_args(&["cold-start", "--plugin", "/x/kms-plugin"]).unwrap();
        assert_eq!(args.plugin, PathBuf::from("/x/kms-plugin"));
    }

    #[test]
    fn options_belong_to_their_scenario() {
        assert!(parse_args(&["decrypt"]).is_err(), "--socket is required");
        assert!(parse_args(&["startup", "--socket", "x"]).is_err());
        assert!(parse_args(&["status", "--socket", "x", "--mix", "1:1:1"]).is_err());
        let args = parse_args(&["mixed", "--socket", "/s", "--mix", "1:0:1", "--count", "5"]).unwrap();
        assert_eq!((args.mix.as_str(), args.count), ("1:0:1", Some(5)));
    }
}
