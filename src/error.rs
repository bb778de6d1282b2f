//! The plugin's one error type and its one mapping to gRPC status codes: handlers, the edge
//! layers (server/edge/) and the codec all refuse through it.
//!
//! Messages sent to the apiserver name what was wrong with the request and never carry backend
//! details, key material or request bytes; backend details go to the log only.

use tonic::codegen::http;
use tonic::{Code, Status};

use crate::backend::{BackendError, ErrorKind};
use crate::contract::MAX_CIPHERTEXT;

/// Why a ciphertext was refused (keys/envelope.rs checks them). Each maps to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("ciphertext is empty")]
    Empty,
    #[error("ciphertext of {len} bytes is not longer than the {overhead}-byte envelope")]
    Truncated { len: usize, overhead: usize },
    #[error("ciphertext of {0} bytes exceeds the {MAX_CIPHERTEXT}-byte limit")]
    TooLong(usize),
    #[error("unsupported envelope format version {0}")]
    UnknownVersion(u8),
    #[error("ciphertext failed authentication")]
    Authentication,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (sizes, missing fields, foreign annotations).
    #[error("{0}")]
    InvalidArgument(String),
    /// The ciphertext's framing or authentication failed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The key_id names no root key this plugin was configured with.
    #[error("key_id is not known to this plugin")]
    UnknownKeyId,
    /// The remote KMS failed; `kind` decides the code.
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    /// No usable local KEK (start-up before the first wrap succeeded).
    #[error("no local KEK is available yet")]
    NotReady,
    /// The current local KEK reached its hard use limit and rotation keeps failing.
    #[error("the current local KEK reached its use limit and rotation is failing")]
    KekExhausted,
    /// Too many distinct KEK unwraps queued in this process (local load, not an outage).
    #[error("too many distinct KEK unwraps queued in the plugin; retry")]
    Overloaded,
    /// The caller (its connection or uid), or all callers, have as many calls open or waiting
    /// as they may; the others are served. Local load, not an outage.
    #[error("too many calls of this {} waiting in the plugin; retry", .0.as_str())]
    PeerShare(crate::shares::Limit),
    /// The request body did not arrive whole in time (a stalled or trickling stream).
    #[error("request body not received within {} s", .0.as_secs())]
    BodyTimeout(std::time::Duration),
    /// Too many calls are waiting for the rest of their body; the others are served.
    #[error("too many requests waiting for the rest of their body")]
    BodiesWaiting,
    /// The request is over the size limit (tonic reports `OutOfRange`; the gRPC spec's code
    /// for a message over the receive limit is `ResourceExhausted`).
    #[error("request larger than the {0}-byte limit")]
    TooLarge(usize),
    /// The request body is not a protobuf message of the method's type.
    #[error("request is not a valid protobuf message: {0}")]
    Protobuf(String),
    /// A local failure that is not the caller's fault (random number generator).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Error {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::Protobuf(_) => Code::InvalidArgument,
            Error::Envelope(EnvelopeError::Authentication) => Code::DataLoss,
            Error::Envelope(_) => Code::InvalidArgument,
            Error::UnknownKeyId => Code::NotFound,
            Error::Backend(e) => match e.kind {
                ErrorKind::Transient | ErrorKind::Configuration => Code::Unavailable,
                ErrorKind::Denied => Code::PermissionDenied,
                ErrorKind::KeyUnusable => Code::FailedPrecondition,
                ErrorKind::UnknownKey => Code::NotFound,
                ErrorKind::BadWrappedKey => Code::DataLoss,
            },
            Error::NotReady | Error::KekExhausted => Code::Unavailable,
            Error::Overloaded | Error::PeerShare(_) | Error::BodiesWaiting | Error::TooLarge(_) => {
                Code::ResourceExhausted
            }
            Error::BodyTimeout(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The status sent to the apiserver: the code and a message free of backend detail.
    pub fn to_status(&self) -> Status {
        let msg = match self {
            Error::Backend(e) => match e.kind {
                ErrorKind::Transient => "remote KMS unavailable".to_string(),
                ErrorKind::Configuration => {
                    "remote KMS unavailable: the plugin's set-up is incomplete (see its log)".to_string()
                }
                ErrorKind::Denied => "remote KMS denied access".to_string(),
                ErrorKind::KeyUnusable => "root key is disabled or deleted".to_string(),
                ErrorKind::UnknownKey => "key_id is not known to this plugin".to_string(),
                ErrorKind::BadWrappedKey => "wrapped KEK failed to unwrap".to_string(),
            },
            other => other.to_string(),
        };
        Status::new(self.code(), msg)
    }

    /// A trailers-only response carrying [`Error::to_status`]: a call refused before routing.
    pub fn to_http<B: Default>(&self) -> http::Response<B> {
        self.to_status().into_http()
    }

    /// Makes `response`, a trailers-only one tonic built (a call it refused), carry this error's
    /// status instead of the one tonic chose.
    pub fn restate<B>(&self, response: &mut http::Response<B>) {
        let status = self.to_status();
        let headers = response.headers_mut();
        headers.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
        // Every message of ours is ASCII text (no backend detail, no request bytes).
        headers.insert(
            "grpc-message",
            http::HeaderValue::try_from(status.message()).expect("ASCII"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_refusal_is_answered_through_the_one_mapping() {
        let refused = Error::BodiesWaiting.to_http::<()>();
        let header = |r: &http::Response<()>, name: &str| r.headers()[name].to_str().unwrap().to_string();
        assert_eq!(
            header(&refused, "grpc-status"),
            (Code::ResourceExhausted as i32).to_string()
        );
        // tonic percent-encodes the message (gRPC's encoding of grpc-message).
        assert_eq!(
            header(&refused, "grpc-message").replace("%20", " "),
            "too many requests waiting for the rest of their body"
        );

        // tonic's own answer to an oversized request, restated as ours.
        let mut response = Status::out_of_range("decoded message length too large").into_http::<()>();
        Error::TooLarge(4096).restate(&mut response);
        assert_eq!(
            header(&response, "grpc-status"),
            (Code::ResourceExhausted as i32).to_string()
        );
        assert_eq!(
            header(&response, "grpc-message"),
            "request larger than the 4096-byte limit"
        );
    }
}
