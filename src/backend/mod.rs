//! Remote KMS backends: where the root key lives and never leaves.
//!
//! A backend does four things: names its current root key (`probe`), wraps a local KEK under
//! that key, unwraps a wrapped KEK under a named key, and says which key_ids it can unwrap
//! under. Everything else (caching, rotation, the wire) lives in the core, written once.
//!
//! Each backend is one module that owns its `[backend]` settings type (serde, with the fields
//! beside `type`), that type's `files()` (for reload's change detection) and `build()` (its
//! constructor). Adding a backend is that module, `pub mod` here, and one line in the
//! `backends!` list in `settings.rs`, which derives the enum, the `type` names, parsing,
//! `files()` and `build()` from it. A backend whose keys change at run time (a probe finds a
//! new current key, a reload hands over learned ones) keeps them in a `registry::KeyRegistry`.

pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod delay;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod kmip;
pub mod local;
pub mod pkcs11;
pub mod refused;
pub mod registry;
#[cfg(any(feature = "gcp", feature = "azure"))]
pub mod said;
pub mod tls;
pub mod vault;

use async_trait::async_trait;

use crate::secret::Kek;

/// A wrapped local KEK and the root key_id it was wrapped under.
pub struct Wrapped {
    /// key_id of the root key that wrapped the KEK; reported to the apiserver.
    pub key_id: String,
    /// Opaque bytes only the same backend (and root key) can unwrap.
    pub blob: Vec<u8>,
}

/// What a backend failure means for the caller; decides the gRPC code and whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network, throttling, timeout: worth retrying, the key is fine.
    Transient,
    /// The backend refused us (credentials, policy, wrong PIN).
    Denied,
    /// The plugin's own set-up is incomplete (no credentials to sign with): nothing the key
    /// manager said, so not a revocation; retrying helps only once someone fixes it.
    Configuration,
    /// The root key exists but cannot be used (disabled, pending deletion, destroyed).
    KeyUnusable,
    /// The key_id does not name a root key this backend was configured with.
    UnknownKey,
    /// The wrapped bytes do not unwrap under the named key (tampered or foreign).
    BadWrappedKey,
}

/// A backend failure. `detail` is for logs only and must not contain key material.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct BackendError {
    pub kind: ErrorKind,
    pub detail: String,
}

impl BackendError {
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// A root-key holder. Implementations must be cheap to share (`Arc<dyn Backend>`).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs: "local", "pkcs11", "aws".
    fn name(&self) -> &'static str;

    /// Health probe: reaches the root key store and returns the current root key_id.
    /// May make a remote round trip; only background tasks call it.
    async fn probe(&self) -> Result<String, BackendError>;

    /// Whether `key_id` names a root key this backend can unwrap under (current or older).
    fn knows(&self, key_id: &str) -> bool;

    /// Wraps `kek` under the current root key.
    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError>;

    /// Unwraps `blob` under the root key named `key_id`.
    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError>;

    /// The configured root keys other than the current one, as (key_id, the name the
    /// configuration gives it), so an operator can confirm a key added for a rotation before
    /// making it current. key_id is empty while not yet resolved.
    fn decrypt_only(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Why `key_id`, a key this backend knows, must not be used now (a version retired by the
    /// key manager, a deleted key), from what the last probe saw. In memory: called on every
    /// Decrypt, before the KEK cache.
    fn refuses(&self, _key_id: &str) -> Option<BackendError> {
        None
    }

    /// Keys this instance learned at run time beyond its configuration (an alias or a name that
    /// moved to a new key), as (key_id, locator) pairs, so a reloaded backend keeps them.
    fn remembered(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Takes over what [`Backend::remembered`] returned from the backend this one replaces.
    fn remember(&self, _keys: Vec<(String, String)>) {}

    /// Longest wrapped KEK this backend produces; longer ones are refused before any call.
    fn max_wrapped_len(&self) -> usize {
        crate::contract::MAX_WRAPPED_KEK
    }
}

/// Defaults of the call budget the network backends share (vault and kmip take only the call
/// timeout): a whole call, retries included, well inside the 3 s the apiserver allows a Decrypt.
pub(crate) mod call_budget {
    use std::time::Duration;

    pub fn call_timeout() -> Duration {
        Duration::from_millis(2000)
    }

    pub fn attempt_timeout() -> Duration {
        Duration::from_millis(700)
    }

    pub fn max_attempts() -> u32 {
        3
    }
}

/// Runs a backend constructor on tokio's blocking pool: constructors read and parse files (root
/// keys, PEMs, the system CA bundle), which must not hold up the async workers while a reload is
/// built beside calls being served.
pub(crate) async fn off_thread<T: Send + 'static>(
    build: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(build).await.map_err(|e| e.to_string())?
}
