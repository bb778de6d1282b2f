//! Metrics of the key hierarchy: backend calls and rotations as they happen, and gauges read
//! from the live state at scrape time. Labels are bounded: op, outcome and reason are fixed
//! sets, and only the current key_id's hash is exported.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::Keys;
use crate::backend::{BackendError, ErrorKind};
use crate::logging::KeyIdHash;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendCall {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyIdLabel {
    key_id_hash: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Counters and histograms updated by the key hierarchy. Clones share the values.
#[derive(Clone)]
pub struct KeyMetrics {
    backend_calls: Family<BackendCall, Counter>,
    backend_seconds: HistogramFamily<Op>,
    pub(super) rotations: Family<Reason, Counter>,
}

fn backend_histogram() -> Histogram {
    // 0.5 ms … 4 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// The `outcome` label of a backend call.
pub fn outcome(kind: Option<ErrorKind>) -> &'static str {
    match kind {
        None => "ok",
        Some(ErrorKind::Transient) => "transient",
        Some(ErrorKind::Denied) => "denied",
        Some(ErrorKind::Configuration) => "configuration",
        Some(ErrorKind::KeyUnusable) => "key_unusable",
        Some(ErrorKind::UnknownKey) => "unknown_key",
        Some(ErrorKind::BadWrappedKey) => "bad_wrapped_key",
    }
}

impl KeyMetrics {
    pub fn new() -> Self {
        Self {
            backend_calls: Family::default(),
            backend_seconds: Family::new_with_constructor(backend_histogram),
            rotations: Family::default(),
        }
    }

    /// Records one backend call.
    pub fn backend_call<T>(&self, op: &'static str, result: &Result<T, BackendError>, elapsed: Duration) {
        let outcome = outcome(result.as_ref().err().map(|e| e.kind));
        self.backend_calls.get_or_create(&BackendCall { op, outcome }).inc();
        self.backend_seconds
            .get_or_create(&Op { op })
            .observe(elapsed.as_secs_f64());
    }
}

impl Default for KeyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Gauges read from the live key state on each scrape.
struct KeysCollector(Arc<Keys>);

impl std::fmt::Debug for KeysCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeysCollector")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for KeysCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let keys = &self.0;
        let current = keys.current();
        let healthy = keys.healthy_current().is_ok();
        let (revoked, failing) = keys.health_flags();
        gauge(
            &mut encoder,
            "kek_age_seconds",
            "Age of the current local KEK",
            current.as_ref().map_or(0.0, |c| c.age().as_secs_f64()),
        )?;
        gauge(
            &mut encoder,
            "kek_uses",
            "Seeds sealed under the current local KEK",
            current.as_ref().map_or(0.0, |c| c.uses() as f64),
        )?;
        gauge(
            &mut encoder,
            "kek_cache_size",
            "Unwrapped local KEKs in the cache",
            keys.cache().len() as f64,
        )?;
        gauge(
            &mut encoder,
            "healthy",
            "1 when Status answers ok",
            if healthy { 1.0 } else { 0.0 },
        )?;
        gauge(
            &mut encoder,
            "backend_healthy",
            "1 when the last backend probe succeeded",
            if failing || revoked { 0.0 } else { 1.0 },
        )?;
        gauge(
            &mut encoder,
            "root_key_revoked",
            "1 when the current root key is disabled, deleted or denied",
            if revoked { 1.0 } else { 0.0 },
        )?;
        if let Some(c) = current {
            let info = ConstGauge::new(1i64);
            let mut family = encoder.encode_descriptor(
                "key_id_info",
                "The current key_id, hashed as the apiserver does",
                None,
                info.metric_type(),
            )?;
            let labels = KeyIdLabel {
                key_id_hash: KeyIdHash(c.key_id()).to_string(),
            };
            info.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Registers the hierarchy's metrics (and its cache's) into `registry`.
pub fn register(keys: &Arc<Keys>, registry: &mut Registry) {
    let m = &keys.metrics;
    registry.register(
        "backend_calls",
        "Backend calls by operation and outcome",
        m.backend_calls.clone(),
    );
    registry.register(
        "backend_call_duration_seconds",
        "Backend call latency",
        m.backend_seconds.clone(),
    );
    registry.register("kek_rotations", "Local KEKs made, by reason", m.rotations.clone());
    let stats = keys.cache().stats.clone();
    registry.register("kek_cache_hits", "Decrypts whose KEK was cached", stats.hits);
    registry.register(
        "kek_cache_misses",
        "Decrypts that started a backend unwrap",
        stats.misses,
    );
    registry.register(
        "kek_cache_coalesced",
        "Decrypts that waited on an unwrap already in flight",
        stats.coalesced,
    );
    registry.register("kek_cache_evictions", "KEKs evicted from the cache", stats.evictions);
    registry.register(
        "kek_cache_refused_hits",
        "Decrypts answered from a recently refused wrapped KEK, without a backend call",
        stats.refused_hits,
    );
    registry.register(
        "unwrap_queue_full",
        "Decrypts refused (ResourceExhausted) because too many distinct unwraps were queued, or the caller's connection, uid or all callers had as many calls waiting on unwraps as they may",
        stats.busy,
    );
    registry.register_collector(Box::new(KeysCollector(Arc::clone(keys))));
}
