//! The KMS v2 protocol as the apiserver uses it.

use crate::common::*;

#[tokio::test]
async fn round_trip_with_contract_limits() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "")).await;
    let mut c = plugin.client().await;

    let st = status(&mut c).await;
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    assert!(st.key_id.starts_with("local:"));

    let seed = rand_bytes(32);
    let e1 = encrypt(&mut c, &seed).await;
    assert_contract(&e1, &st.key_id);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), seed);

    // The same plaintext twice: distinct ciphertexts (the apiserver's cache key must differ).
    let e2 = encrypt(&mut c, &seed).await;
    assert_contract(&e2, &st.key_id);
    assert_ne!(e1.ciphertext, e2.ciphertext);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), seed);

    // Sizes other than the apiserver's 32 bytes work too, up to the limit that fits 1024.
    for n in [1, 33, 995] {
        let p = rand_bytes(n);
        let e = encrypt(&mut c, &p).await;
        assert_contract(&e, &st.key_id);
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), p);
    }
    // Status key_id never changed along the way.
    assert_eq!(status(&mut c).await.key_id, st.key_id);
    plugin.stop().await;
}

#[tokio::test]
async fn v2beta1_version_for_older_clusters() {
    let dir = Dir::new();
    let plugin = Plugin::start(&dir.config(&dir.socket(), "root.key", &[], "[status]\nversion = \"v2beta1\"")).await;
    let st = status(&mut plugin.client().await).await;
    assert_eq!(st.version, "v2beta1");
    plugin.stop().await;
}

#[tokio::test]
async fn decrypts_after_restart_and_on_another_instance() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    plugin.stop().await;

    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    assert_eq!(
        status(&mut c).await.key_id,
        key_id,
        "key_id must be stable across restarts"
    );
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);

    // A second node sharing the root key: same key_id, decrypts what the first wrote.
    let other_socket = dir.path("other/kms.sock").display().to_string();
    let other = Plugin::start(&dir.config(&other_socket, "root.key", &[], "")).await;
    let mut c2 = other.client().await;
    assert_eq!(status(&mut c2).await.key_id, key_id);
    assert_eq!(decrypt(&mut c2, &e).await.unwrap(), seed);
    let e2 = encrypt(&mut c2, &seed).await;
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), seed);
    other.stop().await;
    plugin.stop().await;
}
