//! TLS client configuration shared by the network backends (Vault, KMIP, Azure): rustls with ring,
//! certificate verification always on, a CA bundle or the system's roots, and an optional
//! client certificate whose key file gets the same checks as any secret file. PEM files are
//! read whole, within the cap on every file the configuration names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The TLS settings of a network backend (Vault, KMIP). In the configuration they are fields
/// of `[backend]` itself (`ca_file`, `client_cert_file`, `client_key_file`, `tls_server_name`),
/// declared by each backend's settings type so that `deny_unknown_fields` keeps refusing a
/// typo (serde's `flatten` would accept it); each type's `tls()` gathers them here, where what
/// they mean is decided once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA bundle that signed the server's certificate; else the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS (both or neither).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Name to verify the server's certificate against, when the address does not carry it.
    pub server_name: Option<String>,
}

impl TlsSettings {
    /// The files named, in the order above (for a reload's change detection).
    pub fn files(&self) -> Vec<PathBuf> {
        [&self.ca_file, &self.client_cert_file, &self.client_key_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The rustls client configuration; errors name the setting at fault.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        client_config(
            self.ca_file.as_deref(),
            self.client_cert_file.as_deref(),
            self.client_key_file.as_deref(),
        )
    }

    /// `tls_server_name` as a name to verify, if set; an error names the setting.
    pub fn server_name(&self) -> Result<Option<ServerName<'static>>, String> {
        self.server_name
            .as_ref()
            .map(|name| ServerName::try_from(name.clone()).map_err(|e| format!("tls_server_name {name:?}: {e}")))
            .transpose()
    }
}

/// A client configuration; errors name the setting at fault.
fn client_config(
    ca_file: Option<&Path>,
    client_cert_file: Option<&Path>,
    client_key_file: Option<&Path>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = crate::secret_file::read_capped("ca_file", path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("ca_file {}: no PEM certificate in it", path.display()));
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots);
    match (client_cert_file, client_key_file) {
        (Some(cert), Some(key)) => {
            let pem = crate::secret_file::read_capped("client_cert_file", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("client_cert_file {}: {e}", cert.display()))?;
            let policy = crate::secret_file::Policy {
                deny_mode: 0o077,
                max_len: 64 * 1024,
            };
            let pem = crate::secret_file::read(key, &policy).map_err(|e| format!("client_key_file {e}"))?;
            let key =
                PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("client_key_file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("set both client_cert_file and client_key_file, or neither".into()),
    }
}

/// Whether a connection failed on a certificate (ours or the server's): a configuration to
/// fix, not an outage to wait out. rustls's error reaches us boxed inside other errors, so its
/// text is what is read.
pub fn is_tls_refusal(e: &(dyn std::error::Error + 'static)) -> bool {
    let text = error_chain(e);
    text.contains("invalid peer certificate") || (text.contains("received fatal alert") && text.contains("Certificate"))
}

/// "outer: inner: root cause", so a connection error says what failed (refused, certificate…).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
