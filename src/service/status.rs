//! Status: answered from memory, never a backend round trip.
//!
//! Healthy ("ok" with the current key_id) while a local KEK can seal: it exists, its root key is
//! not revoked, and any backend outage is shorter than `probe.max_outage`. Otherwise the call
//! itself fails with the reason's code: the apiserver keeps writing on a stale seed when healthz != "ok" (upstream bug 138950),
//! so only a failed Status stops its writes.

use crate::error::Error;
use crate::keys::Keys;
use crate::proto::v2::StatusResponse;
use crate::settings::ApiVersion;

pub fn handle(keys: &Keys, version: ApiVersion) -> Result<StatusResponse, Error> {
    let current = keys.healthy_current()?;
    Ok(StatusResponse {
        version: version.as_str().to_string(),
        healthz: "ok".to_string(),
        key_id: current.key_id().to_string(),
    })
}
