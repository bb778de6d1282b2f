//! `kms-plugin`: CLI, configuration and logging; the library does the rest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kms_plugin::backend::tls::error_chain;
use kms_plugin::settings::Settings;
use kms_plugin::{backend, client, logging, server};

#[derive(Parser)]
#[command(
    name = "kms-plugin",
    version,
    about = "Kubernetes KMS v2 plugin with a local key hierarchy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve KMS v2 on the configured Unix socket until SIGTERM/SIGINT.
    Serve {
        /// TOML configuration file (environment KMS_PLUGIN_* overrides it).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Socket path (overrides socket.path).
        #[arg(long)]
        socket: Option<String>,
        /// Development mode: local root key and socket under DIR, key created if missing.
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        dev: Option<PathBuf>,
    },
    /// Write a new random 32-byte local root key (mode 0600); never overwrites.
    Keygen {
        /// Where to write the key; the file must not exist yet.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Validate the configuration and run a backend wrap/unwrap probe.
    Check {
        /// TOML configuration file, as given to `serve` (environment KMS_PLUGIN_* overrides it).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Check the socket directory and the files the config names from the point of view of
        /// the user the plugin runs as (the manifest's runAsUser[:runAsGroup], e.g. 65532:0)
        /// rather than this process's: for a root `check` of a layout made for that user.
        #[arg(long, value_name = "UID[:GID]", value_parser = clap::value_parser!(kms_plugin::identity::Identity))]
        as_user: Option<kms_plugin::identity::Identity>,
    },
    /// Call Status over the socket; exit 0 only if healthy (usable as an exec probe).
    Status {
        /// The plugin's socket: a path, unix:///path, or @name for an abstract socket.
        #[arg(long, value_name = "PATH")]
        socket: String,
        /// How long to wait for the connection and the reply.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Read etcd (read-only) and report what is stored under which keys, and whether a root
    /// key may be retired. Exit 0 ok, 1 error, 2 --require-retirable key still has objects,
    /// 3 --verify found objects that do not open, 4 --require-retirable found no object of
    /// the provider at all (no verdict).
    Inventory {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Open every distinct seed with the configured backend (needs --config).
        #[arg(long, requires = "config")]
        verify: bool,
        /// The configuration `serve` uses: its keys are resolved as `serve` does (for --verify,
        /// and to say whether --require-retirable's key is still configured).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Exit 2 unless no object is stored under this key_id: the plugin's form (as `status`
        /// prints it) or sha256:<64 lowercase hex>. Needs --provider or --encryption-config.
        #[arg(long, value_name = "KEY_ID")]
        require_retirable: Option<String>,
        /// The KMS v2 provider name (EncryptionConfiguration `kms.name`) whose objects count.
        #[arg(long, value_name = "NAME", conflicts_with = "encryption_config")]
        provider: Option<String>,
        /// The apiservers' EncryptionConfiguration, to read the provider name from.
        #[arg(long, value_name = "FILE")]
        encryption_config: Option<PathBuf>,
        /// One JSON document on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// After a rotation: check that every apiserver writes with the same current key, rewrite
    /// every object of the resources this plugin's provider writes under it (the cluster's
    /// StorageVersionMigrations, or get-and-update through the API), then prove it from etcd.
    /// Exit 0 every object under the current key, 1 error, 2 some remain (listed).
    Migrate {
        /// The apiservers' --encryption-provider-config: which resources the provider writes.
        #[arg(long, value_name = "FILE")]
        encryption_config: PathBuf,
        /// The KMS v2 provider's name in it (needed only if it names several).
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// kubeconfig (default: $KUBECONFIG, ~/.kube/config, or the in-cluster service account).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// An apiserver to check, e.g. https://10.0.0.1:6443 (repeat for each; default: the
        /// endpoints of the default/kubernetes Service).
        #[arg(long = "apiserver", value_name = "URL")]
        apiservers: Vec<String>,
        /// How objects get rewritten.
        #[arg(long, value_enum, default_value = "auto")]
        method: kms_plugin::migrate::Method,
        /// How long StorageVersionMigrations may take before the rewrite takes over.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// Objects rewritten per second at most.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        rate: u32,
        /// Objects per list call when rewriting.
        #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        chunk_size: u32,
        /// Preflight and plan only: list what is not under the current key, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Where etcd is (`inventory`, `migrate`): read-only access is enough.
#[derive(clap::Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated (the first that answers is used).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    endpoints: String,
    /// CA certificate (PEM) that signed etcd's server certificate; needed for https.
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The apiserver's --etcd-prefix.
    #[arg(long, default_value = "/registry/")]
    prefix: String,
    /// Keys per etcd Range call (memory is about this many values at a time).
    #[arg(long, default_value_t = kms_plugin::inventory::etcd::PAGE, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    page_size: i64,
}

impl EtcdArgs {
    fn connection(&self) -> kms_plugin::inventory::etcd::Connection {
        kms_plugin::inventory::connection(
            &self.endpoints,
            self.cacert.clone(),
            self.cert.clone(),
            self.key.clone(),
        )
    }
}

/// `inventory`'s arguments, checked.
struct InventoryArgs {
    etcd: EtcdArgs,
    verify: bool,
    config: Option<PathBuf>,
    require_retirable: Option<String>,
    provider: Option<String>,
    encryption_config: Option<PathBuf>,
    json: bool,
}

fn inventory_options(a: InventoryArgs) -> Result<kms_plugin::inventory::Options, String> {
    let provider = match (a.provider, &a.encryption_config) {
        (Some(p), _) => Some(p),
        (None, Some(file)) => Some(
            kms_plugin::migrate::encryption_config::EncryptionConfig::read(file)?
                .provider(None)
                .map_err(|e| format!("--encryption-config {}: {e}", file.display()))?,
        ),
        (None, None) => None,
    };
    let require_retirable = a
        .require_retirable
        .as_deref()
        .map(kms_plugin::inventory::key_id::parse)
        .transpose()?;
    if require_retirable.is_some() && provider.is_none() {
        return Err(
            "--require-retirable needs the provider whose objects count: --provider NAME (the EncryptionConfiguration's kms.name) or --encryption-config FILE"
                .into(),
        );
    }
    Ok(kms_plugin::inventory::Options {
        connection: a.etcd.connection(),
        prefix: a.etcd.prefix.clone(),
        config: a.config.as_deref().map(|c| load(Some(c))).transpose()?,
        verify: a.verify,
        require_retirable,
        provider,
        json: a.json,
        page_size: a.etcd.page_size,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any key material is read, whatever the subcommand: no core file may hold it.
    if let Err(e) = kms_plugin::ops::hygiene::harden() {
        eprintln!("kms-plugin: could not disable core dumps: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Keygen { out } => backend::local::generate_key_file(&out)
            .map(|key_id| println!("wrote {} (key_id {key_id})", out.display()))
            .map_err(|e| e.to_string()),
        Command::Serve { config, socket, dev } => serve(config, socket, dev),
        Command::Check { config, as_user } => {
            // Before anything reads a file: every check below takes this user's point of view.
            if let Some(id) = as_user {
                kms_plugin::identity::set_as_user(id);
            }
            runtime(1).block_on(check(config))
        }
        Command::Status { socket, timeout } => runtime(1).block_on(status(&socket, timeout)),
        Command::Inventory {
            etcd,
            verify,
            config,
            require_retirable,
            provider,
            encryption_config,
            json,
        } => {
            let options = inventory_options(InventoryArgs {
                etcd,
                verify,
                config,
                require_retirable,
                provider,
                encryption_config,
                json,
            });
            return match options.and_then(|o| runtime(1).block_on(kms_plugin::inventory::run(o))) {
                Ok(code) => ExitCode::from(code),
                Err(msg) => {
                    eprintln!("kms-plugin inventory: {msg}");
                    ExitCode::from(kms_plugin::inventory::EXIT_ERROR)
                }
            };
        }
        Command::Migrate {
            encryption_config,
            provider,
            kubeconfig,
            apiservers,
            method,
            deadline,
            rate,
            chunk_size,
            dry_run,
            etcd,
        } => {
            let options = kms_plugin::migrate::Options {
                kubeconfig,
                encryption_config,
                provider,
                apiservers,
                method,
                deadline,
                rate,
                chunk_size,
                dry_run,
                etcd: etcd.connection(),
                prefix: etcd.prefix,
                etcd_page_size: etcd.page_size,
            };
            return match runtime(1).block_on(kms_plugin::migrate::run(options)) {
                Ok(code) => ExitCode::from(code),
                Err(msg) => {
                    eprintln!("kms-plugin migrate: {msg}");
                    ExitCode::from(kms_plugin::migrate::EXIT_ERROR)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("kms-plugin: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn load(config: Option<&Path>) -> Result<Settings, String> {
    Settings::load(config).map_err(|e| e.to_string())
}

/// Settings for `serve --dev DIR`: a root key and a socket under DIR; `KMS_PLUGIN_*`
/// variables still override them.
fn dev_settings(dir: &Path) -> Result<Settings, String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::path::absolute(dir).map_err(|e| e.to_string())?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let key = dir.join("root.key");
    if !key.exists() {
        let key_id = backend::local::generate_key_file(&key).map_err(|e| e.to_string())?;
        eprintln!(
            "kms-plugin: development mode: created root key {} ({key_id})",
            key.display()
        );
    }
    let base = format!(
        "[socket]\npath = {:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
        dir.join("kms.sock").display().to_string(),
        key.display().to_string()
    );
    let mut settings = Settings::load_with(Some(&base), std::env::vars()).map_err(|e| e.to_string())?;
    settings.dev_mode = true;
    Ok(settings)
}

fn serve(config: Option<PathBuf>, socket: Option<String>, dev: Option<PathBuf>) -> Result<(), String> {
    let mut settings = match &dev {
        Some(dir) => dev_settings(dir)?,
        None => load(config.as_deref())?,
    };
    // A --socket override is not in the file: a reload would see it as a socket change.
    let reloadable = config.filter(|_| socket.is_none());
    if let Some(socket) = socket {
        settings.socket.path = socket_arg(&socket)?.to_string();
    }
    let log = logging::init(&settings.log.level, settings.log.format);
    let config = reloadable
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| e.to_string())?;
    runtime(settings.process.worker_threads)
        .block_on(kms_plugin::run(settings, config, log, shutdown_signal()))
        .map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            // Without the handlers SIGTERM kills the process outright, with no drain and the
            // socket left behind: say so rather than fail silently at stop time.
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT; a stop will not drain");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn check(config: Option<PathBuf>) -> Result<(), String> {
    let settings = load(config.as_deref())?;
    for warning in settings.warnings() {
        eprintln!("kms-plugin: warning: {warning}");
    }
    let address: server::socket::SocketAddress = settings.socket.path.parse()?;
    server::socket::preflight(
        &address,
        settings.socket.group.as_deref(),
        settings.socket.directory_private_to_pod,
    )
    .map_err(|e| e.to_string())?;
    let backend = kms_plugin::build_backend(&settings).await.map_err(|e| e.to_string())?;
    let key_id = kms_plugin::keys::self_test::self_test(backend.as_ref()).await?.key_id;
    let id = kms_plugin::identity::current();
    println!(
        "ok: backend {} current key_id {key_id} ({}); wrap/unwrap round trip succeeded; socket directory and files checked for uid {}",
        backend.name(),
        logging::KeyIdHash(&key_id),
        id.uid
    );
    // After the probe: a backend resolves its older keys there.
    println!("decrypt-only keys: {}", logging::key_list(&backend.decrypt_only()));
    Ok(())
}

/// A socket given on the command line: relative paths are taken from the current directory.
fn socket_arg(socket: &str) -> Result<server::socket::SocketAddress, String> {
    let path = std::path::Path::new(socket);
    let text = if socket.starts_with('@') || socket.starts_with("unix://") || path.is_absolute() {
        socket.to_string()
    } else {
        std::path::absolute(path)
            .map_err(|e| format!("--socket: {e}"))?
            .display()
            .to_string()
    };
    text.parse().map_err(|e| format!("--socket: {e}"))
}

async fn status(socket: &str, timeout: Duration) -> Result<(), String> {
    let address = socket_arg(socket)?;
    let mut client = client::connect(&address, timeout)
        .await
        .map_err(|e| format!("connect {socket}: {}", error_chain(&e)))?;
    let reply = client
        .status(kms_plugin::proto::v2::StatusRequest {})
        .await
        .map_err(|s| format!("Status failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    println!(
        "version={} healthz={} key_id={}",
        reply.version, reply.healthz, reply.key_id
    );
    if reply.healthz == "ok" {
        Ok(())
    } else {
        Err(format!("unhealthy: {}", reply.healthz))
    }
}
