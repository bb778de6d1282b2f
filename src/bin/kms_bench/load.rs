//! The closed-loop load engine: N workers, each issuing one call at a time, timed per call.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// One worker's connection and state; `call` makes one request and checks its answer.
pub trait Worker: Send + 'static {
    /// `Err` carries the failure's name: a gRPC code (`Unavailable`) or a check (`Mismatch`).
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// When the measured phase ends.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    After(Duration),
    Count(u64),
}

/// What a run measured.
pub struct Measured {
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl Measured {
    pub fn new() -> Self {
        Self {
            hist: new_histogram(),
            errors: BTreeMap::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn record(&mut self, latency: Duration, result: Result<(), String>) {
        // Saturates at the histogram's upper bound (one hour) instead of failing.
        self.hist
            .saturating_record(latency.as_nanos().min(u64::MAX as u128) as u64);
        if let Err(code) = result {
            *self.errors.entry(code).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: Measured) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 1 h at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

struct Shared {
    measure_from: Instant,
    stop: Stop,
    issued: AtomicU64,
}

/// Runs `workers` concurrently: calls during `warmup` are made but not recorded, then calls are
/// recorded until `stop`. Elapsed time runs from the end of the warm-up to the last reply.
pub async fn run<W: Worker>(workers: Vec<W>, warmup: Duration, stop: Stop) -> Measured {
    let shared = Arc::new(Shared {
        measure_from: Instant::now() + warmup,
        stop,
        issued: AtomicU64::new(0),
    });
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(drive(w, Arc::clone(&shared))))
        .collect();
    let mut total = Measured::new();
    let mut last = shared.measure_from;
    for task in tasks {
        let (measured, end) = task.await.expect("worker task panicked");
        total.merge(measured);
        last = last.max(end);
    }
    total.elapsed = last.saturating_duration_since(shared.measure_from);
    total
}

async fn drive<W: Worker>(mut worker: W, shared: Arc<Shared>) -> (Measured, Instant) {
    let mut measured = Measured::new();
    let end = match shared.stop {
        Stop::After(d) => Some(shared.measure_from + d),
        Stop::Count(_) => None,
    };
    let mut last = shared.measure_from;
    loop {
        let started = Instant::now();
        let recording = started >= shared.measure_from;
        if recording {
            let done = match (shared.stop, end) {
                (_, Some(end)) => started >= end,
                (Stop::Count(n), None) => shared.issued.fetch_add(1, Relaxed) >= n,
                (Stop::After(_), None) => unreachable!("deadline set for duration runs"),
            };
            if done {
                break;
            }
        }
        let result = worker.call().await;
        if recording {
            let now = Instant::now();
            measured.record(now - started, result);
            last = now;
        }
    }
    (measured, last)
}
