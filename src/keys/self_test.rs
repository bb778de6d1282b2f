//! The one backend self-test, run by `check`, before a reload puts a new backend in force, and
//! nowhere else in another form: probe, wrap a fresh KEK, check the wrapped KEK fits the size
//! budget, unwrap it and compare. Bounded by [`BACKEND_CALL_TIMEOUT`] as a whole.

use ring::rand::SystemRandom;

use super::{BACKEND_CALL_TIMEOUT, Kek, check_wrapped};
use crate::backend::{Backend, Wrapped};

/// What a passed self-test leaves: the probe's current key_id, and a KEK wrapped by it (a
/// reload makes it the first current KEK; `check` drops it, wiped).
pub struct Passed {
    pub key_id: String,
    pub kek: Kek,
    pub wrapped: Wrapped,
}

/// Runs the self-test; the error says which step failed and why.
pub async fn self_test(backend: &dyn Backend) -> Result<Passed, String> {
    let steps = async {
        let key_id = backend.probe().await.map_err(|e| format!("backend probe: {e}"))?;
        let kek = Kek::generate(&SystemRandom::new()).map_err(|_| "random number generator failed")?;
        let wrapped = backend.wrap(&kek).await.map_err(|e| format!("backend wrap: {e}"))?;
        check_wrapped(&wrapped, backend.max_wrapped_len()).map_err(|e| format!("backend wrap: {e}"))?;
        let back = backend
            .unwrap(&wrapped.key_id, &wrapped.blob)
            .await
            .map_err(|e| format!("backend unwrap: {e}"))?;
        if back.expose() != kek.expose() {
            return Err("backend unwrap returned a different key".to_string());
        }
        Ok(Passed { key_id, kek, wrapped })
    };
    tokio::time::timeout(BACKEND_CALL_TIMEOUT, steps)
        .await
        .map_err(|_| format!("backend self-test timed out after {} s", BACKEND_CALL_TIMEOUT.as_secs()))?
}
