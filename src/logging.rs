//! Structured logs (tracing): text or JSON, level from config or `RUST_LOG`.
//!
//! What may appear in a log line: method, uid (truncated, escaped), the SHA-256 of a key_id,
//! sizes, durations, gRPC codes and error kinds. Never plaintext, seeds, KEKs or ciphertext bytes.

use std::fmt;

use ring::digest;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `level`. Logs go to stderr.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Displays `sha256:<hex>` of a key_id, the form the apiserver logs and exports, computed only
/// when the line is actually written.
pub struct KeyIdHash<'a>(pub &'a str);

impl fmt::Display for KeyIdHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = digest::digest(&digest::SHA256, self.0.as_bytes());
        write!(f, "sha256:{}", hex::encode(d.as_ref()))
    }
}

/// A request uid fit for a log line: at most 64 bytes, escaped by the `Debug` formatter.
pub fn short_uid(uid: &str) -> &str {
    let mut end = uid.len().min(64);
    while !uid.is_char_boundary(end) {
        end -= 1;
    }
    &uid[..end]
}
