//! Vault authentication: where the token comes from, and keeping it valid.
//!
//! - `token`: read from a file, and read again whenever the file changes (an agent or operator
//!   rotates it);
//! - `approle`, `jwt`, `cert`: a login at `auth/{mount}/login`; the credential files are read at
//!   each login, so rotated secret_ids and refreshed JWTs are picked up.
//!
//! A token is renewed (`renew-self`) once two thirds of its lease have passed; if it cannot be
//! renewed (or the renewal is capped short) a login method logs in again. A token the server
//! refuses (403) is dropped, and the next call logs in again. A failed login is not retried
//! before a back-off of 1, 2, 4 … 60 s: a rejected credential never turns into a tight loop.
//! Tokens, secret_ids and JWTs live in zeroizing strings, never in logs or error messages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::http::{Http, kind_of};
use crate::backend::{BackendError, ErrorKind};

/// `[backend.auth]`: one method and its fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `token`, `approle`, `jwt` or `cert`.
    pub method: String,
    /// token: the file holding the token.
    pub token_file: Option<PathBuf>,
    /// approle: the role's id (not a secret on its own).
    pub role_id: Option<String>,
    /// approle: the file holding the secret_id.
    pub secret_id_file: Option<PathBuf>,
    /// jwt: the role to log in as.
    pub role: Option<String>,
    /// jwt: the file holding the JWT (a service-account or node-issued OIDC token).
    pub jwt_file: Option<PathBuf>,
    /// cert: the certificate role's name (optional: Vault then picks the matching one).
    pub name: Option<String>,
    /// Where the auth method is mounted; defaults to the method's name.
    pub mount: Option<String>,
}

impl AuthSettings {
    /// The credential files named here.
    pub fn files(&self) -> Vec<PathBuf> {
        [&self.token_file, &self.secret_id_file, &self.jwt_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// The checked auth method.
#[derive(Debug, Clone)]
enum Method_ {
    Token {
        file: PathBuf,
    },
    AppRole {
        role_id: String,
        secret_id_file: PathBuf,
        mount: String,
    },
    Jwt {
        role: String,
        jwt_file: PathBuf,
        mount: String,
    },
    Cert {
        name: Option<String>,
        mount: String,
    },
}

impl AuthSettings {
    fn check(&self) -> Result<Method_, String> {
        let need = |v: &Option<PathBuf>, field: &str| {
            v.clone()
                .ok_or_else(|| format!("backend.auth.{field}: required by method {:?}", self.method))
        };
        let need_s = |v: &Option<String>, field: &str| {
            v.clone()
                .ok_or_else(|| format!("backend.auth.{field}: required by method {:?}", self.method))
        };
        let mount = |default: &str| self.mount.clone().unwrap_or_else(|| default.to_string());
        let method = match self.method.as_str() {
            "token" => Method_::Token {
                file: need(&self.token_file, "token_file")?,
            },
            "approle" => Method_::AppRole {
                role_id: need_s(&self.role_id, "role_id")?,
                secret_id_file: need(&self.secret_id_file, "secret_id_file")?,
                mount: mount("approle"),
            },
            "jwt" => Method_::Jwt {
                role: need_s(&self.role, "role")?,
                jwt_file: need(&self.jwt_file, "jwt_file")?,
                mount: mount("jwt"),
            },
            "cert" => Method_::Cert {
                name: self.name.clone(),
                mount: mount("cert"),
            },
            other => {
                return Err(format!(
                    "backend.auth.method: {other:?} is not one of: token, approle, jwt, cert"
                ));
            }
        };
        // A field that belongs to another method is a mistake worth naming.
        let used: &[&str] = match &method {
            Method_::Token { .. } => &["token_file"],
            Method_::AppRole { .. } => &["role_id", "secret_id_file", "mount"],
            Method_::Jwt { .. } => &["role", "jwt_file", "mount"],
            Method_::Cert { .. } => &["name", "mount"],
        };
        let set = [
            ("token_file", self.token_file.is_some()),
            ("role_id", self.role_id.is_some()),
            ("secret_id_file", self.secret_id_file.is_some()),
            ("role", self.role.is_some()),
            ("jwt_file", self.jwt_file.is_some()),
            ("name", self.name.is_some()),
            ("mount", self.mount.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(f, is_set)| *is_set && !used.contains(f)) {
            return Err(format!("backend.auth.{field}: not used by method {:?}", self.method));
        }
        Ok(method)
    }
}

struct Token {
    secret: Zeroizing<String>,
    obtained: Instant,
    /// None: the token does not expire.
    lease: Option<Duration>,
    renewable: bool,
}

impl Token {
    fn due(&self) -> bool {
        self.lease.is_some_and(|lease| self.obtained.elapsed() >= lease * 2 / 3)
    }

    fn expired(&self) -> bool {
        self.lease.is_some_and(|lease| self.obtained.elapsed() >= lease)
    }
}

#[derive(Default)]
struct State {
    token: Option<Token>,
    /// The token file's (modified, length, inode) when it was read.
    token_file_stamp: Option<(SystemTime, u64, u64)>,
    failures: u32,
    not_before: Option<Instant>,
    /// What the last failed login was (an outage, or a refused credential), repeated while
    /// the back-off lasts: an outage must not look like a revocation.
    last_failure: Option<ErrorKind>,
}

/// The backend's Vault identity.
pub struct Auth {
    method: Method_,
    state: Mutex<State>,
}

/// A 403 on a token younger than this is the policy's answer, not the token's: no new login
/// (so a denied policy costs at most one login a minute, not a token pile-up in Vault).
const REFRESH_ON_403_AFTER: Duration = Duration::from_secs(60);

/// A token for one call; wiped when dropped.
pub type TokenSecret = Zeroizing<String>;

impl Auth {
    pub fn new(settings: &AuthSettings) -> Result<Self, String> {
        Ok(Self {
            method: settings.check()?,
            state: Mutex::new(State::default()),
        })
    }

    /// The method's name, for logs.
    pub fn method(&self) -> &'static str {
        match self.method {
            Method_::Token { .. } => "token",
            Method_::AppRole { .. } => "approle",
            Method_::Jwt { .. } => "jwt",
            Method_::Cert { .. } => "cert",
        }
    }

    /// A token to call with: the current one, renewed or replaced when due.
    pub async fn token(&self, http: &Http) -> Result<TokenSecret, BackendError> {
        let mut state = self.state.lock().await;
        if let Method_::Token { file } = &self.method
            && stamp(file) != state.token_file_stamp
        {
            state.token = None;
        }
        if let Some(token) = &state.token
            && token.due()
        {
            if token.renewable && self.renew(http, &mut state).await.is_ok() {
                tracing::debug!(method = self.method(), "vault token renewed");
            } else if !matches!(self.method, Method_::Token { .. }) {
                // A fresh login; if that fails (say, an outage), the old token serves on
                // until its lease really ends.
                let old = state.token.take();
                if let Err(e) = self.login(http, &mut state).await {
                    match old {
                        Some(old) if !old.expired() => state.token = Some(old),
                        _ => return Err(e),
                    }
                }
            }
        }
        if state.token.is_none() {
            self.login(http, &mut state).await?;
        }
        Ok(state.token.as_ref().expect("set above").secret.clone())
    }

    /// The server refused `used` (403). Unless it is younger than a minute (then the refusal
    /// is the policy's, and a new login would only be refused again), forget it so the next call logs
    /// in again (or, with a token file, reads it again); true when it was forgotten.
    pub async fn refused(&self, used: &str) -> bool {
        let mut state = self.state.lock().await;
        let stale = state
            .token
            .as_ref()
            .is_some_and(|t| t.secret.as_str() == used && t.obtained.elapsed() > REFRESH_ON_403_AFTER);
        if stale {
            state.token = None;
            state.token_file_stamp = None;
        }
        stale
    }

    async fn renew(&self, http: &Http, state: &mut State) -> Result<(), BackendError> {
        let token = state.token.as_mut().expect("checked by caller");
        let reply = http
            .call(
                Method::POST,
                "auth/token/renew-self",
                Some(&token.secret),
                Some(&json!({})),
            )
            .await?;
        if reply.status != 200 {
            return Err(BackendError::new(kind_of(&reply), "vault renew-self refused"));
        }
        let lease = reply.body["auth"]["lease_duration"].as_u64().unwrap_or(0);
        // A renewal capped by the token's max TTL: better a fresh login now.
        if lease < 10 {
            return Err(BackendError::new(ErrorKind::Transient, "vault token near its max TTL"));
        }
        token.obtained = Instant::now();
        token.lease = Some(Duration::from_secs(lease));
        Ok(())
    }

    async fn login(&self, http: &Http, state: &mut State) -> Result<(), BackendError> {
        if let Some(at) = state.not_before
            && Instant::now() < at
        {
            // Not a new answer from the server: transient, so it never counts as the second
            // of two refusals in a row (the last real answer's kind is in the message).
            return Err(BackendError::new(
                ErrorKind::Transient,
                format!(
                    "vault {} login failed recently ({:?}); next attempt in {} ms",
                    self.method(),
                    state.last_failure.unwrap_or(ErrorKind::Transient),
                    at.saturating_duration_since(Instant::now()).as_millis()
                ),
            ));
        }
        match self.fetch(http, state).await {
            Ok(token) => {
                state.failures = 0;
                state.not_before = None;
                state.last_failure = None;
                tracing::info!(
                    method = self.method(),
                    lease_s = token.lease.map(|l| l.as_secs()),
                    renewable = token.renewable,
                    "vault login succeeded"
                );
                state.token = Some(token);
                Ok(())
            }
            Err(e) => {
                state.failures = state.failures.saturating_add(1);
                let backoff =
                    Duration::from_secs(1 << state.failures.min(6).saturating_sub(1)).min(Duration::from_secs(60));
                state.not_before = Some(Instant::now() + backoff);
                state.last_failure = Some(e.kind);
                tracing::warn!(method = self.method(), error = %e, backoff_s = backoff.as_secs(), "vault login failed");
                Err(e)
            }
        }
    }

    /// Obtains a new token by the configured method.
    async fn fetch(&self, http: &Http, state: &mut State) -> Result<Token, BackendError> {
        let (path, mut body) = match &self.method {
            Method_::Token { file } => {
                let stamp_before = stamp(file);
                let secret = read_credential(file, 0o077, "token_file").await?;
                state.token_file_stamp = stamp_before;
                // Its lease, to renew it in time (a token without the lookup permission still
                // works: it is then used until refused, and the file re-read).
                let reply = http
                    .call(Method::GET, "auth/token/lookup-self", Some(&secret), None)
                    .await?;
                let (lease, renewable) = match reply.status {
                    200 => {
                        let ttl = reply.body["data"]["ttl"].as_u64().unwrap_or(0);
                        (
                            (ttl > 0).then(|| Duration::from_secs(ttl)),
                            reply.body["data"]["renewable"].as_bool().unwrap_or(false),
                        )
                    }
                    403 if reply.is_vault_error() => {
                        return Err(BackendError::new(
                            ErrorKind::Denied,
                            "vault: the token in token_file is not valid",
                        ));
                    }
                    _ => {
                        return Err(BackendError::new(
                            kind_of(&reply),
                            format!("vault lookup-self: {}", reply.error_text()),
                        ));
                    }
                };
                return Ok(Token {
                    secret,
                    obtained: Instant::now(),
                    lease,
                    renewable,
                });
            }
            Method_::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = read_credential(secret_id_file, 0o077, "secret_id_file").await?;
                (
                    format!("auth/{mount}/login"),
                    json!({"role_id": role_id, "secret_id": secret_id.as_str()}),
                )
            }
            Method_::Jwt { role, jwt_file, mount } => {
                // Projected service-account tokens are often mode 0644: refuse only writable ones.
                let jwt = read_credential(jwt_file, 0o022, "jwt_file").await?;
                (
                    format!("auth/{mount}/login"),
                    json!({"role": role, "jwt": jwt.as_str()}),
                )
            }
            Method_::Cert { name, mount } => {
                let body = match name {
                    Some(name) => json!({ "name": name }),
                    None => json!({}),
                };
                (format!("auth/{mount}/login"), body)
            }
        };
        let reply = http.call(Method::POST, &path, None, Some(&body)).await;
        wipe(&mut body);
        let reply = reply?;
        if reply.status != 200 {
            let kind = match reply.status {
                400 | 401 | 403 if reply.is_vault_error() => ErrorKind::Denied,
                _ => kind_of(&reply),
            };
            return Err(BackendError::new(
                kind,
                format!("vault {} login: {}", self.method(), reply.error_text()),
            ));
        }
        let auth = &reply.body["auth"];
        let secret = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "vault login: no client_token in the answer"))?;
        let lease = auth["lease_duration"].as_u64().unwrap_or(0);
        Ok(Token {
            secret: Zeroizing::new(secret.to_string()),
            obtained: Instant::now(),
            lease: (lease > 0).then(|| Duration::from_secs(lease)),
            renewable: auth["renewable"].as_bool().unwrap_or(false),
        })
    }
}

/// Clears the credential strings inside a login body before it is dropped.
fn wipe(body: &mut Value) {
    if let Some(map) = body.as_object_mut() {
        for v in map.values_mut() {
            if let Value::String(s) = v {
                zeroize::Zeroize::zeroize(s);
            }
        }
    }
}

/// Reads a credential file on the blocking pool: a login runs while calls are being served.
async fn read_credential(path: &Path, deny_mode: u32, field: &'static str) -> Result<Zeroizing<String>, BackendError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || read_credential_now(&path, deny_mode, field))
        .await
        .map_err(|e| BackendError::new(ErrorKind::Transient, format!("vault backend.auth.{field}: {e}")))?
}

fn read_credential_now(path: &Path, deny_mode: u32, field: &str) -> Result<Zeroizing<String>, BackendError> {
    let policy = crate::secret_file::Policy {
        deny_mode,
        max_len: 64 * 1024,
    };
    let bytes = crate::secret_file::read(path, &policy)
        .map_err(|e| BackendError::new(ErrorKind::Denied, format!("vault backend.auth.{field}: {e}")))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| BackendError::new(ErrorKind::Denied, format!("vault backend.auth.{field}: not UTF-8")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(BackendError::new(
            ErrorKind::Denied,
            format!("vault backend.auth.{field}: empty"),
        ));
    }
    Ok(Zeroizing::new(text.to_string()))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}
