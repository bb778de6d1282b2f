//! The Google Cloud KMS backend against the emulation of its REST API
//! (integration/emulators/gcp_kms.py): what only this backend has. Round trip, rotation,
//! revocation, permission denied, outage, coalescing and the log scan are in the shared suite.
//! The three credential sources tested: a service-account key file (self-signed JWTs, verified
//! by the emulator), the metadata server, and workload identity federation (STS exchange).

use tonic::Code;

use crate::common::gcp::GcpKms;
use crate::common::*;

async fn round_trip(plugin: &Plugin) -> String {
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    e.key_id
}

/// No credentials file: application default credentials fall back to the metadata server.
#[tokio::test]
async fn metadata_server_credentials() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    let config = dir.write_config(&kms.config(&dir, &key, &[], "", ""));
    let mut env = kms.env();
    // No gcloud file, no GOOGLE_APPLICATION_CREDENTIALS: ADC must reach the metadata server.
    env.push(("HOME", dir.path("home").display().to_string()));
    let (ok, text) = check_env(&config, &env);
    assert!(ok && text.contains("ok: backend gcp current key_id"), "{text}");
    let plugin = Plugin::start_env(&config, &env).await;
    assert_eq!(round_trip(&plugin).await, format!("{key}/cryptoKeyVersions/1"));
    assert!(kms.calls("token") >= 1, "no token from the metadata server");
    plugin.stop().await;
}

/// An `external_account` file: the subject token is exchanged at `token_url` (STS).
#[tokio::test]
async fn workload_identity_federation_credentials() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    let subject = format!("subject-token-{}", rand_hex(16));
    std::fs::write(kms.state.join("subject-token"), &subject).unwrap();
    let external = serde_json::json!({
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/pool/providers/k8s",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("https://127.0.0.1:{}/v1/token", kms.port),
        "credential_source": {"file": kms.state.join("subject-token")},
    });
    let file = dir.path("external-account.json");
    std::fs::write(&file, external.to_string()).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let line = format!("credentials_file = {:?}", file.display().to_string());
    let config = dir.write_config(&kms.config(&dir, &key, &[], &line, ""));
    let plugin = Plugin::start_env(&config, &kms.env()).await;
    round_trip(&plugin).await;
    assert!(kms.calls("token") >= 1, "no STS exchange");
    let logs = plugin.stop_with_logs().await;
    let mut secrets: Vec<Vec<u8>> = kms.tokens().into_iter().map(String::into_bytes).collect();
    secrets.push(subject.into_bytes());
    leaks::assert_no_leaks(&logs, &secrets);
}

/// A service-account key the service does not know: start-up stops with the service's
/// refusal, and `check` says so.
#[tokio::test]
async fn an_unknown_service_account_is_refused_at_start() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    let mut account: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kms.service_account()).unwrap()).unwrap();
    account["private_key_id"] = "0000".into();
    let file = dir.path("other-account.json");
    std::fs::write(&file, account.to_string()).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let line = format!("credentials_file = {:?}", file.display().to_string());
    let config = dir.write_config(&kms.config(&dir, &key, &[], &line, ""));
    let (ok, text) = check_env(&config, &kms.env());
    assert!(!ok, "{text}");
    assert!(text.contains("UNAUTHENTICATED"), "{text}");
    assert!(!text.contains("BEGIN PRIVATE KEY"), "{text}");
}

/// A service-account key file others can read is refused before anything is sent.
#[tokio::test]
async fn a_readable_service_account_file_is_refused() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    std::fs::set_permissions(
        kms.service_account(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let config = dir.write_config(&kms.config(&dir, &key, &[], &kms.service_account_line(), ""));
    let (ok, text) = check(&config);
    assert!(!ok && text.contains("credentials_file"), "{text}");
    assert_eq!(kms.calls("get"), 0);
}

/// An older version disabled after a rotation: its data is refused (FailedPrecondition) even
/// while its KEK is cached, since the probe unwraps a sample of it again; enabled again, it
/// decrypts. The new primary's data is untouched throughout.
#[tokio::test]
async fn an_older_version_disabled_later_is_refused_and_purged() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    let text = kms.config(
        &dir,
        &key,
        &[],
        &kms.service_account_line(),
        "[probe]\ninterval = \"200ms\"",
    );
    let plugin = Plugin::start_env(&dir.write_config(&text), &kms.env()).await;
    let mut c = plugin.client().await;
    let (s1, s2) = (rand_bytes(32), rand_bytes(32));
    let e1 = encrypt(&mut c, &s1).await;
    let v2 = kms.rotate(&key);
    eventually("the new primary to be current", || async {
        status(&mut c.clone()).await.key_id == v2
    })
    .await;
    let e2 = encrypt(&mut c, &s2).await;
    assert_eq!(e2.key_id, v2);
    assert_eq!(
        decrypt(&mut c, &e1).await.unwrap(),
        s1,
        "the older version's KEK is cached"
    );

    kms.set_state(&e1.key_id, "DISABLED");
    let err = eventually_some("the older version to be refused", || async {
        decrypt(&mut c.clone(), &e1).await.err()
    })
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(status(&mut c).await.healthz, "ok");

    kms.set_state(&e1.key_id, "ENABLED");
    let opened = eventually_some("the older version to decrypt again", || async {
        decrypt(&mut c.clone(), &e1).await.ok()
    })
    .await;
    assert_eq!(opened, s1);
    plugin.stop().await;
}

/// An answer whose ciphertext does not match its CRC32C (corrupted on the way) is never used:
/// no KEK is made from it, Status and Encrypt are refused, the log says why; once answers are
/// whole again, the plugin serves.
#[tokio::test]
async fn a_corrupted_answer_is_not_used() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    kms.admin("/admin/corrupt?on=1", &[]);
    let config = dir.write_config(&kms.config(&dir, &key, &[], &kms.service_account_line(), ""));
    let plugin = Plugin::spawn_env(
        &["serve", "--config", config.to_str().unwrap()],
        &dir.socket(),
        &kms.env(),
    );
    assert!(plugin.wait_log("does not match its CRC32C").await, "{}", plugin.logs());
    let mut c = eventually_some("the socket", || async { plugin.try_client().await.ok() }).await;
    let request = kms_plugin::proto::v2::EncryptRequest {
        plaintext: rand_bytes(32).into(),
        uid: rand_hex(8),
    };
    let err = c.encrypt(request).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let refused = crate::suite::try_status(&c).await.err().map(|e| e.code());
    assert_eq!(refused, Some(Code::Unavailable));

    kms.admin("/admin/corrupt?on=0", &[]);
    plugin.wait_ready().await;
    assert_eq!(round_trip(&plugin).await, format!("{key}/cryptoKeyVersions/1"));
    plugin.stop().await;
}

/// A Decrypt request pairs a key_id with a blob of its choosing: an enabled version's key_id
/// with a blob of a disabled version is refused, but never makes the enabled version refused.
#[tokio::test]
async fn a_request_cannot_get_an_enabled_version_refused() {
    let dir = Dir::new();
    let kms = GcpKms::start(&dir).await;
    let key = kms.create_key("root");
    let text = kms.config(
        &dir,
        &key,
        &[],
        &kms.service_account_line(),
        "[probe]\ninterval = \"200ms\"",
    );
    let config = dir.write_config(&text);
    // Blobs under distinct KEKs of version 1 (a failed unwrap of one blob is not retried at once).
    let mut old = Vec::new();
    for _ in 0..3 {
        let maker = Plugin::start_env(&config, &kms.env()).await;
        old.push(encrypt(&mut maker.client().await, &rand_bytes(32)).await);
        maker.stop().await;
    }
    let plugin = Plugin::start_env(&config, &kms.env()).await;
    let mut c = plugin.client().await;
    let v2 = kms.rotate(&key);
    eventually("the new primary to be current", || async {
        status(&mut c.clone()).await.key_id == v2
    })
    .await;
    let s2 = rand_bytes(32);
    let e2 = encrypt(&mut c, &s2).await;
    kms.set_state(&old[0].key_id, "DISABLED");
    for e1 in &old {
        let mut forged = decrypt_request(e1);
        forged.key_id = e2.key_id.clone();
        let err = c.decrypt(forged).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    let probes = plugin.backend_calls("probe").await;
    eventually("three more probes", || async {
        plugin.backend_calls("probe").await >= probes + 3
    })
    .await;
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(status(&mut c).await.healthz, "ok");
    assert!(!plugin.logs().contains("cached KEKs purged"), "{}", plugin.logs());
    plugin.stop().await;
}
