//! A backend that refuses every call with one stored error.
//!
//! Used when a token rejected the PIN at start-up: exiting would let the supervisor restart the
//! plugin and try the PIN again and again until the token locks. Instead the plugin stays up,
//! Status fails with the reason, and nothing is retried until an operator restarts it.

use async_trait::async_trait;

use super::{Backend, BackendError, Wrapped};
use crate::secret::Kek;

/// Fails every operation with `error`.
pub struct Refused {
    name: &'static str,
    error: BackendError,
}

impl Refused {
    pub fn new(name: &'static str, error: BackendError) -> Self {
        Self { name, error }
    }
}

#[async_trait]
impl Backend for Refused {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn probe(&self) -> Result<String, BackendError> {
        Err(self.error.clone())
    }

    // Every key_id gets the stored error (not "unknown key"), so callers see the real reason.
    fn knows(&self, _key_id: &str) -> bool {
        true
    }

    async fn wrap(&self, _kek: &Kek) -> Result<Wrapped, BackendError> {
        Err(self.error.clone())
    }

    async fn unwrap(&self, _key_id: &str, _blob: &[u8]) -> Result<Kek, BackendError> {
        Err(self.error.clone())
    }
}
