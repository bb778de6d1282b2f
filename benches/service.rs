//! The whole gRPC method bodies in-process, without the socket or HTTP/2: `KmsService` over
//! `Keys` over a `LocalBackend`, called through the generated `KeyManagementService` trait.
//! The difference between these numbers and kms-bench's single-stream latency is the transport.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kms_plugin::backend::local::{LocalBackend, generate_key_file};
use kms_plugin::keys::Keys;
use kms_plugin::keys::rotation::{Reason, RotationPolicy};
use kms_plugin::proto::v2::key_management_service_server::KeyManagementService;
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, StatusRequest};
use kms_plugin::service::KmsService;
use kms_plugin::settings::ApiVersion;
use tonic::Request;

fn service(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("root.key");
    generate_key_file(&key).unwrap();
    let backend = Arc::new(LocalBackend::open(&key, &[]).unwrap());
    // One worker runs the KEK rotation task, as in the plugin: millions of Encrypts in a run
    // pass max_uses, and without rotation the plugin would (rightly) stop sealing.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let keys = Keys::new(
        backend,
        RotationPolicy::default(),
        NonZeroUsize::new(1000).unwrap(),
        Duration::from_secs(3600),
    );
    rt.block_on(keys.rotate(Reason::First)).unwrap();
    let (_stop_rotation, stopped) = tokio::sync::watch::channel(false);
    rt.spawn(Arc::clone(&keys).run_rotation(stopped));
    let svc = KmsService::new(keys, ApiVersion::V2);

    let seed = bytes::Bytes::from(vec![42u8; 32]);
    let uid = "01234567-89ab-4cde-8f01-23456789abcd".to_string();
    let sealed = rt
        .block_on(svc.encrypt(Request::new(EncryptRequest {
            plaintext: seed.clone(),
            uid: uid.clone(),
        })))
        .unwrap()
        .into_inner();
    let decrypt = DecryptRequest {
        ciphertext: sealed.ciphertext,
        uid: uid.clone(),
        key_id: sealed.key_id,
        annotations: sealed.annotations,
    };

    let mut g = c.benchmark_group("service");
    g.bench_function("status", |b| {
        b.iter(|| rt.block_on(svc.status(Request::new(StatusRequest {}))).unwrap())
    });
    g.bench_function("encrypt_32B", |b| {
        b.iter(|| {
            rt.block_on(svc.encrypt(Request::new(EncryptRequest {
                plaintext: black_box(seed.clone()),
                uid: uid.clone(),
            })))
            .unwrap()
        })
    });
    g.bench_function("decrypt_32B_cached", |b| {
        b.iter(|| {
            let r = rt
                .block_on(svc.decrypt(Request::new(black_box(decrypt.clone()))))
                .unwrap();
            assert_eq!(r.get_ref().plaintext.len(), 32);
            r
        })
    });
    g.finish();
}

criterion_group!(benches, service);
criterion_main!(benches);
