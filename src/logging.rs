//! Structured logs (tracing): text or JSON, level from config or `RUST_LOG`.
//!
//! What may appear in a log line: method, uid (truncated, escaped), the SHA-256 of a key_id,
//! sizes, durations, gRPC codes and error kinds. Never plaintext, seeds, KEKs or ciphertext bytes.

use std::fmt;

use ring::digest;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::parse::one_of(d, &[("text", Self::Text), ("json", Self::Json)])
    }
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log level setting: one level, or comma-separated directives that each name a
/// level (`info,kms_plugin=debug`). A bare word that is not a level ("warning") would be read
/// by the filter as a target name and silence every line, so it is refused.
pub fn check_level(spec: &str) -> Result<(), String> {
    let valid = || {
        format!(
            "{spec:?} is not a log level (one of {}, or directives like \"info,kms_plugin=debug\")",
            LEVELS.join(", ")
        )
    };
    if spec.trim().is_empty() {
        return Err(valid());
    }
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(valid());
        }
    }
    EnvFilter::try_new(spec).map(|_| ()).map_err(|_| valid())
}

/// Changes the log level of the running process (a configuration reload).
pub struct LevelHandle {
    handle: Option<tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
    /// RUST_LOG was set and valid: it wins over `log.level`, at start and on reload.
    from_env: bool,
}

impl LevelHandle {
    /// Applies `level` (already checked by the settings) unless RUST_LOG decides.
    pub fn set(&self, level: &str) {
        if let (Some(handle), false) = (&self.handle, self.from_env) {
            let _ = handle.reload(EnvFilter::new(level));
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set and valid, overrides `level`; an
/// invalid one is ignored with a warning rather than silencing the log. Logs go to stderr.
pub fn init(level: &str, format: LogFormat) -> LevelHandle {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = std::env::var("RUST_LOG").ok();
    let (spec, ignored, from_env) = match env {
        Some(env) if check_level(&env).is_ok() => (env, None, true),
        Some(env) => (level.to_string(), Some(env), false),
        None => (level.to_string(), None, false),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(EnvFilter::new(spec));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(not_aws_trace));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    if let Some(env) = ignored {
        tracing::warn!(rust_log = ?env, "RUST_LOG is not a valid level or directive list; using log.level");
    }
    LevelHandle {
        handle: installed.is_ok().then_some(handle),
        from_env,
    }
}

/// Whether an event may be written whatever the level: the AWS SDK's trace events print whole
/// requests and responses (the KEK in the bodies of Encrypt and Decrypt, the session token in
/// the signed canonical request), so its targets (`aws_sigv4`, `aws_smithy_runtime` …) are
/// capped at debug even when the level says trace.
fn not_aws_trace(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.target().starts_with("aws_") && *meta.level() == tracing::Level::TRACE)
}

/// Displays `sha256:<hex>` of a key_id, the form the apiserver logs and exports, computed only
/// when the line is actually written.
pub struct KeyIdHash<'a>(pub &'a str);

impl fmt::Display for KeyIdHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No key_id (none known yet): `-`, never the hash of "" that looks like a real key.
        if self.0.is_empty() {
            return f.write_str("-");
        }
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

/// `n` and `noun`, plural unless `n` is 1 ("1 local KEK", "2 local KEKs").
pub fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A backend's decrypt-only keys on one line, each as `key_id (hash, name)`; `none` if there
/// are none. key_ids are public (the apiserver stores them in every object), so they are shown
/// whole: the operator compares them with the configuration.
pub fn key_list(keys: &[(String, String)]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    let shown: Vec<String> = keys
        .iter()
        .map(|(id, name)| {
            let id_shown = if id.is_empty() { "-" } else { id.as_str() };
            format!("{id_shown} ({}, {name})", KeyIdHash(id))
        })
        .collect();
    shown.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_key_lists_read_as_english() {
        assert_eq!(counted(1, "local KEK"), "1 local KEK");
        assert_eq!(counted(0, "local KEK"), "0 local KEKs");
        assert_eq!(counted(2, "object"), "2 objects");
        assert_eq!(key_list(&[]), "none");
        let listed = key_list(&[("local:ab".into(), "/k".into()), (String::new(), "uid \"7\"".into())]);
        assert_eq!(
            listed,
            format!("local:ab ({}, /k); - (-, uid \"7\")", KeyIdHash("local:ab"))
        );
    }
}
