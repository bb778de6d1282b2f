//! The operator's lifecycle through a real apiserver, on the embedded default (local) backend:
//! what lands in etcd, restarts, rotation by live reload and retirement, a killed plugin.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;

use crate::cluster::*;
use crate::common::rand_hex;
use crate::servers::Kind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn secrets_are_sealed_by_the_plugin_and_config_maps_stay_plain() {
    let cluster = Cluster::start(Kind::Local).await;
    let client = &cluster.apiserver.client;
    let marker = format!("e2e-plaintext-{}", rand_hex(8));
    create_secrets(client, "s", &marker, 100).await;
    create_config_maps(client, "c", &marker, 100).await;

    let key_id = cluster.key_id().await;
    let secrets = etcd_values(&cluster.etcd, &format!("/registry/secrets/{NAMESPACE}/s-")).await;
    assert_eq!(secrets.len(), 100);
    let prefix = format!("k8s:enc:kms:v2:{PROVIDER}:");
    for (key, value) in &secrets {
        assert!(
            value.starts_with(prefix.as_bytes()),
            "{key} is not sealed by the plugin"
        );
        assert!(!contains(value, marker.as_bytes()), "{key} holds its plaintext");
        assert_eq!(stored_key_id(key, value), key_id, "{key}");
    }
    let maps = etcd_values(&cluster.etcd, &format!("/registry/configmaps/{NAMESPACE}/c-")).await;
    assert_eq!(maps.len(), 100);
    for (key, value) in &maps {
        assert!(value.starts_with(b"k8s\0"), "{key} is not stored plain (protobuf)");
        assert!(contains(value, marker.as_bytes()), "{key} lacks its data");
    }
    check_secrets(client, "s", &marker, 100).await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    for i in 0..100 {
        let cm = api.get(&format!("c-{i}")).await.unwrap();
        assert_eq!(cm.data.unwrap()["value"], format!("{marker}-{i}"));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn everything_reads_back_after_plugin_and_apiserver_restarts() {
    let mut cluster = Cluster::start(Kind::Local).await;
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "r", &marker, 20).await;

    // Plugin restart (SIGTERM, start): its KEK cache is cold afterwards.
    let stopped = Instant::now();
    cluster.plugin.take().unwrap().stop().await;
    cluster.start_plugin().await;
    let took = wait_until(
        "/readyz/kms-providers after a plugin restart",
        Duration::from_secs(120),
        || cluster.apiserver.kms_ready(),
    )
    .await;
    // The apiserver caches a good check for 20 s, so a quick restart may go unnoticed (0 s).
    measured("plugin restart: SIGTERM to serving again", stopped.elapsed());
    measured("plugin restart: then to /readyz/kms-providers ok", took);
    check_secrets(&cluster.apiserver.client, "r", &marker, 20).await;
    create_secrets(&cluster.apiserver.client, "after-plugin", &marker, 5).await;

    // Apiserver restart: its DEK cache is cold, so every distinct seed is a Decrypt through
    // the plugin (whose cache is cold too since its own restart).
    let took = cluster.apiserver.restart().await;
    measured("apiserver restart: start to /readyz ok", took);
    let took = wait_until(
        "/readyz/kms-providers after an apiserver restart",
        Duration::from_secs(120),
        || cluster.apiserver.kms_ready(),
    )
    .await;
    measured("apiserver restart: /readyz to /readyz/kms-providers ok", took);
    check_secrets(&cluster.apiserver.client, "r", &marker, 20).await;
    check_secrets(&cluster.apiserver.client, "after-plugin", &marker, 5).await;
    assert!(
        cluster.plugin().backend_calls("unwrap").await >= 1,
        "the cold reads never reached the plugin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn a_live_rotation_is_seen_by_the_apiserver_and_a_rewrite_retires_the_old_key() {
    let mut cluster = Cluster::start(Kind::Local).await;
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "old", &marker, 30).await;
    let old = cluster.key_id().await;
    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 2, "objects are still under the old key:\n{report}");

    // Rotation by live reload: no restart; the old key stays configured decrypt-only.
    let pid = cluster.plugin().child.id();
    let rotated = Instant::now();
    cluster.keys.rotate(&cluster.dir).await;
    let new = cluster.wait_plugin_key_id_change(&old).await;
    assert_ne!(new, old);
    assert_eq!(cluster.plugin().child.id(), pid, "the plugin restarted");
    cluster.wait_apiserver_key_id(&new, Duration::from_secs(150)).await;
    measured(
        "live rotation: config rewrite to the apiserver reporting the new key_id hash",
        rotated.elapsed(),
    );
    cluster
        .wait_secret_stored_under(&new, "new", Duration::from_secs(60))
        .await;
    measured(
        "live rotation: config rewrite to a new Secret stored under the new key_id",
        rotated.elapsed(),
    );
    check_secrets(&cluster.apiserver.client, "old", &marker, 30).await;

    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 2, "rotation alone rewrites nothing:\n{report}");
    let rewritten = rewrite_secrets(&cluster.apiserver.client).await;
    assert!(rewritten >= 30);
    let (code, report) = cluster.inventory(&["--json"]);
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains(&old), "the old key_id still has objects:\n{report}");
    let (code, report) = cluster.retirable(&old);
    assert_eq!(code, 0, "{report}");
    check_secrets(&cluster.apiserver.client, "old", &marker, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "end-to-end: needs KMS_E2E_KUBE_APISERVER; run integration/e2e.sh"]
async fn a_killed_plugin_coasts_as_long_as_the_apiserver_allows_then_recovers() {
    let mut cluster = Cluster::start(Kind::Local).await;
    let marker = rand_hex(8);
    create_secrets(&cluster.apiserver.client, "k", &marker, 10).await;
    let api: Api<Secret> = Api::namespaced(cluster.apiserver.client.clone(), NAMESPACE);

    let plugin = cluster.plugin.take().unwrap();
    plugin.signal("KILL");
    drop(plugin);
    let killed = Instant::now();
    // The apiserver keeps writing with its current seed for up to 3 minutes after its last
    // good Status, and reads with the seeds it has decrypted; its readiness check fails first.
    let (mut not_ready, mut write_failed, mut read_failed) = (None, None, None);
    for i in 0.. {
        if not_ready.is_none() && !cluster.apiserver.kms_ready().await {
            not_ready = Some(killed.elapsed());
        }
        if write_failed.is_none() && !create_secret(&api, &format!("coast-{i}")).await {
            write_failed = Some(killed.elapsed());
        }
        if read_failed.is_none() && api.get(&format!("k-{}", i % 10)).await.is_err() {
            read_failed = Some(killed.elapsed());
        }
        if (not_ready.is_some() && write_failed.is_some()) || killed.elapsed() > Duration::from_secs(240) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let not_ready = not_ready.expect("/readyz/kms-providers never failed with the plugin dead");
    let write_failed = write_failed.expect("writes never stopped with the plugin dead for 4 minutes");
    measured("kill -9: to /readyz/kms-providers failing", not_ready);
    measured("kill -9: writes kept working for", write_failed);
    assert!(read_failed.is_none(), "a cached read failed after {read_failed:?}");
    assert!(
        write_failed > Duration::from_secs(60),
        "writes stopped after only {write_failed:?}"
    );

    let restarted = Instant::now();
    cluster.start_plugin().await;
    let ready = wait_until(
        "/readyz/kms-providers after the restart",
        Duration::from_secs(120),
        || cluster.apiserver.kms_ready(),
    )
    .await;
    measured("kill -9: plugin start to /readyz/kms-providers ok", ready);
    let mut n = 0;
    wait_until("a write after the restart", Duration::from_secs(120), || {
        n += 1;
        let name = format!("recovered-{n}");
        let api = api.clone();
        async move { create_secret(&api, &name).await }
    })
    .await;
    measured("kill -9: plugin start to writes working", restarted.elapsed());
    check_secrets(&cluster.apiserver.client, "k", &marker, 10).await;
}

/// Creates a small Secret; whether the apiserver accepted it.
async fn create_secret(api: &Api<Secret>, name: &str) -> bool {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        string_data: Some([("value".to_string(), "x".to_string())].into()),
        ..Default::default()
    };
    api.create(&kube::api::PostParams::default(), &secret).await.is_ok()
}
