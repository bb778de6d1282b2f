//! The HTTP transport every Azure call goes through (the key client's and the credential's):
//! reqwest on the crate's rustls + ring configuration (a CA bundle or the system's roots), a
//! per-attempt timeout, no redirects, an optional fixed address for the vault's host name, and
//! answers read whole only up to [`MAX_ANSWER`] bytes: every answer is untrusted.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::http::{
    AsyncRawResponse, ClientOptions, ExponentialRetryOptions, HttpClient, Request, RetryOptions, Transport,
};

/// Largest answer read from Key Vault, Entra ID or a managed-identity endpoint. A key bundle of
/// an RSA-4096 key with tags is a few KiB; anything larger is not an answer we asked for.
pub const MAX_ANSWER: usize = 64 * 1024;

/// What the transport needs from the settings.
pub struct TransportSettings<'a> {
    pub ca_file: Option<&'a Path>,
    /// `(host, ip)`: connect to `ip` for `host`, bypassing DNS.
    pub pin: Option<(&'a str, IpAddr)>,
    pub attempt_timeout: Duration,
    pub call_timeout: Duration,
    pub max_attempts: u32,
}

/// A reqwest client whose answers are capped at [`MAX_ANSWER`] bytes.
#[derive(Debug)]
struct Capped(reqwest::Client);

#[async_trait]
impl HttpClient for Capped {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let answer = self.0.execute_request(request).await?;
        let (status, headers, body) = answer.deconstruct();
        let mut buf = vec![0u8; MAX_ANSWER];
        let n = body.collect_into(&mut buf).await.map_err(|e| {
            azure_core::Error::with_error(
                azure_core::error::ErrorKind::Io,
                e,
                format!("answer larger than {MAX_ANSWER} bytes, or cut short"),
            )
        })?;
        buf.truncate(n);
        Ok(AsyncRawResponse::from_bytes(status, headers, buf))
    }
}

/// The SDK options for a client or credential: our transport, and a retry budget that fits in
/// the call timeout (the apiserver allows 3 s for a whole Decrypt).
pub fn client_options(s: &TransportSettings<'_>) -> Result<ClientOptions, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = crate::backend::tls::TlsSettings {
        ca_file: s.ca_file.map(Into::into),
        ..Default::default()
    }
    .client_config()?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(s.attempt_timeout)
        .timeout(s.attempt_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(60));
    if let Some((host, ip)) = s.pin {
        // Port 0: the URL's port is used.
        builder = builder.resolve(host, SocketAddr::new(ip, 0));
    }
    let client = builder.build().map_err(|e| format!("backend: HTTP client: {e}"))?;
    let retry = RetryOptions::exponential(ExponentialRetryOptions {
        initial_delay: azure_core::time::Duration::milliseconds(50),
        max_retries: s.max_attempts.max(1) - 1,
        max_total_elapsed: azure_core::time::Duration::try_from(s.call_timeout)
            .map_err(|e| format!("backend.call_timeout: {e}"))?,
        max_delay: azure_core::time::Duration::milliseconds(400),
    });
    Ok(ClientOptions {
        transport: Some(Transport::new(Arc::new(Capped(client)))),
        retry,
        ..Default::default()
    })
}
