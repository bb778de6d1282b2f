//! AWS KMS backend (`aws-sdk-kms`), also usable with AWS-KMS-compatible servers.
//!
//! The root key is a KMS key, named by key ARN, key id, alias name or alias ARN; `DescribeKey`
//! resolves it to the key ARN, which is the key_id. The alias is re-resolved on every probe, so
//! re-pointing an alias is a root-key rotation. A local KEK is wrapped with `Encrypt` under an
//! encryption context (`kms-plugin: local-kek` plus any configured pairs) that `Decrypt` must
//! repeat, and `Decrypt` names the expected key, so a blob made under another key is refused.
//!
//! Calls have an overall and a per-attempt timeout well under the apiserver's 3 s, and the SDK's
//! standard retry mode (with its retry-quota token bucket) as the retry budget.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use zeroize::Zeroizing;

use super::registry::{Entry, KeyRegistry};
use super::{Backend, BackendError, ErrorKind, Wrapped};
use crate::secret::Kek;

/// `[backend]` with `type = "aws"`: a key in AWS KMS or a compatible server.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// Key ARN, key id, alias name (`alias/x`) or alias ARN; re-pointing an alias rotates.
    pub key: String,
    /// Full key ARNs of older keys, kept to decrypt data written before a rotation.
    #[serde(default)]
    pub decrypt_only_keys: Vec<String>,
    /// Region; otherwise the SDK's chain (AWS_REGION, profile).
    pub region: Option<String>,
    /// Endpoint override (FIPS or VPC endpoints, compatible servers).
    pub endpoint: Option<String>,
    /// Extra encryption context bound to every wrap.
    #[serde(default)]
    pub encryption_context: BTreeMap<String, String>,
    #[serde(
        default = "crate::backend::call_budget::call_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub call_timeout: Duration,
    #[serde(
        default = "crate::backend::call_budget::attempt_timeout",
        deserialize_with = "crate::parse::duration"
    )]
    pub attempt_timeout: Duration,
    #[serde(default = "crate::backend::call_budget::max_attempts")]
    pub max_attempts: u32,
}

impl AwsSettings {
    /// No files: credentials come from the SDK's chain.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }

    pub async fn build(&self) -> Result<std::sync::Arc<dyn Backend>, String> {
        Ok(std::sync::Arc::new(AwsBackend::connect(self).await?))
    }
}

/// A KMS key in AWS KMS (or a compatible server).
pub struct AwsBackend {
    client: Client,
    key: String,
    context: BTreeMap<String, String>,
    /// Key ARNs: the configured decrypt-only ones and every one the key resolved to. An ARN is
    /// its own key_id and locator.
    keys: KeyRegistry<()>,
}

fn classify<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> ErrorKind {
    match e {
        SdkError::ServiceError(s) => match s.err().code().unwrap_or_default() {
            "DisabledException" | "KMSInvalidStateException" | "NotFoundException" | "InvalidKeyUsageException" => {
                ErrorKind::KeyUnusable
            }
            "AccessDeniedException" | "UnrecognizedClientException" | "IncompleteSignature" => ErrorKind::Denied,
            // Clock skew and expiring web-identity tokens fix themselves: not a revocation.
            "InvalidSignatureException" | "ExpiredTokenException" => ErrorKind::Transient,
            "InvalidCiphertextException" | "IncorrectKeyException" => ErrorKind::BadWrappedKey,
            // Throttling, KMSInternalException, DependencyTimeoutException, KeyUnavailableException …
            _ => ErrorKind::Transient,
        },
        _ => ErrorKind::Transient,
    }
}

/// The credentials error in `e`'s chain, if the SDK got no credentials to sign with.
fn credentials_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a aws_credential_types::provider::error::CredentialsError> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref() {
            return Some(found);
        }
        source = e.source();
    }
    None
}

/// What to do about no credentials, instead of the SDK's page of debug output.
const NO_CREDENTIALS: &str = "no AWS credentials found (environment, profile, web identity, IMDS): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or AWS_ROLE_ARN with AWS_WEB_IDENTITY_TOKEN_FILE, or run where the instance metadata service answers";

/// No credentials is the plugin's set-up to fix, whatever the last provider of the chain said
/// (every provider "not loaded", or an instance metadata service that refused): a
/// configuration error, an outage until fixed, never a revocation.
fn no_credentials(what: &str, e: &aws_credential_types::provider::error::CredentialsError) -> BackendError {
    use aws_credential_types::provider::error::CredentialsError;
    let detail = match e {
        CredentialsError::CredentialsNotLoaded(_) => format!("aws {what}: {NO_CREDENTIALS}"),
        // Display texts only: the Debug form carries whole HTTP responses.
        other => {
            let said: String = super::tls::error_chain(other).chars().take(300).collect();
            format!("aws {what}: {NO_CREDENTIALS} (the last provider tried: {said})")
        }
    };
    BackendError::new(ErrorKind::Configuration, detail)
}

fn err<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug + 'static>(
    e: SdkError<E, R>,
    what: &str,
) -> BackendError {
    if !matches!(e, SdkError::ServiceError(_))
        && let Some(c) = credentials_error(&e)
    {
        return no_credentials(what, c);
    }
    let kind = classify(&e);
    let detail = match &e {
        SdkError::ServiceError(s) => format!(
            "aws {what}: {}: {}",
            s.err().code().unwrap_or("unknown"),
            s.err().message().unwrap_or_default()
        ),
        other => format!("aws {what}: {}", aws_sdk_kms::error::DisplayErrorContext(other)),
    };
    BackendError::new(kind, detail)
}

impl AwsBackend {
    /// Builds the client from the SDK's standard credential chain and tries to resolve the key.
    /// An unreachable KMS does not stop start-up (the probe resolves it later); a key that is
    /// missing or disabled does.
    pub async fn connect(opts: &AwsSettings) -> Result<Self, String> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(opts.call_timeout)
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .connect_timeout(opts.attempt_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(opts.max_attempts.max(1)));
        if let Some(region) = &opts.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &opts.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err("aws: no region configured (set backend.region or AWS_REGION)".into());
        }
        let mut context = opts.encryption_context.clone();
        context.insert("kms-plugin".into(), "local-kek".into());
        let keys = KeyRegistry::new();
        for arn in &opts.decrypt_only_keys {
            keys.insert(arn.clone(), Entry::new(arn.clone(), ()));
        }
        let backend = Self {
            client: Client::new(&shared),
            key: opts.key.clone(),
            context,
            keys,
        };
        match backend.resolve().await {
            Ok(_) => {}
            // Credentials may still appear (an instance metadata service that is not up yet).
            Err(e) if matches!(e.kind, ErrorKind::Transient | ErrorKind::Configuration) => {
                tracing::warn!(error = %e, "aws: key not resolved at start-up; will retry in the background")
            }
            Err(e) => return Err(e.detail),
        }
        Ok(backend)
    }

    /// DescribeKey: the configured key's ARN, if it is enabled.
    async fn resolve(&self) -> Result<String, BackendError> {
        let out = self
            .client
            .describe_key()
            .key_id(&self.key)
            .send()
            .await
            .map_err(|e| err(e, "DescribeKey"))?;
        let meta = out
            .key_metadata
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "aws DescribeKey: no metadata"))?;
        match &meta.key_state {
            Some(KeyState::Enabled) => {}
            // States in which AWS says the key cannot be used until someone acts.
            Some(
                state @ (KeyState::Disabled
                | KeyState::PendingDeletion
                | KeyState::PendingImport
                | KeyState::PendingReplicaDeletion),
            ) => {
                return Err(BackendError::new(
                    ErrorKind::KeyUnusable,
                    format!("aws key {} is {state:?}", meta.arn.as_deref().unwrap_or("?")),
                ));
            }
            // No state, Unavailable (a disconnected custom key store), Creating, Updating, or a
            // state this SDK does not know: nothing authoritative about the key.
            state => {
                return Err(BackendError::new(
                    ErrorKind::Transient,
                    format!("aws key {} is {state:?}", meta.arn.as_deref().unwrap_or("?")),
                ));
            }
        }
        let arn = meta
            .arn
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "aws DescribeKey: no ARN"))?;
        self.keys.make_current(arn.clone(), Entry::new(arn.clone(), ()));
        Ok(arn)
    }
}

#[async_trait]
impl Backend for AwsBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    async fn probe(&self) -> Result<String, BackendError> {
        self.resolve().await
    }

    fn knows(&self, key_id: &str) -> bool {
        self.keys.knows(key_id)
    }

    fn decrypt_only(&self) -> Vec<(String, String)> {
        // Sorted by ARN, which is both the key_id and the locator.
        self.keys
            .decrypt_only()
            .into_iter()
            .map(|(arn, entry)| (arn, entry.locator))
            .collect()
    }

    fn remembered(&self) -> Vec<(String, String)> {
        self.keys.remembered()
    }

    fn remember(&self, keys: Vec<(String, String)>) {
        // An ARN is its own locator, whatever the other backend called it.
        let arns = keys.into_iter().map(|(arn, _)| (arn.clone(), arn)).collect();
        self.keys.remember(arns, || ());
    }

    async fn wrap(&self, kek: &Kek) -> Result<Wrapped, BackendError> {
        let arn = match self.keys.current() {
            Some(arn) => arn,
            None => self.resolve().await?,
        };
        let out = self
            .client
            .encrypt()
            .key_id(&arn)
            .plaintext(Blob::new(kek.expose().to_vec()))
            .set_encryption_context(Some(self.context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| err(e, "Encrypt"))?;
        let blob = out
            .ciphertext_blob
            .ok_or_else(|| BackendError::new(ErrorKind::Transient, "aws Encrypt: no ciphertext"))?;
        Ok(Wrapped {
            key_id: arn,
            blob: blob.into_inner(),
        })
    }

    // AWS KMS ciphertext blobs are at most 6144 bytes.
    fn max_wrapped_len(&self) -> usize {
        6144
    }

    async fn unwrap(&self, key_id: &str, blob: &[u8]) -> Result<Kek, BackendError> {
        if !self.knows(key_id) {
            return Err(BackendError::new(ErrorKind::UnknownKey, "aws: key_id not configured"));
        }
        let out = self
            .client
            .decrypt()
            .key_id(key_id)
            .ciphertext_blob(Blob::new(blob.to_vec()))
            .set_encryption_context(Some(self.context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| err(e, "Decrypt"))?;
        let plain = Zeroizing::new(
            out.plaintext
                .ok_or_else(|| BackendError::new(ErrorKind::Transient, "aws Decrypt: no plaintext"))?
                .into_inner(),
        );
        Kek::from_bytes(&plain).ok_or_else(|| {
            BackendError::new(
                ErrorKind::Transient,
                "aws Decrypt: malformed answer (unwrapped KEK has the wrong length)",
            )
        })
    }
}
