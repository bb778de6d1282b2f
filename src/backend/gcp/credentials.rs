//! Google credentials: a named JSON file (a service-account key, or workload identity
//! federation's `external_account` configuration), else application default credentials
//! (GOOGLE_APPLICATION_CREDENTIALS, gcloud's file, then the metadata server).
//!
//! A service-account key is a private key: its file gets the same checks as every secret file
//! (owner, no group or other access, bounded size). The SDK signs its own short-lived tokens
//! with it (self-signed JWTs); `external_account` exchanges the configured subject token at the
//! configured `token_url` (Google's STS).

use std::path::{Path, PathBuf};

use google_cloud_auth::credentials::{self, Credentials};
use serde_json::Value;

const POLICY: crate::secret_file::Policy = crate::secret_file::Policy {
    deny_mode: 0o077,
    max_len: 64 * 1024,
};

pub async fn build(file: Option<&Path>) -> Result<Credentials, String> {
    let Some(path) = file else {
        return credentials::Builder::default().build().map_err(|e| {
            format!(
                "gcp: application default credentials: {}",
                super::said::said(&e.to_string(), &[])
            )
        });
    };
    let path: PathBuf = path.to_path_buf();
    let shown = path.display().to_string();
    let json: Value = super::super::off_thread(move || {
        let bytes = crate::secret_file::read(&path, &POLICY).map_err(|e| format!("backend.credentials_file {e}"))?;
        // The parse error's position only: the text around it is a private key.
        serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "backend.credentials_file {}: not JSON (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            )
        })
    })
    .await?;
    let kind = json.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    let built = match kind.as_str() {
        "service_account" => credentials::service_account::Builder::new(json).build(),
        "external_account" => credentials::external_account::Builder::new(json).build(),
        "impersonated_service_account" => credentials::impersonated::Builder::new(json).build(),
        other => {
            return Err(format!(
                "backend.credentials_file {shown}: credentials of type {:?} are not supported here (service_account, external_account or impersonated_service_account; other kinds through GOOGLE_APPLICATION_CREDENTIALS)",
                super::said::said(other, &[])
            ));
        }
    };
    built.map_err(|e| {
        format!(
            "backend.credentials_file {shown}: {}",
            super::said::said(&e.to_string(), &[])
        )
    })
}
