//! Local KEK rotation, root-key rotation and the KEK cache, observed over the socket.

use crate::common::*;
use kms_plugin::contract::KEK_ANNOTATION;
use kms_plugin::proto::v2::EncryptResponse;

fn wrapped(e: &EncryptResponse) -> Vec<u8> {
    e.annotations[KEK_ANNOTATION].to_vec()
}

/// Encrypts until the wrapped KEK differs from `before` (the background task rotated).
async fn encrypt_until_rotated(c: &mut kms_plugin::client::Client, before: &[u8]) -> (EncryptResponse, Vec<u8>) {
    eventually_some("the local KEK to rotate", || async {
        let seed = rand_bytes(32);
        let e = encrypt(&mut c.clone(), &seed).await;
        (wrapped(&e) != before).then_some((e, seed))
    })
    .await
}

#[tokio::test]
async fn local_kek_rotates_by_uses_without_changing_key_id() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "[kek]\nmax_uses = 2")).await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    let (e2, s2) = encrypt_until_rotated(&mut c, &wrapped(&e1)).await;
    assert_eq!(e2.key_id, key_id, "local rotation must not change key_id");
    assert_eq!(status(&mut c).await.key_id, key_id);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert!(plugin.wait_log("reason=\"uses\"").await, "{}", plugin.logs());
    plugin.stop().await;
}

#[tokio::test]
async fn local_kek_rotates_by_age() {
    let dir = Dir::new();
    let extra = "[kek]\nmax_age = \"300ms\"\n[probe]\ninterval = \"100ms\"";
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], extra)).await;
    let mut c = plugin.client().await;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    let (e2, s2) = encrypt_until_rotated(&mut c, &wrapped(&e1)).await;
    assert_eq!(e1.key_id, e2.key_id);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert!(plugin.wait_log("reason=\"age\"").await);
    plugin.stop().await;
}

#[tokio::test]
async fn root_key_rotation_changes_key_id_and_keeps_old_data() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "old.key", &[], "")).await;
    let mut c = plugin.client().await;
    let old_id = status(&mut c).await.key_id;
    let s_old = rand_bytes(32);
    let e_old = encrypt(&mut c, &s_old).await;
    plugin.stop().await;

    // Rotation: the new key is current, the old one decrypt-only.
    let plugin = Plugin::start(&dir.config(&dir.socket(), "new.key", &["old.key"], "")).await;
    let mut c = plugin.client().await;
    let new_id = status(&mut c).await.key_id;
    assert_ne!(new_id, old_id, "root rotation must change key_id");
    let s_new = rand_bytes(32);
    let e_new = encrypt(&mut c, &s_new).await;
    assert_contract(&e_new, &new_id);
    assert_eq!(decrypt(&mut c, &e_old).await.unwrap(), s_old);
    assert_eq!(decrypt(&mut c, &e_new).await.unwrap(), s_new);
    plugin.stop().await;

    // Old key retired: its data is refused with NotFound, new data still decrypts.
    let plugin = Plugin::start(&dir.config(&dir.socket(), "new.key", &[], "")).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e_old).await.unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(decrypt(&mut c, &e_new).await.unwrap(), s_new);
    plugin.stop().await;
}

#[tokio::test]
async fn concurrent_cold_decrypts_share_one_unwrap() {
    let dir = Dir::new();
    let writer = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut c = writer.client().await;
    let mut sealed = Vec::new();
    for _ in 0..64 {
        let seed = rand_bytes(32);
        sealed.push((encrypt(&mut c, &seed).await, seed));
    }
    let kek = wrapped(&sealed[0].0);
    assert!(
        sealed.iter().all(|(e, _)| wrapped(e) == kek),
        "all seeds under one local KEK"
    );
    writer.stop().await;

    // A fresh process has never seen that KEK; a slow backend makes the 64 misses overlap.
    let reader =
        Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "[bench]\nbackend_latency = \"300ms\"")).await;
    assert_eq!(reader.backend_calls("unwrap").await, 0);
    let mut tasks = Vec::new();
    for (e, seed) in sealed {
        let mut c = reader.client().await;
        tasks.push(tokio::spawn(
            async move { decrypt(&mut c, &e).await.map(|p| p == seed) },
        ));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(true)));
    }
    assert_eq!(reader.backend_calls("unwrap").await, 1, "logs:\n{}", reader.logs());
    reader.stop().await;
}
