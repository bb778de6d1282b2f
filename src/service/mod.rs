//! The gRPC surface: `v2.KeyManagementService`. This file only dispatches and logs; each
//! method lives in its own module that checks its request into a small value, then acts.

mod decrypt;
mod encrypt;
mod status;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::error::Error;
use crate::keys::Keys;
use crate::logging::{KeyIdHash, short_uid};
use crate::proto::v2::key_management_service_server::KeyManagementService;
use crate::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use crate::settings::ApiVersion;

/// The KMS v2 service over a shared key hierarchy.
#[derive(Clone)]
pub struct KmsService {
    keys: Arc<Keys>,
    version: ApiVersion,
}

impl KmsService {
    pub fn new(keys: Arc<Keys>, version: ApiVersion) -> Self {
        Self { keys, version }
    }
}

/// One log line per call: debug on success, warn on failure. Never request or response bytes.
fn finish<T>(
    method: &'static str,
    uid: &str,
    key_id: &str,
    started: Instant,
    result: Result<T, Error>,
) -> Result<Response<T>, Status> {
    let elapsed_us = started.elapsed().as_micros() as u64;
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
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let result = status::handle(&self.keys, self.version);
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        finish("Status", "", &key_id, started, result)
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let uid = request.uid.clone();
        let result = encrypt::handle(&self.keys, request).await;
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        finish("Encrypt", &uid, &key_id, started, result)
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = decrypt::handle(&self.keys, &request).await;
        finish("Decrypt", &request.uid, &request.key_id, started, result)
    }
}
