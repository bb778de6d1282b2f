//! The gRPC surface: `v2.KeyManagementService`. This file only dispatches and logs; each
//! method lives in its own module that checks its request into a small value, then acts.

pub mod codec;
mod decrypt;
mod encrypt;
mod status;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use crate::error::Error;
use crate::keys::Keys;
use crate::logging::{KeyIdHash, short_uid};
use crate::proto::v2::key_management_service_server::KeyManagementService;
use crate::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use crate::shares::Peer;
pub use status::ApiVersion;

/// Put into each request's extensions by the server's edge layer; a handler marks it when it
/// runs, so the edge logs and counts only the calls refused before any handler (the handler
/// logs and counts its own).
#[derive(Clone, Default)]
pub struct Handled(Arc<std::sync::atomic::AtomicBool>);

impl Handled {
    fn mark<T>(request: &Request<T>) {
        if let Some(h) = request.extensions().get::<Handled>() {
            h.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether a handler took the call.
    pub fn ran(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Counts calls in `grpc_requests_total` by method and code.
#[derive(Clone)]
pub struct CallCounter(Family<MethodCode, Counter>);

impl CallCounter {
    pub fn count(&self, method: &'static str, code: Code) {
        self.0
            .get_or_create(&MethodCode {
                method,
                code: code_label(code),
            })
            .inc();
    }
}

/// The KMS v2 service over a shared key hierarchy.
#[derive(Clone)]
pub struct KmsService {
    keys: Arc<Keys>,
    version: ApiVersion,
    metrics: GrpcMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

/// Request counts by method and code, and latency by method.
#[derive(Clone)]
struct GrpcMetrics {
    requests: Family<MethodCode, Counter>,
    seconds: Family<Method, Histogram, fn() -> Histogram>,
    /// Per-method handles for the common case (code OK), resolved once so a call does no
    /// label hashing or map locking: indexed like [`METHODS`].
    ok: [Counter; 3],
    latency: [Histogram; 3],
}

const METHODS: [&str; 3] = ["Status", "Encrypt", "Decrypt"];

fn grpc_histogram() -> Histogram {
    // 25 µs … 0.8 s
    Histogram::new(exponential_buckets(0.000025, 2.0, 16))
}

/// The gRPC code's canonical name, as a bounded label.
pub(crate) fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

impl KmsService {
    pub fn new(keys: Arc<Keys>, version: ApiVersion) -> Self {
        let requests: Family<MethodCode, Counter> = Family::default();
        let seconds: Family<Method, Histogram, fn() -> Histogram> = Family::new_with_constructor(grpc_histogram);
        let ok = METHODS.map(|method| requests.get_or_create(&MethodCode { method, code: "OK" }).clone());
        let latency = METHODS.map(|method| seconds.get_or_create(&Method { method }).clone());
        Self {
            keys,
            version,
            metrics: GrpcMetrics {
                requests,
                seconds,
                ok,
                latency,
            },
        }
    }

    /// The request counter, for calls refused before a handler.
    pub fn call_counter(&self) -> CallCounter {
        CallCounter(self.metrics.requests.clone())
    }

    /// Registers the request metrics into `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "grpc_requests",
            "KMS gRPC requests by method and code",
            self.metrics.requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "KMS gRPC request latency",
            self.metrics.seconds.clone(),
        );
    }

    /// One log line and the metrics per call: debug on success, warn on failure. Never
    /// request or response bytes.
    fn finish<T>(
        &self,
        method: &'static str,
        uid: &str,
        key_id: &str,
        started: Instant,
        result: Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        let elapsed = started.elapsed();
        let i = METHODS.iter().position(|m| *m == method).expect("a known method");
        match &result {
            Ok(_) => self.metrics.ok[i].inc(),
            Err(e) => self
                .metrics
                .requests
                .get_or_create(&MethodCode {
                    method,
                    code: code_label(e.code()),
                })
                .inc(),
        };
        self.metrics.latency[i].observe(elapsed.as_secs_f64());
        log_outcome(method, uid, key_id, elapsed, result)
    }
}

fn log_outcome<T>(
    method: &'static str,
    uid: &str,
    key_id: &str,
    elapsed: std::time::Duration,
    result: Result<T, Error>,
) -> Result<Response<T>, Status> {
    let elapsed_us = elapsed.as_micros() as u64;
    match result {
        Ok(resp) => {
            debug!(method, uid = ?short_uid(uid), key_id_hash = %KeyIdHash(key_id), elapsed_us, "ok");
            Ok(Response::new(resp))
        }
        Err(e) => {
            let status = e.to_status();
            warn!(method, uid = ?short_uid(uid), key_id_hash = %KeyIdHash(key_id), elapsed_us, code = ?status.code(), error = %e, "failed");
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        Handled::mark(&request);
        let result = status::handle(&self.keys, self.version);
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        self.finish("Status", "", &key_id, started, result)
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        Handled::mark(&request);
        let request = request.into_inner();
        let uid = request.uid.clone();
        let result = encrypt::handle(&self.keys, request).await;
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        self.finish("Encrypt", &uid, &key_id, started, result)
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        Handled::mark(&request);
        // The server's edge layer says who is calling; their share bounds what they can wait on.
        let peer = request.extensions().get::<Peer>().copied();
        let request = request.into_inner();
        let result = decrypt::handle(&self.keys, &request, peer).await;
        self.finish("Decrypt", &request.uid, &request.key_id, started, result)
    }
}
