//! Who the plugin is to Entra ID (`[backend.auth]`): one credential source and its fields.
//!
//! - `managed_identity`: the node's or pod's managed identity (IMDS, or the `IDENTITY_ENDPOINT` +
//!   `IDENTITY_HEADER` protocol where the platform sets them); `client_id` picks a user-assigned
//!   identity.
//! - `workload_identity`: AKS workload identity, a federated service-account token; tenant,
//!   client id and token file default to `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
//!   `AZURE_FEDERATED_TOKEN_FILE`, which the AKS webhook sets. The plugin reads the file itself
//!   (a regular file, capped like every file it reads, [`crate::secret_file::read_capped`]) each
//!   time it needs a token, so the kubelet's refreshed token is picked up; it is sent as the
//!   client assertion.
//! - `client_secret`: an app registration's secret, read from `client_secret_file` (a secret
//!   file: owner-only mode, safe directories) when the backend is built; a reload rereads it.
//! - `client_certificate`: an app registration's certificate; the plugin signs the client
//!   assertion (RS256, `x5t` and `x5t#S256` thumbprints) itself with ring, so neither OpenSSL
//!   nor the SDK's PKCS#12 loader is needed. The key is a secret file (PEM, PKCS#8 or PKCS#1).
//!
//! Tokens live in the SDK's cache, in `Secret` values it never prints; errors carry no token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientMethodOptions, ClientOptions};
use azure_identity::{
    ClientAssertion, ClientAssertionCredential, ClientAssertionCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ring::{digest, rand, signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use zeroize::Zeroizing;

/// `[backend.auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// `managed_identity`, `workload_identity`, `client_secret` or `client_certificate`.
    pub method: String,
    /// Directory (tenant) id: client_secret, client_certificate; workload_identity's default is
    /// `AZURE_TENANT_ID`.
    pub tenant_id: Option<String>,
    /// Application (client) id; for managed_identity, a user-assigned identity's client id.
    pub client_id: Option<String>,
    /// client_secret: the file holding the secret.
    pub client_secret_file: Option<PathBuf>,
    /// client_certificate: the certificate registered with the app (PEM, first one used).
    pub certificate_file: Option<PathBuf>,
    /// client_certificate: its private key (PEM, RSA).
    pub certificate_key_file: Option<PathBuf>,
    /// workload_identity: the federated token file; default `AZURE_FEDERATED_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// Entra ID's host for another cloud (`https://login.microsoftonline.us`); default
    /// `AZURE_AUTHORITY_HOST`, else the public cloud's.
    pub authority_host: Option<String>,
}

impl AuthSettings {
    /// The files these settings name (a workload identity token file, named here or by the
    /// environment, is reread for each token anyway).
    pub fn files(&self) -> Vec<PathBuf> {
        [
            &self.client_secret_file,
            &self.certificate_file,
            &self.certificate_key_file,
            &self.token_file,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect()
    }

    /// Checks that the method's fields, and only them, are set.
    fn check(&self) -> Result<(), String> {
        let (required, allowed): (&[&str], &[&str]) = match self.method.as_str() {
            "managed_identity" => (&[], &["client_id"]),
            "workload_identity" => (&[], &["tenant_id", "client_id", "token_file", "authority_host"]),
            "client_secret" => (
                &["tenant_id", "client_id", "client_secret_file"],
                &["tenant_id", "client_id", "client_secret_file", "authority_host"],
            ),
            "client_certificate" => (
                &["tenant_id", "client_id", "certificate_file", "certificate_key_file"],
                &[
                    "tenant_id",
                    "client_id",
                    "certificate_file",
                    "certificate_key_file",
                    "authority_host",
                ],
            ),
            other => {
                return Err(format!(
                    "backend.auth.method: {other:?} is not one of: managed_identity, workload_identity, client_secret, client_certificate"
                ));
            }
        };
        let set = [
            ("tenant_id", self.tenant_id.is_some()),
            ("client_id", self.client_id.is_some()),
            ("client_secret_file", self.client_secret_file.is_some()),
            ("certificate_file", self.certificate_file.is_some()),
            ("certificate_key_file", self.certificate_key_file.is_some()),
            ("token_file", self.token_file.is_some()),
            ("authority_host", self.authority_host.is_some()),
        ];
        for (field, is_set) in set {
            if is_set && !allowed.contains(&field) {
                return Err(format!("backend.auth.{field}: not used by method {:?}", self.method));
            }
            if !is_set && required.contains(&field) {
                return Err(format!("backend.auth.{field}: required by method {:?}", self.method));
            }
        }
        Ok(())
    }

    /// The credential, its SDK calls on `options` (our transport and retry budget). Reads the
    /// secret files now: call off the async workers.
    pub fn credential(&self, mut options: ClientOptions) -> Result<Arc<dyn TokenCredential>, String> {
        self.check()?;
        if let Some(host) = &self.authority_host {
            if !host.starts_with("https://") {
                return Err(format!(
                    "backend.auth.authority_host: {host:?} must start with https://"
                ));
            }
            let mut cloud = CustomConfiguration::default();
            cloud.authority_host = host.clone();
            options.cloud = Some(Arc::new(CloudConfiguration::Custom(cloud)));
        }
        let sdk = |e: azure_core::Error| {
            format!(
                "backend.auth ({}): {}",
                self.method,
                super::error::bounded(&e.to_string(), 300)
            )
        };
        let need = |v: &Option<String>| v.clone().unwrap_or_default();
        Ok(match self.method.as_str() {
            "managed_identity" => {
                let o = ManagedIdentityCredentialOptions {
                    client_options: options,
                    user_assigned_id: self.client_id.clone().map(UserAssignedId::ClientId),
                };
                ManagedIdentityCredential::new(Some(o)).map_err(sdk)?
            }
            "workload_identity" => {
                // What the SDK's WorkloadIdentityCredential does, with the token file read by the
                // plugin (capped) instead of whole by the SDK.
                let from_env = |set: &Option<String>, var: &str, what: &str| {
                    set.clone()
                        .or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
                        .ok_or_else(|| {
                            format!(
                                "backend.auth (workload_identity): no {what} specified: set {var} (the AKS webhook does) or backend.auth's field"
                            )
                        })
                };
                let tenant = from_env(&self.tenant_id, "AZURE_TENANT_ID", "tenant id")?;
                let client_id = from_env(&self.client_id, "AZURE_CLIENT_ID", "client id")?;
                let path = match &self.token_file {
                    Some(path) => path.clone(),
                    None => PathBuf::from(from_env(&None, "AZURE_FEDERATED_TOKEN_FILE", "token file")?),
                };
                // Read once now, so a missing or oversized file is named by `check` and at start.
                FederatedToken::read(&path)?;
                let o = ClientAssertionCredentialOptions {
                    client_options: options,
                };
                ClientAssertionCredential::new(tenant, client_id, FederatedToken { path }, Some(o)).map_err(sdk)?
            }
            "client_secret" => {
                let path = self.client_secret_file.as_deref().unwrap_or(Path::new(""));
                // The file's bytes are wiped on drop; the one copy left is the SDK's `Secret`,
                // which lives as long as the credential and is not zeroized (the SDK's type).
                let secret = read_secret(path, "client_secret_file")?;
                let secret = std::str::from_utf8(&secret)
                    .map_err(|_| "backend.auth.client_secret_file: not UTF-8".to_string())?
                    .trim()
                    .to_string();
                let o = ClientSecretCredentialOptions {
                    client_options: options,
                };
                ClientSecretCredential::new(
                    &need(&self.tenant_id),
                    need(&self.client_id),
                    Secret::new(secret),
                    Some(o),
                )
                .map_err(sdk)?
            }
            _ => {
                let assertion = CertificateAssertion::load(
                    self.certificate_file.as_deref().unwrap_or(Path::new("")),
                    self.certificate_key_file.as_deref().unwrap_or(Path::new("")),
                    need(&self.client_id),
                )?;
                let o = ClientAssertionCredentialOptions {
                    client_options: options,
                };
                let tenant = need(&self.tenant_id);
                let host = self
                    .authority_host
                    .clone()
                    .or_else(|| std::env::var("AZURE_AUTHORITY_HOST").ok())
                    .unwrap_or_else(|| "https://login.microsoftonline.com".into());
                let assertion = CertificateAssertion {
                    audience: format!("{}/{tenant}/oauth2/v2.0/token", host.trim_end_matches('/')),
                    ..assertion
                };
                ClientAssertionCredential::new(tenant, need(&self.client_id), assertion, Some(o)).map_err(sdk)?
            }
        })
    }
}

/// Workload identity's federated token (the kubelet's projected service-account token), read
/// from its file for each token request.
#[derive(Debug)]
struct FederatedToken {
    path: PathBuf,
}

impl FederatedToken {
    fn read(path: &Path) -> Result<String, String> {
        let bytes = Zeroizing::new(crate::secret_file::read_capped("backend.auth.token_file", path)?);
        let token = std::str::from_utf8(&bytes)
            .map_err(|_| format!("backend.auth.token_file {}: not UTF-8", path.display()))?
            .trim();
        if token.is_empty() {
            return Err(format!("backend.auth.token_file {}: is empty", path.display()));
        }
        Ok(token.to_string())
    }
}

#[async_trait]
impl ClientAssertion for FederatedToken {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || Self::read(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e))
    }
}

/// Reads a credential file with the checks every secret file gets.
fn read_secret(path: &Path, field: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let policy = crate::secret_file::Policy {
        deny_mode: 0o077,
        max_len: 64 * 1024,
    };
    let bytes = crate::secret_file::read(path, &policy).map_err(|e| format!("backend.auth.{field}: {e}"))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("backend.auth.{field}: {} is empty", path.display()));
    }
    Ok(bytes)
}

/// A client assertion signed with the app's certificate key, as Entra ID's certificate
/// credentials document it: a JWT with `aud` the token endpoint, `iss` = `sub` = client id, a
/// ten-minute lifetime and a unique `jti`.
pub struct CertificateAssertion {
    key: signature::RsaKeyPair,
    client_id: String,
    /// base64url SHA-1 and SHA-256 of the certificate's DER.
    x5t: String,
    x5t_s256: String,
    audience: String,
}

impl std::fmt::Debug for CertificateAssertion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAssertion")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl CertificateAssertion {
    fn load(cert: &Path, key: &Path, client_id: String) -> Result<Self, String> {
        let pem = crate::secret_file::read_capped("backend.auth.certificate_file", cert)?;
        let der = CertificateDer::pem_slice_iter(&pem)
            .next()
            .ok_or_else(|| {
                format!(
                    "backend.auth.certificate_file {}: no PEM certificate in it",
                    cert.display()
                )
            })?
            .map_err(|e| format!("backend.auth.certificate_file {}: {e}", cert.display()))?;
        let pem = read_secret(key, "certificate_key_file")?;
        let bad = |why: &dyn std::fmt::Display| format!("backend.auth.certificate_key_file {}: {why}", key.display());
        let key = match PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(&e))? {
            PrivateKeyDer::Pkcs8(k) => signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(bad(&"not an RSA key (Entra ID certificate credentials are RSA)")),
        }
        .map_err(|e| bad(&e))?;
        Ok(Self {
            key,
            client_id,
            x5t: B64URL.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &der)),
            x5t_s256: B64URL.encode(digest::digest(&digest::SHA256, &der)),
            audience: String::new(),
        })
    }

    /// The signed JWT for `now` (seconds since the epoch) and a random `jti`.
    fn sign(&self, now: u64, jti: &str) -> Result<String, String> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t, "x5t#S256": self.x5t_s256});
        let claims = serde_json::json!({
            "aud": self.audience, "iss": self.client_id, "sub": self.client_id, "jti": jti,
            "nbf": now, "iat": now, "exp": now + 600,
        });
        let input = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the client assertion failed".to_string())?;
        Ok(format!("{input}.{}", B64URL.encode(sig)))
    }
}

#[async_trait]
impl ClientAssertion for CertificateAssertion {
    async fn secret(&self, _: Option<ClientMethodOptions<'_>>) -> azure_core::Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut jti = [0u8; 16];
        rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut jti)
            .map_err(|_| azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, "no randomness"))?;
        self.sign(now, &hex::encode(jti))
            .map_err(|e| azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(method: &str) -> AuthSettings {
        AuthSettings {
            method: method.into(),
            tenant_id: None,
            client_id: None,
            client_secret_file: None,
            certificate_file: None,
            certificate_key_file: None,
            token_file: None,
            authority_host: None,
        }
    }

    #[test]
    fn the_federated_token_file_is_read_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "eyJ.token.sig\n").unwrap();
        assert_eq!(FederatedToken::read(&path).unwrap(), "eyJ.token.sig");
        let huge = vec![b'a'; crate::secret_file::MAX_FILE_BYTES as usize + 1];
        std::fs::write(&path, huge).unwrap();
        let e = FederatedToken::read(&path).unwrap_err();
        assert!(e.contains("backend.auth.token_file"), "{e}");
        std::fs::write(&path, " \n").unwrap();
        assert!(FederatedToken::read(&path).unwrap_err().contains("is empty"));
    }

    #[test]
    fn each_method_takes_its_fields_only() {
        assert!(settings("managed_identity").check().is_ok());
        assert!(settings("workload_identity").check().is_ok());
        let e = settings("client_secret").check().unwrap_err();
        assert!(e.contains("backend.auth.tenant_id: required"), "{e}");
        let mut s = settings("managed_identity");
        s.client_secret_file = Some("/x".into());
        let e = s.check().unwrap_err();
        assert!(e.contains("client_secret_file: not used by method"), "{e}");
        let e = settings("password").check().unwrap_err();
        assert!(e.contains("is not one of"), "{e}");
    }
}
