//! Turns the settings into what the process runs with: the backend, built one way for `serve`,
//! `check`, a live reload and `inventory --verify`.

use std::sync::Arc;

use tracing::warn;

use crate::backend::{self, Backend};
use crate::server;
use crate::settings::Settings;

/// Why the plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
    let backend = settings.backend.build().await.map_err(StartError::Backend)?;
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
