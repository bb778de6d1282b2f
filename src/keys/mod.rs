//! The key hierarchy: root key (in the backend) → local KEK (in memory) → apiserver seed.
//!
//! Security contract:
//! - a local KEK exists in plaintext only in this process's memory, in a zeroizing buffer; it
//!   leaves the process only wrapped by the backend's root key (in the response annotation);
//! - every seal uses a fresh random 96-bit nonce, and a KEK is retired after `max_uses` seals or
//!   `max_age`, far below the 2^32 random-nonce bound;
//! - Encrypt, Status and cached Decrypt never wait on the backend; only the very first KEK may
//!   be made on a request path, every later one is made by the background rotation task.

pub mod cache;
pub mod envelope;
pub mod metrics;
pub mod rotation;
pub mod self_test;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use ring::rand::SystemRandom;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use crate::secret::{KEY_LEN, Kek, Plaintext, aead};

use crate::backend::{Backend, BackendError, ErrorKind, Wrapped};
use crate::contract;
use crate::error::Error;
use crate::logging::KeyIdHash;
use crate::shares::Peer;
use cache::{KekCache, KekRef};
use envelope::Envelope;
use rotation::{Reason, RotationPolicy};

/// The local KEK new seeds are sealed under, and what Status reports.
pub struct CurrentKek {
    key_id: String,
    kek: Arc<Kek>,
    kek_ref: KekRef,
    wrapped: bytes::Bytes,
    created: Instant,
    uses: AtomicU64,
}

impl CurrentKek {
    /// key_id of the root key that wrapped this KEK.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seconds since this KEK was made.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// Seeds sealed under this KEK so far.
    pub fn uses(&self) -> u64 {
        self.uses.load(Relaxed)
    }
}

/// The result of Encrypt: what goes back to the apiserver.
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    pub key_id: String,
    pub wrapped_kek: bytes::Bytes,
}

/// The part of the hierarchy a configuration reload replaces, as one value: the backend and
/// the policies that go with it. A call holds the one it started with to its end.
pub struct Active {
    pub backend: Arc<dyn Backend>,
    pub policy: RotationPolicy,
    /// Transient outage tolerated before Status fails.
    pub max_outage: Duration,
}

/// Where [`Keys`] reads the [`Active`] in force, on every call. The serving process keeps it
/// inside the one value a reload swaps whole (`reload::Running`), so the hierarchy, the peer
/// lists and the log level change together; [`Keys::new`] keeps its own, fixed.
pub type ActiveSource = Box<dyn Fn() -> Arc<Active> + Send + Sync>;

/// The plugin's keys: the current local KEK, the cache of unwrapped KEKs, and the backend.
pub struct Keys {
    active: ActiveSource,
    current: ArcSwapOption<CurrentKek>,
    cache: Arc<KekCache>,
    rng: SystemRandom,
    rotate_soon: Notify,
    rotating: tokio::sync::Mutex<()>,
    rotations: AtomicU64,
    health: Mutex<Health>,
    metrics: metrics::KeyMetrics,
}

/// What the probes and calls have seen of the backend.
#[derive(Default)]
struct Health {
    /// When the current transient outage began.
    failing_since: Option<Instant>,
    /// A permanent failure of the current root key (disabled, deleted, access denied).
    revoked: Option<BackendError>,
    /// The key_id that failed, if known: nothing is unwrapped under it until a probe succeeds.
    revoked_key: Option<String>,
    /// A first authoritative refusal of the current root key, not yet confirmed: revocation
    /// (and the purge) waits for a second one in a row (see [`Keys::note_backend_error`]).
    suspect: Option<BackendError>,
    /// When a probe last succeeded.
    last_ok: Option<Instant>,
}

fn is_permanent(e: &BackendError) -> bool {
    matches!(e.kind, ErrorKind::KeyUnusable | ErrorKind::Denied)
}

/// Failures that make the backend unusable for a while without saying anything about the key:
/// served from cache up to `max_outage`, and healed by the next successful probe.
fn is_outage(e: &BackendError) -> bool {
    matches!(e.kind, ErrorKind::Transient | ErrorKind::Configuration)
}

impl Keys {
    /// Keys over a fixed backend (tools, tests, benchmarks): nothing can replace it.
    pub fn new(
        backend: Arc<dyn Backend>,
        policy: RotationPolicy,
        cache_capacity: NonZeroUsize,
        max_outage: Duration,
    ) -> Arc<Self> {
        let active = Arc::new(Active {
            backend,
            policy,
            max_outage,
        });
        Self::with_source(Box::new(move || Arc::clone(&active)), cache_capacity)
    }

    /// Keys reading the backend and policies in force from `active`, which a reload changes
    /// through [`Keys::replace`].
    pub fn with_source(active: ActiveSource, cache_capacity: NonZeroUsize) -> Arc<Self> {
        Arc::new(Self {
            active,
            current: ArcSwapOption::empty(),
            cache: KekCache::new(cache_capacity),
            rng: SystemRandom::new(),
            rotate_soon: Notify::new(),
            rotating: tokio::sync::Mutex::new(()),
            rotations: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            metrics: metrics::KeyMetrics::new(),
        })
    }

    /// The backend and policies in force.
    pub fn active(&self) -> Arc<Active> {
        (self.active)()
    }

    /// Puts a reloaded configuration in force: `swap` replaces, in one step, the value the
    /// [`ActiveSource`] reads, while no rotation runs; calls already running finish on the old
    /// one. `first` is a KEK the caller made and checked under the new backend: when the root
    /// key changed it becomes current at once, so nothing is sealed under a root key the new
    /// configuration may no longer know. Cached KEKs of root keys the new backend does not know
    /// are purged (and wiped when their last holder drops them). Returns how many.
    pub async fn replace(&self, swap: impl FnOnce(), first: (Kek, Wrapped)) -> usize {
        let _guard = self.rotating.lock().await;
        swap();
        let backend = self.backend();
        let purged = self.cache.retain_keys(|key_id| backend.knows(key_id));
        {
            // The new backend has just answered a probe, a wrap and an unwrap.
            let mut health = self.lock_health();
            *health = Health {
                last_ok: Some(Instant::now()),
                ..Health::default()
            };
        }
        let (kek, wrapped) = first;
        // No current KEK (none made yet, or the root key was revoked): a first one, not a change.
        match self.current() {
            None => self.install(kek, wrapped, Reason::First),
            Some(c) if c.key_id != wrapped.key_id => self.install(kek, wrapped, Reason::RootKeyChanged),
            Some(_) => {}
        }
        purged
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The KEK to seal under, or why the plugin must not seal (and Status must fail):
    /// no KEK yet, the root key revoked, or a backend outage longer than `max_outage`.
    pub fn healthy_current(&self) -> Result<Arc<CurrentKek>, Error> {
        {
            let health = self.lock_health();
            if let Some(e) = &health.revoked {
                return Err(Error::Backend(e.clone()));
            }
            if let Some(since) = health.failing_since
                && since.elapsed() > self.active().max_outage
            {
                return Err(Error::Backend(BackendError::new(
                    ErrorKind::Transient,
                    format!(
                        "backend unreachable for {} s (max_outage {} s)",
                        since.elapsed().as_secs(),
                        self.active().max_outage.as_secs()
                    ),
                )));
            }
        }
        let current = self.current().ok_or(Error::NotReady)?;
        if current.uses() >= self.hard_limit() {
            return Err(Error::KekExhausted);
        }
        Ok(current)
    }

    /// Seals allowed under one KEK when rotation keeps failing: random 96-bit nonces stay
    /// safe far beyond `max_uses`, but sealing must not go on forever under one KEK.
    fn hard_limit(&self) -> u64 {
        self.active().policy.max_uses.saturating_mul(2)
    }

    /// (revoked, failing): whether the current root key is revoked, and whether the backend is
    /// in a transient outage.
    pub fn health_flags(&self) -> (bool, bool) {
        let h = self.lock_health();
        (h.revoked.is_some(), h.failing_since.is_some())
    }

    /// Time since the last successful probe, if there was one.
    pub fn since_last_probe_ok(&self) -> Option<Duration> {
        self.lock_health().last_ok.map(|t| t.elapsed())
    }

    /// The probe interval (from the rotation policy).
    pub fn probe_interval(&self) -> Duration {
        self.active().policy.check_interval
    }

    /// Records a successful probe: outages and revocations are over.
    fn note_backend_ok(&self) {
        let mut health = self.lock_health();
        health.last_ok = Some(Instant::now());
        let was_revoked = health.revoked.take().is_some();
        health.revoked_key = None;
        // A refusal not yet confirmed was logged as one: its end is worth a line too.
        let was_suspect = health.suspect.take().is_some();
        let was_failing = health.failing_since.take().is_some();
        if was_revoked || was_suspect || was_failing {
            info!("backend healthy again");
        }
    }

    /// A failed unwrap on the request path. It may be the caller's bad input as much as a
    /// revoked key, and it is one answer, so it neither revokes nor purges: a permanent error
    /// asks the background task to probe now, and only the probe decides.
    fn note_unwrap_error(&self, key_id: &str, e: &BackendError) {
        if is_permanent(e) {
            warn!(error = %e, key_id_hash = %KeyIdHash(key_id), "unwrap refused by the backend; probing now");
            self.rotate_soon.notify_one();
        } else if is_outage(e) {
            self.lock_health().failing_since.get_or_insert_with(Instant::now);
        }
    }

    /// Records a failure of the background task's probe, verify or wrap, concerning `key_id`
    /// (None: the current root key). A permanent failure (the backend's authoritative "key gone,
    /// disabled or denied"; backends map anything ambiguous to `Transient`) must be seen twice
    /// in a row before it acts: the first only marks the key suspect and asks for another probe
    /// soon. The second purges that key's cached KEKs and, for the current key, retires the
    /// current KEK, so nothing more is sealed or opened under a revoked root key.
    fn note_backend_error(&self, key_id: Option<&str>, e: &BackendError) {
        let current = self.current();
        let current_id = current.as_ref().map(|c| c.key_id.as_str());
        let key_id = key_id.or(current_id);
        if is_permanent(e) {
            {
                let mut health = self.lock_health();
                if health.revoked.is_none() && health.suspect.replace(e.clone()).is_none() {
                    drop(health);
                    warn!(
                        error = %e,
                        key_id_hash = %KeyIdHash(key_id.unwrap_or_default()),
                        "root key refused by the backend; confirming with another probe before purging"
                    );
                    return;
                }
            }
            let purged = key_id.map(|k| self.cache.purge_key(k)).unwrap_or(0);
            let is_current = key_id.is_none() || key_id == current_id;
            warn!(
                error = %e,
                key_id_hash = %KeyIdHash(key_id.unwrap_or_default()),
                purged_keks = purged,
                current = is_current,
                "root key unusable: cached KEKs purged"
            );
            if is_current {
                self.current.store(None);
                let mut health = self.lock_health();
                health.revoked = Some(e.clone());
                if let Some(k) = key_id {
                    health.revoked_key = Some(k.to_string());
                }
            }
        } else if is_outage(e) {
            self.lock_health().failing_since.get_or_insert_with(Instant::now);
        }
    }

    /// The current local KEK, if one has been made. Lock-free; what Status reads.
    pub fn current(&self) -> Option<Arc<CurrentKek>> {
        self.current.load_full()
    }

    /// The cache of unwrapped KEKs (for metrics and tests).
    pub fn cache(&self) -> &KekCache {
        &self.cache
    }

    /// The backend behind the hierarchy.
    pub fn backend(&self) -> Arc<dyn Backend> {
        Arc::clone(&self.active().backend)
    }

    /// Local KEKs made by this process so far.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Relaxed)
    }

    /// Seals a seed under the current local KEK. The caller has checked its length.
    pub async fn encrypt(&self, plaintext: &[u8]) -> Result<Sealed, Error> {
        let cur = match self.healthy_current() {
            Ok(cur) => cur,
            // Only the very first KEK is ever made on a request path.
            Err(Error::NotReady) => {
                self.rotate(Reason::First).await?;
                self.healthy_current()?
            }
            Err(e) => return Err(e),
        };
        let before = cur.uses.fetch_add(1, Relaxed);
        if before + 1 >= self.active().policy.max_uses {
            self.rotate_soon.notify_one();
            // The hard stop; Status fails from the same count on (healthy_current).
            if before >= self.hard_limit() {
                return Err(Error::KekExhausted);
            }
        }
        let ciphertext = envelope::seal(&cur.kek, &cur.key_id, &cur.kek_ref, plaintext, &self.rng)
            .map_err(|_| Error::Internal("random number generator failed"))?;
        Ok(Sealed {
            ciphertext,
            key_id: cur.key_id.clone(),
            wrapped_kek: cur.wrapped.clone(),
        })
    }

    /// Opens a seed. Checks, in order: framing, that the key_id is known, the KEK (cache, else
    /// one coalesced backend unwrap), then the envelope's authentication.
    /// `peer` is who asked (None: in-process), for its share of waiting room on a cache miss.
    pub async fn decrypt(
        &self,
        key_id: &str,
        wrapped_kek: &bytes::Bytes,
        ciphertext: &[u8],
        peer: Option<Peer>,
    ) -> Result<Plaintext, Error> {
        let envelope = Envelope::parse(ciphertext)?;
        let active = self.active();
        if !active.backend.knows(key_id) {
            return Err(Error::UnknownKeyId);
        }
        if let Some(e) = active.backend.refuses(key_id) {
            // A retired version or deleted key: its cached KEKs go too.
            let purged = self.cache.purge_key(key_id);
            if purged > 0 {
                warn!(error = %e, key_id_hash = %KeyIdHash(key_id), purged_keks = purged, "root key version refused by the backend: cached KEKs purged");
            }
            return Err(Error::Backend(e));
        }
        {
            // The backend itself may still answer (or a compatible server may not enforce key
            // state); a root key the probe found revoked is not used until it recovers.
            let health = self.lock_health();
            if health.revoked_key.as_deref() == Some(key_id)
                && let Some(e) = &health.revoked
            {
                return Err(Error::Backend(e.clone()));
            }
        }
        if wrapped_kek.len() > active.backend.max_wrapped_len() {
            return Err(Error::InvalidArgument(format!(
                "wrapped KEK of {} bytes is longer than this backend makes",
                wrapped_kek.len()
            )));
        }
        let kek_ref = KekRef::new(key_id, wrapped_kek);
        let kek = self
            .cache
            .get_or_fetch(kek_ref, key_id, peer, || {
                let (backend, key_id, blob) = (Arc::clone(&active.backend), key_id.to_owned(), wrapped_kek.clone());
                let metrics = self.metrics.clone();
                async move {
                    backend_call(
                        &*backend,
                        &metrics,
                        "unwrap",
                        Some(&key_id),
                        backend.unwrap(&key_id, &blob),
                    )
                    .await
                }
            })
            .await
            .map_err(|miss| match miss {
                cache::Miss::Busy => Error::Overloaded,
                cache::Miss::Shares(limit) => Error::PeerShare(limit),
                cache::Miss::Backend(e) => {
                    self.note_unwrap_error(key_id, &e);
                    Error::Backend(e)
                }
            })?;
        Ok(envelope.open(&kek, key_id, &kek_ref)?)
    }

    /// Makes a new local KEK wrapped under the backend's current root key and makes it current.
    /// Serialised: concurrent callers wait, and a `First` request finding a KEK does nothing.
    pub async fn rotate(&self, reason: Reason) -> Result<(), Error> {
        let _guard = self.rotating.lock().await;
        if reason == Reason::First && self.current.load().is_some() {
            return Ok(());
        }
        let kek = Kek::generate(&self.rng).map_err(|_| Error::Internal("random number generator failed"))?;
        let active = self.active();
        let backend = &*active.backend;
        let stale = || !Arc::ptr_eq(&active, &self.active());
        let wrapped = match backend_call(backend, &self.metrics, "wrap", None, backend.wrap(&kek)).await {
            Ok(w) => w,
            // A backend a reload has since replaced says nothing about the one in force.
            Err(e) if stale() => return Err(e.into()),
            Err(e) => {
                self.note_backend_error(None, &e);
                return Err(e.into());
            }
        };
        check_wrapped(&wrapped, backend.max_wrapped_len())?;
        // The KEK must come back before anything is sealed under it: a server that ignored
        // the IV or the AAD, or answered for another key, would otherwise lose the data.
        let back = backend_call(
            backend,
            &self.metrics,
            "verify",
            Some(&wrapped.key_id),
            backend.unwrap(&wrapped.key_id, &wrapped.blob),
        )
        .await?;
        if back.expose() != kek.expose() {
            return Err(BackendError::new(ErrorKind::KeyUnusable, "a new KEK unwrapped to a different key").into());
        }
        if stale() {
            return Err(Error::Backend(BackendError::new(
                ErrorKind::Transient,
                "configuration reloaded during the rotation",
            )));
        }
        self.install(kek, wrapped, reason);
        Ok(())
    }

    /// Makes `kek` (checked by [`check_wrapped`]) the current KEK.
    fn install(&self, kek: Kek, wrapped: Wrapped, reason: Reason) {
        let kek_ref = KekRef::new(&wrapped.key_id, &wrapped.blob);
        let kek = Arc::new(kek);
        self.cache.insert(kek_ref, &wrapped.key_id, Arc::clone(&kek));
        let cur = Arc::new(CurrentKek {
            kek,
            kek_ref,
            wrapped: wrapped.blob.into(),
            created: Instant::now(),
            uses: AtomicU64::new(0),
            key_id: wrapped.key_id,
        });
        let previous = self.current.swap(Some(Arc::clone(&cur)));
        self.rotations.fetch_add(1, Relaxed);
        self.metrics
            .rotations
            .get_or_create(&metrics::Reason {
                reason: reason.as_str(),
            })
            .inc();
        // The previous root key is named rather than compared in a second field that could
        // contradict `reason`; `-` when there was no current KEK.
        let previous_key = previous.as_ref().map_or("", |p| p.key_id.as_str());
        info!(
            reason = reason.as_str(),
            key_id_hash = %KeyIdHash(&cur.key_id),
            previous_key_id_hash = %KeyIdHash(previous_key),
            "new local KEK is current"
        );
    }

    /// The background task: makes the first KEK if start-up could not, follows the backend's
    /// current root key, and retires KEKs by age and use count. Runs until `shutdown` fires.
    pub async fn run_rotation(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let wait = match (failures, self.current()) {
                (0, Some(cur)) => self.active().policy.next_check(cur.age()),
                (0, None) => Duration::ZERO,
                // Back off after failures: 1 s, 2 s, 4 s … capped at the check interval.
                (n, _) => Duration::from_secs(1 << n.min(6)).min(self.active().policy.check_interval),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.rotate_soon.notified() => {}
                _ = shutdown.changed() => return,
            }
            match self.check_and_rotate().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %e, failures, "local KEK rotation check failed; will retry");
                }
            }
        }
    }

    /// One pass of the rotation task: probe the backend, rotate if anything is due.
    pub async fn check_and_rotate(&self) -> Result<(), Error> {
        let active = self.active();
        let backend = &*active.backend;
        // A pass that began before a reload must not judge the backend now in force.
        let stale = || !Arc::ptr_eq(&active, &self.active());
        let root = match backend_call(backend, &self.metrics, "probe", None, backend.probe()).await {
            Ok(root) => root,
            Err(e) => {
                if !stale() {
                    self.note_backend_error(None, &e);
                }
                return Err(e.into());
            }
        };
        // The probe also proves the current KEK still unwraps: that exercises the permission
        // Decrypt needs (a key can be described but no longer usable) and catches a root key
        // that changed under the same name.
        if let Some(cur) = self.current().filter(|c| c.key_id == root) {
            let back = backend_call(
                backend,
                &self.metrics,
                "verify",
                Some(&cur.key_id),
                backend.unwrap(&cur.key_id, &cur.wrapped),
            )
            .await
            .and_then(|k| {
                if k.expose() == cur.kek.expose() {
                    Ok(())
                } else {
                    Err(BackendError::new(
                        ErrorKind::KeyUnusable,
                        "current KEK unwraps to a different key",
                    ))
                }
            });
            if let Err(e) = back {
                let e = match e.kind {
                    // Our own wrapped KEK no longer unwrapping means the root key changed.
                    ErrorKind::BadWrappedKey | ErrorKind::UnknownKey => {
                        BackendError::new(ErrorKind::KeyUnusable, e.detail)
                    }
                    _ => e,
                };
                if !stale() {
                    self.note_backend_error(None, &e);
                }
                return Err(e.into());
            }
        }
        if stale() {
            return Ok(());
        }
        self.note_backend_ok();
        let reason = match self.current() {
            None => Some(Reason::First),
            Some(cur) if cur.key_id != root => Some(Reason::RootKeyChanged),
            Some(cur) => active.policy.due(cur.age(), cur.uses()),
        };
        match reason {
            Some(reason) => self.rotate(reason).await,
            None => Ok(()),
        }
    }
}

/// A wrapped KEK whose every Encrypt output can be decrypted: a key_id the apiserver accepts, and
/// a blob within both the request budget ([`contract::MAX_WRAPPED_KEK`]) and `backend_max`, the
/// most its backend takes back. One that fails must never become current.
pub fn check_wrapped(wrapped: &Wrapped, backend_max: usize) -> Result<(), Error> {
    contract::check_key_id(&wrapped.key_id)
        .map_err(|why| BackendError::new(ErrorKind::KeyUnusable, format!("backend key_id unusable: {why}")))?;
    let max = backend_max.min(contract::MAX_WRAPPED_KEK);
    if wrapped.blob.is_empty() || wrapped.blob.len() > max {
        return Err(BackendError::new(
            ErrorKind::KeyUnusable,
            format!(
                "backend made a wrapped KEK of {} bytes; at most {max} fit a Decrypt request ({} bytes) and this backend",
                wrapped.blob.len(),
                contract::MAX_REQUEST_BYTES
            ),
        )
        .into());
    }
    Ok(())
}

/// Upper bound on any backend call, whatever the backend's own timeouts: a hung HSM or
/// network must turn into a transient error, never a stalled task.
pub const BACKEND_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one backend call with the timeout, the metrics and one log line.
async fn backend_call<T>(
    backend: &dyn Backend,
    metrics: &metrics::KeyMetrics,
    op: &'static str,
    key_id: Option<&str>,
    call: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let started = Instant::now();
    let result = tokio::time::timeout(BACKEND_CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::new(
                ErrorKind::Transient,
                format!("{op} timed out after {} s", BACKEND_CALL_TIMEOUT.as_secs()),
            ))
        });
    metrics.backend_call(op, &result, started.elapsed());
    let key_id_hash = key_id.map_or_else(|| "-".to_string(), |k| KeyIdHash(k).to_string());
    let elapsed_us = started.elapsed().as_micros() as u64;
    // The periodic probe and verify succeed every interval: logged at debug, so a quiet
    // plugin's info log holds only what changed.
    if result.is_ok() && matches!(op, "probe" | "verify") {
        tracing::debug!(backend = backend.name(), op, ok = true, key_id_hash = %key_id_hash, elapsed_us, "backend call");
    } else {
        info!(backend = backend.name(), op, ok = result.is_ok(), key_id_hash = %key_id_hash, elapsed_us, "backend call");
    }
    result
}
