//! The HTTP side of the Vault backend: one pooled HTTPS client (rustls, ring), the request
//! helper that every Vault call goes through, and what an HTTP outcome means as a
//! [`BackendError`] kind.
//!
//! Plain `http://` is accepted only for a loopback address (a local Vault Agent, a dev server):
//! anything else carries KEKs and tokens over the network and must be `https://`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::backend::tls::{TlsSettings, error_chain, is_tls_refusal};
use crate::backend::{BackendError, ErrorKind};

/// Largest Vault response read.
const MAX_RESPONSE: usize = 1 << 20;

/// TLS material and the server's address.
pub struct Endpoint<'a> {
    pub address: &'a str,
    pub tls: &'a TlsSettings,
    pub namespace: Option<&'a str>,
    pub timeout: Duration,
}

/// A Vault HTTP API client.
pub struct Http {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    namespace: Option<String>,
    timeout: Duration,
}

/// Longest error text from a Vault answer that goes into a log line or `check`'s output.
const MAX_ERROR_TEXT: usize = 200;

/// A Vault answer: HTTP status and JSON body (`Null` when empty or not JSON).
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// Vault's own error strings, scrubbed for logs (see [`scrub_errors`]).
    errors: String,
}

impl Reply {
    /// Whether this is an error answer of Vault's own API: a JSON object with an `errors` array.
    /// A proxy's or ingress's page, or garbage, is not: it says nothing about the key.
    pub fn is_vault_error(&self) -> bool {
        self.body.get("errors").is_some_and(Value::is_array)
    }

    /// The status and Vault's error strings, for logs; never any other part of the body.
    pub fn error_text(&self) -> String {
        format!("HTTP {}: {}", self.status, self.errors)
    }
}

/// Vault's error strings of an answer to `path`, safe to log: none for an auth endpoint (a
/// server or proxy that echoes the request would echo a credential), else the `errors` strings
/// on one line, with every string we sent (a KEK, a token) cut out, at most
/// [`MAX_ERROR_TEXT`] characters.
fn scrub_errors(path: &str, body: &Value, sent: &[&str]) -> String {
    if path.starts_with("auth/") {
        return "(answer of an auth endpoint not shown)".into();
    }
    let Some(errors) = body.get("errors").and_then(Value::as_array) else {
        return "(not a Vault API answer)".into();
    };
    let mut text = errors.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; ");
    for secret in sent.iter().filter(|s| s.len() >= 4) {
        text = text.replace(secret, "<redacted>");
    }
    let text: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The string values of a request body (what must never come back into a log).
fn sent_strings<'a>(body: Option<&'a Value>, token: Option<&'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = token.into_iter().collect();
    if let Some(Value::Object(map)) = body {
        out.extend(map.values().filter_map(Value::as_str));
    }
    out
}

impl Http {
    /// Builds the client; errors name the setting at fault.
    pub fn new(endpoint: &Endpoint<'_>) -> Result<Self, String> {
        let base = endpoint.address.trim_end_matches('/').to_string();
        let uri: hyper::Uri = base.parse().map_err(|e| format!("address {base:?}: {e}"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if is_loopback(uri.host().unwrap_or("")) => {
                tracing::warn!(address = %base, "vault: plain http to a loopback address (a local agent or dev server)")
            }
            _ => {
                return Err(format!(
                    "address {base:?}: must be https:// (http:// only to a loopback address)"
                ));
            }
        }
        let tls = endpoint.tls.client_config()?;
        let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        let builder = match endpoint.tls.server_name()? {
            Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
            None => builder,
        };
        let connector = builder.enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            base,
            namespace: endpoint.namespace.map(str::to_string),
            timeout: endpoint.timeout,
        })
    }

    /// One API call: `path` is below `/v1/`. Transport failures and timeouts are
    /// [`ErrorKind::Transient`]; any HTTP answer is returned for the caller to judge.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Reply, BackendError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}/v1/{path}", self.base))
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("x-vault-token", token);
        }
        if let Some(ns) = &self.namespace {
            request = request.header("x-vault-namespace", ns.as_str());
        }
        let body_sent = body;
        let payload = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = request
            .body(Full::new(payload))
            .map_err(|e| BackendError::new(ErrorKind::Transient, format!("vault request: {e}")))?;
        let call = async {
            let response = self.client.request(request).await.map_err(|e| {
                // A certificate the trust settings refuse is a configuration to fix, not
                // an outage to wait out.
                let kind = if is_tls_refusal(&e) {
                    ErrorKind::Denied
                } else {
                    ErrorKind::Transient
                };
                // Named, as KMIP's message names its server: an unreachable address is often a typo.
                BackendError::new(kind, format!("vault {path} at {}: {}", self.base, error_chain(&e)))
            })?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| BackendError::new(ErrorKind::Transient, format!("vault {path}: reading the answer: {e}")))?
                .to_bytes();
            // Anything but a JSON object is not an answer of Vault's API.
            let body = match serde_json::from_slice::<Value>(&bytes) {
                Ok(v @ Value::Object(_)) => v,
                _ => Value::Null,
            };
            let errors = if (200..300).contains(&status) {
                String::new()
            } else {
                scrub_errors(path, &body, &sent_strings(body_sent, token))
            };
            Ok(Reply { status, body, errors })
        };
        tokio::time::timeout(self.timeout, call).await.unwrap_or_else(|_| {
            Err(BackendError::new(
                ErrorKind::Transient,
                format!(
                    "vault {path} at {}: no answer within {} ms",
                    self.base,
                    self.timeout.as_millis()
                ),
            ))
        })
    }
}

/// What an HTTP error answer means, before any operation-specific reading of a 400. Only an
/// error answer of Vault's own API is authoritative: the same status with any other body (an
/// ingress's HTML page, a proxy's refusal, garbage) is a transient fault, never a denial or a
/// revocation.
pub fn kind_of(reply: &Reply) -> ErrorKind {
    if !reply.is_vault_error() {
        return ErrorKind::Transient;
    }
    match reply.status {
        401 | 403 => ErrorKind::Denied,
        404 => ErrorKind::KeyUnusable,
        400 => ErrorKind::BadWrappedKey,
        // 429, sealed or standby (503), other 5xx, and anything unexpected: retry later.
        _ => ErrorKind::Transient,
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
