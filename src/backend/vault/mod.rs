//! HashiCorp Vault / OpenBao Transit backend.
//!
//! The root key is a Transit key (`{mount}/keys/{key}`); it never leaves Vault. A local KEK is
//! wrapped with `encrypt/{key}` pinned to the key's latest version, with `associated_data`
//! binding the key_id, and unwrapped with `decrypt/{key}`. The key must be an AEAD type
//! (`aes256-gcm96`, the default, `aes128-gcm96`, `chacha20-poly1305`, `xchacha20-poly1305`).
//!
//! key_id = `vault:` + 128 bits of a SHA-256 of (namespace, mount, key name) + `:v` + version +
//! `:` + 32 bits of a SHA-256 of that version's creation time. So it is the same on every node
//! and behind every address of an HA cluster, differs for every key and version, and a key
//! deleted and re-created under the same name gets new key_ids. The probe reads the key, so a
//! `rotate` (or `auto_rotate_period`) changes Status's key_id within one probe interval, with
//! no restart. A version below the key's `min_decryption_version`, or a deleted key, is
//! refused (`FailedPrecondition`) and its cached KEKs purged.

mod auth;
mod http;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper::Method;
use ring::digest;
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

pub use auth::AuthSettings;

use super::tls::TlsSettings;
use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::Kek;
use auth::Auth;
use http::{Endpoint, Http, Reply, kind_of};

const ID_DOMAIN: &[u8] = b"kms-plugin/vault-key-id/v1\0";
const AEAD_TYPES: [&str; 4] = [
    "aes256-gcm96",
    "aes128-gcm96",
    "chacha20-poly1305",
    "xchacha20-poly1305",
];

/// `[backend]` with `type = "vault"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSettings {
    /// `https://vault.example:8200` (`http://` only to a loopback address).
    pub address: String,
    /// TLS: see [`TlsSettings`] (read through [`VaultSettings::tls`]). The client certificate
    /// serves mutual TLS and the `cert` auth method.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub tls_server_name: Option<String>,
    /// Vault Enterprise / OpenBao namespace.
    pub namespace: Option<String>,
    /// Where the Transit engine is mounted.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The Transit key that wraps new KEKs.
    pub key: String,
    /// Older Transit keys (names), kept to decrypt data written under them.
    #[serde(default)]
    pub decrypt_only_keys: Vec<String>,
    /// Each Vault call's deadline (the apiserver allows 3 s for the whole Decrypt).
    #[serde(
        default = "crate::backend::call_budget::call_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub call_timeout: Duration,
    pub auth: AuthSettings,
}

impl VaultSettings {
    pub async fn build(&self) -> Result<std::sync::Arc<dyn Backend>, String> {
        let settings = self.clone();
        Ok(std::sync::Arc::new(
            super::off_thread(move || VaultBackend::new(&settings)).await?,
        ))
    }

    /// Every file these settings name (for change detection by a reload).
    pub fn files(&self) -> Vec<PathBuf> {
        self.tls().files().into_iter().chain(self.auth.files()).collect()
    }

    /// The TLS fields, as the type every network backend shares.
    pub fn tls(&self) -> TlsSettings {
        TlsSettings {
            ca_file: self.ca_file.clone(),
            client_cert_file: self.client_cert_file.clone(),
            client_key_file: self.client_key_file.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
}

fn default_mount() -> String {
    "transit".into()
}

/// What one well-formed read of a Transit key said.
#[derive(Clone)]
struct KeyInfo {
    latest: u64,
    min_decryption: u64,
    /// key_id of the latest version.
    current_id: String,
}

/// What the last two authoritative reads of a Transit key said. A refusal takes effect only when
/// both agree, so one odd answer (a proxy's, a misrouted request's) never retires a version.
#[derive(Clone, Default)]
struct KeyState {
    /// `Err(why)`: Vault said the key does not exist or cannot be used.
    last: Option<Result<KeyInfo, String>>,
    previous: Option<Result<KeyInfo, String>>,
}

impl KeyState {
    fn record(&mut self, reading: Result<KeyInfo, String>) {
        self.previous = self.last.replace(reading);
    }

    /// Why every version of the key is refused: both reads said it is gone.
    fn unusable(&self) -> Option<&str> {
        match (&self.last, &self.previous) {
            (Some(Err(why)), Some(Err(_))) => Some(why),
            _ => None,
        }
    }

    /// The lowest version both reads allow to decrypt (1 until two reads agree).
    fn min_decryption(&self) -> u64 {
        let min = |r: &Option<Result<KeyInfo, String>>| match r {
            Some(Ok(info)) => info.min_decryption,
            Some(Err(_)) => u64::MAX,
            None => 1,
        };
        min(&self.last).min(min(&self.previous))
    }
}

/// A Transit key (current or decrypt-only).
struct KeyName {
    name: String,
    identity: String,
}

/// A Transit engine on a Vault or OpenBao server.
pub struct VaultBackend {
    http: Http,
    auth: Auth,
    mount: String,
    current: KeyName,
    keys: Vec<KeyName>,
    /// By identity.
    info: Mutex<HashMap<String, KeyState>>,
}

impl VaultBackend {
    /// Builds the client and checks the settings; the server is first reached by the probe.
    pub fn new(s: &VaultSettings) -> Result<Self, String> {
        let http = Http::new(&Endpoint {
            address: &s.address,
            tls: &s.tls(),
            namespace: s.namespace.as_deref(),
            timeout: s.call_timeout,
        })?;
        let auth = Auth::new(&s.auth)?;
        let name = |name: &str| KeyName {
            name: name.to_string(),
            identity: identity(s.namespace.as_deref().unwrap_or(""), &s.mount, name),
        };
        let mount = s.mount.trim_matches('/').to_string();
        let mut keys: Vec<KeyName> = s.decrypt_only_keys.iter().map(|k| name(k)).collect();
        keys.push(name(&s.key));
        for (i, k) in keys.iter().enumerate() {
            if k.name.is_empty() || k.name.contains('/') {
                return Err(format!("backend: Transit key name {:?} is not valid", k.name));
            }
            if keys[..i].iter().any(|o| o.name == k.name) {
                return Err(format!("backend: Transit key {:?} is configured twice", k.name));
            }
        }
        Ok(Self {
            http,
            auth,
            mount,
            current: name(&s.key),
            keys,
            info: Mutex::new(HashMap::new()),
        })
    }

    fn info(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyState>> {
        self.info.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A Vault call with the current token; a 403 on a token that is not brand new drops it
    /// and tries once more with a fresh login.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Reply, BackendError> {
        let mut retried = false;
        loop {
            let token = self.auth.token(&self.http).await?;
            let reply = self.http.call(method.clone(), path, Some(&token), body).await?;
            if reply.status == 403 && reply.is_vault_error() && !retried && self.auth.refused(&token).await {
                retried = true;
                continue;
            }
            return Ok(reply);
        }
    }

    /// Reads a Transit key and records what an authoritative answer says.
    async fn read_key(&self, key: &KeyName) -> Result<KeyInfo, BackendError> {
        let reply = self
            .call(Method::GET, &format!("{}/keys/{}", self.mount, key.name), None)
            .await?;
        let info = match reply.status {
            200 => parse_key(&key.identity, &reply.body["data"]),
            // Vault's own "no such key" (a JSON `errors` answer); any other 404 is a proxy's.
            404 if reply.is_vault_error() => Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("vault: Transit key {:?} not found under {:?}", key.name, self.mount),
            )),
            _ => Err(BackendError::new(
                kind_of(&reply),
                format!(
                    "vault read key {:?}: {}{}",
                    key.name,
                    reply.error_text(),
                    denied_hint(&reply, &format!("{}/keys/{}", self.mount, key.name))
                ),
            )),
        };
        match &info {
            Ok(info) => self
                .info()
                .entry(key.identity.clone())
                .or_default()
                .record(Ok(info.clone())),
            Err(e) if e.kind == ErrorKind::KeyUnusable => self
                .info()
                .entry(key.identity.clone())
                .or_default()
                .record(Err(e.detail.clone())),
            Err(_) => {}
        }
        info
    }

    fn key_for(&self, key_id: &str) -> Option<(&KeyName, u64)> {
        let (identity, version) = parse_key_id(key_id)?;
        self.keys.iter().find(|k| k.identity == identity).map(|k| (k, version))
    }
}

/// The name part of every key_id of a Transit key.
fn identity(namespace: &str, mount: &str, name: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(ID_DOMAIN);
    for part in [namespace.trim_matches('/'), mount.trim_matches('/'), name] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    hex::encode(&ctx.finish().as_ref()[..16])
}

fn parse_key_id(key_id: &str) -> Option<(&str, u64)> {
    let mut parts = key_id.split(':');
    let (Some("vault"), Some(identity), Some(version), Some(_created), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((identity, version.strip_prefix('v')?.parse().ok()?))
}

/// The `data` of `GET {mount}/keys/{key}`. An answer without the fields every Transit key has
/// is not Vault's (a proxy, a misrouted request): transient, never a verdict on the key.
fn parse_key(identity: &str, data: &Value) -> Result<KeyInfo, BackendError> {
    let malformed = |why: &str| {
        BackendError::new(
            ErrorKind::Transient,
            format!("vault read key: malformed answer ({why})"),
        )
    };
    let kind = data["type"].as_str().ok_or_else(|| malformed("no type"))?;
    let latest = data["latest_version"]
        .as_u64()
        .filter(|v| *v > 0)
        .ok_or_else(|| malformed("no latest_version"))?;
    if !data["keys"].is_object() {
        return Err(malformed("no keys"));
    }
    if !AEAD_TYPES.contains(&kind) {
        // Well-formed, and it says the key cannot do what the plugin needs.
        return Err(BackendError::new(
            ErrorKind::KeyUnusable,
            format!(
                "vault: Transit key type {kind:?} cannot bind associated data; use one of {}",
                AEAD_TYPES.join(", ")
            ),
        ));
    }
    let created = &data["keys"][latest.to_string()];
    let created = match created {
        Value::Number(n) => n.to_string(),
        Value::Object(o) => o.get("creation_time").map(Value::to_string).unwrap_or_default(),
        other => other.to_string(),
    };
    let tag = digest::digest(&digest::SHA256, created.as_bytes());
    Ok(KeyInfo {
        latest,
        min_decryption: data["min_decryption_version"].as_u64().unwrap_or(1),
        current_id: format!("vault:{identity}:v{latest}:{}", hex::encode(&tag.as_ref()[..4])),
    })
}

/// Reads Transit's `vault:vN:` prefix.
fn blob_version(blob: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(blob).ok()?;
    let rest = text.strip_prefix("vault:v")?;
    rest.split_once(':')?.0.parse().ok()
}

#[async_trait]
impl Backend for VaultBackend {
    fn name(&self) -> &'static str {
        "vault"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        let current = self.read_key(&self.current).await?;
        // Older keys: their min_decryption_version and existence, best effort.
        for key in self.keys.iter().filter(|k| k.identity != self.current.identity) {
            if let Err(e) = self.read_key(key).await {
                tracing::warn!(key = %key.name, error = %e, "vault: could not read a decrypt-only Transit key");
            }
        }
        Ok(current.current_id)
    }

    fn knows(&self, key_id: &str) -> bool {
        self.key_for(key_id).is_some()
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        let info = self.info();
        self.keys
            .iter()
            .filter(|k| k.identity != self.current.identity)
            .map(|k| {
                let id = match info.get(&k.identity).and_then(|s| s.last.as_ref()) {
                    Some(Ok(i)) => i.current_id.clone(),
                    _ => String::new(),
                };
                (id, format!("{}/keys/{}", self.mount, k.name))
            })
            .collect()
    }

    fn refuses(&self, key_id: &str) -> Option<BackendError> {
        let (identity, version) = parse_key_id(key_id)?;
        let all = self.info();
        let state = all.get(identity)?;
        if let Some(why) = state.unusable() {
            return Some(BackendError::new(ErrorKind::KeyUnusable, why.to_string()));
        }
        let min = state.min_decryption();
        (version < min).then(|| {
            BackendError::new(
                ErrorKind::KeyUnusable,
                format!("vault: key version {version} is below min_decryption_version {min}"),
            )
        })
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let known = self.info().get(&self.current.identity).and_then(|s| match &s.last {
            Some(Ok(info)) => Some(info.clone()),
            _ => None,
        });
        let info = match known {
            Some(info) => info,
            None => self.read_key(&self.current).await?,
        };
        let plaintext = Zeroizing::new(B64.encode(kek.expose()));
        let mut body = json!({
            "plaintext": plaintext.as_str(),
            "key_version": info.latest,
            "associated_data": B64.encode(info.current_id.as_bytes()),
        });
        let reply = self
            .call(
                Method::POST,
                &format!("{}/encrypt/{}", self.mount, self.current.name),
                Some(&body),
            )
            .await;
        if let Some(Value::String(s)) = body.get_mut("plaintext") {
            zeroize::Zeroize::zeroize(s);
        }
        let reply = reply?;
        if reply.status != 200 {
            return Err(BackendError::new(
                op_kind(&reply),
                format!(
                    "vault encrypt: {}{}",
                    reply.error_text(),
                    denied_hint(&reply, &format!("{}/encrypt/{}", self.mount, self.current.name))
                ),
            ));
        }
        let ciphertext = reply.body["data"]["ciphertext"]
            .as_str()
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "vault encrypt: no ciphertext in the answer"))?;
        if blob_version(ciphertext.as_bytes()) != Some(info.latest) {
            return Err(BackendError::new(
                ErrorKind::Transient,
                "vault encrypt: answered under another key version than asked",
            ));
        }
        Ok(Wrapped {
            key_id: info.current_id,
            blob: ciphertext.as_bytes().to_vec(),
        })
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let (key, version) = self
            .key_for(key_id)
            .ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "vault: key_id names no configured Transit key"))?;
        if blob_version(blob) != Some(version) {
            return Err(BackendError::new(
                ErrorKind::BadWrappedKey,
                "vault: wrapped KEK is not a Transit ciphertext of the key_id's version",
            ));
        }
        if let Some(e) = self.refuses(key_id) {
            return Err(e);
        }
        let ciphertext = std::str::from_utf8(blob).expect("checked by blob_version");
        let body = json!({
            "ciphertext": ciphertext,
            "associated_data": B64.encode(key_id.as_bytes()),
        });
        let mut reply = self
            .call(
                Method::POST,
                &format!("{}/decrypt/{}", self.mount, key.name),
                Some(&body),
            )
            .await?;
        if reply.status != 200 {
            return Err(BackendError::new(
                op_kind(&reply),
                format!(
                    "vault decrypt: {}{}",
                    reply.error_text(),
                    denied_hint(&reply, &format!("{}/decrypt/{}", self.mount, key.name))
                ),
            ));
        }
        let plaintext = match reply.body["data"]["plaintext"].take() {
            Value::String(s) => Zeroizing::new(s),
            _ => {
                return Err(BackendError::new(
                    ErrorKind::Transient,
                    "vault decrypt: no plaintext in the answer",
                ));
            }
        };
        // A 200 whose plaintext is not a KEK is a malformed answer, not a verdict on the wrapped
        // KEK: transient, so it is never remembered as bad once the server answers right again.
        let bytes = Zeroizing::new(B64.decode(plaintext.as_bytes()).map_err(|_| {
            BackendError::new(
                ErrorKind::Transient,
                "vault decrypt: malformed answer (plaintext is not base64)",
            )
        })?);
        Kek::from_bytes(&bytes).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Transient,
                "vault decrypt: malformed answer (unwrapped KEK has the wrong length)",
            )
        })
    }

    fn max_wrapped_len(&self) -> usize {
        // "vault:v<version>:" + base64 of nonce, 32-byte KEK and tag.
        256
    }
}

/// For a Vault 403: a token without a root policy is refused a key that does not exist exactly
/// as one its policy does not cover, so the answer alone cannot say which.
fn denied_hint(reply: &Reply, path: &str) -> String {
    if reply.status == 403 && reply.is_vault_error() {
        format!(" (the key does not exist, or the token's policy does not cover {path})")
    } else {
        String::new()
    }
}

/// What a failed encrypt or decrypt means (only Vault's own error answers are verdicts).
fn op_kind(reply: &Reply) -> ErrorKind {
    let text = reply.error_text();
    match reply.status {
        400 if !reply.is_vault_error() => ErrorKind::Transient,
        400 if text.contains("disallowed by policy") || text.contains("too old") => ErrorKind::KeyUnusable,
        400 if text.contains("not found") || text.contains("no existing key") => ErrorKind::KeyUnusable,
        _ => kind_of(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_namespace_mount_key_and_version() {
        let a = identity("", "transit", "k");
        assert_ne!(a, identity("ns1", "transit", "k"));
        assert_ne!(a, identity("", "transit2", "k"));
        assert_ne!(a, identity("", "transit", "k2"));
        // Length-prefixed: no two splits of the same bytes collide.
        assert_ne!(identity("a", "bc", "d"), identity("ab", "c", "d"));
        let data = json!({"type": "aes256-gcm96", "latest_version": 3, "min_decryption_version": 2,
            "keys": {"1": 1700000000, "2": 1700000100, "3": 1700000200}});
        let info = parse_key(&a, &data).unwrap();
        assert_eq!(info.latest, 3);
        assert_eq!(info.min_decryption, 2);
        assert!(info.current_id.starts_with(&format!("vault:{a}:v3:")));
        assert_eq!(parse_key_id(&info.current_id), Some((a.as_str(), 3)));
        // Same name and version, re-created key: another key_id.
        let recreated = json!({"type": "aes256-gcm96", "latest_version": 3, "keys": {"3": 1800000000}});
        assert_ne!(parse_key(&a, &recreated).unwrap().current_id, info.current_id);
        assert!(parse_key(&a, &json!({"type": "rsa-2048", "latest_version": 1})).is_err());
        assert_eq!(parse_key_id("local:abc"), None);
        assert_eq!(blob_version(b"vault:v12:abc"), Some(12));
        assert_eq!(blob_version(b"vault:x:abc"), None);
    }
}
