//! The `kmip` backend against a real KMIP server (PyKMIP's pykmip-server, mutual TLS; see
//! integration/common/kmip.rs): nothing is mocked.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::kmip::Kmip;
use crate::common::openbao::Pki;
use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

async fn cold(config: &std::path::Path) -> (Vec<u8>, kms_plugin::proto::v2::EncryptResponse) {
    let maker = Plugin::start(config).await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut maker.client().await, &seed).await;
    maker.stop().await;
    (seed, e)
}

#[tokio::test]
async fn kmip_round_trip_restart_and_one_call_for_64_cold_decrypts() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let config = kmip.config(&dir, "kms-root", "", "");
    let (seed, e) = cold(&config).await;
    assert!(e.key_id.starts_with("kmip:"), "{}", e.key_id);
    let plugin = Plugin::start(&config).await;
    let c = plugin.client().await;
    assert_eq!(
        status(&mut c.clone()).await.key_id,
        e.key_id,
        "same key_id after a restart"
    );
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (mut c, e) = (c.clone(), e.clone());
        tasks.push(tokio::spawn(async move { decrypt(&mut c, &e).await.unwrap() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), seed);
    }
    assert_eq!(plugin.backend_calls("unwrap").await, 1);
    // A tampered wrapped KEK is refused, never opened under another key. (PyKMIP reports a
    // failed GCM tag as General Failure, which the backend cannot tell from a server fault, so
    // it answers Unavailable; a server that says Cryptographic Failure gets DataLoss.)
    let mut bad = decrypt_request(&e);
    let mut blob = bad.annotations[kms_plugin::contract::KEK_ANNOTATION].to_vec();
    blob[20] ^= 1;
    bad.annotations
        .insert(kms_plugin::contract::KEK_ANNOTATION.into(), blob.into());
    let code = c.clone().decrypt(bad).await.unwrap_err().code();
    assert!(matches!(code, Code::DataLoss | Code::Unavailable), "{code:?}");
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_a_new_key_under_the_name_is_a_rotation_without_a_restart() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", "", "[probe]\ninterval = \"200ms\"")).await;
    let mut c = plugin.client().await;
    let first = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let old = encrypt(&mut c, &seed).await;
    // Initial Date has a resolution of one second: the new key must be strictly newer.
    std::thread::sleep(Duration::from_millis(1100));
    // A newer object with the name that is not an AES-256 key never becomes the root key.
    kmip.py("u = c.create(enums.CryptographicAlgorithm.AES, 128, name='kms-root', cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])\nc.activate(u)");
    // Two full probes after the newer object: each has looked at it and kept the old key.
    let probes = plugin.backend_calls("probe").await;
    eventually("two probes", || async {
        plugin.backend_calls("probe").await >= probes + 2
    })
    .await;
    assert_eq!(status(&mut c).await.key_id, first, "an AES-128 key took over the name");
    std::thread::sleep(Duration::from_millis(1100));
    kmip.create_key("kms-root");
    let deadline = Instant::now() + Duration::from_secs(20);
    let second = loop {
        let id = status(&mut c).await.key_id;
        if id != first {
            break id;
        }
        assert!(Instant::now() < deadline, "the rotation was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(encrypt(&mut c, &rand_bytes(32)).await.key_id, second);
    assert_eq!(decrypt(&mut c, &old).await.unwrap(), seed);
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_revoking_the_current_key_fails_status_and_purges_its_keks() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    let uid = kmip.create_key("kms-root");
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", "", "[probe]\ninterval = \"200ms\"")).await;
    let mut c = plugin.client().await;
    let e = encrypt(&mut c, &rand_bytes(32)).await;
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 1.0);
    kmip.revoke(&uid);
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match c.status(StatusRequest {}).await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "Status never failed"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 0.0);
    assert_eq!(decrypt(&mut c, &e).await.unwrap_err().code(), Code::FailedPrecondition);
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_a_wrong_client_certificate_is_a_clear_error() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let other = Pki::new(&dir, "stranger");
    let good = kmip.config(&dir, "kms-root", "", "");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace(
            &kmip.pki.client_cert.display().to_string(),
            &other.client_cert.display().to_string(),
        )
        .replace(
            &kmip.pki.client_key.display().to_string(),
            &other.client_key.display().to_string(),
        );
    let out = Command::new(BIN)
        .args(["check", "--config", dir.write_config(&text).to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("kmip") && (text.contains("TLS") || text.contains("certificate")),
        "{text}"
    );
    let out = Command::new(BIN)
        .args(["check", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn kmip_a_stopped_server_is_an_outage_that_heals() {
    let dir = Dir::new();
    let mut kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let config = kmip.config(&dir, "kms-root", "", "[probe]\ninterval = \"200ms\"");
    let (cold_seed, cold_e) = cold(&config).await;
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let hot = encrypt(&mut c, &seed).await;
    kmip.stop();
    assert_eq!(status(&mut c).await.healthz, "ok");
    encrypt(&mut c, &rand_bytes(32)).await;
    assert_eq!(decrypt(&mut c, &hot).await.unwrap(), seed);
    assert_eq!(decrypt(&mut c, &cold_e).await.unwrap_err().code(), Code::Unavailable);
    kmip.run();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match decrypt(&mut c, &cold_e).await {
            Ok(p) => {
                assert_eq!(p, cold_seed);
                break;
            }
            Err(_) => assert!(Instant::now() < deadline, "never recovered; logs:\n{}", plugin.logs()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while plugin.metric("kms_plugin_backend_healthy ").await != 1.0 {
        assert!(Instant::now() < deadline, "the probe never saw the server again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status(&mut c).await.healthz, "ok");
    plugin.stop().await;
}

#[tokio::test]
async fn kmip_trace_logs_carry_no_key_material() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    kmip.create_key("kms-root");
    let config = kmip.config(&dir, "kms-root", "", "");
    let (_, cold_e) = cold(&config).await;
    let plugin = Plugin::start_traced(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    decrypt(&mut c, &e).await.unwrap();
    decrypt(&mut c, &cold_e).await.unwrap();
    let logs = plugin.stop_with_logs().await;
    assert!(logs.contains("backend call"), "trace logs missing");
    let key = std::fs::read(&kmip.pki.client_key).unwrap();
    let mut secrets = vec![seed, key];
    for e in [&e, &cold_e] {
        // IV, tag and ciphertext of each wrapped KEK.
        secrets.push(e.annotations[kms_plugin::contract::KEK_ANNOTATION][1..].to_vec());
    }
    crate::common::leaks::assert_no_leaks(&logs, &secrets);
}
