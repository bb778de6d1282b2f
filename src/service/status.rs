//! Status: answered from memory, never a backend round trip.
//!
//! Healthy ("ok" with the current key_id) while a local KEK can seal: it exists, its root key is
//! not revoked, and any backend outage is shorter than `probe.max_outage`. Otherwise the call
//! itself fails with the reason's code: the apiserver keeps writing on a stale seed when healthz != "ok" (upstream bug 138950),
//! so only a failed Status stops its writes.

use crate::error::Error;
use crate::keys::Keys;
use crate::proto::v2::StatusResponse;

/// The version string in StatusResponse: "v2" (Kubernetes 1.29+) or "v2beta1" (1.27–1.28).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ApiVersion {
    #[default]
    V2,
    V2beta1,
}

impl<'de> serde::Deserialize<'de> for ApiVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::parse::one_of(d, &[("v2", Self::V2), ("v2beta1", Self::V2beta1)])
    }
}

impl ApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V2 => "v2",
            ApiVersion::V2beta1 => "v2beta1",
        }
    }
}

pub fn handle(keys: &Keys, version: ApiVersion) -> Result<StatusResponse, Error> {
    let current = keys.healthy_current()?;
    Ok(StatusResponse {
        version: version.as_str().to_string(),
        healthz: "ok".to_string(),
        key_id: current.key_id().to_string(),
    })
}
