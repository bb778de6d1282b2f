//! PKCS#11 HSM backend (Thales Luna, YubiHSM, CloudHSM, SoftHSM …) through `cryptoki`.
//!
//! The root key is an AES key on the token, found by label; it never leaves the token. A local
//! KEK is wrapped by C_Encrypt with CKM_AES_GCM (random 96-bit IV, AAD binding the key_id), so
//! only `iv || ciphertext || tag` leaves the plugin.
//!
//! key_id = `pkcs11:` + 128 bits of SHA-256 over the token label, the key label, and a check
//! value (AES-GCM of a constant under the key): stable on every node holding the key (HA group
//! members included), and different if the label is moved to another key. A root key found
//! again by label after a lost session must have the same check value, or it is refused.
//!
//! PKCS#11 calls block, so they run on tokio's blocking pool, one session each, from a pool
//! bounded by `sessions`. A session that was closed or logged out is replaced (re-open,
//! re-login) and the call retried once. A rejected PIN is never tried again: tokens lock after a
//! few failures, so the backend fails every later call until the plugin is restarted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::registry::{Entry, KeyRegistry};
use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::{KEY_LEN, Kek};

const KEY_ID_DOMAIN: &[u8] = b"kms-plugin/pkcs11-key-id/v1\0";
const KCV_AAD: &[u8] = b"kms-plugin/pkcs11-key-check-value/v1";
const WRAP_AAD_DOMAIN: &[u8] = b"kms-plugin/pkcs11-wrap/v1\0";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Where the user PIN comes from. Never a command-line argument, never logged.
#[derive(Debug, Clone)]
pub enum PinSource {
    File(PathBuf),
    Env(String),
}

/// `[backend]` with `type = "pkcs11"`: AES root keys on a PKCS#11 token (HSM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The vendor's PKCS#11 library.
    pub module: PathBuf,
    pub token_label: String,
    /// File holding the user PIN (mode must deny others).
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    pub current_key_label: String,
    #[serde(default)]
    pub decrypt_only_key_labels: Vec<String>,
    /// Concurrent token sessions (bounds concurrent unwraps).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_sessions() -> usize {
    4
}

impl Pkcs11Settings {
    /// Where the PIN comes from: the file if both are set.
    pub fn pin_source(&self) -> Result<PinSource, String> {
        match (&self.pin_file, &self.pin_env) {
            (Some(file), _) => Ok(PinSource::File(file.clone())),
            (None, Some(var)) => Ok(PinSource::Env(var.clone())),
            (None, None) => Err("pkcs11: no PIN source: set pin_file or pin_env".into()),
        }
    }

    /// The PIN file, for change detection.
    pub fn files(&self) -> Vec<PathBuf> {
        self.pin_file.iter().cloned().collect()
    }

    /// Opens the token. A rejected PIN is never presented again: the plugin serves a backend
    /// that refuses everything (Status `PermissionDenied`) instead of crash-looping on it.
    pub async fn build(&self) -> Result<Arc<dyn Backend>, String> {
        let settings = self.clone();
        match tokio::task::spawn_blocking(move || Pkcs11Backend::open(&settings))
            .await
            .map_err(|e| e.to_string())?
        {
            Ok(b) => Ok(Arc::new(b)),
            Err(e) if e.pin_rejected => {
                tracing::error!("pkcs11: the token rejected the PIN; not retrying. Fix the PIN and restart");
                let error = BackendError::new(ErrorKind::Denied, format!("pkcs11: {}", e.message));
                Ok(Arc::new(super::refused::Refused::new("pkcs11", error)))
            }
            Err(e) => Err(format!("pkcs11: {}", e.message)),
        }
    }
}

struct RootKey {
    label: String,
    handle: Mutex<Option<ObjectHandle>>,
    /// The key's check value once known: a later lookup by label must find the same key.
    kcv: Mutex<Option<Vec<u8>>>,
}

impl RootKey {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_string(),
            handle: Mutex::new(None),
            kcv: Mutex::new(None),
        }
    }
}

/// A key check value: AES-GCM under the key of a constant with a fixed IV. Deterministic per
/// key, reveals nothing about it, and needs only the key's CKA_ENCRYPT permission.
fn check_value(session: &Session, handle: ObjectHandle) -> Result<Vec<u8>, CkError> {
    let mut iv = [0u8; IV_LEN];
    let params = GcmParams::new(&mut iv, KCV_AAD, Ulong::from(128))?;
    session.encrypt(&Mechanism::AesGcm(params), handle, &[0u8; 16])
}

/// Shared state used on the blocking pool.
struct Token {
    ctx: Pkcs11,
    slot: Slot,
    token_id: Vec<u8>,
    pin: AuthPin,
    pin_rejected: AtomicBool,
    /// Serialises logins, so a bad PIN is presented to the token once, never in parallel.
    login: Mutex<()>,
    idle: Mutex<Vec<Session>>,
}

/// Why the token could not be opened.
#[derive(Debug)]
pub struct OpenError {
    pub message: String,
    /// The token rejected the PIN: do not try it again.
    pub pin_rejected: bool,
}

/// A PKCS#11 token holding the root keys.
pub struct Pkcs11Backend {
    token: Arc<Token>,
    permits: Arc<Semaphore>,
    current_label: String,
    /// key_id → key (located by label), for the current and decrypt-only labels. The current
    /// key_id can change when a probe finds another key under the current label.
    keys: KeyRegistry<Arc<RootKey>>,
    rng: SystemRandom,
}

fn classify(e: &CkError) -> ErrorKind {
    match e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired | RvError::PinInvalid => ErrorKind::Denied,
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => ErrorKind::BadWrappedKey,
            // Tokens (SoftHSM among them) report a failed GCM tag on C_Decrypt as a generic error.
            RvError::GeneralError | RvError::FunctionFailed if matches!(e, CkError::Pkcs11(_, Function::Decrypt)) => {
                ErrorKind::BadWrappedKey
            }
            RvError::KeyFunctionNotPermitted
            | RvError::KeyTypeInconsistent
            | RvError::KeyHandleInvalid
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid => ErrorKind::KeyUnusable,
            _ => ErrorKind::Transient,
        },
        _ => ErrorKind::Transient,
    }
}

/// Errors after which the session (or login) is gone and a fresh one may succeed.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::DeviceError
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

fn err(e: &CkError, what: &str) -> BackendError {
    BackendError::new(classify(e), format!("pkcs11 {what}: {e}"))
}

impl Token {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A logged-in session: an idle one, or a new one.
    fn session(&self) -> Result<Session, BackendError> {
        if let Some(s) = self.lock_idle().pop() {
            return Ok(s);
        }
        let _login = self.login.lock().unwrap_or_else(PoisonError::into_inner);
        if self.pin_rejected.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                ErrorKind::Denied,
                "pkcs11: the token rejected the PIN earlier; not retrying (fix the PIN and restart)",
            ));
        }
        let session = self
            .ctx
            .open_ro_session(self.slot)
            .map_err(|e| err(&e, "open session"))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e) => {
                if classify(&e) == ErrorKind::Denied {
                    self.pin_rejected.store(true, Ordering::SeqCst);
                }
                Err(err(&e, "login"))
            }
        }
    }

    /// Runs `op` on a pooled session; on a lost session or login, retries once on a fresh one.
    fn run<T>(
        &self,
        key: &RootKey,
        op: impl Fn(&Session, ObjectHandle) -> Result<T, CkError>,
    ) -> Result<T, BackendError> {
        let mut attempt = 0;
        loop {
            let session = self.session()?;
            let handle = match self.handle(&session, key) {
                Ok(h) => h,
                Err(e) => {
                    drop(session);
                    return Err(e);
                }
            };
            match op(&session, handle) {
                Ok(v) => {
                    self.lock_idle().push(session);
                    return Ok(v);
                }
                Err(e) if attempt == 0 && session_lost(&e) => {
                    tracing::warn!(error = %e, "pkcs11 session lost; reopening and retrying once");
                    drop(session);
                    *key.handle.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    // Other idle sessions likely died with it (logout, token reset).
                    self.lock_idle().clear();
                    attempt += 1;
                }
                Err(e) => {
                    if !session_lost(&e) {
                        self.lock_idle().push(session);
                    }
                    return Err(err(&e, "operation"));
                }
            }
        }
    }

    fn handle(&self, session: &Session, key: &RootKey) -> Result<ObjectHandle, BackendError> {
        if let Some(h) = *key.handle.lock().unwrap_or_else(PoisonError::into_inner) {
            return Ok(h);
        }
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(key.label.as_bytes().to_vec()),
            ])
            .map_err(|e| err(&e, "find key"))?;
        match found.as_slice() {
            [h] => {
                // After a lost session the label may name another key now: never use it under
                // the old key's key_id.
                let expected = key.kcv.lock().unwrap_or_else(PoisonError::into_inner).clone();
                if let Some(expected) = expected {
                    let actual = check_value(session, *h).map_err(|e| err(&e, "key check value"))?;
                    if actual != expected {
                        return Err(BackendError::new(
                            ErrorKind::KeyUnusable,
                            format!("pkcs11: label {:?} now names a different key", key.label),
                        ));
                    }
                }
                *key.handle.lock().unwrap_or_else(PoisonError::into_inner) = Some(*h);
                Ok(*h)
            }
            [] => Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!("pkcs11: no secret key labelled {:?} on the token", key.label),
            )),
            _ => Err(BackendError::new(
                ErrorKind::KeyUnusable,
                format!(
                    "pkcs11: {} secret keys labelled {:?}; labels must be unique",
                    found.len(),
                    key.label
                ),
            )),
        }
    }

    /// The public identity of the key under `key.label`; pins `key` to that key from now on.
    fn key_id(&self, key: &RootKey) -> Result<String, BackendError> {
        let kcv = self.run(key, check_value)?;
        key.kcv
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| kcv.clone());
        // Token label, key label and check value: the same on every node that holds the key,
        // whatever the token's serial (HA group members differ there).
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(&self.token_id);
        ctx.update(key.label.as_bytes());
        ctx.update(b"\0");
        ctx.update(&kcv);
        Ok(format!("pkcs11:{}", hex::encode(&ctx.finish().as_ref()[..16])))
    }
}

/// Start-up error when no token carries the configured label: names the labels that were seen.
fn no_token_message(wanted: &str, seen: &[String]) -> String {
    if seen.is_empty() {
        format!("no PKCS#11 token labelled {wanted:?}: the module shows no initialised token")
    } else {
        format!("no PKCS#11 token labelled {wanted:?}; tokens seen: {}", seen.join(", "))
    }
}

fn read_pin(source: &PinSource) -> Result<AuthPin, String> {
    let pin = match source {
        PinSource::Env(var) => std::env::var(var).map_err(|_| format!("PIN environment variable {var} is not set"))?,
        PinSource::File(path) => {
            // Group may read (an HSM client group); others may not.
            let policy = crate::secret_file::Policy {
                deny_mode: 0o007,
                max_len: 4096,
            };
            let bytes = crate::secret_file::read(path, &policy).map_err(|e| format!("PIN file {e}"))?;
            let text = std::str::from_utf8(&bytes).map_err(|_| format!("PIN file {}: not UTF-8", path.display()))?;
            text.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    if pin.is_empty() {
        return Err("the PKCS#11 PIN is empty".into());
    }
    Ok(AuthPin::from(pin))
}

impl Pkcs11Backend {
    /// Loads the module, finds the token, logs in once and resolves every configured key.
    /// A missing key, token or module is an error here, before the plugin binds its socket.
    pub fn open(opts: &Pkcs11Settings) -> Result<Self, OpenError> {
        Self::open_inner(opts)
            .map_err(|message| OpenError {
                message,
                pin_rejected: false,
            })
            .and_then(|(token, keys)| {
                if token.pin_rejected.load(Ordering::Relaxed) {
                    return Err(OpenError {
                        message: "the token rejected the PIN".into(),
                        pin_rejected: true,
                    });
                }
                Ok(Self {
                    token,
                    permits: Arc::new(Semaphore::new(opts.sessions.max(1))),
                    current_label: opts.current_key_label.clone(),
                    keys,
                    rng: SystemRandom::new(),
                })
            })
    }

    fn open_inner(opts: &Pkcs11Settings) -> Result<(Arc<Token>, KeyRegistry<Arc<RootKey>>), String> {
        let pin = read_pin(&opts.pin_source()?)?;
        let ctx =
            Pkcs11::new(&opts.module).map_err(|e| format!("loading PKCS#11 module {}: {e}", opts.module.display()))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(format!("C_Initialize: {e}")),
        }
        let mut slot = None;
        // The labels seen, so a typo or a token initialised under another label is obvious.
        let mut seen = Vec::new();
        for s in ctx.get_slots_with_token().map_err(|e| format!("listing slots: {e}"))? {
            let info = ctx.get_token_info(s).map_err(|e| format!("token info: {e}"))?;
            let label = info.label().trim_end();
            if label == opts.token_label {
                slot = Some((s, format!("{}\0", opts.token_label)));
                break;
            }
            // SoftHSM2 always offers one uninitialised token: its blank label would only confuse.
            if info.token_initialized() {
                seen.push(format!("{label:?}"));
            }
        }
        let (slot, token_id) = slot.ok_or_else(|| no_token_message(&opts.token_label, &seen))?;
        let token = Arc::new(Token {
            ctx,
            slot,
            token_id: token_id.into_bytes(),
            pin,
            pin_rejected: AtomicBool::new(false),
            login: Mutex::new(()),
            idle: Mutex::new(Vec::new()),
        });
        let keys = KeyRegistry::new();
        let labels = std::iter::once(&opts.current_key_label).chain(&opts.decrypt_only_key_labels);
        for (i, label) in labels.enumerate() {
            let key = Arc::new(RootKey::new(label));
            let id = match token.key_id(&key) {
                Ok(id) => id,
                // Reported by `open` without a second attempt.
                Err(_) if token.pin_rejected.load(Ordering::Relaxed) => return Ok((token, keys)),
                Err(e) => return Err(format!("key {label:?}: {}", e.detail)),
            };
            let entry = Entry::new(label.clone(), key);
            // The first label is the current key, so nothing is known before it.
            if i == 0 {
                keys.make_current(id, entry);
            } else if !keys.insert_new(id, entry) {
                return Err(format!(
                    "key label {label:?} names the same key as another configured label"
                ));
            }
        }
        Ok((token, keys))
    }

    fn key(&self, key_id: &str) -> Option<Arc<RootKey>> {
        self.keys.get(key_id).map(|entry| entry.value)
    }

    /// Runs a blocking token operation on the blocking pool, bounded by the session count.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Token) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| BackendError::new(ErrorKind::Transient, "pkcs11 pool closed"))?;
        let token = Arc::clone(&self.token);
        // The permit lives as long as the blocking call, even if the caller gives up.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&token)
        })
        .await
        .map_err(|_| BackendError::new(ErrorKind::Transient, "pkcs11 worker failed"))?
    }
}

fn wrap_aad(key_id: &str) -> Vec<u8> {
    [WRAP_AAD_DOMAIN, key_id.as_bytes()].concat()
}

#[async_trait]
impl Backend for Pkcs11Backend {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        let key = Arc::new(RootKey::new(&self.current_label));
        let probe_key = Arc::clone(&key);
        let id = self.blocking(move |t| t.key_id(&probe_key)).await?;
        // Another key_id under the label is a root-key rotation; the same one keeps its entry
        // (and the session handle found for it).
        self.keys
            .make_current(id.clone(), Entry::new(self.current_label.clone(), key));
        Ok(id)
    }

    fn knows(&self, key_id: &str) -> bool {
        self.keys.knows(key_id)
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .keys
            .decrypt_only()
            .into_iter()
            .map(|(id, k)| (id, format!("label {:?}", k.locator)))
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let (key_id, key) = self
            .keys
            .current_entry()
            .map(|(id, entry)| (id, entry.value))
            .ok_or_else(|| BackendError::new(ErrorKind::KeyUnusable, "pkcs11: current key unknown"))?;
        let mut iv = [0u8; IV_LEN];
        self.rng
            .fill(&mut iv)
            .map_err(|_| BackendError::new(ErrorKind::Transient, "random number generator failed"))?;
        let plain = Zeroizing::new(kek.expose().to_vec());
        let aad = wrap_aad(&key_id);
        let ct = self
            .blocking(move |t| {
                t.run(&key, |s, h| {
                    let mut iv = iv;
                    let params = GcmParams::new(&mut iv, &aad, Ulong::from(128))?;
                    s.encrypt(&Mechanism::AesGcm(params), h, &plain)
                })
            })
            .await?;
        Ok(Wrapped {
            key_id,
            blob: [&iv[..], &ct].concat(),
        })
    }

    fn max_wrapped_len(&self) -> usize {
        IV_LEN + KEY_LEN + TAG_LEN
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        let key = self
            .key(key_id)
            .ok_or_else(|| BackendError::new(ErrorKind::UnknownKey, "pkcs11: key_id not configured"))?;
        if blob.len() != IV_LEN + KEY_LEN + TAG_LEN {
            return Err(BackendError::new(
                ErrorKind::BadWrappedKey,
                "pkcs11: wrapped KEK has the wrong length",
            ));
        }
        let aad = wrap_aad(key_id);
        let blob = blob.to_vec();
        let plain = self
            .blocking(move |t| {
                t.run(&key, |s, h| {
                    let mut iv = [0u8; IV_LEN];
                    iv.copy_from_slice(&blob[..IV_LEN]);
                    let params = GcmParams::new(&mut iv, &aad, Ulong::from(128))?;
                    s.decrypt(&Mechanism::AesGcm(params), h, &blob[IV_LEN..])
                        .map(Zeroizing::new)
                })
            })
            .await?;
        Kek::from_bytes(&plain)
            .ok_or_else(|| BackendError::new(ErrorKind::BadWrappedKey, "pkcs11: unwrapped KEK has the wrong length"))
    }
}

/// For tests: the module path Debian's softhsm2 package installs.
pub fn softhsm_module() -> &'static Path {
    Path::new("/usr/lib/softhsm/libsofthsm2.so")
}
