//! The unwrapped-KEK cache: an LRU of local KEKs keyed by a digest of their wrapped bytes, with
//! concurrent misses for the same wrapped KEK coalesced into one backend unwrap.
//!
//! Entries hold `Arc<Kek>`; a KEK is wiped when its last holder (cache or in-flight call) drops
//! it. The lock is never held across an await: look up, release, unwrap, re-lock to insert.
//!
//! Under a flood of garbage: a wrapped KEK the backend refused as not unwrapping is remembered
//! for [`NEGATIVE_TTL`] (bounded LRU), so repeating it costs no backend call; and at most
//! [`MAX_INFLIGHT`] distinct unwraps run at once, the others waiting their turn in arrival order
//! (up to [`MAX_WAITING`] of them, for up to [`MAX_WAIT`]) instead of failing, so a legitimate
//! cold Decrypt queued behind garbage still succeeds. Only a full queue is refused, as
//! [`Miss::Busy`], which is local load and never a backend outage.
//!
//! Every call that misses the cache, whether it starts an unwrap, joins one in flight or queues
//! for a slot, holds a waiter share ([`crate::shares`]) until its answer: at most
//! [`MAX_WAITERS_PER_CONNECTION`] per connection, [`MAX_WAITERS_PER_UID`] per peer uid and
//! [`MAX_WAITERS`] in all. So calls waiting on a slow or hostile backend can never hold the
//! server's open-call slots that Status and cached Decrypts (which never wait) need, and one
//! uid cannot take another's waiting room.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use ring::digest;
use tokio::sync::{Semaphore, watch};

use crate::backend::{BackendError, ErrorKind};
use crate::secret::Kek;
use crate::shares::{Peer, Shares};

const REF_DOMAIN: &[u8] = b"kms-plugin/kek-ref/v1\0";

/// Identity of a wrapped local KEK: SHA-256 over the root key_id and the wrapped bytes.
/// Public (derived from public data); used as the cache key and bound into every envelope.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekRef([u8; 32]);

impl KekRef {
    pub fn new(key_id: &str, wrapped: &[u8]) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(REF_DOMAIN);
        ctx.update(&(key_id.len() as u16).to_be_bytes());
        ctx.update(key_id.as_bytes());
        ctx.update(wrapped);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Self(out)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

type Outcome = Result<Arc<Kek>, BackendError>;

/// Why a KEK could not be had.
#[derive(Debug, Clone)]
pub enum Miss {
    /// The backend's answer (or a remembered refusal of the same wrapped KEK).
    Backend(BackendError),
    /// Too many distinct unwraps queued locally; retry later.
    Busy,
    /// The caller's peer (its connection, its uid) or all peers together have as many calls
    /// waiting on unwraps as they may; retry later.
    Shares(crate::shares::Limit),
}

struct Entry {
    key_id: Arc<str>,
    kek: Arc<Kek>,
}

struct Inner {
    lru: LruCache<KekRef, Entry>,
    inflight: HashMap<KekRef, watch::Receiver<Option<Outcome>>>,
    /// Wrapped KEKs the backend refused as not unwrapping, and when that was.
    refused: LruCache<KekRef, (BackendError, Instant)>,
    /// Bumped by every purge: an unwrap that started before a purge must not insert after it.
    epoch: u64,
}

/// Most distinct unwraps in flight at once, so a flood of distinct (garbage) wrapped KEKs
/// cannot start unbounded backend calls. A cold start needs one per distinct local KEK.
pub const MAX_INFLIGHT: usize = 64;
/// Most misses waiting for an unwrap slot; more are refused as [`Miss::Busy`].
pub const MAX_WAITING: usize = 512;
/// Longest a miss waits for an unwrap slot (the apiserver's own deadline is 3 s by default).
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// Calls waiting on an unwrap (started, joined or queued) at once, in all, per peer uid, and per
/// connection. A connection has at most 100 calls open (the server's stream limit), the
/// apiserver one connection; the total stays well below the server's open-call limit.
pub const MAX_WAITERS: usize = 1024;
pub const MAX_WAITERS_PER_UID: usize = 384;
pub const MAX_WAITERS_PER_CONNECTION: usize = 64;
/// How long a refused wrapped KEK is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// How many refused wrapped KEKs are remembered.
const NEGATIVE_CAPACITY: usize = 1024;

/// Removes the in-flight entry however the fetch task ends (even by panic), so waiters get an
/// answer and a later request can try again.
struct InflightGuard {
    cache: Arc<KekCache>,
    kek_ref: KekRef,
    rx: watch::Receiver<Option<Outcome>>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut inner = self.cache.lock();
        if inner
            .inflight
            .get(&self.kek_ref)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            inner.inflight.remove(&self.kek_ref);
        }
    }
}

/// Counters for metrics and tests; monotonic. Clones share the value, so the same counters
/// are registered with Prometheus.
#[derive(Default, Clone)]
pub struct CacheStats {
    pub hits: Counter,
    pub misses: Counter,
    pub coalesced: Counter,
    pub evictions: Counter,
    /// Decrypts answered from a remembered refusal, without a backend call.
    pub refused_hits: Counter,
    /// Misses refused because the unwrap queue, or the caller's waiter share, was full.
    pub busy: Counter,
}

/// Bounded cache of unwrapped local KEKs with single-flight misses.
pub struct KekCache {
    inner: Mutex<Inner>,
    /// Unwrap slots (MAX_INFLIGHT); a fetch task holds one until its backend call ends.
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    /// Waiter shares of the peers whose calls missed the cache.
    waiters: Arc<Shares>,
    pub stats: CacheStats,
}

impl KekCache {
    pub fn new(capacity: NonZeroUsize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                lru: LruCache::new(capacity),
                inflight: HashMap::new(),
                refused: LruCache::new(NonZeroUsize::new(NEGATIVE_CAPACITY).expect("non-zero")),
                epoch: 0,
            }),
            slots: Arc::new(Semaphore::new(MAX_INFLIGHT)),
            waiting: AtomicUsize::new(0),
            waiters: Shares::new(MAX_WAITERS, MAX_WAITERS_PER_UID, MAX_WAITERS_PER_CONNECTION),
            stats: CacheStats::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the map half-updated in a way that matters here.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a KEK this process created (so its own ciphertexts never cost an unwrap).
    pub fn insert(&self, kek_ref: KekRef, key_id: &str, kek: Arc<Kek>) {
        let entry = Entry {
            key_id: key_id.into(),
            kek,
        };
        if let Some((old, _)) = self.lock().lru.push(kek_ref, entry)
            && old != kek_ref
        {
            self.stats.evictions.inc();
        }
    }

    /// Number of cached KEKs.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the KEKs whose root key_id passes `keep` (a reload removed the others);
    /// returns how many were dropped.
    pub fn retain_keys(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<KekRef> = inner
            .lru
            .iter()
            .filter(|(_, e)| !keep(&e.key_id))
            .map(|(r, _)| *r)
            .collect();
        for r in &doomed {
            inner.lru.pop(r);
        }
        inner.epoch += 1;
        doomed.len()
    }

    /// Drops every cached KEK wrapped under `key_id` (root key revoked); returns how many.
    pub fn purge_key(&self, key_id: &str) -> usize {
        self.retain_keys(|k| k != key_id)
    }

    /// Returns the cached KEK, or runs `fetch` once for all concurrent callers asking for the
    /// same `kek_ref`. The fetch runs in its own task, so a caller that gives up (apiserver
    /// timeout) does not cancel the unwrap the others are waiting for. A caller that must wait
    /// needs a waiter share of `peer` (None: an in-process caller, not limited).
    pub async fn get_or_fetch<F, Fut>(
        self: &Arc<Self>,
        kek_ref: KekRef,
        key_id: &str,
        peer: Option<Peer>,
        fetch: F,
    ) -> Result<Arc<Kek>, Miss>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Kek, BackendError>> + Send + 'static,
    {
        let mut slot = None;
        let mut share = None;
        let mut rx = loop {
            {
                let mut inner = self.lock();
                if let Some(e) = inner.lru.get(&kek_ref) {
                    self.stats.hits.inc();
                    return Ok(Arc::clone(&e.kek));
                }
                if let Some((e, at)) = inner.refused.get(&kek_ref) {
                    if at.elapsed() < NEGATIVE_TTL {
                        self.stats.refused_hits.inc();
                        return Err(Miss::Backend(e.clone()));
                    }
                    inner.refused.pop(&kek_ref);
                }
                // From here on the call waits: it needs its peer's share (held to the end).
                if share.is_none()
                    && let Some(peer) = peer
                {
                    match self.waiters.try_take(peer) {
                        Ok(s) => share = Some(s),
                        Err(limit) => {
                            self.stats.busy.inc();
                            return Err(Miss::Shares(limit));
                        }
                    }
                }
                if let Some(rx) = inner.inflight.get(&kek_ref) {
                    self.stats.coalesced.inc();
                    drop(slot.take());
                    break rx.clone();
                }
                if let Some(permit) = slot.take().or_else(|| Arc::clone(&self.slots).try_acquire_owned().ok()) {
                    self.stats.misses.inc();
                    break self.start_fetch(&mut inner, kek_ref, key_id, permit, fetch());
                }
            }
            // Every slot is busy: wait for one in arrival order, then look again (another
            // caller may have fetched this very KEK meanwhile).
            slot = Some(self.wait_for_slot().await?);
        };
        let outcome = rx.wait_for(Option::is_some).await;
        drop(share);
        match outcome {
            Ok(outcome) => outcome.clone().expect("checked is_some").map_err(Miss::Backend),
            Err(_) => Err(Miss::Backend(BackendError::new(
                ErrorKind::Transient,
                "unwrap task ended early",
            ))),
        }
    }

    async fn wait_for_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Miss> {
        /// Gives the queue place back however the wait ends, a caller's cancellation included.
        struct Place<'a>(&'a AtomicUsize);
        impl Drop for Place<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        let place = Place(&self.waiting);
        if self.waiting.fetch_add(1, Relaxed) >= MAX_WAITING {
            drop(place);
            self.stats.busy.inc();
            return Err(Miss::Busy);
        }
        let permit = tokio::time::timeout(MAX_WAIT, Arc::clone(&self.slots).acquire_owned()).await;
        drop(place);
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.stats.busy.inc();
                Err(Miss::Busy)
            }
        }
    }

    /// Registers an in-flight unwrap of `kek_ref` and runs it in its own task, holding `slot`.
    fn start_fetch<Fut>(
        self: &Arc<Self>,
        inner: &mut Inner,
        kek_ref: KekRef,
        key_id: &str,
        slot: tokio::sync::OwnedSemaphorePermit,
        fut: Fut,
    ) -> watch::Receiver<Option<Outcome>>
    where
        Fut: Future<Output = Result<Kek, BackendError>> + Send + 'static,
    {
        let (tx, rx) = watch::channel(None);
        inner.inflight.insert(kek_ref, rx.clone());
        let epoch = inner.epoch;
        let guard = InflightGuard {
            cache: Arc::clone(self),
            kek_ref,
            rx: rx.clone(),
        };
        let key_id: Arc<str> = key_id.into();
        tokio::spawn(async move {
            let outcome = fut.await.map(Arc::new);
            drop(slot);
            {
                let cache = &guard.cache;
                let mut inner = cache.lock();
                match &outcome {
                    Ok(kek) if inner.epoch == epoch => {
                        let entry = Entry {
                            key_id,
                            kek: Arc::clone(kek),
                        };
                        if inner.lru.push(kek_ref, entry).is_some_and(|(old, _)| old != kek_ref) {
                            cache.stats.evictions.inc();
                        }
                    }
                    // Only a refusal of these very bytes is remembered: outages, denials and
                    // revocations are about the key, and the probe tracks those.
                    Err(e) if e.kind == ErrorKind::BadWrappedKey => {
                        inner.refused.put(kek_ref, (e.clone(), Instant::now()));
                    }
                    _ => {}
                }
            }
            drop(guard);
            let _ = tx.send(Some(outcome));
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::time::Duration;

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(&[b; 32]).unwrap()
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let cache = KekCache::new(NonZeroUsize::new(4).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let r = KekRef::new("k", b"w");
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(r, "k", None, || async move {
                        calls.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(kek(9))
                    })
                    .await
                    .map(|k| k.expose()[0])
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 9);
        }
        assert_eq!(calls.load(Relaxed), 1);
        assert_eq!(cache.stats.misses.get(), 1);
        assert_eq!(cache.stats.coalesced.get() + cache.stats.hits.get(), 31);
    }

    #[tokio::test]
    async fn failures_are_shared_and_not_cached() {
        let cache = KekCache::new(NonZeroUsize::new(4).unwrap());
        let r = KekRef::new("k", b"w");
        let e = cache
            .get_or_fetch(r, "k", None, || async {
                Err(BackendError::new(ErrorKind::Transient, "down"))
            })
            .await
            .err()
            .unwrap();
        assert!(matches!(
            e,
            Miss::Backend(BackendError {
                kind: ErrorKind::Transient,
                ..
            })
        ));
        assert!(cache.is_empty());
        assert!(cache.get_or_fetch(r, "k", None, || async { Ok(kek(1)) }).await.is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn lru_evicts_and_purges_by_key() {
        let cache = KekCache::new(NonZeroUsize::new(2).unwrap());
        for (i, id) in ["a", "a", "b"].iter().enumerate() {
            cache.insert(KekRef::new(id, &[i as u8]), id, Arc::new(kek(i as u8)));
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.stats.evictions.get(), 1);
        assert_eq!(cache.purge_key("a"), 1);
        assert_eq!(cache.len(), 1);
        // The evicted entry is fetched again; the kept one is a hit.
        let got = cache
            .get_or_fetch(KekRef::new("b", &[2]), "b", None, || async { panic!("must hit") })
            .await
            .unwrap();
        assert_eq!(got.expose()[0], 2);
    }

    #[test]
    fn kek_ref_separates_fields() {
        assert!(KekRef::new("ab", b"c") != KekRef::new("a", b"bc"));
        assert!(KekRef::new("a", b"c") == KekRef::new("a", b"c"));
    }

    #[tokio::test]
    async fn refused_wrapped_keks_are_remembered_briefly() {
        let cache = KekCache::new(NonZeroUsize::new(4).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let r = KekRef::new("k", b"garbage");
        for _ in 0..500 {
            let calls = Arc::clone(&calls);
            let e = cache
                .get_or_fetch(r, "k", None, || async move {
                    calls.fetch_add(1, Relaxed);
                    Err(BackendError::new(ErrorKind::BadWrappedKey, "no"))
                })
                .await
                .err()
                .unwrap();
            assert!(matches!(
                e,
                Miss::Backend(BackendError {
                    kind: ErrorKind::BadWrappedKey,
                    ..
                })
            ));
        }
        assert_eq!(calls.load(Relaxed), 1);
        assert_eq!(cache.stats.refused_hits.get(), 499);
        // Outages are not remembered: the next call asks the backend again.
        let r = KekRef::new("k", b"other");
        for _ in 0..2 {
            let calls = Arc::clone(&calls);
            let _ = cache
                .get_or_fetch(r, "k", None, || async move {
                    calls.fetch_add(1, Relaxed);
                    Err(BackendError::new(ErrorKind::Transient, "down"))
                })
                .await;
        }
        assert_eq!(calls.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn a_full_set_of_slots_queues_instead_of_failing() {
        let cache = KekCache::new(NonZeroUsize::new(1000).unwrap());
        let mut tasks = Vec::new();
        // Three times as many distinct slow unwraps as there are slots: all succeed.
        for i in 0..(3 * MAX_INFLIGHT) {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move {
                let r = KekRef::new("k", &i.to_be_bytes());
                cache
                    .get_or_fetch(r, "k", None, || async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(kek(i as u8))
                    })
                    .await
                    .map(|k| k.expose()[0])
                    .map_err(|e| format!("{e:?}"))
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u8);
        }
        assert_eq!(cache.stats.misses.get(), 3 * MAX_INFLIGHT as u64);
        assert_eq!(cache.stats.busy.get(), 0);
    }

    #[tokio::test]
    async fn a_full_queue_is_busy_at_once() {
        let cache = KekCache::new(NonZeroUsize::new(4).unwrap());
        let mut tasks = Vec::new();
        // Every slot taken by an unwrap that never ends, and the queue filled behind them.
        for i in 0..(MAX_INFLIGHT + MAX_WAITING) {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move {
                let r = KekRef::new("k", &i.to_be_bytes());
                let _ = cache.get_or_fetch(r, "k", None, std::future::pending).await;
            }));
        }
        while cache.waiting.load(Relaxed) < MAX_WAITING {
            tokio::task::yield_now().await;
        }
        let r = KekRef::new("k", b"one more");
        let started = std::time::Instant::now();
        let e = cache
            .get_or_fetch(r, "k", None, std::future::pending)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Miss::Busy), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(cache.stats.busy.get(), 1);
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn cancelled_waits_give_their_queue_place_back() {
        let cache = KekCache::new(NonZeroUsize::new(4).unwrap());
        let mut busy = Vec::new();
        for i in 0..MAX_INFLIGHT {
            let cache = Arc::clone(&cache);
            busy.push(tokio::spawn(async move {
                let _ = cache
                    .get_or_fetch(KekRef::new("k", &i.to_be_bytes()), "k", None, std::future::pending)
                    .await;
            }));
        }
        while cache.slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // Twice the queue's size of waiters that give up (the apiserver's deadline).
        for i in 0..(2 * MAX_WAITING) {
            let r = KekRef::new("w", &i.to_be_bytes());
            let wait = cache.get_or_fetch(r, "w", None, std::future::pending);
            assert!(tokio::time::timeout(Duration::from_millis(1), wait).await.is_err());
        }
        assert_eq!(cache.waiting.load(Relaxed), 0);
        assert_eq!(cache.stats.busy.get(), 0);
        for t in busy {
            t.abort();
        }
    }
}
