//! Micro-benchmarks of the key hierarchy's hot paths: envelope seal and open, a KEK cache hit,
//! and the annotation checks the apiserver's contract requires.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use kms_plugin::backend::{BackendError, ErrorKind};
use kms_plugin::contract::{KEK_ANNOTATION, check_annotations};
use kms_plugin::keys::Kek;
use kms_plugin::keys::cache::{KekCache, KekRef};
use kms_plugin::keys::envelope::{self, Envelope};
use ring::rand::SystemRandom;

const KEY_ID: &str = "local:00112233445566778899aabbccddeeff";

fn envelope_seal_open(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let kek = Kek::generate(&rng).unwrap();
    let kek_ref = KekRef::new(KEY_ID, &[7u8; 60]);
    let seed = [42u8; 32];
    let sealed = envelope::seal(&kek, KEY_ID, &kek_ref, &seed, &rng).unwrap();

    let mut g = c.benchmark_group("envelope");
    g.bench_function("seal_32B", |b| {
        b.iter(|| envelope::seal(&kek, black_box(KEY_ID), &kek_ref, black_box(&seed), &rng).unwrap())
    });
    g.bench_function("open_32B", |b| {
        b.iter(|| {
            Envelope::parse(black_box(&sealed))
                .unwrap()
                .open(&kek, KEY_ID, &kek_ref)
                .unwrap()
        })
    });
    g.bench_function("kek_ref", |b| {
        b.iter(|| KekRef::new(black_box(KEY_ID), black_box(&[7u8; 60])))
    });
    g.finish();
}

/// Polls a future that must complete without waiting (a cache hit never awaits).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a cache hit must not wait"),
    }
}

fn cache_hit(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let cache = KekCache::new(NonZeroUsize::new(1000).unwrap());
    // A full cache, as after a long life: the hit is one of 1000 entries.
    let mut refs = Vec::new();
    for i in 0..1000u32 {
        let r = KekRef::new(KEY_ID, &i.to_be_bytes());
        cache.insert(r, KEY_ID, Arc::new(Kek::generate(&rng).unwrap()));
        refs.push(r);
    }
    let hit = refs[500];
    c.bench_function("kek_cache/get_or_fetch_hit", |b| {
        b.iter(|| {
            ready(cache.get_or_fetch(black_box(hit), KEY_ID, None, || async {
                Err::<Kek, _>(BackendError::new(ErrorKind::Transient, "must not be called"))
            }))
            .unwrap()
        })
    });
}

fn annotations(c: &mut Criterion) {
    let one = HashMap::from([(KEK_ANNOTATION.to_string(), vec![0u8; 60])]);
    let many: HashMap<String, Vec<u8>> = (0..8)
        .map(|i| (format!("label-{i}.annotations.example-domain.io"), vec![0u8; 60]))
        .collect();
    let mut g = c.benchmark_group("contract");
    g.bench_function("check_annotations_1", |b| {
        b.iter(|| check_annotations(black_box(&one)).unwrap())
    });
    g.bench_function("check_annotations_8", |b| {
        b.iter(|| check_annotations(black_box(&many)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, envelope_seal_open, cache_hit, annotations);
criterion_main!(benches);
