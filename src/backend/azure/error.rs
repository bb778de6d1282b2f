//! What an Azure SDK error means for the plugin. Only the status, Key Vault's error codes and a
//! bounded, single-line message reach the log: never the raw answer (the SDK's `Debug` form
//! carries it whole), never a token.

use azure_core::error::ErrorKind as AzKind;

use crate::backend::{BackendError, ErrorKind};

/// Inner error codes with which Key Vault refuses an operation on a key version that cannot be
/// used (disabled, expired, not yet valid): a verdict on the key, not on the caller.
const KEY_STATE_CODES: [&str; 3] = ["KeyDisabled", "KeyExpired", "KeyNotYetValid"];

/// An HTTP answer's status and codes, as far as they could be read.
pub struct Answer {
    pub status: u16,
    /// `error.code` (`Forbidden`, `KeyNotFound`, `BadParameter` …), or Entra ID's `error`.
    pub code: String,
    /// `error.innererror.code` (`KeyDisabled`, `ForbiddenByRbac`, `AccessDenied` …).
    pub inner: String,
    /// The body is the service's own error JSON (Key Vault's `{"error": {"code": …}}`, Entra
    /// ID's `{"error": "invalid_client", …}`, a managed-identity endpoint's), not a proxy's page:
    /// only such an answer is a verdict.
    pub official: bool,
}

/// At most `max` characters of `text` on one line.
pub fn bounded(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

/// The answer inside `e`, if `e` is an HTTP error (the credential's errors wrap theirs).
fn answer(e: &azure_core::Error) -> Option<Answer> {
    let mut current: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(az) = current.downcast_ref::<azure_core::Error>()
            && let AzKind::HttpResponse {
                status, raw_response, ..
            } = az.kind()
        {
            let body: serde_json::Value = raw_response
                .as_ref()
                .and_then(|raw| serde_json::from_slice(raw.body().as_ref()).ok())
                .unwrap_or_default();
            let error = &body["error"];
            let (code, inner) = match error {
                serde_json::Value::String(code) => (code.as_str(), ""),
                _ => (
                    error["code"].as_str().unwrap_or_default(),
                    error["innererror"]["code"].as_str().unwrap_or_default(),
                ),
            };
            return Some(Answer {
                status: u16::from(*status),
                code: bounded(code, 64),
                inner: bounded(inner, 64),
                official: !code.is_empty() || body["statusCode"].is_number(),
            });
        }
        current = current.source()?;
    }
}

/// Whether an SDK error of a kind `is` is in `e`'s chain.
fn has_kind(e: &azure_core::Error, is: fn(&AzKind) -> bool) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(az) = err.downcast_ref::<azure_core::Error>()
            && is(az.kind())
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// Whether `e` came from getting a token (Entra ID, a managed-identity endpoint, a file).
fn is_credential(e: &azure_core::Error) -> bool {
    has_kind(e, |k| matches!(k, AzKind::Credential))
}

/// Whether `e` is a failure to reach the other end (refused, reset, timed out).
fn is_network(e: &azure_core::Error) -> bool {
    has_kind(e, |k| matches!(k, AzKind::Connection | AzKind::Io))
}

/// Maps an SDK error from `what` (`get key`, `wrapKey`, `unwrapKey`) to the plugin's kinds.
/// `unwrapKey` answered 400 is the blob's fault (it does not decrypt under that version).
pub fn classify(e: &azure_core::Error, what: &str) -> BackendError {
    let text = bounded(&crate::backend::tls::error_chain(e), 400);
    if is_credential(e) {
        let kind = match answer(e).map(|a| (a.status, a.official)) {
            // Entra ID refused the credential (a wrong or expired secret, an unknown app, a
            // certificate it does not know): the plugin's identity is refused.
            Some((400 | 401 | 403, true)) => ErrorKind::Denied,
            Some(_) => ErrorKind::Transient,
            // No answer: unreachable endpoint, or nothing to authenticate with (a missing
            // token file or environment variable).
            None if is_network(e) && crate::backend::tls::is_tls_refusal(e) => ErrorKind::Configuration,
            None if is_network(e) => ErrorKind::Transient,
            None => ErrorKind::Configuration,
        };
        return BackendError::new(kind, format!("azure {what}: getting a token: {text}"));
    }
    let Some(a) = answer(e) else {
        let kind = match e.kind() {
            AzKind::Connection | AzKind::Io if crate::backend::tls::is_tls_refusal(e) => ErrorKind::Configuration,
            AzKind::Connection | AzKind::Io => ErrorKind::Transient,
            // An answer that does not parse: transient, never a verdict.
            AzKind::DataConversion => ErrorKind::Transient,
            // The challenge's resource does not match the vault's domain (a vault_url that is not
            // Key Vault's, or an answer from something else): a setting to fix.
            _ if text.contains("challenge") => ErrorKind::Configuration,
            _ => ErrorKind::Transient,
        };
        return BackendError::new(kind, format!("azure {what}: {text}"));
    };
    let kind = match (a.status, a.code.as_str(), a.inner.as_str()) {
        // Not Key Vault's own error body (a proxy's or gateway's page): nothing about the key.
        _ if !a.official => ErrorKind::Transient,
        (403, _, inner) if KEY_STATE_CODES.contains(&inner) => ErrorKind::KeyUnusable,
        // Key Vault's own 401 after the challenge: the token's identity or audience is refused.
        (401 | 403, _, _) => ErrorKind::Denied,
        (404, "KeyNotFound", _) => ErrorKind::KeyUnusable,
        (400, _, _) if what == "unwrapKey" => ErrorKind::BadWrappedKey,
        _ => ErrorKind::Transient,
    };
    let inner = if a.inner.is_empty() {
        String::new()
    } else {
        format!(" ({})", a.inner)
    };
    BackendError::new(
        kind,
        format!("azure {what}: HTTP {} {}{inner}: {text}", a.status, a.code),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::headers::Headers;
    use azure_core::http::{RawResponse, StatusCode};

    fn http(status: StatusCode, body: &str) -> azure_core::Error {
        let raw = RawResponse::from_bytes(status, Headers::new(), body.as_bytes().to_vec());
        azure_core::Error::with_message(
            AzKind::HttpResponse {
                status,
                error_code: None,
                raw_response: Some(Box::new(raw)),
            },
            "message",
        )
    }

    #[test]
    fn key_vault_answers_map_to_kinds() {
        let disabled = r#"{"error":{"code":"Forbidden","message":"Operation unwrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#;
        let rbac = r#"{"error":{"code":"Forbidden","message":"Caller is not authorized","innererror":{"code":"ForbiddenByRbac"}}}"#;
        let gone = r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k was not found"}}"#;
        let bad = r#"{"error":{"code":"BadParameter","message":"Error occurred while decrypting the data."}}"#;
        let kind = |e: azure_core::Error, what: &str| classify(&e, what).kind;
        assert_eq!(
            kind(http(StatusCode::Forbidden, disabled), "unwrapKey"),
            ErrorKind::KeyUnusable
        );
        assert_eq!(kind(http(StatusCode::Forbidden, rbac), "get key"), ErrorKind::Denied);
        assert_eq!(
            kind(http(StatusCode::NotFound, gone), "get key"),
            ErrorKind::KeyUnusable
        );
        // A 404 that is not Key Vault's (a proxy's page): nothing about the key.
        assert_eq!(
            kind(http(StatusCode::NotFound, "<html>"), "get key"),
            ErrorKind::Transient
        );
        assert_eq!(
            kind(http(StatusCode::BadRequest, bad), "unwrapKey"),
            ErrorKind::BadWrappedKey
        );
        assert_eq!(kind(http(StatusCode::BadRequest, bad), "wrapKey"), ErrorKind::Transient);
        assert_eq!(
            kind(http(StatusCode::TooManyRequests, "{}"), "wrapKey"),
            ErrorKind::Transient
        );
        assert_eq!(
            kind(http(StatusCode::ServiceUnavailable, ""), "get key"),
            ErrorKind::Transient
        );
        let refused = azure_core::Error::with_error(
            AzKind::Credential,
            http(StatusCode::Unauthorized, r#"{"error":"invalid_client"}"#),
            "ClientSecretCredential authentication failed.",
        );
        assert_eq!(kind(refused, "get key"), ErrorKind::Denied);
        let gateway = azure_core::Error::with_error(
            AzKind::Credential,
            http(StatusCode::Forbidden, "<html>blocked</html>"),
            "ClientSecretCredential authentication failed.",
        );
        assert_eq!(kind(gateway, "get key"), ErrorKind::Transient);
        let unset = azure_core::Error::with_message(AzKind::Credential, "no token file specified");
        assert_eq!(kind(unset, "get key"), ErrorKind::Configuration);
    }

    #[test]
    fn details_are_bounded_and_one_line() {
        let long = format!(
            r#"{{"error":{{"code":"Forbidden","message":"{}\nline"}}}}"#,
            "x".repeat(5000)
        );
        let e = classify(&http(StatusCode::Forbidden, &long), "get key");
        assert!(e.detail.len() < 600, "{}", e.detail.len());
        assert!(!e.detail.contains('\n'));
    }
}
