//! Google Cloud KMS backend (`google-cloud-kms-v1`, REST), behind the `gcp` cargo feature.
//!
//! The root key is a symmetric `ENCRYPT_DECRYPT` CryptoKey. key_id is the resource name of the
//! CryptoKeyVersion that wrapped (`projects/…/cryptoKeys/k/cryptoKeyVersions/3`): it names the
//! key and the version, the same on every node. The probe reads the key (`GetCryptoKey`), so
//! moving its primary (a manual or scheduled rotation) changes the current key_id within one
//! probe interval, with no restart; a primary that is disabled or destroyed is an authoritative
//! refusal.
//!
//! A local KEK is wrapped with `Encrypt` named on the current primary *version*, with the
//! key_id as additional authenticated data, so an annotation that names another version or key
//! never unwraps. CRC32C integrity fields go both ways, as Google documents: what we send is
//! checksummed and must come back verified, what we get is checked against its checksum.
//!
//! Older versions: the service picks the version from the ciphertext on `Decrypt`. Which of them
//! are still usable is not in `GetCryptoKey` (and listing versions needs more than the
//! least-privilege role), so the backend keeps one wrapped KEK of each older version it has
//! seen (at most [`WATCHED`]) and the probe unwraps it again, a few versions a probe
//! ([`RECHECKS`], in turn): a version the service refuses twice in a row is refused on every
//! Decrypt, and the core purges its cached KEKs. Only the probe's own samples count: a Decrypt
//! request pairs a key_id with a blob of its choosing (the service checks the version named
//! inside the ciphertext before the AAD), so its refusal says nothing about the key_id.
//!
//! `FAILED_PRECONDITION` means "version not enabled" for keys held by Cloud KMS, but Cloud EKM
//! also reports an unreachable external key manager with it; for `EXTERNAL` and
//! `EXTERNAL_VPC` keys it is an outage, never a refusal.

mod credentials;
use super::said;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::options::RequestOptionsBuilder;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_kms_v1::client::KeyManagementService;
use google_cloud_kms_v1::model::crypto_key::CryptoKeyPurpose;
use google_cloud_kms_v1::model::crypto_key_version::CryptoKeyVersionState;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::Kek;

/// Older versions whose usability the probe re-checks.
pub const WATCHED: usize = 16;

/// Older versions re-checked per probe (one Decrypt each), in turn: keeps a probe within a few
/// call timeouts however many versions are watched.
pub const RECHECKS: usize = 4;

/// Longest CryptoKey name accepted: its version names are key_ids, which the apiserver caps at
/// 1 KiB.
const MAX_KEY_NAME: usize = 900;

/// A wrapped KEK is AES-256-GCM output plus the service's framing: well under a hundred bytes
/// for 32 bytes of plaintext. Anything near this bound is not a Cloud KMS ciphertext.
const MAX_WRAPPED: usize = 512;

/// `[backend]` with `type = "gcp"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpSettings {
    /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`: its primary version wraps new KEKs.
    pub key: String,
    /// Other CryptoKeys (same form), kept to decrypt data written under them. Older versions of
    /// `key` need no entry: they decrypt for as long as they are enabled.
    #[serde(default)]
    pub decrypt_only_keys: Vec<String>,
    /// A service-account key or workload identity federation (`external_account`) JSON file;
    /// otherwise application default credentials (GOOGLE_APPLICATION_CREDENTIALS, the
    /// metadata server).
    pub credentials_file: Option<PathBuf>,
    /// Endpoint override (Private Service Connect, a regional endpoint, a test server).
    pub endpoint: Option<String>,
    #[serde(
        default = "crate::backend::call_budget::call_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub call_timeout: Duration,
    #[serde(
        default = "crate::backend::call_budget::attempt_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub attempt_timeout: Duration,
    #[serde(default = "crate::backend::call_budget::max_attempts")]
    pub max_attempts: u32,
}

impl GcpSettings {
    /// The credentials file, if one is named (ADC's own file is the SDK's to read).
    pub fn files(&self) -> Vec<PathBuf> {
        self.credentials_file.iter().cloned().collect()
    }

    pub async fn build(&self) -> Result<Arc<dyn Backend>, String> {
        Ok(Arc::new(GcpBackend::connect(self).await?))
    }
}

/// What the backend has seen of one older version.
struct Watched {
    /// A KEK wrapped under it, unwrapped again by the probe.
    sample: Vec<u8>,
    /// The last authoritative refusals in a row (0 while it unwraps).
    refusals: u8,
    why: String,
}

#[derive(Default)]
struct State {
    /// The primary version the last probe found enabled.
    current: Option<String>,
    /// The key is held outside Google (Cloud EKM): FAILED_PRECONDITION is then an outage.
    external: bool,
    /// Where the next probe's re-checks start in `order`.
    cursor: usize,
    /// By version name; insertion order kept in `order` to evict the oldest.
    watched: HashMap<String, Watched>,
    order: Vec<String>,
}

/// A CryptoKey in Google Cloud KMS.
pub struct GcpBackend {
    client: KeyManagementService,
    key: String,
    /// Every configured CryptoKey, the current one first.
    keys: Vec<String>,
    state: Mutex<State>,
}

/// Checks `name` is `projects/*/locations/*/keyRings/*/cryptoKeys/*` with plain ids.
fn check_key_name(setting: &str, name: &str) -> Result<(), String> {
    if name.len() > MAX_KEY_NAME {
        return Err(format!("backend.{setting}: longer than {MAX_KEY_NAME} characters"));
    }
    let parts: Vec<&str> = name.split('/').collect();
    let shape = ["projects", "", "locations", "", "keyRings", "", "cryptoKeys", ""];
    let ok = parts.len() == shape.len()
        && parts.iter().zip(shape).all(|(part, want)| {
            if want.is_empty() {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            } else {
                *part == want
            }
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "backend.{setting}: {name:?} is not a CryptoKey name (projects/P/locations/L/keyRings/R/cryptoKeys/K)"
        ))
    }
}

/// The CryptoKey a version name belongs to, if `version` is `<key>/cryptoKeyVersions/<digits>`.
fn key_of(version: &str) -> Option<&str> {
    let (key, id) = version.rsplit_once("/cryptoKeyVersions/")?;
    (!id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())).then_some(key)
}

fn crc32c(bytes: &[u8]) -> i64 {
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    i64::from(CRC.checksum(bytes))
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks `endpoint` is `https://…`, or `http://` to a loopback address: a KEK is sent there.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let loopback = ["http://127.0.0.1", "http://[::1]", "http://localhost"];
    let ok = endpoint.starts_with("https://")
        || loopback.iter().any(|l| {
            endpoint
                .strip_prefix(l)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "backend.endpoint {endpoint:?}: must be https:// (http:// only to a loopback address)"
        ))
    }
}

/// What a failed call means for the key, and a log line without anything we sent. `external`:
/// the key is in Cloud EKM, where FAILED_PRECONDITION also means "external manager unreachable".
fn classify(e: &google_cloud_kms_v1::Error, what: &str, sent: &[&[u8]], external: bool) -> BackendError {
    if let Some(status) = e.status() {
        let kind = match status.code {
            Code::FailedPrecondition if external => ErrorKind::Transient,
            Code::FailedPrecondition | Code::NotFound => ErrorKind::KeyUnusable,
            Code::PermissionDenied => ErrorKind::Denied,
            // A token the service did not accept: clock skew or an expired federation token as
            // often as a wrong account; the set-up to fix, never a revocation.
            Code::Unauthenticated => ErrorKind::Configuration,
            // Decrypt's answer to a ciphertext that fails under the key and AAD.
            Code::InvalidArgument if what == "Decrypt" => ErrorKind::BadWrappedKey,
            Code::InvalidArgument => ErrorKind::Configuration,
            // Unavailable, DeadlineExceeded, ResourceExhausted (quota), Internal, Aborted …
            _ => ErrorKind::Transient,
        };
        let detail = format!(
            "gcp {what}: {}: {}",
            status.code.name(),
            said::said(&status.message, sent)
        );
        return BackendError::new(kind, detail);
    }
    if e.is_authentication() {
        // No token: the credentials' set-up (or the metadata server) is at fault, not the key.
        let detail = format!("gcp {what}: no access token: {}", said::said(&e.to_string(), sent));
        return BackendError::new(ErrorKind::Configuration, detail);
    }
    let detail = match e.http_status_code() {
        // An HTTP error without a Google error body: a proxy's page says nothing about the key.
        Some(code) => format!("gcp {what}: HTTP {code} without a Cloud KMS error body"),
        None => format!("gcp {what}: {}", said::said(&super::tls::error_chain(e), sent)),
    };
    BackendError::new(ErrorKind::Transient, detail)
}

fn malformed(what: &str, why: &str) -> BackendError {
    BackendError::new(ErrorKind::Transient, format!("gcp {what}: malformed answer ({why})"))
}

impl GcpBackend {
    /// Builds the client; an unreachable service does not stop start-up (the probe retries),
    /// a key that is missing, disabled or of the wrong purpose does.
    pub async fn connect(s: &GcpSettings) -> Result<Self, String> {
        check_key_name("key", &s.key)?;
        if let Some(endpoint) = &s.endpoint {
            check_endpoint(endpoint)?;
        }
        if s.call_timeout.is_zero() || s.attempt_timeout.is_zero() {
            return Err("backend: call_timeout and attempt_timeout must be more than zero".into());
        }
        let mut keys = vec![s.key.clone()];
        for k in &s.decrypt_only_keys {
            check_key_name("decrypt_only_keys", k)?;
            if keys.contains(k) {
                return Err(format!("backend: CryptoKey {k:?} is configured twice"));
            }
            keys.push(k.clone());
        }
        // The SDK signs service-account tokens and speaks TLS through rustls' process-wide
        // provider; this crate uses ring everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let credentials = credentials::build(s.credentials_file.as_deref()).await?;
        let backoff = ExponentialBackoffBuilder::new()
            .with_initial_delay(Duration::from_millis(50))
            .with_maximum_delay(Duration::from_millis(400))
            .build()
            .map_err(|e| format!("gcp: {e}"))?;
        let mut builder = KeyManagementService::builder()
            .with_credentials(credentials)
            .with_retry_policy(
                Aip194Strict
                    .with_attempt_limit(s.max_attempts.max(1))
                    .with_time_limit(s.call_timeout),
            )
            .with_backoff_policy(backoff)
            .with_attempt_timeout(s.attempt_timeout);
        if let Some(endpoint) = &s.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        // A redirect would replay an Encrypt, KEK and all, to wherever it points.
        let builder = google_cloud_gax::client_builder::internal::with_follow_redirects(builder, false);
        let client = builder.build().await.map_err(|e| format!("gcp: client: {e}"))?;
        let backend = Self {
            client,
            key: s.key.clone(),
            keys,
            state: Mutex::new(State::default()),
        };
        match backend.primary().await {
            Ok(_) => {}
            Err(e) if matches!(e.kind, ErrorKind::Transient | ErrorKind::Configuration) => {
                tracing::warn!(error = %e, "gcp: key not read at start-up; will retry in the background")
            }
            Err(e) => return Err(e.detail),
        }
        Ok(backend)
    }

    /// GetCryptoKey: the enabled primary version of the configured key.
    async fn primary(&self) -> Result<String, BackendError> {
        let key = self
            .client
            .get_crypto_key()
            .set_name(&self.key)
            .with_idempotency(true)
            .send()
            .await
            .map_err(|e| classify(&e, "GetCryptoKey", &[], self.external()))?;
        if key.name != self.key {
            return Err(malformed("GetCryptoKey", "the answer names another key"));
        }
        if key.purpose != CryptoKeyPurpose::EncryptDecrypt {
            return Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("gcp key {} is not an ENCRYPT_DECRYPT key ({:?})", self.key, key.purpose),
            ));
        }
        let Some(primary) = key.primary else {
            return Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("gcp key {} has no primary version", self.key),
            ));
        };
        if key_of(&primary.name) != Some(self.key.as_str()) {
            return Err(malformed("GetCryptoKey", "the primary is not a version of the key"));
        }
        match primary.state {
            CryptoKeyVersionState::Enabled => {}
            CryptoKeyVersionState::Disabled
            | CryptoKeyVersionState::Destroyed
            | CryptoKeyVersionState::DestroyScheduled => {
                return Err(BackendError::new(
                    ErrorKind::KeyUnusable,
                    format!("gcp primary version {} is {:?}", primary.name, primary.state),
                ));
            }
            // Pending generation or import, or a state this SDK does not know: nothing
            // authoritative about the key.
            other => {
                return Err(BackendError::new(
                    ErrorKind::Transient,
                    format!("gcp primary version {} is {other:?}", primary.name),
                ));
            }
        }
        {
            use google_cloud_kms_v1::model::ProtectionLevel;
            let mut state = lock(&self.state);
            state.current = Some(primary.name.clone());
            state.external = matches!(
                primary.protection_level,
                ProtectionLevel::External | ProtectionLevel::ExternalVpc
            );
        }
        Ok(primary.name)
    }

    /// Remembers `blob` as the sample of `version` (first one seen), evicting the oldest.
    fn watch(&self, version: &str, blob: &[u8]) {
        let mut state = lock(&self.state);
        if state.watched.contains_key(version) {
            return;
        }
        if state.order.len() >= WATCHED {
            let oldest = state.order.remove(0);
            state.watched.remove(&oldest);
        }
        state.order.push(version.to_string());
        state.watched.insert(
            version.to_string(),
            Watched {
                sample: blob.to_vec(),
                refusals: 0,
                why: String::new(),
            },
        );
    }

    fn external(&self) -> bool {
        lock(&self.state).external
    }

    /// Records what the probe's unwrap of `version`'s own sample said about the version.
    fn note(&self, version: &str, outcome: &Result<Kek, BackendError>) {
        let mut state = lock(&self.state);
        let Some(w) = state.watched.get_mut(version) else {
            return;
        };
        match outcome {
            Ok(_) => w.refusals = 0,
            Err(e) if e.kind == ErrorKind::KeyUnusable => {
                w.refusals = w.refusals.saturating_add(1);
                w.why = e.detail.clone();
            }
            Err(_) => {}
        }
    }

    async fn decrypt(&self, version: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let key = key_of(version).ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "gcp: not a version name"))?;
        let answer = self
            .client
            .decrypt()
            .set_name(key)
            .set_ciphertext(bytes::Bytes::copy_from_slice(blob))
            .set_ciphertext_crc32c(crc32c(blob))
            .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(version.as_bytes()))
            .set_additional_authenticated_data_crc32c(crc32c(version.as_bytes()))
            .with_idempotency(true)
            .send()
            .await
            .map_err(|e| classify(&e, "Decrypt", &[blob], self.external()))?;
        let plain = Zeroizing::new(answer.plaintext.to_vec());
        if answer.plaintext_crc32c != Some(crc32c(&plain)) {
            return Err(malformed("Decrypt", "the plaintext does not match its CRC32C"));
        }
        Kek::from_bytes(&plain).ok_or_else(|| malformed("Decrypt", "the unwrapped KEK has the wrong length"))
    }

    /// Unwraps the samples of up to [`RECHECKS`] watched older versions again (in turn across
    /// probes), so a version disabled since is refused even while its KEKs are cached.
    async fn recheck_older(&self, current: &str) {
        let samples: Vec<(String, Vec<u8>)> = {
            let mut state = lock(&self.state);
            let older: Vec<String> = state.order.iter().filter(|v| v.as_str() != current).cloned().collect();
            if older.is_empty() {
                return;
            }
            let start = state.cursor % older.len();
            let picked: Vec<String> = older
                .iter()
                .cycle()
                .skip(start)
                .take(RECHECKS.min(older.len()))
                .cloned()
                .collect();
            state.cursor = start + picked.len();
            picked
                .into_iter()
                .filter_map(|v| state.watched.get(&v).map(|w| (v.clone(), w.sample.clone())))
                .collect()
        };
        for (version, sample) in samples {
            let outcome = self.decrypt(&version, &sample).await;
            if let Err(e) = &outcome
                && e.kind == ErrorKind::KeyUnusable
            {
                tracing::warn!(error = %e, "gcp: an older key version refuses to decrypt");
            }
            self.note(&version, &outcome);
        }
    }
}

#[async_trait]
impl Backend for GcpBackend {
    fn name(&self) -> &'static str {
        "gcp"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        let current = self.primary().await?;
        self.recheck_older(&current).await;
        Ok(current)
    }

    fn knows(&self, key_id: &str) -> bool {
        key_of(key_id).is_some_and(|key| self.keys.iter().any(|k| k == key))
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        self.keys[1..].iter().map(|k| (String::new(), k.clone())).collect()
    }

    fn refuses(&self, key_id: &str) -> Option<BackendError> {
        let state = lock(&self.state);
        let w = state.watched.get(key_id)?;
        (w.refusals >= 2).then(|| BackendError::new(ErrorKind::KeyUnusable, w.why.clone()))
    }

    fn max_wrapped_len(&self) -> usize {
        MAX_WRAPPED
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let current = lock(&self.state).current.clone();
        let version = match current {
            Some(v) => v,
            None => self.primary().await?,
        };
        let answer = self
            .client
            .encrypt()
            .set_name(&version)
            .set_plaintext(bytes::Bytes::copy_from_slice(kek.expose()))
            .set_plaintext_crc32c(crc32c(kek.expose()))
            .set_additional_authenticated_data(bytes::Bytes::copy_from_slice(version.as_bytes()))
            .set_additional_authenticated_data_crc32c(crc32c(version.as_bytes()))
            .with_idempotency(true)
            .send()
            .await
            .map_err(|e| classify(&e, "Encrypt", &[kek.expose()], self.external()))?;
        if !answer.verified_plaintext_crc32c || !answer.verified_additional_authenticated_data_crc32c {
            // Google: the request was corrupted on its way; retrying is safe.
            return Err(malformed("Encrypt", "the service did not verify what was sent"));
        }
        if answer.name != version {
            return Err(malformed("Encrypt", "the answer names another version"));
        }
        if answer.ciphertext_crc32c != Some(crc32c(&answer.ciphertext)) {
            return Err(malformed("Encrypt", "the ciphertext does not match its CRC32C"));
        }
        if answer.ciphertext.is_empty() || answer.ciphertext.len() > MAX_WRAPPED {
            return Err(malformed("Encrypt", "ciphertext of an impossible length"));
        }
        self.watch(&version, &answer.ciphertext);
        Ok(Wrapped {
            key_id: version,
            blob: answer.ciphertext.to_vec(),
        })
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        if !self.knows(key_id) {
            return Err(BackendError::new(ErrorKind::UnknownKey, "gcp: key_id not configured"));
        }
        let outcome = self.decrypt(key_id, blob).await;
        // A blob that unwraps under key_id's AAD was wrapped for that version: a fair sample.
        // A refusal here is not noted (see the module docs).
        if outcome.is_ok() {
            self.watch(key_id, blob);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_are_checked() {
        let good = "projects/p-1/locations/global/keyRings/r_1/cryptoKeys/k.1";
        assert!(check_key_name("key", good).is_ok());
        for bad in [
            "projects/p/locations/global/keyRings/r/cryptoKeys/",
            "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "projects/p/locations/global/keyRings/r/keys/k",
            "projects/p/locations/global/keyRings/r/cryptoKeys/k?x=1",
            "",
        ] {
            assert!(check_key_name("key", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_name_their_key() {
        let key = "projects/p/locations/l/keyRings/r/cryptoKeys/k";
        assert_eq!(key_of(&format!("{key}/cryptoKeyVersions/12")), Some(key));
        assert_eq!(key_of(&format!("{key}/cryptoKeyVersions/")), None);
        assert_eq!(key_of(&format!("{key}/cryptoKeyVersions/1a")), None);
        assert_eq!(key_of(key), None);
    }

    #[test]
    fn endpoints_are_https_or_loopback() {
        for ok in [
            "https://cloudkms.googleapis.com",
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:1/x",
        ] {
            assert!(check_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://kms.example",
            "http://127.0.0.1.evil.example",
            "http://localhost.evil",
            "ftp://x",
            "",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // RFC 3720's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
