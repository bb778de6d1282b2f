//! What an Azure SDK error means for the plugin. Only the status, the service's error codes
//! (Key Vault's `error.code` and `innererror.code`, Entra ID's `error` and `AADSTS` numbers) and,
//! for failures without an answer, the SDK's own text reach the log: never the answer's free
//! text (`error.message`, a non-JSON body, Entra ID's `error_description`), which a server, a
//! proxy or a token endpoint could fill with what was sent (the KEK, the wrapped blob, the client
//! secret or assertion). What was sent is also cut out of the whole detail in every encoding
//! ([`crate::backend::said`]), and the SDK's `Debug` form, which carries the raw answer, is never
//! printed.
//!
//! Only Key Vault's own 403 refusals (`ForbiddenByRbac`, `AccessDenied`, `Forbidden` without an
//! inner code) are `Denied`, and only its key-state codes and `KeyNotFound` are `KeyUnusable`:
//! both are authoritative (the core revokes the key). A token endpoint's refusal (an expired or
//! wrong secret, a clock skew, an unknown managed identity), Key Vault's 401 (a token it does not
//! take, or a proxy that dropped the `Authorization` header) and its firewall's 403 are set-up
//! problems (`Configuration`), served from cache like an outage.

use azure_core::error::ErrorKind as AzKind;

use crate::backend::said::said;
use crate::backend::{BackendError, ErrorKind};

/// Inner error codes with which Key Vault refuses an operation on a key version that cannot be
/// used (disabled, expired, not yet valid): a verdict on the key, not on the caller.
const KEY_STATE_CODES: [&str; 3] = ["KeyDisabled", "KeyExpired", "KeyNotYetValid"];

/// Inner codes of Key Vault's 403 that mean the caller's identity is refused the key.
const DENIED_CODES: [&str; 2] = ["ForbiddenByRbac", "AccessDenied"];

/// Entra ID's "client assertion is not within its valid time range" (a clock skew, an expired
/// federated token): transient, the next token file or a fixed clock heals it.
const AADSTS_TIME_RANGE: &str = "700024";

/// An HTTP answer's status and codes, as far as they could be read.
pub struct Answer {
    pub status: u16,
    /// `error.code` (`Forbidden`, `KeyNotFound`, `BadParameter` …), or Entra ID's `error`.
    pub code: String,
    /// `error.innererror.code` (`KeyDisabled`, `ForbiddenByRbac`, `AccessDenied` …).
    pub inner: String,
    /// Entra ID's `error_codes` (the AADSTS numbers), comma-separated.
    pub aadsts: String,
    /// The body is Key Vault's error JSON, `{"error": {"code": "…"}}` with a string code. A bare
    /// `{"statusCode": …}` (an API gateway's) or a proxy's page is not: only the service's own
    /// answer is a verdict.
    pub official: bool,
    /// The body is a token endpoint's error JSON (Entra ID's or a managed-identity endpoint's
    /// `{"error": "invalid_client", …}`), or Key Vault's form.
    pub token_body: bool,
}

/// At most `max` characters of `text` on one line.
pub fn bounded(text: &str, max: usize) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

/// An error code as the services spell them (`ForbiddenByRbac`, `invalid_client`): short, letters,
/// digits, `_` and `.`. Anything else (an echo of what was sent, a token) is not printed.
fn code(text: &str) -> String {
    if text.len() <= 40
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        text.to_string()
    } else {
        "(unreadable code)".to_string()
    }
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
            let (code_text, inner) = match error {
                serde_json::Value::String(code) => (code.as_str(), ""),
                _ => (
                    error["code"].as_str().unwrap_or_default(),
                    error["innererror"]["code"].as_str().unwrap_or_default(),
                ),
            };
            let aadsts: Vec<String> = body["error_codes"]
                .as_array()
                .map(|codes| {
                    codes
                        .iter()
                        .filter_map(serde_json::Value::as_u64)
                        .take(4)
                        .map(|n| n.to_string())
                        .collect()
                })
                .unwrap_or_default();
            return Some(Answer {
                status: u16::from(*status),
                code: code(code_text),
                inner: code(inner),
                aadsts: aadsts.join(","),
                official: error.is_object() && !code_text.is_empty(),
                token_body: !code_text.is_empty(),
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

/// The status and codes of an answer, for the log.
fn codes(a: &Answer) -> String {
    let mut out = format!("HTTP {}", a.status);
    if !a.code.is_empty() {
        out = format!("{out} {}", a.code);
    }
    if !a.inner.is_empty() {
        out = format!("{out} ({})", a.inner);
    }
    if !a.aadsts.is_empty() {
        out = format!("{out} AADSTS{}", a.aadsts);
    }
    if !a.official && !a.token_body {
        out.push_str(" (not the service's error body)");
    }
    out
}

/// Maps an SDK error from `what` (`get key`, `wrapKey`, `unwrapKey`) to the plugin's kinds.
/// `sent` is what the request carried (the KEK, the wrapped blob): cut out of the detail.
/// `unwrapKey` answered 400 is the blob's fault (it does not decrypt under that version).
pub fn classify(e: &azure_core::Error, what: &str, sent: &[&[u8]]) -> BackendError {
    // The SDK's text, read only when there is no answer (a connection, TLS or parsing failure,
    // a missing setting): then it is the SDK's or the OS's words, not the server's.
    let text = || crate::backend::tls::error_chain(e);
    let make = |kind, detail: String| BackendError::new(kind, said(&detail, sent));
    if is_credential(e) {
        let (kind, detail) = match answer(e) {
            // The token endpoint refused (a wrong or expired secret, an unknown app or managed
            // identity, a certificate it does not know): the set-up to fix, not a verdict on
            // the key. A clock skew or an expired federated token heals by itself.
            Some(a)
                if a.token_body
                    && (400..500).contains(&a.status)
                    && a.aadsts.split(',').any(|c| c == AADSTS_TIME_RANGE) =>
            {
                (ErrorKind::Transient, codes(&a))
            }
            Some(a) if a.token_body && matches!(a.status, 400 | 401 | 403) => (ErrorKind::Configuration, codes(&a)),
            Some(a) => (ErrorKind::Transient, codes(&a)),
            // No answer: unreachable endpoint, or nothing to authenticate with (a missing
            // token file or environment variable).
            None if is_network(e) && crate::backend::tls::is_tls_refusal(e) => (ErrorKind::Configuration, text()),
            None if is_network(e) => (ErrorKind::Transient, text()),
            None => (ErrorKind::Configuration, text()),
        };
        return make(kind, format!("azure {what}: getting a token: {detail}"));
    }
    let Some(a) = answer(e) else {
        let text = text();
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
        return make(kind, format!("azure {what}: {text}"));
    };
    let kind = match (a.status, a.code.as_str(), a.inner.as_str()) {
        // Not Key Vault's own error body (a proxy's or gateway's page): nothing about the key.
        _ if !a.official => ErrorKind::Transient,
        // Expiry and not-before bind encrypt and wrap only: the version still decrypts, so a
        // wrap refused for them must not revoke it.
        (403, _, "KeyExpired" | "KeyNotYetValid") if what == "wrapKey" => ErrorKind::Configuration,
        (403, _, inner) if KEY_STATE_CODES.contains(&inner) => ErrorKind::KeyUnusable,
        // The vault's identity-based refusals: the plugin's identity may not use the key.
        (403, _, inner) if DENIED_CODES.contains(&inner) => ErrorKind::Denied,
        (403, "Forbidden", "") => ErrorKind::Denied,
        // The vault's network rules (ForbiddenByFirewall), or a 403 we do not know: a set-up
        // to fix, never a revocation.
        (403, _, _) => ErrorKind::Configuration,
        // Key Vault's own 401 after the challenge: a token it does not take (audience, tenant),
        // or the bearer stripped on the way. The set-up, not the key.
        (401, _, _) => ErrorKind::Configuration,
        (404, "KeyNotFound", _) => ErrorKind::KeyUnusable,
        (400, _, _) if what == "unwrapKey" => ErrorKind::BadWrappedKey,
        _ => ErrorKind::Transient,
    };
    make(kind, format!("azure {what}: {}", codes(&a)))
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
        let policy = r#"{"error":{"code":"Forbidden","message":"The user, group or application does not have keys get permission"}}"#;
        let firewall = r#"{"error":{"code":"Forbidden","message":"Client address is not authorized","innererror":{"code":"ForbiddenByFirewall"}}}"#;
        let gone = r#"{"error":{"code":"KeyNotFound","message":"A key with (name/id) k was not found"}}"#;
        let bad = r#"{"error":{"code":"BadParameter","message":"Error occurred while decrypting the data."}}"#;
        let kind = |e: azure_core::Error, what: &str| classify(&e, what, &[]).kind;
        assert_eq!(
            kind(http(StatusCode::Forbidden, disabled), "unwrapKey"),
            ErrorKind::KeyUnusable
        );
        assert_eq!(kind(http(StatusCode::Forbidden, rbac), "get key"), ErrorKind::Denied);
        assert_eq!(kind(http(StatusCode::Forbidden, policy), "get key"), ErrorKind::Denied);
        assert_eq!(
            kind(http(StatusCode::Forbidden, firewall), "get key"),
            ErrorKind::Configuration
        );
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
    }

    #[test]
    fn only_the_vaults_own_refusals_are_authoritative() {
        let kind = |e: azure_core::Error| classify(&e, "get key", &[]).kind;
        // Key Vault's 401 (a proxy stripped the bearer, a token of another audience): set-up.
        let missing =
            r#"{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}"#;
        assert_eq!(kind(http(StatusCode::Unauthorized, missing)), ErrorKind::Configuration);
        // An API gateway's body with only a statusCode is not the vault's answer.
        let gateway = r#"{"statusCode":403,"message":"Forbidden"}"#;
        assert_eq!(kind(http(StatusCode::Forbidden, gateway)), ErrorKind::Transient);
        let gateway = r#"{"statusCode":401,"message":"Access denied due to missing subscription key."}"#;
        assert_eq!(kind(http(StatusCode::Unauthorized, gateway)), ErrorKind::Transient);
        // An `error` that is a string is not Key Vault's form either.
        assert_eq!(
            kind(http(StatusCode::Forbidden, r#"{"error":"Forbidden"}"#)),
            ErrorKind::Transient
        );
    }

    #[test]
    fn token_endpoint_refusals_are_set_up_never_revocations() {
        let kind = |e: azure_core::Error| classify(&e, "get key", &[]).kind;
        let credential = |status, body: &str| {
            azure_core::Error::with_error(
                AzKind::Credential,
                http(status, body),
                "ClientSecretCredential authentication failed.",
            )
        };
        let refused = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#;
        assert_eq!(
            kind(credential(StatusCode::Unauthorized, refused)),
            ErrorKind::Configuration
        );
        let skew = r#"{"error":"invalid_client","error_description":"AADSTS700024: Client assertion is not within its valid time range.","error_codes":[700024]}"#;
        assert_eq!(kind(credential(StatusCode::BadRequest, skew)), ErrorKind::Transient);
        let no_identity = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
        assert_eq!(
            kind(credential(StatusCode::BadRequest, no_identity)),
            ErrorKind::Configuration
        );
        assert_eq!(
            kind(credential(StatusCode::Forbidden, "<html>blocked</html>")),
            ErrorKind::Transient
        );
        let unset = azure_core::Error::with_message(AzKind::Credential, "no token file specified");
        assert_eq!(kind(unset), ErrorKind::Configuration);
        let e = classify(&credential(StatusCode::Unauthorized, refused), "get key", &[]);
        assert!(
            e.detail.contains("HTTP 401 invalid_client AADSTS7000215"),
            "{}",
            e.detail
        );
    }

    #[test]
    fn echoed_requests_never_reach_the_detail() {
        use base64::Engine;
        let kek = [0x5au8; 32];
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kek);
        // The echo in the message, in a non-JSON body, in the code itself.
        for body in [
            format!(r#"{{"error":{{"code":"BadParameter","message":"bad {{\"value\":\"{b64}\"}}"}}}}"#),
            format!(r#"{{"value":"{b64}"}}"#),
            format!(r#"{{"error":{{"code":"{b64}"}}}}"#),
            format!(r#"{{"error":{{"code":"{}"}}}}"#, hex::encode(kek)),
        ] {
            for what in ["wrapKey", "unwrapKey"] {
                let e = classify(&http(StatusCode::BadRequest, &body), what, &[&kek]);
                assert!(!e.detail.contains(&b64), "{}", e.detail);
                assert!(!e.detail.contains(&hex::encode(kek)), "{}", e.detail);
                assert!(!e.detail.contains("message"), "{}", e.detail);
            }
        }
        // A token endpoint echoing the form (the client secret, an assertion) in its description.
        let echo = r#"{"error":"invalid_request","error_description":"client_secret=cs~hunter2hunter2hunter2 client_assertion=eyJhbGciOi.x.y"}"#;
        let e = classify(
            &azure_core::Error::with_error(
                AzKind::Credential,
                http(StatusCode::BadRequest, echo),
                "ClientSecretCredential authentication failed. client_secret=cs~hunter2hunter2hunter2",
            ),
            "get key",
            &[],
        );
        assert!(
            !e.detail.contains("hunter2") && !e.detail.contains("eyJ"),
            "{}",
            e.detail
        );
    }

    #[test]
    fn details_are_bounded_and_one_line() {
        let long = format!(
            r#"{{"error":{{"code":"Forbidden","message":"{}\nline"}}}}"#,
            "x".repeat(5000)
        );
        let e = classify(&http(StatusCode::Forbidden, &long), "get key", &[]);
        assert!(e.detail.len() < 600, "{}", e.detail.len());
        assert!(!e.detail.contains('\n'));
    }
}
