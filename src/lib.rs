//! A Kubernetes KMS v2 plugin with a local key hierarchy.
//!
//! Module map: `service` (the gRPC surface, one module per method) and `contract` (what the
//! apiserver accepts); `keys` (the hierarchy: envelope format, KEK cache, rotation) over
//! `secret` (key material and the AEAD); `backend` (where root keys live, one folder or file
//! each); `server` (socket, edge limits and shutdown); `ops` (health, metrics, process
//! hygiene); `settings`, `startup` and `reload` (configuration, and what the process runs with);
//! `inventory` (what etcd holds); `migrate` (re-sealing every object after a rotation); `client` (a KMS v2 client for the CLI, tests and benchmarks).
//!
//! Layers, bottom to top: a module imports only modules listed before it (integration/layering.rs
//! fails otherwise, so no cycle can come back):
//! `proto`, `contract`, `shares`, `secret`, `identity`, `secret_file`, `parse`, `logging`,
//! `backend`, `error`, `keys`, `service`, `server`, `client`, `ops`,
//! `settings`, `startup`, `reload`, `inventory`, `migrate`
//!
#![forbid(unsafe_code)]

pub mod backend;
pub mod client;
pub mod contract;
pub mod error;
pub mod identity;
pub mod inventory;
pub mod keys;
pub mod logging;
pub mod migrate;
pub mod ops;
pub mod parse;
pub mod reload;
pub mod secret;
pub mod secret_file;
pub mod server;
pub mod service;
pub mod settings;
pub mod shares;
pub mod startup;

/// Generated gRPC code for the KMS APIs in `proto/`.
pub mod proto {
    pub mod v2 {
        tonic::include_proto!("v2");
    }
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
}

use std::future::Future;
use std::sync::Arc;

use tracing::{info, warn};

use keys::Keys;
use logging::KeyIdHash;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use settings::Settings;

pub use startup::{StartError, build_backend};

/// Runs the plugin until `shutdown` resolves: makes the first local KEK, binds the socket,
/// serves, then drains, removes the socket and drops (wipes) every key. With `config` (the
/// file `settings` came from), changes to it are reloaded live; `log` changes the log level.
pub async fn run(
    settings: Settings,
    config: Option<std::path::PathBuf>,
    log: logging::LevelHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    // Everything that can be checked is checked before anything is bound or built: a refused
    // socket directory is reported as that, whatever else (a taken metrics port) is wrong too.
    for warning in settings.warnings() {
        warn!("{warning}");
    }
    let address: server::socket::SocketAddress = settings.socket.path.parse().map_err(StartError::Address)?;
    server::socket::preflight(
        &address,
        settings.socket.group.as_deref(),
        settings.socket.directory_private_to_pod,
    )?;
    if let Err(e) = ops::hygiene::harden() {
        warn!(error = %e, "could not disable core dumps");
    }
    if settings.process.mlock {
        ops::hygiene::lock_memory().map_err(|e| StartError::Setup(format!("process.mlock: mlockall failed: {e}")))?;
    }
    let backend = build_backend(&settings).await?;
    // What the process runs with, as one value a reload replaces whole.
    let running = reload::Running::new(settings.clone(), backend).shared();
    let keys = Keys::with_source(reload::active_source(&running), settings.kek.cache_capacity);
    // Make the first KEK before binding, so the apiserver's first Status is already healthy.
    // If the backend is down, start anyway: Status fails until the background task succeeds.
    if let Err(e) = keys.check_and_rotate().await {
        warn!(error = %e, "could not make the first local KEK; Status fails until the backend answers");
    }
    let mut registry = Registry::with_prefix("kms_plugin");
    registry.register(
        "build",
        "Build information",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    keys::metrics::register(&keys, &mut registry);
    let service = service::KmsService::new(Arc::clone(&keys), settings.status.version);
    service.register_metrics(&mut registry);
    let connections = server::connections::Connections::new(settings.socket.max_connections);
    connections.register_metrics(&mut registry);
    let reload_metrics = reload::ReloadMetrics::default();
    reload_metrics.register(&mut registry);
    let http = match settings.metrics.enabled {
        true => {
            let address = settings.metrics.address;
            let listener = match ops::http::bind(address).await {
                Err(e) if settings.dev_mode && e.kind() == std::io::ErrorKind::AddrInUse => {
                    // Only a default address earns the hint: one the operator chose is in use.
                    let hint = match std::env::var_os("KMS_PLUGIN_METRICS__ADDRESS") {
                        Some(_) => "",
                        None => " (set KMS_PLUGIN_METRICS__ADDRESS to choose)",
                    };
                    warn!(%address, "metrics.address is in use; development mode serves /metrics on a free loopback port instead{hint}");
                    ops::http::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await
                }
                other => other,
            }
            .map_err(|e| StartError::Setup(format!("metrics.address {address}: {e}")))?;
            let endpoint = Arc::new(ops::http::Endpoint {
                registry,
                keys: Arc::clone(&keys),
            });
            let bound = listener
                .local_addr()
                .map_err(|e| StartError::Setup(format!("metrics: {e}")))?;
            let http = ops::http::HttpServer::start(listener, endpoint)
                .map_err(|e| StartError::Setup(format!("metrics: {e}")))?;
            info!(address = %bound, "serving /metrics, /livez, /readyz, /healthz");
            Some(http)
        }
        false => None,
    };

    let (listener, guard) = server::socket::bind(
        &address,
        settings.socket.mode,
        settings.socket.group.as_deref(),
        settings.socket.directory_private_to_pod,
    )?;
    let key_id = keys
        .current()
        .map(|c| KeyIdHash(c.key_id()).to_string())
        .unwrap_or_else(|| "-".into());
    info!(
        socket = %address,
        backend = keys.backend().name(),
        version = settings.status.version.as_str(),
        key_id_hash = %key_id,
        decrypt_only = %logging::key_list(&keys.backend().decrypt_only()),
        "serving KMS v2"
    );

    if settings.dev_mode {
        info!(
            "development mode is up; next, ask it for its status: kms-plugin status --socket {address} (from a checkout: cargo run --release -- status --socket {address})"
        );
    }

    let (stop_rotation, rotation_stopped) = tokio::sync::watch::channel(false);
    let rotation = tokio::spawn(Arc::clone(&keys).run_rotation(rotation_stopped.clone()));
    let peers = reload::peer_source(&running);
    let shutdown_grace = settings.shutdown_grace;
    let reloader = match config {
        Some(path) => {
            let reloader = reload::Reloader::new(path, running, Arc::clone(&keys), log, reload_metrics).await;
            Some(tokio::spawn(reloader.run(rotation_stopped)))
        }
        // No file to reload (--dev, --socket): a SIGHUP must not terminate the plugin.
        None => Some(tokio::spawn(reload::ignore_hangups(rotation_stopped))),
    };
    let result = server::serve(listener, service, peers, connections, shutdown_grace, shutdown).await;

    let _ = stop_rotation.send(true);
    if let Some(http) = http {
        http.stop().await;
    }
    let _ = rotation.await;
    if let Some(reloader) = reloader {
        let _ = reloader.await;
    }
    drop(guard);
    drop(keys);
    info!("stopped; socket removed and keys dropped");
    Ok(result?)
}
