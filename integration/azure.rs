//! The Azure Key Vault backend against the emulation of Key Vault's documented REST API
//! (integration/emulators/azure_keyvault.py): what only Azure has. Round trip, rotation by a
//! new key version, revocation by disabling it, permission denied, outage, coalescing and the
//! log scan are in the shared suite (integration/suite/).

use std::process::Command;

use tonic::Code;

use crate::common::azure::{Auth, KeyVault};
use crate::common::*;

/// A round trip through a plugin signed in with `auth`, a cold unwrap by a second plugin, and
/// the emulator's proof that the credential got its tokens.
async fn round_trip_with(auth: Auth) {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, auth, "");
    let env = kv.env(auth);
    let plugin = Plugin::start_env(&config, &env).await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    assert!(
        key_id.starts_with(&format!("{}/keys/k/", kv.vault_url())),
        "key_id names the vault, the key and its version: {key_id}"
    );
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_contract(&e, &key_id);
    plugin.stop().await;

    let plugin = Plugin::start_env(&config, &env).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    assert_eq!(plugin.backend_calls("unwrap").await, 1);
    plugin.stop().await;
    assert!(
        kv.counter("token") >= 2,
        "each plugin got a token from the {auth:?} endpoint"
    );
    assert!(kv.counter("unwrapkey") >= 1);
}

#[tokio::test]
async fn client_certificate_signs_its_assertion() {
    round_trip_with(Auth::ClientCertificate).await;
}

#[tokio::test]
async fn workload_identity_from_the_aks_environment() {
    round_trip_with(Auth::WorkloadIdentity).await;
}

#[tokio::test]
async fn managed_identity_through_the_identity_endpoint() {
    round_trip_with(Auth::ManagedIdentity).await;
}

/// A Managed HSM's oct-HSM key wraps with A256KW (40-byte blobs).
#[tokio::test]
async fn managed_hsm_wraps_with_aes_key_wrap() {
    let dir = Dir::new();
    let kv = KeyVault::start_with(&dir, true);
    let config = kv.config(&dir, Auth::ClientSecret, "");
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    assert_eq!(e.annotations[kms_plugin::contract::KEK_ANNOTATION].len(), 40);
    plugin.stop().await;
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
    plugin.stop().await;
}

/// After a rotation the old version keeps decrypting; once it is disabled its data is refused
/// (FailedPrecondition) while the new version's still decrypts; re-enabled, it decrypts again.
/// Expired, it still decrypts (Key Vault's exp binds wrapping only), and its cached KEK stays;
/// so does the current version's once it expires, which only stops new wraps.
#[tokio::test]
async fn old_versions_decrypt_until_disabled_even_expired() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let v1 = status(&mut c).await.key_id;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    let old = v1.rsplit('/').next().unwrap().to_string();

    kv.admin(&["rotate"]);
    let v2 = eventually_some("the new version to be current", || async {
        crate::suite::try_status(&c)
            .await
            .ok()
            .map(|s| s.key_id)
            .filter(|k| *k != v1)
    })
    .await;
    let s2 = rand_bytes(32);
    let e2 = encrypt(&mut c, &s2).await;
    assert_contract(&e2, &v2);
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);

    assert_eq!(
        plugin.metric("kms_plugin_kek_cache_size ").await,
        2.0,
        "a KEK under each version"
    );
    kv.admin(&["disable", &old]);
    eventually("the disabled version's data to be refused", || async {
        decrypt(&mut c.clone(), &e1).await.err().map(|s| s.code()) == Some(Code::FailedPrecondition)
    })
    .await;
    assert_eq!(
        plugin.metric("kms_plugin_kek_cache_size ").await,
        1.0,
        "the disabled version's KEK is purged"
    );
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(status(&mut c).await.healthz, "ok");

    kv.admin(&["enable", &old]);
    let opened = eventually_some("the re-enabled version to decrypt", || async {
        decrypt(&mut c.clone(), &e1).await.ok()
    })
    .await;
    assert_eq!(opened, s1);

    kv.admin(&["expire", &old]);
    let probes = plugin.backend_calls("probe").await;
    eventually("three more probes", || async {
        plugin.backend_calls("probe").await >= probes + 3
    })
    .await;
    assert_eq!(
        decrypt(&mut c, &e1).await.unwrap(),
        s1,
        "an expired version still decrypts"
    );
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 2.0, "nothing purged");

    // The current version expires: its data still decrypts, cold too (unwrapKey is allowed),
    // nothing is purged.
    kv.admin(&["expire"]);
    let probes = plugin.backend_calls("probe").await;
    eventually("three more probes", || async {
        plugin.backend_calls("probe").await >= probes + 3
    })
    .await;
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s2);
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 2.0, "nothing purged");
    plugin.stop().await;
    // A plugin started now makes no KEK (Status fails: nothing can be wrapped), yet decrypts.
    let socket = dir.socket();
    let plugin = Plugin::spawn(&["serve", "--config", config.to_str().unwrap()], &socket);
    let opened = eventually_some("a cold unwrap under the expired version", || async {
        decrypt(&mut plugin.try_client().await.ok()?, &e2).await.ok()
    })
    .await;
    assert_eq!(opened, s2);
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    assert!(
        plugin.logs().contains("has expired (exp): it still decrypts"),
        "{}",
        plugin.logs()
    );
    plugin.stop().await;
}

/// `kms-plugin check` wraps and unwraps through the vault; with a wrong client secret it fails
/// saying Entra ID refused the credential, without printing the secret.
#[tokio::test]
async fn check_round_trips_and_names_a_refused_secret() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "");
    let (ok, out) = check(&config);
    assert!(ok, "{out}");
    assert!(out.contains("ok: backend azure current key_id"), "{out}");

    let wrong = format!("cs~wrong-{}", rand_hex(16));
    std::fs::write(kv.file("client-secret"), &wrong).unwrap();
    let (ok, out) = check(&config);
    assert!(!ok, "{out}");
    assert!(out.contains("AADSTS7000215"), "{out}");
    assert!(!out.contains(&wrong), "{out}");
}

/// Workload identity without its environment is a configuration error `check` names.
#[tokio::test]
async fn workload_identity_without_its_environment_is_named() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::WorkloadIdentity, "");
    let out = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .env_remove("AZURE_TENANT_ID")
        .output()
        .unwrap();
    let (ok, out) = outcome(&out);
    assert!(!ok, "{out}");
    assert!(out.contains("workload_identity") && out.contains("tenant"), "{out}");
}

/// Answers no vault gives (a proxy's HTML 403, an oversized body, an unwrapped KEK of the wrong
/// length, an API gateway's `{"statusCode": 401}`) and Key Vault's own 401 (a proxy dropped the
/// bearer) are outages, never revocations: a cold Decrypt is Unavailable, the cached KEKs stay
/// and serve, Status stays healthy, and once the answers are right again the cold Decrypt
/// succeeds.
#[tokio::test]
async fn hostile_answers_are_transient_never_verdicts() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let (cold_seed, cold) = cold_ciphertexts(&config, 1).await.remove(0);
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let hot = encrypt(&mut c, &seed).await;

    for mode in ["short-kek", "huge", "proxy-403", "gateway-401", "kv-401"] {
        kv.admin(&["hostile", mode]);
        let err = decrypt(&mut c, &cold).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{mode}: {err:?}");
        let probes = plugin.backend_calls("probe").await;
        eventually("two more probes", || async {
            plugin.backend_calls("probe").await >= probes + 2
        })
        .await;
        assert_eq!(status(&mut c).await.healthz, "ok", "{mode}");
        assert_eq!(
            decrypt(&mut c, &hot).await.unwrap(),
            seed,
            "{mode}: the cached KEK serves"
        );
        assert!(
            plugin.metric("kms_plugin_kek_cache_size ").await >= 1.0,
            "{mode}: nothing purged"
        );
    }
    kv.admin(&["hostile", "off"]);
    let opened = eventually_some("the cold Decrypt to succeed", || async {
        decrypt(&mut c.clone(), &cold).await.ok()
    })
    .await;
    assert_eq!(opened, cold_seed);
    plugin.stop().await;
}

/// Moving to another key of the vault: with the old key's name in `decrypt_only_keys` its data
/// still decrypts; without it, its key_id is unknown (NotFound) and never tried.
#[tokio::test]
async fn another_key_takes_over_and_the_old_one_stays_decrypt_only() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let plugin = Plugin::start(&kv.config(&dir, Auth::ClientSecret, "")).await;
    let mut c = plugin.client().await;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    plugin.stop().await;

    kv.admin(&["create", "k2"]);
    let plugin = Plugin::start(&kv.config_keys(&dir, Auth::ClientSecret, "k2", &["k"], "")).await;
    let mut c = plugin.client().await;
    let key_id = status(&mut c).await.key_id;
    assert!(key_id.starts_with(&format!("{}/keys/k2/", kv.vault_url())), "{key_id}");
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);
    let e2 = encrypt(&mut c, &s1).await;
    assert_contract(&e2, &key_id);
    plugin.stop().await;

    let plugin = Plugin::start(&kv.config_keys(&dir, Auth::ClientSecret, "k2", &[], "")).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &e1).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(plugin.backend_calls("unwrap").await, 0);
    assert_eq!(decrypt(&mut c, &e2).await.unwrap(), s1);
    plugin.stop().await;
}

/// A hung vault (accepts, never answers) costs a cold Decrypt at most the call timeout, well
/// under the apiserver's 3 s, and is an outage (Unavailable), healed once it answers again.
#[tokio::test]
async fn a_hung_vault_fails_a_cold_decrypt_within_the_call_timeout() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "");
    let (seed, cold) = cold_ciphertexts(&config, 1).await.remove(0);
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    kv.pause(true);
    let began = std::time::Instant::now();
    let err = decrypt(&mut c, &cold).await.unwrap_err();
    let took = began.elapsed();
    kv.pause(false);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        took < std::time::Duration::from_millis(2500),
        "a hung vault took {took:?}"
    );
    let opened = eventually_some("the cold Decrypt to succeed", || async {
        decrypt(&mut c.clone(), &cold).await.ok()
    })
    .await;
    assert_eq!(opened, seed);
    plugin.stop().await;
}

/// A reload (SIGHUP) builds a new backend: it keeps reading the versions the old one used, so
/// an old version disabled after the reload is still refused and its cached KEK purged.
#[tokio::test]
async fn a_reload_keeps_watching_the_versions_in_use() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let v1 = status(&mut c).await.key_id;
    let s1 = rand_bytes(32);
    let e1 = encrypt(&mut c, &s1).await;
    kv.admin(&["rotate"]);
    eventually_some("the new version to be current", || async {
        crate::suite::try_status(&c)
            .await
            .ok()
            .map(|s| s.key_id)
            .filter(|k| *k != v1)
    })
    .await;
    plugin.signal("HUP");
    assert!(plugin.wait_log("configuration reloaded").await, "{}", plugin.logs());
    assert_eq!(decrypt(&mut c, &e1).await.unwrap(), s1);

    kv.admin(&["disable", v1.rsplit('/').next().unwrap()]);
    eventually("the disabled version's data to be refused", || async {
        decrypt(&mut c.clone(), &e1).await.err().map(|s| s.code()) == Some(Code::FailedPrecondition)
    })
    .await;
    plugin.stop().await;
}

/// Answers that echo the request (a vault quoting the KEK of a wrapKey or the blob of an
/// unwrapKey, a token endpoint quoting the client secret, the signed assertion or the federated
/// token) never bring what was sent into the plugin's log or `check`'s output.
#[tokio::test]
async fn echoed_requests_never_reach_the_logs() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let (_, cold) = cold_ciphertexts(&config, 1).await.remove(0);
    let plugin = Plugin::start_traced(&config).await;
    let mut c = plugin.client().await;
    let v1 = status(&mut c).await.key_id;
    let echoed = || -> Vec<Vec<u8>> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        std::fs::read_to_string(kv.file("echoed.txt"))
            .unwrap_or_default()
            .lines()
            .map(|l| b64.decode(l).unwrap())
            .collect()
    };

    kv.admin(&["hostile", "echo"]);
    let err = decrypt(&mut c, &cold).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // A new version: the plugin wraps a new KEK under it, and the vault echoes that KEK.
    kv.admin(&["rotate"]);
    eventually("a wrap under the new version to be echoed", || async {
        echoed().iter().any(|v| v.len() == 32)
    })
    .await;
    assert!(plugin.wait_log("azure wrapKey: HTTP 400").await, "{}", plugin.logs());
    assert!(plugin.wait_log("azure unwrapKey: HTTP 400").await, "{}", plugin.logs());
    kv.admin(&["hostile", "off"]);
    let logs = plugin.stop_with_logs().await;
    assert!(
        !logs.contains("Invalid request body"),
        "the answer's text is not logged"
    );
    crate::common::leaks::assert_no_leaks(&logs, &echoed());
    assert!(!v1.is_empty());

    // The token endpoint: each credential that sends a secret, through `check`.
    kv.admin(&["hostile", "echo-token"]);
    let before = echoed().len();
    for auth in [Auth::ClientSecret, Auth::ClientCertificate, Auth::WorkloadIdentity] {
        let (ok, out) = check_env(&kv.config(&dir, auth, ""), &kv.env(auth));
        assert!(!ok, "{out}");
        assert!(out.contains("AADSTS900144"), "{auth:?}: {out}");
        crate::common::leaks::assert_no_leaks(&out, &echoed());
    }
    assert_eq!(echoed().len(), before + 3, "each credential's secret was echoed");
}

/// Key Vault's identifiers are case-insensitive, so a key_id with the version upper-cased would
/// unwrap the same blob: such aliases are no key_id of this plugin (NotFound, no backend call),
/// so they never enter the versions the probe watches.
#[tokio::test]
async fn a_version_alias_is_not_a_key_id() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "");
    let (seed, cold) = cold_ciphertexts(&config, 1).await.remove(0);
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let (prefix, version) = cold.key_id.rsplit_once('/').unwrap();
    let mut alias = cold.clone();
    alias.key_id = format!("{prefix}/{}", version.to_uppercase());
    assert_ne!(alias.key_id, cold.key_id);
    let err = decrypt(&mut c, &alias).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(plugin.backend_calls("unwrap").await, 0);
    assert_eq!(decrypt(&mut c, &cold).await.unwrap(), seed);
    plugin.stop().await;
}

/// Entra ID refusing the credential (here a wrong client secret, 401 invalid_client) is the
/// plugin's set-up to fix, not a verdict on the key: a cold Decrypt is Unavailable, never
/// PermissionDenied (which the core treats as a revocation), and heals once the secret is right.
#[tokio::test]
async fn a_refused_credential_is_set_up_never_a_revocation() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let (seed, cold) = cold_ciphertexts(&config, 1).await.remove(0);
    let right = std::fs::read(kv.file("client-secret")).unwrap();
    std::fs::write(kv.file("client-secret"), format!("cs~wrong-{}", rand_hex(16))).unwrap();
    let socket = dir.socket();
    let plugin = Plugin::spawn(&["serve", "--config", config.to_str().unwrap()], &socket);
    let err = eventually_some("the socket to answer", || async {
        decrypt(&mut plugin.try_client().await.ok()?, &cold).await.err()
    })
    .await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        plugin
            .wait_log("getting a token: HTTP 401 invalid_client AADSTS7000215")
            .await,
        "{}",
        plugin.logs()
    );
    plugin.stop().await;
    std::fs::write(kv.file("client-secret"), right).unwrap();
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    assert_eq!(decrypt(&mut c, &cold).await.unwrap(), seed);
    plugin.stop().await;
}

/// The probe stays well within the core's 10 s limit however many older versions are watched
/// and however slowly the vault answers for them: with ten versions used and every get of an
/// older one hanging past the call timeout, probes still succeed, each within 8 s.
#[tokio::test]
async fn the_probe_is_bounded_with_many_slow_older_versions() {
    let dir = Dir::new();
    let kv = KeyVault::start(&dir);
    let config = kv.config(&dir, Auth::ClientSecret, "[probe]\ninterval = \"200ms\"");
    let plugin = Plugin::start(&config).await;
    let c = plugin.client().await;
    let mut current = crate::suite::try_status(&c).await.unwrap().key_id;
    for _ in 0..9 {
        kv.admin(&["rotate"]);
        let before = current.clone();
        current = eventually_some("the new version to be current", || async {
            crate::suite::try_status(&c)
                .await
                .ok()
                .map(|s| s.key_id)
                .filter(|k| *k != before)
        })
        .await;
    }
    kv.admin(&["hostile", "slow-older"]);
    let probes_ok = |logs: &str| -> Vec<u64> {
        logs.lines()
            .filter(|l| l.contains("op=\"probe\" ok=true"))
            .filter_map(|l| l.split("elapsed_us=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let before = probes_ok(&plugin.logs()).len();
    eventually("three probes to succeed with slow older versions", || async {
        probes_ok(&plugin.logs()).len() >= before + 3
    })
    .await;
    let slow = probes_ok(&plugin.logs())[before + 1..].to_vec();
    assert!(slow.iter().all(|&us| us < 8_000_000), "probe times (µs): {slow:?}");
    assert!(
        slow.iter().any(|&us| us > 1_000_000),
        "the older reads were slow: {slow:?}"
    );
    assert!(!plugin.logs().contains("probe timed out"), "{}", plugin.logs());
    kv.admin(&["hostile", "off"]);
    plugin.stop().await;
}
