//! A backend wrapper that adds latency to every remote call, for benchmarks and tests that
//! need a slow remote KMS (cold-start bursts, coalescing). Enabled only by `[bench]` settings.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Backend, BackendError, Wrapped};
use crate::secret::Kek;

/// Delays `probe`, `wrap` and `unwrap` of the inner backend by a fixed latency.
pub struct Delayed {
    inner: Arc<dyn Backend>,
    latency: Duration,
}

impl Delayed {
    pub fn new(inner: Arc<dyn Backend>, latency: Duration) -> Self {
        Self { inner, latency }
    }
}

#[async_trait]
impl Backend for Delayed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn probe(&self) -> Result<String, BackendError> {
        tokio::time::sleep(self.latency).await;
        self.inner.probe().await
    }

    fn knows(&self, key_id: &str) -> bool {
        self.inner.knows(key_id)
    }

    fn refuses(&self, key_id: &str) -> Option<BackendError> {
        self.inner.refuses(key_id)
    }

    fn remembered(&self) -> Vec<(String, String)> {
        self.inner.remembered()
    }

    fn remember(&self, keys: Vec<(String, String)>) {
        self.inner.remember(keys)
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        tokio::time::sleep(self.latency).await;
        self.inner.wrap(kek).await
    }

    fn max_wrapped_len(&self) -> usize {
        self.inner.max_wrapped_len()
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        tokio::time::sleep(self.latency).await;
        self.inner.unwrap(key_id, blob).await
    }
}
