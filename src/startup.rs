//! Turns the settings into what the process runs with: the backend, built one way for `serve`,
//! `check`, a live reload and `inventory --verify`.

use std::sync::Arc;

use tracing::warn;

use crate::backend::{self, Backend};
use crate::server;
use crate::settings::{BackendSettings, Settings};

/// Why the plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    KeyFile(#[from] backend::local::KeyFileError),
    #[error("backend: {0}")]
    Backend(String),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Socket(#[from] server::socket::SocketError),
    #[error("socket.path: {0}")]
    Address(String),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Builds the configured backend (wrapped in the latency injector if a benchmark asks for it).
pub async fn build_backend(settings: &Settings) -> Result<Arc<dyn Backend>, StartError> {
    let backend: Arc<dyn Backend> = match &settings.backend {
        BackendSettings::Local(local) => {
            let (current, old) = (local.current_key_file.clone(), local.decrypt_only_key_files.clone());
            Arc::new(off_thread(move || Ok(backend::local::LocalBackend::open(&current, &old)?)).await?)
        }
        BackendSettings::Pkcs11(p) => {
            let pin = match (&p.pin_file, &p.pin_env) {
                (Some(file), _) => backend::pkcs11::PinSource::File(file.clone()),
                (None, Some(var)) => backend::pkcs11::PinSource::Env(var.clone()),
                (None, None) => return Err(StartError::Backend("pkcs11: no PIN source".into())),
            };
            let opts = backend::pkcs11::Pkcs11Options {
                module: p.module.clone(),
                token_label: p.token_label.clone(),
                pin,
                current_key_label: p.current_key_label.clone(),
                decrypt_only_key_labels: p.decrypt_only_key_labels.clone(),
                sessions: p.sessions,
            };
            match tokio::task::spawn_blocking(move || backend::pkcs11::Pkcs11Backend::open(&opts))
                .await
                .map_err(|e| StartError::Backend(e.to_string()))?
            {
                Ok(b) => Arc::new(b),
                Err(e) if e.pin_rejected => {
                    tracing::error!("pkcs11: the token rejected the PIN; not retrying. Fix the PIN and restart");
                    let error =
                        backend::BackendError::new(backend::ErrorKind::Denied, format!("pkcs11: {}", e.message));
                    Arc::new(backend::refused::Refused::new("pkcs11", error))
                }
                Err(e) => return Err(StartError::Backend(format!("pkcs11: {}", e.message))),
            }
        }
        BackendSettings::Aws(a) => {
            let opts = backend::aws::AwsOptions {
                key: a.key.clone(),
                decrypt_only_keys: a.decrypt_only_keys.clone(),
                region: a.region.clone(),
                endpoint: a.endpoint.clone(),
                encryption_context: a.encryption_context.clone(),
                call_timeout: a.call_timeout,
                attempt_timeout: a.attempt_timeout,
                max_attempts: a.max_attempts,
            };
            Arc::new(
                backend::aws::AwsBackend::connect(&opts)
                    .await
                    .map_err(StartError::Backend)?,
            )
        }
        BackendSettings::Vault(v) => {
            let v = v.clone();
            Arc::new(off_thread(move || backend::vault::VaultBackend::new(&v).map_err(StartError::Backend)).await?)
        }
        BackendSettings::Kmip(k) => {
            let k = k.clone();
            Arc::new(off_thread(move || backend::kmip::KmipBackend::new(&k).map_err(StartError::Backend)).await?)
        }
    };
    Ok(match settings.bench.backend_latency {
        Some(latency) => {
            warn!(
                latency_ms = latency.as_millis() as u64,
                "bench.backend_latency is set: every backend call is delayed"
            );
            Arc::new(backend::delay::Delayed::new(backend, latency))
        }
        None => backend,
    })
}

/// Runs a backend constructor on tokio's blocking pool: it reads and parses files (root keys,
/// PEMs, the system CA bundle), which must not hold up the async worker while a reload is
/// built beside calls being served.
async fn off_thread<T: Send + 'static>(
    build: impl FnOnce() -> Result<T, StartError> + Send + 'static,
) -> Result<T, StartError> {
    tokio::task::spawn_blocking(build)
        .await
        .map_err(|e| StartError::Backend(e.to_string()))?
}
