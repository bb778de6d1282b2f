//! The AWS KMS backend end to end: the built plugin against moto's KMS server.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::common::moto::Moto;
use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

async fn start(config: &std::path::Path) -> Plugin {
    let env = Moto::env();
    Plugin::start_env(config, &env).await
}

/// Polls Status until `pred` holds on its outcome (bounded).
async fn status_until(
    c: &mut kms_plugin::client::Client,
    pred: impl Fn(&Result<String, Code>) -> bool,
) -> Result<String, Code> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner().key_id)
            .map_err(|s| s.code());
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "status never reached the expected state; last {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn round_trip_and_alias_rotation() {
    let moto = Moto::start().await;
    let dir = Dir::new();
    let k1 = moto.create_key().await;
    moto.alias("alias/kms-plugin", &k1).await;
    let plugin = start(&moto.config(&dir, "alias/kms-plugin", &[], "[probe]\ninterval = \"100ms\"")).await;
    let mut c = plugin.client().await;
    let st = status(&mut c).await;
    assert_eq!(st.key_id, k1, "key_id is the resolved key ARN");
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    assert_contract(&e1, &k1);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);

    // Re-pointing the alias is a root-key rotation: new key_id, old data still decrypts.
    let k2 = moto.create_key().await;
    moto.alias("alias/kms-plugin", &k2).await;
    status_until(&mut c, |r| r.as_deref() == Ok(k2.as_str())).await.unwrap();
    let s2 = rand_bytes(32);
    let e2 = encrypt(&mut c, &s2).await;
    assert_contract(&e2, &k2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    plugin.stop().await;

    // After a restart the old key must be listed as decrypt-only; then both decrypt via KMS.
    let plugin = start(&moto.config(&dir, "alias/kms-plugin", &[&k1], "")).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(plugin.backend_calls("unwrap").await, 2);
    plugin.stop().await;
    let plugin = start(&moto.config(&dir, "alias/kms-plugin", &[], "")).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e1).await.unwrap_err().code(), Code::NotFound);
    plugin.stop().await;
}

#[tokio::test]
async fn disabled_key_fails_status_and_recovers_when_enabled() {
    let moto = Moto::start().await;
    let dir = Dir::new();
    let k = moto.create_key().await;
    let plugin = start(&moto.config(&dir, &k, &[], "[probe]\ninterval = \"100ms\"")).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;

    moto.set_enabled(&k, false).await;
    assert_eq!(
        status_until(&mut c, |r| r.is_err()).await,
        Err(Code::FailedPrecondition)
    );
    // Its cached KEKs are gone: Decrypt asks KMS, which refuses a disabled key.
    let err = decrypt(&mut c, &e).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c
        .encrypt(kms_plugin::proto::v2::EncryptRequest {
            plaintext: seed.clone().into(),
            uid: "u".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    moto.set_enabled(&k, true).await;
    assert_eq!(status_until(&mut c, |r| r.is_ok()).await, Ok(k.clone()));
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    plugin.stop().await;
}

#[tokio::test]
async fn outage_keeps_hot_paths_working_and_recovers() {
    let moto = Moto::start().await;
    let dir = Dir::new();
    let k = moto.create_key().await;
    let extra = "[probe]\ninterval = \"100ms\"\nmax_outage = \"2s\"";
    let plugin = start(&moto.config(&dir, &k, &[], extra)).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let cached = encrypt(&mut c, &seed).await;

    // A ciphertext under a KEK this plugin has never seen (made by another instance).
    let other_socket = dir.path("other/kms.sock").display().to_string();
    let other_cfg = moto.config(&dir, &k, &[], "").to_str().unwrap().to_string();
    let text = std::fs::read_to_string(&other_cfg)
        .unwrap()
        .replace(&dir.socket(), &other_socket);
    let other = start(&dir.write_config(&text)).await;
    let cold_seed = rand_bytes(32);
    let cold = encrypt(&mut other.client().await, &cold_seed).await;
    other.stop().await;

    moto.pause(true);
    // Hot paths need no KMS: Status (within max_outage), Encrypt and cached Decrypt work.
    assert_eq!(status(&mut c).await.key_id, k);
    let fresh = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &fresh).await.unwrap(), seed);
    assert_eq!(decrypt(&mut c, &cached).await.unwrap(), seed);
    // An uncached KEK needs KMS: Unavailable, after the bounded call timeout.
    assert_eq!(decrypt(&mut c, &cold).await.unwrap_err().code(), Code::Unavailable);
    // Past max_outage, Status fails so the apiserver stops writing.
    assert_eq!(status_until(&mut c, |r| r.is_err()).await, Err(Code::Unavailable));

    moto.pause(false);
    assert_eq!(status_until(&mut c, |r| r.is_ok()).await, Ok(k.clone()));
    // What docs/operations.md tells the operator to look for once an outage is over.
    assert!(plugin.wait_log("backend healthy again").await, "{}", plugin.logs());
    assert_eq!(decrypt(&mut c, &cold).await.unwrap(), cold_seed);
    plugin.stop().await;
}
