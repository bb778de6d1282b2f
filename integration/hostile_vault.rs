//! The `vault` backend against answers no real Vault gives (integration/common/fake_vault.rs):
//! an ingress's pages, malformed JSON, malformed successes, echoed requests. The rule under
//! test: only an authoritative answer of Vault's own API, seen twice in a row, revokes a key;
//! anything ambiguous is a transient outage; nothing a server sends back is logged verbatim.

use std::path::PathBuf;

use tonic::Code;

use crate::common::fake_vault::{FakeVault, Mode};
use crate::common::*;

/// Fast probes and a long outage allowance: an ambiguous answer must never fail Status here.
const SETTINGS: &str = "[probe]\ninterval = \"100ms\"\nmax_outage = \"60s\"";

fn config(dir: &Dir, vault: &FakeVault, auth: &str) -> PathBuf {
    dir.write_config(&format!(
        "{SETTINGS}\n[socket]\npath = {:?}\n[backend]\ntype = \"vault\"\naddress = {:?}\nkey = \"k\"\n[backend.auth]\n{auth}\n",
        dir.socket(),
        vault.addr
    ))
}

fn secret_file(dir: &Dir, name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.path(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

fn token_auth(dir: &Dir) -> String {
    format!(
        "method = \"token\"\ntoken_file = {:?}",
        secret_file(dir, "token", "fake-token-0123456789")
    )
}

/// Seeds sealed and decrypted once, so their KEK is cached.
async fn cached_seeds(c: &mut kms_plugin::client::Client) -> Vec<(Vec<u8>, kms_plugin::proto::v2::EncryptResponse)> {
    let mut out = Vec::new();
    for _ in 0..3 {
        let seed = rand_bytes(32);
        let e = encrypt(c, &seed).await;
        assert_eq!(decrypt(c, &e).await.unwrap(), seed);
        out.push((seed, e));
    }
    out
}

#[tokio::test]
async fn answers_that_are_not_vaults_never_revoke() {
    let dir = Dir::new();
    let vault = FakeVault::start(Mode::Normal).await;
    let plugin = Plugin::start(&config(&dir, &vault, &token_auth(&dir))).await;
    let mut c = plugin.client().await;
    let seeds = cached_seeds(&mut c).await;
    let cached = plugin.metric("kms_plugin_kek_cache_size").await;
    assert!(cached >= 1.0);
    for mode in [Mode::Html404, Mode::Html200, Mode::MalformedJson, Mode::NoType] {
        vault.set(mode);
        // Several probes' worth of the answer: each a transient failure, never a verdict.
        vault.wait_reads(4).await;
        assert_eq!(status(&mut c).await.healthz, "ok", "{mode:?}\n{}", plugin.logs());
        for (seed, e) in &seeds {
            assert_eq!(&decrypt(&mut c, e).await.unwrap(), seed, "{mode:?}");
        }
        assert_eq!(plugin.metric("kms_plugin_kek_cache_size").await, cached, "{mode:?}");
        vault.set(Mode::Normal);
        vault.wait_reads(2).await;
    }
    let logs = plugin.stop_with_logs().await;
    assert!(
        logs.contains("malformed answer") && logs.contains("not a Vault API answer"),
        "{logs}"
    );
    assert!(
        !logs.contains("root key unusable") && !logs.contains("confirming"),
        "{logs}"
    );
}

#[tokio::test]
async fn one_authoritative_refusal_waits_for_a_second_before_purging() {
    let dir = Dir::new();
    let vault = FakeVault::start(Mode::Normal).await;
    let plugin = Plugin::start(&config(&dir, &vault, &token_auth(&dir))).await;
    let mut c = plugin.client().await;
    let seeds = cached_seeds(&mut c).await;
    // Vault's own "not found", once, then the key again: noted, not acted on.
    vault.set(Mode::NotFoundOnce);
    assert!(
        plugin.wait_log("confirming with another probe").await,
        "{}",
        plugin.logs()
    );
    vault.wait_reads(3).await;
    assert_eq!(status(&mut c).await.healthz, "ok");
    for (seed, e) in &seeds {
        assert_eq!(&decrypt(&mut c, e).await.unwrap(), seed);
    }
    assert!(!plugin.logs().contains("root key unusable"), "{}", plugin.logs());
    // Twice in a row: the key is revoked and its KEKs purged.
    vault.set(Mode::NotFound);
    assert!(
        plugin.wait_log("root key unusable: cached KEKs purged").await,
        "{}",
        plugin.logs()
    );
    let refused = c.status(kms_plugin::proto::v2::StatusRequest {}).await;
    let healthz = refused
        .map(|r| r.into_inner().healthz)
        .unwrap_or_else(|s| format!("{:?}", s.code()));
    assert_ne!(healthz, "ok");
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size").await, 0.0);
    assert_eq!(
        decrypt(&mut c, &seeds[0].1).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // The key back: the plugin heals by itself.
    vault.set(Mode::Normal);
    assert!(plugin.wait_log("backend healthy again").await, "{}", plugin.logs());
    eventually("Status to recover", || {
        let mut c = c.clone();
        async move {
            c.status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .is_ok_and(|s| s.get_ref().healthz == "ok")
        }
    })
    .await;
    assert_eq!(&decrypt(&mut c, &seeds[0].1).await.unwrap(), &seeds[0].0);
    plugin.stop().await;
}

#[tokio::test]
async fn a_malformed_unwrap_answer_is_unavailable_and_not_remembered() {
    let dir = Dir::new();
    let vault = FakeVault::start(Mode::Normal).await;
    let config = config(&dir, &vault, &token_auth(&dir));
    let maker = Plugin::start(&config).await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut maker.client().await, &seed).await;
    maker.stop().await;
    for mode in [Mode::DecryptWrongLength, Mode::DecryptNotBase64] {
        // A fresh process: its cache does not hold the KEK, so Decrypt asks the server.
        let plugin = Plugin::start(&config).await;
        let mut c = plugin.client().await;
        vault.set(mode);
        let err = decrypt(&mut c, &e).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode:?}: {err:?}");
        // The server answers right again: the very next Decrypt succeeds (no DataLoss kept).
        vault.set(Mode::Normal);
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed, "{mode:?}");
        plugin.stop().await;
    }
}

#[tokio::test]
async fn echoed_requests_never_reach_logs_or_check_output() {
    let dir = Dir::new();
    let vault = FakeVault::start(Mode::Echo).await;
    let secret_id = "approle-secret-id-5e3f9a0c1b7d";
    let auth = format!(
        "method = \"approle\"\nrole_id = \"role-1\"\nsecret_id_file = {:?}",
        secret_file(&dir, "secret-id", secret_id)
    );
    let config = config(&dir, &vault, &auth);
    // `check` with a server that echoes the login request into its error.
    // (Off the runtime's thread: the fake server answers on it.)
    let args = [
        "check".to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (ok, text) = crate::common::outcome(&out);
    assert!(!ok, "{text}");
    assert!(text.contains("auth endpoint not shown"), "{text}");
    assert!(!text.contains(secret_id), "{text}");

    // Serving, logging at trace: login echoed, then (once logged in) encrypt echoed.
    let socket = dir.socket();
    let plugin = Plugin::spawn_env(
        &["serve", "--config", config.to_str().unwrap()],
        &socket,
        &[("RUST_LOG", "trace")],
    );
    assert!(plugin.wait_log("vault login failed").await, "{}", plugin.logs());
    vault.set(Mode::Normal);
    eventually("the plugin to log in and make a KEK", || async {
        match plugin.try_client().await {
            Ok(mut c) => c
                .status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .is_ok_and(|s| s.get_ref().healthz == "ok"),
            Err(_) => false,
        }
    })
    .await;
    let mut c = plugin.client().await;
    encrypt(&mut c, &rand_bytes(32)).await;
    vault.set(Mode::EchoEncrypt);
    // SIGHUP: the reload builds a backend and checks it with a wrap, which the server echoes.
    plugin.signal("HUP");
    assert!(plugin.wait_log("<redacted>").await, "{}", plugin.logs());
    vault.set(Mode::Normal);
    let logs = plugin.stop_with_logs().await;
    assert!(!logs.contains(secret_id), "the secret_id reached the log");
    for kek in vault.sent_plaintexts.lock().unwrap().iter() {
        assert!(!logs.contains(kek.as_str()), "a KEK sent to encrypt reached the log");
    }
}

/// A backend output that passes every other check but would not fit a Decrypt request (3 KiB,
/// over the 4 KiB request budget with the longest key_id) never becomes current: what Encrypt
/// returns must always decrypt.
#[tokio::test]
async fn a_wrapped_kek_over_the_request_budget_never_becomes_current() {
    let dir = Dir::new();
    let vault = FakeVault::start(Mode::HugeCiphertext).await;
    let plugin = Plugin::spawn(
        &[
            "serve",
            "--config",
            config(&dir, &vault, &token_auth(&dir)).to_str().unwrap(),
        ],
        &dir.socket(),
    );
    // Either the KEK was refused (the fix) or it became current (Status ok).
    eventually("a first KEK attempt", || async {
        if plugin.logs().contains("fit a Decrypt request") {
            return true;
        }
        let Ok(mut c) = plugin.try_client().await else {
            return false;
        };
        c.status(kms_plugin::proto::v2::StatusRequest {})
            .await
            .is_ok_and(|s| s.get_ref().healthz == "ok")
    })
    .await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let sealed = c
        .encrypt(kms_plugin::proto::v2::EncryptRequest {
            plaintext: seed.clone().into(),
            uid: "u".into(),
        })
        .await;
    if let Ok(e) = sealed {
        // Whatever Encrypt returns, Decrypt must open.
        assert_eq!(decrypt(&mut c, e.get_ref()).await.unwrap(), seed);
    }
    let st = c.status(kms_plugin::proto::v2::StatusRequest {}).await;
    assert!(st.as_ref().map_or(true, |s| s.get_ref().healthz != "ok"), "{st:?}");
    assert!(plugin.logs().contains("fit a Decrypt request"), "{}", plugin.logs());
    // `check` runs the same self-test as a reload: it refuses such a backend too.
    let config = config(&dir, &vault, &token_auth(&dir));
    // Off this thread: the fake server answers on it.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["check", "--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fit a Decrypt request"),
        "{out:?}"
    );
    // A normal backend answer afterwards becomes current at the next attempt.
    vault.set(Mode::Normal);
    eventually("a KEK after the backend answers normally", || async {
        let mut c = plugin.client().await;
        c.status(kms_plugin::proto::v2::StatusRequest {})
            .await
            .is_ok_and(|s| s.get_ref().healthz == "ok")
    })
    .await;
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    plugin.stop().await;
}
