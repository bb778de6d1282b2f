//! KMIP backend (OASIS KMIP 1.4 over mutual TLS): Thales CipherTrust, Fortanix DSM, Entrust
//! KeyControl, IBM GKLM, Vault Enterprise's KMIP engine, PyKMIP …
//!
//! The root key is a symmetric AES key on the key manager; its material never leaves it (no
//! Get). A local KEK is wrapped with the server's Encrypt in AES-GCM with a fresh random 96-bit
//! IV and AAD binding the key_id; the blob is `0x01 ‖ IV ‖ tag ‖ ciphertext`. Decrypt repeats
//! IV, tag and AAD.
//!
//! The current key is named by KMIP Name or Unique Identifier. A name is resolved with Locate
//! at start and at every probe (the newest Active key carrying it), so re-pointing a name to a
//! new key is a rotation the probe picks up with no restart; keys seen before stay usable for
//! the process's life (list their Unique Identifiers in `decrypt_only_keys` across restarts).
//! key_id = `kmip:` + 128 bits of a SHA-256 of the Unique Identifier and the key's Initial Date
//! (read with Get Attributes, which works in every state, so a Deactivated older key is still
//! identified after a restart): the same on every node that shares the server, new when the
//! current key changes, and different for keys of two servers that happen to share an id.
//!
//! The probe checks the current key's State: anything but Active (Deactivated, Compromised,
//! Destroyed) is KeyUnusable and its cached KEKs are purged; a decrypt-only key that is
//! Compromised or Destroyed is refused the same way.
//!
//! Only an authoritative answer revokes (answer.rs classifies each one): a well-formed refusal
//! naming the key, or a well-formed State that is not Active. A Locate by name that finds no
//! Active key is not authoritative by itself (an index, a permission filter or a fault can empty
//! a list): it counts only when Get Attributes of the last current key then says that key is
//! gone or not Active; else it is a transient outage, as is anything malformed. Locate asks for
//! at most LOCATE_MAX_ITEMS keys, so one probe makes a bounded number of calls.
//!
//! Operations used: Locate, Get Attributes, Encrypt, Decrypt, protocol 1.4 (the first with
//! authenticated-encryption additional data and tags in Encrypt/Decrypt); the server needs the
//! symmetric key lifecycle and AES-GCM cryptographic operations.

mod answer;
pub mod ttlv;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroizing;

use super::registry::{Entry, KeyRegistry};
use super::tls::TlsSettings;
use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::{KEY_LEN, Kek};
use ttlv::{Item, Value, tag};

const ID_DOMAIN: &[u8] = b"kms-plugin/kmip-key-id/v1\0";
const BLOB_VERSION: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Maximum Items of a Locate by name: bounds the Get Attributes calls one probe makes (the
/// candidates, plus one for the last current key).
const LOCATE_MAX_ITEMS: usize = 16;

mod op {
    pub const LOCATE: u32 = 0x08;
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;
}

/// KMIP State enumeration.
const STATE_ACTIVE: u32 = 2;
const STATE_NAMES: [&str; 7] = [
    "unknown",
    "Pre-Active",
    "Active",
    "Deactivated",
    "Compromised",
    "Destroyed",
    "Destroyed Compromised",
];

/// `[backend]` with `type = "kmip"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmipSettings {
    /// `host:port` (port 5696 if omitted).
    pub address: String,
    /// TLS: see [`TlsSettings`] (read through [`KmipSettings::tls`]). The client certificate
    /// and key are required: KMIP requires mutual TLS.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub tls_server_name: Option<String>,
    /// Optional username/password credential; the password is read from this file.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The current key by KMIP Name (resolved at every probe) …
    pub key_name: Option<String>,
    /// … or by Unique Identifier.
    pub key_uid: Option<String>,
    /// Unique Identifiers of older keys, kept to decrypt data written under them.
    #[serde(default)]
    pub decrypt_only_keys: Vec<String>,
    /// Connections kept open to the server (bounds concurrent KMIP calls).
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    #[serde(
        default = "crate::backend::call_budget::call_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub call_timeout: Duration,
}

fn default_pool() -> usize {
    4
}

impl KmipSettings {
    pub async fn build(&self) -> Result<std::sync::Arc<dyn Backend>, String> {
        let settings = self.clone();
        Ok(std::sync::Arc::new(
            super::off_thread(move || KmipBackend::new(&settings)).await?,
        ))
    }

    /// Every file these settings name (for change detection by a reload).
    pub fn files(&self) -> Vec<PathBuf> {
        self.tls()
            .files()
            .into_iter()
            .chain(self.password_file.clone())
            .collect()
    }

    /// The TLS fields, as the type every network backend shares.
    pub fn tls(&self) -> TlsSettings {
        TlsSettings {
            ca_file: self.ca_file.clone(),
            client_cert_file: Some(self.client_cert_file.clone()),
            client_key_file: Some(self.client_key_file.clone()),
            server_name: self.tls_server_name.clone(),
        }
    }
}

/// What identifies the current key in the settings.
enum CurrentRef {
    Name(String),
    Uid(String),
}

/// A KMIP key manager.
pub struct KmipBackend {
    host: String,
    port: u16,
    server_name: rustls::pki_types::ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    credential: Option<(String, Zeroizing<String>)>,
    current_ref: CurrentRef,
    decrypt_only: Vec<String>,
    idle: Mutex<Vec<TlsStream<TcpStream>>>,
    slots: Semaphore,
    timeout: Duration,
    /// key_id → Unique Identifier, for every key resolved so far, with why it must not be used
    /// if the probe saw it Compromised or Destroyed.
    keys: KeyRegistry<Option<String>>,
    rng: SystemRandom,
}

impl KmipBackend {
    /// Builds the client from the settings; the server is first reached by the probe.
    pub fn new(s: &KmipSettings) -> Result<Self, String> {
        let (host, port) = match s.address.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse().map_err(|_| format!("address {:?}: bad port", s.address))?,
            ),
            _ => (s.address.trim_matches(['[', ']']).to_string(), 5696),
        };
        let tls_settings = s.tls();
        let server_name = match tls_settings.server_name()? {
            Some(name) => name,
            // The host of the address: an error here names it as the setting at fault.
            None => rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("tls_server_name {host:?}: {e}"))?,
        };
        let tls = tls_settings.client_config()?;
        let credential = match (&s.username, &s.password_file) {
            (Some(user), Some(file)) => {
                let policy = crate::secret_file::Policy {
                    deny_mode: 0o077,
                    max_len: 4096,
                };
                let bytes = crate::secret_file::read(file, &policy).map_err(|e| format!("password_file {e}"))?;
                let text = std::str::from_utf8(&bytes).map_err(|_| "password_file: not UTF-8".to_string())?;
                Some((
                    user.clone(),
                    Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()),
                ))
            }
            (None, None) => None,
            _ => return Err("backend: set both username and password_file, or neither".into()),
        };
        let current_ref = match (&s.key_name, &s.key_uid) {
            (Some(n), None) => CurrentRef::Name(n.clone()),
            (None, Some(u)) => CurrentRef::Uid(u.clone()),
            _ => return Err("backend: set exactly one of key_name and key_uid".into()),
        };
        Ok(Self {
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            credential,
            current_ref,
            decrypt_only: s.decrypt_only_keys.clone(),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(s.pool_size.max(1)),
            timeout: s.call_timeout,
            keys: KeyRegistry::new(),
            rng: SystemRandom::new(),
        })
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>, BackendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| {
            BackendError::new(
                ErrorKind::Transient,
                format!("kmip connect {}:{}: {e}", self.host, self.port),
            )
        })?;
        let _ = tcp.set_nodelay(true);
        self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            let kind = if super::tls::is_tls_refusal(&e) {
                ErrorKind::Denied
            } else {
                ErrorKind::Transient
            };
            BackendError::new(kind, format!("kmip TLS handshake: {}", super::tls::error_chain(&e)))
        })
    }

    /// One request/response on a pooled connection; a pooled connection the server has closed
    /// is replaced once.
    async fn exchange(&self, request: &[u8]) -> Result<Item, BackendError> {
        // The wait for a connection counts against the call's deadline too.
        let call = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| BackendError::new(ErrorKind::Transient, "kmip pool closed"))?;
            let pooled = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let (mut conn, reused) = match pooled {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let mut result = roundtrip(&mut conn, request).await;
            if result.is_err() && reused {
                conn = self.connect().await?;
                result = roundtrip(&mut conn, request).await;
            }
            let response = result.map_err(|e| BackendError::new(ErrorKind::Transient, format!("kmip: {e}")))?;
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
            Ok(response)
        };
        tokio::time::timeout(self.timeout, call).await.unwrap_or_else(|_| {
            Err(BackendError::new(
                ErrorKind::Transient,
                format!("kmip: no answer within {} ms", self.timeout.as_millis()),
            ))
        })
    }

    /// Runs one operation; returns its response payload, or the server's refusal classified.
    async fn operation(&self, operation: u32, payload: Vec<Item>) -> Result<Item, BackendError> {
        let mut header = vec![
            Item::structure(
                tag::PROTOCOL_VERSION,
                vec![
                    Item::new(tag::PROTOCOL_VERSION_MAJOR, Value::Integer(1)),
                    // 1.4: the first version with authenticated-encryption data in Encrypt/Decrypt.
                    Item::new(tag::PROTOCOL_VERSION_MINOR, Value::Integer(4)),
                ],
            ),
            Item::new(tag::BATCH_COUNT, Value::Integer(1)),
        ];
        if let Some((user, password)) = &self.credential {
            header.insert(
                1,
                Item::structure(
                    tag::AUTHENTICATION,
                    vec![Item::structure(
                        tag::CREDENTIAL,
                        vec![
                            Item::new(tag::CREDENTIAL_TYPE, Value::Enumeration(1)),
                            Item::structure(
                                tag::CREDENTIAL_VALUE,
                                vec![
                                    Item::new(tag::USERNAME, Value::Text(user.clone())),
                                    Item::new(tag::PASSWORD, Value::Text(password.to_string())),
                                ],
                            ),
                        ],
                    )],
                ),
            );
        }
        let message = Item::structure(
            tag::REQUEST_MESSAGE,
            vec![
                Item::structure(tag::REQUEST_HEADER, header),
                Item::structure(
                    tag::BATCH_ITEM,
                    vec![
                        Item::new(tag::OPERATION, Value::Enumeration(operation)),
                        Item::structure(tag::REQUEST_PAYLOAD, payload),
                    ],
                ),
            ],
        );
        let mut bytes = Zeroizing::new(Vec::new());
        message.encode(&mut bytes);
        wipe(message);
        let response = self.exchange(&bytes).await?;
        answer::classify(operation, &response)
    }

    /// State and Initial Date of `uid`, from a well-formed Get Attributes answer.
    async fn state(&self, uid: &str) -> Result<(u32, i64), BackendError> {
        let payload = self
            .operation(
                op::GET_ATTRIBUTES,
                vec![
                    Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(uid.to_string())),
                    Item::new(tag::ATTRIBUTE_NAME, Value::Text("State".into())),
                    Item::new(tag::ATTRIBUTE_NAME, Value::Text("Initial Date".into())),
                ],
            )
            .await?;
        answer::attributes(&payload, uid)
    }

    /// The current key: its Unique Identifier, State and Initial Date.
    async fn resolve_current(&self) -> Result<(String, u32, i64), BackendError> {
        match &self.current_ref {
            CurrentRef::Uid(uid) => {
                let (state, initial) = self.state(uid).await?;
                Ok((uid.clone(), state, initial))
            }
            CurrentRef::Name(name) => self.locate_current(name).await,
        }
    }

    /// The newest Active AES-256 key named `name`, in at most [`LOCATE_MAX_ITEMS`] + 1 Get
    /// Attributes calls.
    async fn locate_current(&self, name: &str) -> Result<(String, u32, i64), BackendError> {
        let attribute = |name: &str, value: Value| {
            Item::structure(
                tag::ATTRIBUTE,
                vec![
                    Item::new(tag::ATTRIBUTE_NAME, Value::Text(name.into())),
                    Item::new(tag::ATTRIBUTE_VALUE, value),
                ],
            )
        };
        // Only an Active AES-256 symmetric key counts: another object that merely carries the
        // name (a certificate, a secret, a short key someone could create) never becomes root.
        // The filters also make every match a real candidate, so Maximum Items only bites with
        // more than LOCATE_MAX_ITEMS Active keys of the name at once. KMIP 1.4 defines no order
        // for the answer (PyKMIP sends the newest Initial Date first); the Initial Dates of the
        // candidates decide, so within the bound the newest Active key still wins.
        let payload = self
            .operation(
                op::LOCATE,
                vec![
                    // Maximum Items comes before the attributes in a Locate request.
                    Item::new(tag::MAXIMUM_ITEMS, Value::Integer(LOCATE_MAX_ITEMS as i32)),
                    attribute("Object Type", Value::Enumeration(2)),
                    attribute("Cryptographic Algorithm", Value::Enumeration(3)),
                    attribute("Cryptographic Length", Value::Integer(256)),
                    attribute("State", Value::Enumeration(STATE_ACTIVE)),
                    Item::structure(
                        tag::ATTRIBUTE,
                        vec![
                            Item::new(tag::ATTRIBUTE_NAME, Value::Text("Name".into())),
                            Item::structure(
                                tag::ATTRIBUTE_VALUE,
                                vec![
                                    Item::new(tag::NAME_VALUE, Value::Text(name.to_string())),
                                    Item::new(tag::NAME_TYPE, Value::Enumeration(1)),
                                ],
                            ),
                        ],
                    ),
                ],
            )
            .await?;
        let uids = answer::located(&payload, LOCATE_MAX_ITEMS)?;
        if uids.len() == LOCATE_MAX_ITEMS {
            tracing::warn!(
                name,
                max_items = LOCATE_MAX_ITEMS,
                "kmip: so many Active keys carry the name that only some are compared; deactivate old ones"
            );
        }
        // Several keys may carry the name during a rotation: the newest Active one is current.
        let mut best: Option<(i64, &str)> = None;
        let mut seen = Vec::with_capacity(uids.len());
        for &uid in &uids {
            let (state, initial) = match self.state(uid).await {
                Ok(found) => found,
                // A candidate gone since the Locate says nothing about the current key.
                Err(e) if e.kind == ErrorKind::KeyUnusable => continue,
                Err(e) => return Err(e),
            };
            seen.push((uid, state));
            if state == STATE_ACTIVE && best.is_none_or(|(t, u)| (initial, uid) > (t, u)) {
                best = Some((initial, uid));
            }
        }
        if let Some((initial, uid)) = best {
            return Ok((uid.to_string(), STATE_ACTIVE, initial));
        }
        // No Active key under the name is authoritative only once the last current key itself
        // is gone or not Active; until then the empty answer is a fault of the server's.
        let last = self.keys.current_entry().map(|(_, key)| key.locator);
        let Some(last) = last else {
            return Err(BackendError::new(
                ErrorKind::Transient,
                format!(
                    "kmip: the server found no Active AES-256 key named {name:?} ({} candidates): ambiguous, not treated as revocation",
                    uids.len()
                ),
            ));
        };
        let state = match seen.iter().find(|(uid, _)| *uid == last) {
            Some(&(_, state)) => state,
            // Item Not Found for the last current key is authoritative: it is gone.
            None => self.state(&last).await?.0,
        };
        if state == STATE_ACTIVE {
            return Err(BackendError::new(
                ErrorKind::Transient,
                format!(
                    "kmip: the server found no Active AES-256 key named {name:?}, yet the current key {last:?} is Active: ambiguous, not treated as revocation"
                ),
            ));
        }
        Err(BackendError::new(
            ErrorKind::KeyUnusable,
            format!(
                "kmip: the current key {last:?} is {} and no Active AES-256 key is named {name:?}",
                state_name(state)
            ),
        ))
    }

    async fn encrypt(&self, uid: &str, data: &[u8], iv: &[u8], aad: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BackendError> {
        let payload = self
            .operation(
                op::ENCRYPT,
                vec![
                    Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(uid.to_string())),
                    gcm_parameters(),
                    Item::new(tag::DATA, Value::Bytes(data.to_vec())),
                    Item::new(tag::IV_COUNTER_NONCE, Value::Bytes(iv.to_vec())),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
                        Value::Bytes(aad.to_vec()),
                    ),
                ],
            )
            .await?;
        answer::check_uid(&payload, uid, op::ENCRYPT)?;
        let ct = payload.child(tag::DATA).and_then(Item::as_bytes);
        let auth = payload
            .child(tag::AUTHENTICATED_ENCRYPTION_TAG)
            .and_then(Item::as_bytes);
        match (ct, auth) {
            (Some(ct), Some(auth)) if auth.len() == TAG_LEN => Ok((ct.to_vec(), auth.to_vec())),
            _ => Err(BackendError::new(
                ErrorKind::Transient,
                "kmip Encrypt: answer without data or a 16-byte tag",
            )),
        }
    }

    /// The key_id of the key `uid` created at `initial` (its Initial Date).
    fn key_id_of(uid: &str, initial: i64) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(ID_DOMAIN);
        ctx.update(&(uid.len() as u32).to_be_bytes());
        ctx.update(uid.as_bytes());
        ctx.update(&initial.to_be_bytes());
        format!("kmip:{}", hex::encode(&ctx.finish().as_ref()[..16]))
    }
}

fn state_name(state: u32) -> &'static str {
    STATE_NAMES.get(state as usize).copied().unwrap_or("unknown")
}

fn gcm_parameters() -> Item {
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            // Block Cipher Mode GCM, Cryptographic Algorithm AES, a 16-byte tag.
            Item::new(tag::BLOCK_CIPHER_MODE, Value::Enumeration(9)),
            Item::new(tag::CRYPTOGRAPHIC_ALGORITHM, Value::Enumeration(3)),
            Item::new(tag::TAG_LENGTH, Value::Integer(TAG_LEN as i32)),
        ],
    )
}

/// Clears byte and text values (a KEK, a password) before the request is dropped.
fn wipe(item: Item) {
    fn walk(item: &mut Item) {
        match &mut item.value {
            Value::Structure(items) => items.iter_mut().for_each(walk),
            Value::Bytes(b) => zeroize::Zeroize::zeroize(b),
            Value::Text(t) => zeroize::Zeroize::zeroize(t),
            _ => {}
        }
    }
    let mut item = item;
    walk(&mut item);
}

async fn roundtrip(conn: &mut TlsStream<TcpStream>, request: &[u8]) -> Result<Item, String> {
    conn.write_all(request).await.map_err(|e| format!("send: {e}"))?;
    conn.flush().await.map_err(|e| format!("send: {e}"))?;
    let mut header = [0u8; 8];
    conn.read_exact(&mut header)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    let total = ttlv::message_len(&header)?;
    let mut buf = vec![0u8; total];
    buf[..8].copy_from_slice(&header);
    conn.read_exact(&mut buf[8..])
        .await
        .map_err(|e| format!("receive: {e}"))?;
    let message = Item::decode(&buf)?;
    if message.tag != tag::RESPONSE_MESSAGE {
        return Err(format!("unexpected KMIP message tag {:#x}", message.tag));
    }
    Ok(message)
}

#[async_trait]
impl Backend for KmipBackend {
    fn name(&self) -> &'static str {
        "kmip"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        let (uid, state, initial) = self.resolve_current().await?;
        if state != STATE_ACTIVE {
            return Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("kmip: current key {uid:?} is {}", state_name(state)),
            ));
        }
        let key_id = Self::key_id_of(&uid, initial);
        // An Active key is usable, whatever an earlier probe saw.
        self.keys.insert(key_id.clone(), Entry::new(uid.clone(), None));
        let previous = self.keys.make_current(key_id.clone(), Entry::new(uid.clone(), None));
        // The UIDs are what the operator writes in decrypt_only_keys (identifiers, not secrets).
        match previous.map(|(_, key)| key.locator) {
            Some(old) if old != uid => tracing::info!(
                old_uid = %old,
                new_uid = %uid,
                "kmip: the current key name now locates another key; add old_uid to decrypt_only_keys, or a restarted plugin cannot decrypt what was written under it"
            ),
            None => tracing::info!(uid = %uid, "kmip: current key located"),
            _ => {}
        }
        // Older keys: resolved once, and refused once compromised or destroyed.
        for old in &self.decrypt_only {
            match self.state(old).await {
                Ok((state, initial)) => {
                    let unusable = (state >= 4).then(|| format!("kmip: key {old:?} is {}", state_name(state)));
                    self.keys
                        .insert(Self::key_id_of(old, initial), Entry::new(old.clone(), unusable));
                }
                Err(e) => tracing::warn!(key = %old, error = %e, "kmip: could not check a decrypt-only key"),
            }
        }
        Ok(key_id)
    }

    fn knows(&self, key_id: &str) -> bool {
        self.keys.knows(key_id)
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        let others = self.keys.decrypt_only();
        // Every configured decrypt-only UID, resolved or not, and any key the name moved from.
        let mut out: Vec<(String, String)> = self
            .decrypt_only
            .iter()
            .map(|uid| (self.keys.find(uid).unwrap_or_default(), format!("uid {uid:?}")))
            .collect();
        for (id, k) in &others {
            if !self.decrypt_only.contains(&k.locator) {
                out.push((id.clone(), format!("uid {:?}", k.locator)));
            }
        }
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    fn refuses(&self, key_id: &str) -> Option<BackendError> {
        let why = self.keys.get(key_id)?.value?;
        Some(BackendError::new(ErrorKind::KeyUnusable, why))
    }

    fn remembered(&self) -> Vec<(String, String)> {
        self.keys.remembered()
    }

    fn remember(&self, keys: Vec<(String, String)>) {
        self.keys.remember(keys, || None);
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let (key_id, uid) = match self.keys.current_entry() {
            Some((key_id, key)) => (key_id, key.locator),
            None => {
                let key_id = self.probe().await?;
                let uid = self.keys.get(&key_id).map(|k| k.locator).unwrap_or_default();
                (key_id, uid)
            }
        };
        let mut iv = [0u8; IV_LEN];
        self.rng
            .fill(&mut iv)
            .map_err(|_| BackendError::new(ErrorKind::Transient, "random number generator failed"))?;
        let (ct, auth) = self.encrypt(&uid, kek.expose(), &iv, key_id.as_bytes()).await?;
        if ct.len() != KEY_LEN {
            return Err(BackendError::new(
                ErrorKind::Transient,
                "kmip Encrypt: ciphertext of the wrong length",
            ));
        }
        let mut blob = Vec::with_capacity(1 + IV_LEN + TAG_LEN + KEY_LEN);
        blob.push(BLOB_VERSION);
        blob.extend_from_slice(&iv);
        blob.extend_from_slice(&auth);
        blob.extend_from_slice(&ct);
        Ok(Wrapped { key_id, blob })
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let uid = self
            .keys
            .get(key_id)
            .map(|k| k.locator)
            .ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "kmip: key_id names no known key"))?;
        if blob.len() != 1 + IV_LEN + TAG_LEN + KEY_LEN || blob[0] != BLOB_VERSION {
            return Err(BackendError::new(
                ErrorKind::BadWrappedKey,
                "kmip: wrapped KEK has the wrong shape",
            ));
        }
        let (iv, rest) = blob[1..].split_at(IV_LEN);
        let (auth, ct) = rest.split_at(TAG_LEN);
        let payload = self
            .operation(
                op::DECRYPT,
                vec![
                    Item::new(tag::UNIQUE_IDENTIFIER, Value::Text(uid.clone())),
                    gcm_parameters(),
                    Item::new(tag::DATA, Value::Bytes(ct.to_vec())),
                    Item::new(tag::IV_COUNTER_NONCE, Value::Bytes(iv.to_vec())),
                    Item::new(
                        tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
                        Value::Bytes(key_id.as_bytes().to_vec()),
                    ),
                    Item::new(tag::AUTHENTICATED_ENCRYPTION_TAG, Value::Bytes(auth.to_vec())),
                ],
            )
            .await?;
        let kek = answer::kek(&payload, &uid);
        wipe(payload);
        kek
    }

    fn max_wrapped_len(&self) -> usize {
        1 + IV_LEN + TAG_LEN + KEY_LEN
    }
}
