//! The unwrapped-KEK cache: an LRU of local KEKs keyed by a digest of their wrapped bytes, with
//! concurrent misses for the same wrapped KEK coalesced into one backend unwrap.
//!
//! Entries hold `Arc<Kek>`; a KEK is wiped when its last holder (cache or in-flight call) drops
//! it. The lock is never held across an await: look up, release, unwrap, re-lock to insert.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use ring::digest;
use tokio::sync::watch;

use super::secret::Kek;
use crate::backend::{BackendError, ErrorKind};

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

struct Entry {
    key_id: Arc<str>,
    kek: Arc<Kek>,
}

struct Inner {
    lru: LruCache<KekRef, Entry>,
    inflight: HashMap<KekRef, watch::Receiver<Option<Outcome>>>,
    /// Bumped by every purge: an unwrap that started before a purge must not insert after it.
    epoch: u64,
}

/// Most distinct unwraps in flight at once; beyond it misses fail fast with Unavailable, so
/// a flood of distinct (garbage) wrapped KEKs cannot queue unbounded backend calls. A cold
/// start needs one per distinct local KEK, far fewer.
pub const MAX_INFLIGHT: usize = 64;

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
}

/// Bounded cache of unwrapped local KEKs with single-flight misses.
pub struct KekCache {
    inner: Mutex<Inner>,
    pub stats: CacheStats,
}

impl KekCache {
    pub fn new(capacity: NonZeroUsize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                lru: LruCache::new(capacity),
                inflight: HashMap::new(),
                epoch: 0,
            }),
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

    /// Drops every cached KEK wrapped under `key_id` (root key revoked); returns how many.
    pub fn purge_key(&self, key_id: &str) -> usize {
        let mut inner = self.lock();
        let doomed: Vec<KekRef> = inner
            .lru
            .iter()
            .filter(|(_, e)| &*e.key_id == key_id)
            .map(|(r, _)| *r)
            .collect();
        for r in &doomed {
            inner.lru.pop(r);
        }
        inner.epoch += 1;
        doomed.len()
    }

    /// Returns the cached KEK, or runs `fetch` once for all concurrent callers asking for the
    /// same `kek_ref`. The fetch runs in its own task, so a caller that gives up (apiserver
    /// timeout) does not cancel the unwrap the others are waiting for.
    pub async fn get_or_fetch<F, Fut>(self: &Arc<Self>, kek_ref: KekRef, key_id: &str, fetch: F) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Kek, BackendError>> + Send + 'static,
    {
        let mut rx = {
            let mut inner = self.lock();
            if let Some(e) = inner.lru.get(&kek_ref) {
                self.stats.hits.inc();
                return Ok(Arc::clone(&e.kek));
            }
            if let Some(rx) = inner.inflight.get(&kek_ref) {
                self.stats.coalesced.inc();
                rx.clone()
            } else {
                if inner.inflight.len() >= MAX_INFLIGHT {
                    return Err(BackendError::new(
                        ErrorKind::Transient,
                        "too many distinct unwraps in flight",
                    ));
                }
                self.stats.misses.inc();
                let (tx, rx) = watch::channel(None);
                inner.inflight.insert(kek_ref, rx.clone());
                let epoch = inner.epoch;
                let guard = InflightGuard {
                    cache: Arc::clone(self),
                    kek_ref,
                    rx: rx.clone(),
                };
                let key_id: Arc<str> = key_id.into();
                let fut = fetch();
                tokio::spawn(async move {
                    let outcome = fut.await.map(Arc::new);
                    {
                        let cache = &guard.cache;
                        let mut inner = cache.lock();
                        if let Ok(kek) = &outcome
                            && inner.epoch == epoch
                        {
                            let entry = Entry {
                                key_id,
                                kek: Arc::clone(kek),
                            };
                            if inner.lru.push(kek_ref, entry).is_some_and(|(old, _)| old != kek_ref) {
                                cache.stats.evictions.inc();
                            }
                        }
                    }
                    drop(guard);
                    let _ = tx.send(Some(outcome));
                });
                rx
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("checked is_some"),
            Err(_) => Err(BackendError::new(ErrorKind::Transient, "unwrap task ended early")),
        }
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
                    .get_or_fetch(r, "k", || async move {
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
            .get_or_fetch(r, "k", || async {
                Err(BackendError::new(ErrorKind::Transient, "down"))
            })
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::Transient);
        assert!(cache.is_empty());
        assert!(cache.get_or_fetch(r, "k", || async { Ok(kek(1)) }).await.is_ok());
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
            .get_or_fetch(KekRef::new("b", &[2]), "b", || async { panic!("must hit") })
            .await
            .unwrap();
        assert_eq!(got.expose()[0], 2);
    }

    #[test]
    fn kek_ref_separates_fields() {
        assert!(KekRef::new("ab", b"c") != KekRef::new("a", b"bc"));
        assert!(KekRef::new("a", b"c") == KekRef::new("a", b"c"));
    }
}
