//! Azure Key Vault and Managed HSM backend (`azure_security_keyvault_keys`, `azure_identity`).
//!
//! The root key is a Key Vault key; its newest version is the current root key. A local KEK is
//! wrapped with `wrapKey` under that exact version (RSA-OAEP-256 on RSA keys; A256KW on a
//! Managed HSM's `oct-HSM` keys) and unwrapped with `unwrapKey` under the version named in the
//! key_id, so every version keeps decrypting until it is disabled.
//!
//! key_id = `{vault_url}/keys/{name}/{version}`, the version's `kid` on the configured vault URL:
//! it names the vault, the key and the version. The probe gets the key (its newest version), so
//! a new version (a manual rotation, or the vault's rotation policy) becomes current with no
//! restart; it also gets the older versions this process has used (a bounded number per probe,
//! round-robin), and a version that two reads in a row found disabled, deleted or without
//! `unwrapKey` is refused (`FailedPrecondition`) and its cached KEKs purged. Expiry and
//! not-before only stop wrapping, as in Key Vault: an expired current version fails the probe as
//! a set-up error and its data keeps decrypting. Only Key Vault's own 403 refusing the identity
//! is a permission refusal (`PermissionDenied`); see `error.rs` for the rest.

mod auth;
mod error;
mod transport;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::http::RequestContent;
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, Key, KeyClientGetKeyOptions, KeyClientWrapKeyOptions, KeyOperationParameters,
    KeyOperationResult, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions};
use serde::Deserialize;
use zeroize::Zeroizing;

pub use auth::AuthSettings;

use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::Kek;
use error::classify;

/// Key Vault REST API version: a GA version that has wrapKey/unwrapKey on vaults and Managed HSMs
/// (the SDK's default is a preview).
const API_VERSION: &str = "7.5";

/// Most key versions watched (the current one and older ones this process used).
const MAX_WATCHED: usize = 32;

/// Most older versions one probe reads, four at a time, round-robin over the watched ones: a
/// probe must end well within the core's 10 s limit on a backend call.
const PER_PROBE: usize = 8;

/// The time a probe may take, reads of older versions included; those not read by then are read
/// by the next probes.
const PROBE_BUDGET: Duration = Duration::from_secs(7);

/// `[backend]` with `type = "azure"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    /// `https://{vault}.vault.azure.net` or `https://{hsm}.managedhsm.azure.net`.
    pub vault_url: String,
    /// The key's name; its newest version is the current root key.
    pub key: String,
    /// Other keys of the same vault (names), kept to decrypt data wrapped under them.
    #[serde(default)]
    pub decrypt_only_keys: Vec<String>,
    /// `RSA-OAEP-256` (RSA keys: Key Vault, Managed HSM) or `A256KW` (a Managed HSM's 256-bit
    /// `oct-HSM` keys).
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// CA bundle for Key Vault's, Entra ID's and the identity endpoint's certificates; else the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// Connect to this address for the vault's host name instead of resolving it (a private
    /// endpoint without a private DNS zone). The certificate is still checked against the name.
    pub vault_ip: Option<IpAddr>,
    /// Each operation's deadline, retries included (the apiserver allows 3 s for a Decrypt).
    #[serde(
        default = "crate::backend::call_budget::call_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub call_timeout: Duration,
    /// Each HTTP attempt's deadline.
    #[serde(
        default = "crate::backend::call_budget::attempt_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub attempt_timeout: Duration,
    #[serde(default = "crate::backend::call_budget::max_attempts")]
    pub max_attempts: u32,
    pub auth: AuthSettings,
}

fn default_algorithm() -> String {
    "RSA-OAEP-256".into()
}

impl AzureSettings {
    /// Every file these settings name (for change detection by a reload).
    pub fn files(&self) -> Vec<PathBuf> {
        self.ca_file.iter().cloned().chain(self.auth.files()).collect()
    }

    pub async fn build(&self) -> Result<Arc<dyn Backend>, String> {
        let settings = self.clone();
        Ok(Arc::new(super::off_thread(move || AzureBackend::new(&settings)).await?))
    }
}

/// The wrapping algorithm, with the key types it works with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    RsaOaep256,
    A256Kw,
}

impl Algorithm {
    fn sdk(self) -> EncryptionAlgorithm {
        match self {
            Algorithm::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            Algorithm::A256Kw => EncryptionAlgorithm::A256Kw,
        }
    }

    fn fits(self, kty: &KeyType) -> bool {
        match self {
            Algorithm::RsaOaep256 => matches!(kty, KeyType::Rsa | KeyType::RsaHsm),
            Algorithm::A256Kw => matches!(kty, KeyType::Oct | KeyType::OctHsm),
        }
    }

    /// Longest wrapped KEK: an RSA-4096 block, or 32 bytes plus the 8-byte AES-KW block.
    fn max_wrapped(self) -> usize {
        match self {
            Algorithm::RsaOaep256 => 512,
            Algorithm::A256Kw => 40,
        }
    }
}

/// What the last two authoritative reads of one key version said (`Err(why)`: unusable). A
/// refusal takes effect only when both agree, so one odd answer never retires a version.
#[derive(Clone, Default)]
struct VersionState {
    last: Option<Result<(), String>>,
    previous: Option<Result<(), String>>,
}

impl VersionState {
    fn record(&mut self, reading: Result<(), String>) {
        self.previous = self.last.replace(reading);
    }

    fn refused(&self) -> Option<&str> {
        match (&self.last, &self.previous) {
            (Some(Err(why)), Some(Err(_))) => Some(why),
            _ => None,
        }
    }
}

/// A key in Key Vault or a Managed HSM.
pub struct AzureBackend {
    client: KeyClient,
    /// `scheme://host[:port]`, the key_ids' prefix.
    vault: String,
    key: String,
    /// The current key and the decrypt-only ones.
    names: Vec<String>,
    algorithm: Algorithm,
    call_timeout: Duration,
    /// The current root key's key_id, from the last good probe.
    current: Mutex<Option<String>>,
    /// By key_id: versions this process used, and what the probes read of them.
    versions: Mutex<HashMap<String, VersionState>>,
    /// Where the next probe's round of older versions begins.
    cursor: Mutex<usize>,
}

impl AzureBackend {
    /// Builds the clients and checks the settings (reads the credential files); Key Vault is
    /// first reached by the probe.
    pub fn new(s: &AzureSettings) -> Result<Self, String> {
        let url = reqwest::Url::parse(&s.vault_url).map_err(|e| format!("backend.vault_url: {e}"))?;
        let host = url
            .host_str()
            .filter(|_| url.scheme() == "https")
            .ok_or_else(|| format!("backend.vault_url: {:?} must be https://<vault host>", s.vault_url))?
            .to_ascii_lowercase();
        if url.path() != "/" || url.query().is_some() {
            return Err(format!("backend.vault_url: {:?} must have no path", s.vault_url));
        }
        let vault = match url.port() {
            Some(port) => format!("https://{host}:{port}"),
            None => format!("https://{host}"),
        };
        // The longest key_id (a 127-character name, a 64-character version) must fit the
        // apiserver's limit.
        if vault.len() + "/keys/".len() + 127 + 1 + 64 > crate::contract::MAX_KEY_ID {
            return Err(format!("backend.vault_url: {:?} is too long for a key_id", s.vault_url));
        }
        let algorithm = match s.algorithm.as_str() {
            "RSA-OAEP-256" => Algorithm::RsaOaep256,
            "A256KW" => Algorithm::A256Kw,
            other => return Err(format!("backend.algorithm: {other:?} is not RSA-OAEP-256 or A256KW")),
        };
        let mut names = vec![s.key.clone()];
        names.extend(s.decrypt_only_keys.iter().cloned());
        for (i, name) in names.iter().enumerate() {
            if !valid_name(name) {
                return Err(format!(
                    "backend: key name {name:?} is not a Key Vault key name (1-127 letters, digits, '-')"
                ));
            }
            if names[..i].contains(name) {
                return Err(format!("backend: key {name:?} is configured twice"));
            }
        }
        if s.call_timeout.is_zero() || s.attempt_timeout.is_zero() {
            return Err("backend.call_timeout and attempt_timeout must be above zero".into());
        }
        let options = transport::client_options(&transport::TransportSettings {
            ca_file: s.ca_file.as_deref(),
            pin: s.vault_ip.map(|ip| (host.as_str(), ip)),
            attempt_timeout: s.attempt_timeout,
            call_timeout: s.call_timeout,
            max_attempts: s.max_attempts,
        })?;
        let credential = s.auth.credential(options.clone())?;
        let key_options = KeyClientOptions {
            api_version: API_VERSION.into(),
            client_options: options,
            ..Default::default()
        };
        let client = KeyClient::new(&vault, credential, Some(key_options))
            .map_err(|e| format!("backend.vault_url: {}", error::bounded(&e.to_string(), 300)))?;
        Ok(Self {
            client,
            vault,
            key: s.key.clone(),
            names,
            algorithm,
            call_timeout: s.call_timeout,
            current: Mutex::new(None),
            versions: Mutex::new(HashMap::new()),
            cursor: Mutex::new(0),
        })
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, HashMap<String, VersionState>> {
        self.versions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key_id(&self, name: &str, version: &str) -> String {
        format!("{}/keys/{name}/{version}", self.vault)
    }

    /// (name, version) of a key_id of this vault and one of the configured keys.
    fn parse_key_id<'a>(&self, key_id: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key_id.strip_prefix(&self.vault)?.strip_prefix("/keys/")?;
        let (name, version) = rest.split_once('/')?;
        (self.names.iter().any(|n| n == name) && valid_version(version)).then_some((name, version))
    }

    /// Starts watching a version this process used (bounded).
    fn watch(&self, key_id: &str) {
        let mut versions = self.versions();
        if versions.len() < MAX_WATCHED || versions.contains_key(key_id) {
            versions.entry(key_id.to_string()).or_default();
        }
    }

    /// One SDK call under the call timeout; `sent` (the KEK, the blob) is cut out of its errors.
    async fn timed<T>(
        &self,
        what: &str,
        sent: &[&[u8]],
        call: impl std::future::Future<Output = azure_core::Result<T>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(result) => result.map_err(|e| classify(&e, what, sent)),
            Err(_) => Err(BackendError::new(
                ErrorKind::Transient,
                format!("azure {what}: no answer within {:?}", self.call_timeout),
            )),
        }
    }

    /// Gets a key version (the newest with `version` None) and judges it; records authoritative
    /// answers about whether it decrypts. Returns its key_id and whether it can wrap now
    /// (`Err(why)`: expired, not yet valid, no wrapKey in its key_ops).
    async fn read_key(&self, name: &str, version: Option<&str>) -> Result<(String, Result<(), String>), BackendError> {
        let options = KeyClientGetKeyOptions {
            key_version: version.map(str::to_string),
            ..Default::default()
        };
        let answer = self
            .timed("get key", &[], async {
                self.client.get_key(name, Some(options)).await?.into_model()
            })
            .await;
        let (key_id, verdict, can_wrap) = match answer.and_then(|key| self.judge(name, version, &key)) {
            Ok(judged) => judged,
            Err(e) => {
                // Key Vault's "no such key" about one version is a verdict on that version.
                if let (ErrorKind::KeyUnusable, Some(v)) = (e.kind, version) {
                    self.record(&self.key_id(name, v), Err(e.detail.clone()));
                }
                return Err(e);
            }
        };
        self.record(&key_id, verdict.as_ref().map(|_| ()).map_err(|e| e.detail.clone()));
        verdict.map(|()| (key_id, can_wrap))
    }

    /// Records an authoritative reading of a version (bounded).
    fn record(&self, key_id: &str, reading: Result<(), String>) {
        let mut versions = self.versions();
        if versions.len() < MAX_WATCHED || versions.contains_key(key_id) {
            versions.entry(key_id.to_string()).or_default().record(reading);
        }
    }

    /// A key bundle's key_id, whether that version can unwrap (the verdict recorded for older
    /// versions), and whether it can wrap now. An answer without what every key bundle has is
    /// transient, never a verdict.
    ///
    /// Key Vault applies `exp` and `nbf` to encrypt and wrap only: an expired version still
    /// unwraps, so its data (and a rotation policy's older versions) stays readable, and a jump
    /// of the local clock refuses nothing. A version is refused for decryption only when it is
    /// disabled, of a type the algorithm cannot use, or lacks `unwrapKey` in its key_ops (and
    /// when Key Vault says it no longer exists).
    #[allow(clippy::type_complexity)]
    fn judge(
        &self,
        name: &str,
        asked: Option<&str>,
        key: &Key,
    ) -> Result<(String, Result<(), BackendError>, Result<(), String>), BackendError> {
        let malformed =
            |why: &str| BackendError::new(ErrorKind::Transient, format!("azure get key: malformed answer ({why})"));
        let jwk = key.key.as_ref().ok_or_else(|| malformed("no key"))?;
        let kid = jwk.kid.as_deref().ok_or_else(|| malformed("no kid"))?;
        // The kid's last two segments are the name and version; its host may be the vault's
        // public name even behind a private endpoint, so only those are taken.
        let mut segments = kid.trim_end_matches('/').rsplit('/');
        let (version, kid_name) = (segments.next().unwrap_or(""), segments.next().unwrap_or(""));
        if !kid_name.eq_ignore_ascii_case(name) || !valid_version(version) || asked.is_some_and(|v| v != version) {
            return Err(malformed("kid names another key or version"));
        }
        let key_id = self.key_id(name, version);
        let attributes = key.attributes.as_ref().ok_or_else(|| malformed("no attributes"))?;
        let kty = jwk.kty.as_ref().ok_or_else(|| malformed("no kty"))?;
        let unusable = |why: String| {
            Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("azure key {key_id} {why}"),
            ))
        };
        let now = azure_core::time::OffsetDateTime::now_utc();
        let lacks = |op: &str| {
            jwk.key_ops
                .as_deref()
                .is_some_and(|ops| !ops.iter().any(|o| o.eq_ignore_ascii_case(op)))
        };
        let verdict = if !self.algorithm.fits(kty) {
            unusable(format!("is of type {kty:?}, which cannot do {:?}", self.algorithm))
        } else if lacks("unwrapKey") {
            unusable("does not allow unwrapKey (key_ops)".into())
        } else if attributes.enabled == Some(false) {
            unusable("is disabled".into())
        } else {
            Ok(())
        };
        let can_wrap = if lacks("wrapKey") {
            Err(format!("azure key {key_id} does not allow wrapKey (key_ops)"))
        } else if attributes.expires.is_some_and(|exp| exp <= now) {
            Err(format!("azure key {key_id} has expired (exp)"))
        } else if attributes.not_before.is_some_and(|nbf| nbf > now) {
            Err(format!("azure key {key_id} is not valid yet (nbf)"))
        } else {
            Ok(())
        };
        Ok((key_id, verdict, can_wrap))
    }

    #[allow(clippy::field_reassign_with_default)] // the model is #[non_exhaustive]
    fn parameters(&self, value: Vec<u8>) -> Result<RequestContent<KeyOperationParameters>, BackendError> {
        let mut params = KeyOperationParameters::default();
        params.algorithm = Some(self.algorithm.sdk());
        params.value = Some(value);
        params
            .try_into()
            .map_err(|e: azure_core::Error| BackendError::new(ErrorKind::Transient, format!("azure: request: {e}")))
    }

    /// The result of a wrap or unwrap, checked to come from the version asked (Key Vault's
    /// identifiers are case-insensitive), and the key_id the answer's `kid` confirms (None when
    /// it has no kid).
    fn result(
        &self,
        what: &str,
        name: &str,
        version: &str,
        out: KeyOperationResult,
    ) -> Result<(Vec<u8>, Option<String>), BackendError> {
        let confirmed = match out.kid.as_deref() {
            None => None,
            Some(kid) => {
                let mut segments = kid.trim_end_matches('/').rsplit('/');
                let (v, n, keys) = (segments.next(), segments.next(), segments.next());
                let same = v.is_some_and(|v| v.eq_ignore_ascii_case(version))
                    && n.is_some_and(|n| n.eq_ignore_ascii_case(name))
                    && keys == Some("keys");
                if !same {
                    return Err(BackendError::new(
                        ErrorKind::Transient,
                        format!("azure {what}: answered under another key version than asked"),
                    ));
                }
                Some(self.key_id(name, version))
            }
        };
        let value = out.result.ok_or_else(|| {
            BackendError::new(
                ErrorKind::Transient,
                format!("azure {what}: malformed answer (no value)"),
            )
        })?;
        Ok((value, confirmed))
    }

    /// The older versions the next probe reads: all of them, or [`PER_PROBE`] of them taken
    /// round-robin.
    fn next_round(&self, mut older: Vec<String>) -> Vec<String> {
        if older.len() <= PER_PROBE {
            return older;
        }
        older.sort();
        let mut cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
        let start = *cursor % older.len();
        *cursor = start + PER_PROBE;
        older.into_iter().cycle().skip(start).take(PER_PROBE).collect()
    }

    /// Reads an older version (`None`: nothing to read), recording what Key Vault says of it.
    async fn check_older(&self, key_id: Option<&String>) {
        if let Some((name, version)) = key_id.and_then(|k| self.parse_key_id(k))
            && let Err(e) = self.read_key(name, Some(version)).await
            && e.kind != ErrorKind::KeyUnusable
        {
            tracing::warn!(error = %e, "azure: could not read an older key version");
        }
    }
}

/// Key Vault key names: 1-127 letters, digits and dashes.
fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Key versions: 32 lower-case hex digits, as Key Vault and Managed HSM spell them. Identifiers
/// are case-insensitive to the service, so any other spelling would be an alias of a version.
fn valid_version(version: &str) -> bool {
    version.len() == 32 && version.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[async_trait]
impl Backend for AzureBackend {
    fn name(&self) -> &'static str {
        "azure"
    }

    /// Reads the current version, then up to [`PER_PROBE`] older versions this process used,
    /// four at a time, all within [`PROBE_BUDGET`]: disabled or deleted ones are refused. A
    /// current version that can no longer wrap (expired, not yet valid, no wrapKey) is an error
    /// of the set-up (`Configuration`): its data still decrypts, nothing is revoked.
    async fn probe(&self) -> Result<String, BackendError> {
        let deadline = tokio::time::Instant::now() + PROBE_BUDGET;
        let (current, can_wrap) = self.read_key(&self.key, None).await?;
        self.watch(&current);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = can_wrap.is_ok().then(|| current.clone());
        let older: Vec<String> = self.versions().keys().filter(|k| **k != current).cloned().collect();
        for wave in self.next_round(older).chunks(4) {
            let reads = async {
                tokio::join!(
                    self.check_older(wave.first()),
                    self.check_older(wave.get(1)),
                    self.check_older(wave.get(2)),
                    self.check_older(wave.get(3)),
                )
            };
            if tokio::time::timeout_at(deadline, reads).await.is_err() {
                tracing::warn!(
                    "azure: the probe ran out of time reading older key versions; the next probes read them"
                );
                break;
            }
        }
        can_wrap.map(|()| current).map_err(|why| {
            BackendError::new(
                ErrorKind::Configuration,
                format!("{why}: it still decrypts, but wraps nothing; make a new version current"),
            )
        })
    }

    fn knows(&self, key_id: &str) -> bool {
        self.parse_key_id(key_id).is_some()
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        self.names[1..]
            .iter()
            .map(|name| (String::new(), format!("{}/keys/{name}", self.vault)))
            .collect()
    }

    fn refuses(&self, key_id: &str) -> Option<BackendError> {
        let versions = self.versions();
        let why = versions.get(key_id)?.refused()?;
        Some(BackendError::new(ErrorKind::KeyUnusable, why.to_string()))
    }

    /// The versions watched, so a reloaded backend keeps reading them (and refusing the
    /// disabled ones) before they are used again.
    fn remembered(&self) -> Vec<(String, String)> {
        self.versions().keys().map(|id| (id.clone(), id.clone())).collect()
    }

    fn remember(&self, keys: Vec<(String, String)>) {
        for (key_id, _) in keys {
            if self.parse_key_id(&key_id).is_some() {
                self.watch(&key_id);
            }
        }
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let known = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let key_id = match known {
            Some(id) => id,
            None => self.probe().await?,
        };
        let (name, version) = self
            .parse_key_id(&key_id)
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "azure: current key_id does not parse"))?;
        let params = self.parameters(kek.expose().to_vec())?;
        let options = KeyClientWrapKeyOptions {
            key_version: Some(version.to_string()),
            ..Default::default()
        };
        let out = self
            .timed("wrapKey", &[&kek.expose()[..]], async {
                self.client.wrap_key(name, params, Some(options)).await?.into_model()
            })
            .await?;
        let (blob, _) = self.result("wrapKey", name, version, out)?;
        if blob.is_empty() || blob.len() > self.algorithm.max_wrapped() {
            return Err(BackendError::new(
                ErrorKind::Transient,
                format!("azure wrapKey: malformed answer ({} bytes)", blob.len()),
            ));
        }
        Ok(Wrapped { key_id, blob })
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let (name, version) = self.parse_key_id(key_id).ok_or_else(|| {
            BackendError::new(
                ErrorKind::UnknownKey,
                "azure: key_id names no configured key of this vault",
            )
        })?;
        if let Some(e) = self.refuses(key_id) {
            return Err(e);
        }
        if blob.is_empty() || blob.len() > self.algorithm.max_wrapped() {
            return Err(BackendError::new(
                ErrorKind::BadWrappedKey,
                "azure: wrapped KEK has the wrong length",
            ));
        }
        let params = self.parameters(blob.to_vec())?;
        let out = self
            .timed("unwrapKey", &[blob], async {
                self.client.unwrap_key(name, version, params, None).await?.into_model()
            })
            .await?;
        let (plain, confirmed) = self.result("unwrapKey", name, version, out)?;
        let plain = Zeroizing::new(plain);
        let kek = Kek::from_bytes(&plain).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Transient,
                "azure unwrapKey: malformed answer (unwrapped KEK has the wrong length)",
            )
        })?;
        // Watched only as the vault's answer named it: never a spelling the caller chose.
        if let Some(key_id) = confirmed {
            self.watch(&key_id);
        }
        Ok(kek)
    }

    fn max_wrapped_len(&self) -> usize {
        self.algorithm.max_wrapped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_refused_only_after_two_reads_agree() {
        let mut s = VersionState::default();
        s.record(Err("disabled".into()));
        assert!(s.refused().is_none());
        s.record(Err("disabled".into()));
        assert_eq!(s.refused(), Some("disabled"));
        s.record(Ok(()));
        assert!(s.refused().is_none());
    }

    #[test]
    fn names_and_versions() {
        assert!(valid_name("kms-root-1"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
        assert!(valid_version("0123456789abcdef0123456789abcdef"));
        assert!(!valid_version("../x"));
        // Aliases of a version (Key Vault's identifiers are case-insensitive) are not versions.
        assert!(!valid_version("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_version("0123456789abcdef0123456789abcdef0"));
    }

    fn backend() -> AzureBackend {
        let settings: AzureSettings = serde_json::from_value(serde_json::json!({
            "vault_url": "https://kv.vault.azure.net",
            "key": "k",
            "auth": {"method": "managed_identity"},
        }))
        .unwrap();
        AzureBackend::new(&settings).unwrap()
    }

    const VERSION: &str = "0123456789abcdef0123456789abcdef";

    fn bundle(attributes: &str, ops: &str) -> Key {
        serde_json::from_str(&format!(
            r#"{{"key":{{"kid":"https://kv.vault.azure.net/keys/k/{VERSION}","kty":"RSA","key_ops":{ops}}},"attributes":{attributes}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn expiry_stops_wrapping_never_unwrapping() {
        let b = backend();
        let all = r#"["wrapKey","unwrapKey"]"#;
        let judged = |attributes: &str, ops: &str| {
            let (key_id, decrypts, wraps) = b.judge("k", None, &bundle(attributes, ops)).unwrap();
            assert_eq!(key_id, format!("https://kv.vault.azure.net/keys/k/{VERSION}"));
            (decrypts.is_ok(), wraps.is_ok())
        };
        assert_eq!(judged(r#"{"enabled":true}"#, all), (true, true));
        // Expired, not yet valid (whatever the local clock says): still decrypts.
        assert_eq!(judged(r#"{"enabled":true,"exp":1000}"#, all), (true, false));
        assert_eq!(judged(r#"{"enabled":true,"nbf":99999999999}"#, all), (true, false));
        // An older version needs unwrapKey only.
        assert_eq!(judged(r#"{"enabled":true}"#, r#"["unwrapKey"]"#), (true, false));
        assert_eq!(judged(r#"{"enabled":true}"#, r#"["wrapKey"]"#), (false, true));
        assert_eq!(judged(r#"{"enabled":false}"#, all), (false, true));
    }

    #[test]
    fn answers_are_matched_case_insensitively_and_name_the_canonical_key_id() {
        let b = backend();
        let out = |kid: &str| -> KeyOperationResult {
            serde_json::from_str(&format!(r#"{{"kid":"{kid}","value":"AAAA"}}"#)).unwrap()
        };
        let upper = format!("https://KV.vault.azure.net/keys/K/{}", VERSION.to_uppercase());
        let (_, confirmed) = b.result("unwrapKey", "k", VERSION, out(&upper)).unwrap();
        assert_eq!(
            confirmed.as_deref(),
            Some(format!("https://kv.vault.azure.net/keys/k/{VERSION}").as_str())
        );
        let other = "https://kv.vault.azure.net/keys/k/ffffffffffffffffffffffffffffffff";
        assert!(b.result("unwrapKey", "k", VERSION, out(other)).is_err());
        // An alias of a version is not a key_id of this backend: never unwrapped, never watched.
        assert!(!b.knows(&format!("https://kv.vault.azure.net/keys/k/{}", VERSION.to_uppercase())));
    }

    #[test]
    fn older_versions_are_read_round_robin() {
        let b = backend();
        let older: Vec<String> = (0..20).map(|i| format!("v{i:02}")).collect();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 {
            let round = b.next_round(older.clone());
            assert_eq!(round.len(), PER_PROBE);
            seen.extend(round);
        }
        assert_eq!(seen.len(), 20, "three rounds of 8 cover 20 versions");
        assert_eq!(b.next_round(older[..3].to_vec()).len(), 3);
    }
}
