//! The `vault` backend against a real OpenBao server (integration/common/openbao.rs): what only
//! Vault has (Transit versions, auth methods, token renewal, sealing). Round trip, rotation,
//! revocation, a stopped server, coalescing and the token log scan are in the shared suite
//! (integration/suite/); nothing is mocked.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use tonic::Code;

use crate::common::openbao::{Bao, Pki};
use crate::common::*;
use kms_plugin::proto::v2::StatusRequest;

/// A dev server with Transit key `k`, the least-privilege policy `kms`, and a token file.
fn dev_with_key(dir: &Dir) -> (Bao, String) {
    let bao = Bao::dev(dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let auth = bao.token_auth(dir, &bao.token("kms", "1h"));
    (bao, auth)
}

const FAST_PROBE: &str = "[probe]\ninterval = \"200ms\"";

#[tokio::test]
async fn raising_min_decryption_version_refuses_old_versions_and_purges_their_keks() {
    let dir = Dir::new();
    let (bao, auth) = dev_with_key(&dir);
    let plugin = Plugin::start(&bao.config(&dir, "k", &[], &auth, "", FAST_PROBE)).await;
    let mut c = plugin.client().await;
    let v1 = status(&mut c).await.key_id;
    assert!(v1.starts_with("vault:") && v1.contains(":v1:"), "{v1}");
    let old = encrypt(&mut c, &rand_bytes(32)).await;
    bao.cli(&["write", "-f", "transit/keys/k/rotate"]);
    let v2 = eventually_some("Transit's v2 to be current", || async {
        try_key_id(&c).await.filter(|k| *k != v1)
    })
    .await;
    assert!(v2.contains(":v2:"), "{v2}");
    let seed = rand_bytes(32);
    let new = encrypt(&mut c, &seed).await;
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 2.0);
    bao.cli(&["write", "transit/keys/k/config", "min_decryption_version=2"]);
    // Within a probe interval the v1 KEK (cached until now) is refused and purged.
    let code = eventually_some("v1 to be refused", || async {
        decrypt(&mut c.clone(), &old).await.err().map(|e| e.code())
    })
    .await;
    assert_eq!(code, Code::FailedPrecondition);
    assert_eq!(plugin.metric("kms_plugin_kek_cache_size ").await, 1.0);
    assert_eq!(decrypt(&mut c, &new).await.unwrap(), seed);
    assert_eq!(status(&mut c).await.healthz, "ok");
    plugin.stop().await;
}

/// AppRole `kms` with short-lived tokens; returns the `[backend.auth]` body.
fn approle(bao: &Bao, dir: &Dir, ttl: &str) -> String {
    bao.cli(&["auth", "enable", "approle"]);
    bao.cli(&[
        "write",
        "auth/approle/role/kms",
        "token_policies=kms",
        &format!("token_ttl={ttl}"),
        &format!("token_max_ttl={ttl}"),
    ]);
    let role_id = bao.cli(&["read", "-field=role_id", "auth/approle/role/kms/role-id"]);
    let secret_id = bao.cli(&["write", "-f", "-field=secret_id", "auth/approle/role/kms/secret-id"]);
    let file = dir.path("secret-id");
    std::fs::write(&file, secret_id.trim()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "method = \"approle\"\nrole_id = {:?}\nsecret_id_file = {:?}",
        role_id.trim(),
        file.display().to_string()
    )
}

#[tokio::test]
async fn expiring_tokens_are_replaced_before_any_call_fails() {
    let dir = Dir::new();
    let (bao, _) = dev_with_key(&dir);
    let auth = approle(&bao, &dir, "4s");
    let config = bao.config(&dir, "k", &[], &auth, "", "[probe]\ninterval = \"300ms\"");
    let cold = cold_ciphertexts(&config, 6).await;
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    // Ten seconds of calls: two and a half token lifetimes.
    let started = Instant::now();
    let mut cold = cold.into_iter();
    while started.elapsed() < Duration::from_secs(10) {
        assert_eq!(status(&mut c).await.healthz, "ok");
        let seed = rand_bytes(32);
        let e = encrypt(&mut c, &seed).await;
        assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed);
        if started.elapsed() > Duration::from_millis(1500 * (7 - cold.len() as u64))
            && let Some((seed, e)) = cold.next()
        {
            assert_eq!(decrypt(&mut c, &e).await.unwrap(), seed, "cold Decrypt");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = plugin.http_get("/metrics").await;
    let failed: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("kms_plugin_backend_calls_total") && !l.contains("outcome=\"ok\""))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(failed.is_empty(), "backend calls failed: {failed:?}");
    let logins = plugin.logs().matches("vault login succeeded").count();
    assert!(logins >= 3, "{logins} logins in 10 s of 4 s tokens");
    plugin.stop().await;
}

/// Sealing is Vault's own outage (the suite covers a stopped server): hot paths keep working,
/// Status fails only after max_outage, and unsealing heals.
#[tokio::test]
async fn a_sealed_server_is_an_outage_that_heals() {
    let dir = Dir::new();
    let bao = Bao::tls(&dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let auth = bao.token_auth(&dir, &bao.token("kms", "24h"));
    let config = bao.config(
        &dir,
        "k",
        &[],
        &auth,
        "",
        "[probe]\ninterval = \"200ms\"\nmax_outage = \"3s\"",
    );
    let cold = cold_ciphertexts(&config, 1).await;
    let plugin = Plugin::start(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let hot = encrypt(&mut c, &seed).await;

    bao.seal();
    let began = Instant::now();
    assert_eq!(status(&mut c).await.healthz, "ok");
    encrypt(&mut c, &rand_bytes(32)).await;
    assert_eq!(decrypt(&mut c, &hot).await.unwrap(), seed);
    let err = decrypt(&mut c, &cold[0].1).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    eventually("Status to fail", || async { try_key_id(&c).await.is_none() }).await;
    let failed_after = began.elapsed();
    assert!(
        failed_after >= Duration::from_millis(2900),
        "failed after {failed_after:?}"
    );
    bao.unseal();
    eventually("Status to recover", || async { try_key_id(&c).await.is_some() }).await;
    assert_eq!(decrypt(&mut c, &cold[0].1).await.unwrap(), cold[0].0);
    plugin.stop().await;
}

/// The key_id Status reports, or None when it refuses.
async fn try_key_id(c: &kms_plugin::client::Client) -> Option<String> {
    let r = c.clone().status(StatusRequest {}).await.ok()?;
    Some(r.into_inner().key_id)
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_error() {
    let dir = Dir::new();
    let bao = Bao::tls(&dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let auth = bao.token_auth(&dir, &bao.token("kms", "1h"));
    let good = bao.config(&dir, "k", &[], &auth, "", "");
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
    let other = Pki::new(&dir, "other-ca");
    let text = std::fs::read_to_string(&good).unwrap().replace(
        &bao.pki.as_ref().unwrap().ca.display().to_string(),
        &other.ca.display().to_string(),
    );
    let (ok, text) = check(&dir.write_config(&text));
    assert!(!ok, "{text}");
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(
        text.contains("Denied"),
        "a certificate refusal is not an outage: {text}"
    );
}

/// An RS256 JWT signed with `key` (PEM), made with openssl.
fn jwt(dir: &Dir, key: &std::path::Path, claims: &serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signing_input = format!(
        "{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let input = dir.path("jwt-input");
    std::fs::write(&input, &signing_input).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign", key.to_str().unwrap()])
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    format!("{signing_input}.{}", b64(&out.stdout))
}

#[tokio::test]
async fn every_auth_method_logs_in() {
    let dir = Dir::new();
    let bao = Bao::tls(&dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let pki = bao.pki.as_ref().unwrap();
    let mut methods = vec![("token", bao.token_auth(&dir, &bao.token("kms", "1h")), String::new())];
    methods.push(("approle", approle(&bao, &dir, "1h"), String::new()));

    // jwt: a key pair whose public half OpenBao trusts, as for a cluster's service-account
    // issuer or a node's OIDC tokens.
    let key = dir.path("jwt.key");
    let status = Command::new("openssl")
        .args(["genrsa", "-out", key.to_str().unwrap(), "2048"])
        .output()
        .unwrap()
        .status;
    assert!(status.success());
    let public = dir.path("jwt.pub");
    assert!(
        Command::new("openssl")
            .args([
                "rsa",
                "-in",
                key.to_str().unwrap(),
                "-pubout",
                "-out",
                public.to_str().unwrap()
            ])
            .output()
            .unwrap()
            .status
            .success()
    );
    bao.cli(&["auth", "enable", "jwt"]);
    bao.cli(&[
        "write",
        "auth/jwt/config",
        &format!("jwt_validation_pubkeys=@{}", public.display()),
    ]);
    bao.cli(&[
        "write",
        "auth/jwt/role/kms",
        "role_type=jwt",
        "bound_audiences=kms-plugin",
        "user_claim=sub",
        "token_policies=kms",
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jwt(
        &dir,
        &key,
        &serde_json::json!({"sub": "system:node:cp-1", "aud": "kms-plugin", "iat": now, "nbf": now - 5, "exp": now + 600}),
    );
    let jwt_file = dir.path("node.jwt");
    std::fs::write(&jwt_file, &token).unwrap();
    methods.push((
        "jwt",
        format!(
            "method = \"jwt\"\nrole = \"kms\"\njwt_file = {:?}",
            jwt_file.display().to_string()
        ),
        String::new(),
    ));

    // cert: the client certificate the TLS connection presents.
    bao.cli(&["auth", "enable", "cert"]);
    bao.cli(&[
        "write",
        "auth/cert/certs/kms",
        &format!("certificate=@{}", pki.ca.display()),
        "token_policies=kms",
    ]);
    methods.push((
        "cert",
        "method = \"cert\"\nname = \"kms\"".to_string(),
        format!(
            "client_cert_file = {:?}\nclient_key_file = {:?}",
            pki.client_cert.display().to_string(),
            pki.client_key.display().to_string()
        ),
    ));

    for (method, auth, backend_extra) in methods {
        let config = bao.config(&dir, "k", &[], &auth, &backend_extra, "");
        let (ok, text) = check(&config);
        assert!(ok, "{method}: {text}");
        assert!(text.contains("wrap/unwrap round trip succeeded"), "{method}: {text}");
    }
}

#[tokio::test]
async fn trace_logs_carry_no_token_secret_id_or_kek() {
    let dir = Dir::new();
    let (bao, _) = dev_with_key(&dir);
    let auth = approle(&bao, &dir, "1h");
    let config = bao.config(&dir, "k", &[], &auth, "", "");
    let cold = cold_ciphertexts(&config, 1).await;
    let plugin = Plugin::start_traced(&config).await;
    let mut c = plugin.client().await;
    let seed = rand_bytes(32);
    let e = encrypt(&mut c, &seed).await;
    decrypt(&mut c, &e).await.unwrap();
    decrypt(&mut c, &cold[0].1).await.unwrap();
    let logs = plugin.stop_with_logs().await;
    assert!(logs.contains("vault login succeeded"), "trace logs missing");

    let secret_id = std::fs::read_to_string(dir.path("secret-id")).unwrap();
    let mut secrets: Vec<Vec<u8>> = vec![secret_id.trim().as_bytes().to_vec(), seed.clone(), cold[0].0.clone()];
    // The plaintext KEKs, as Transit itself gives them back to root.
    for e in [&e, &cold[0].1] {
        let blob = String::from_utf8(e.annotations[kms_plugin::contract::KEK_ANNOTATION].to_vec()).unwrap();
        let aad = base64::engine::general_purpose::STANDARD.encode(e.key_id.as_bytes());
        let kek = bao.cli(&[
            "write",
            "-field=plaintext",
            "transit/decrypt/k",
            &format!("ciphertext={blob}"),
            &format!("associated_data={aad}"),
        ]);
        let kek = base64::engine::general_purpose::STANDARD.decode(kek.trim()).unwrap();
        assert_eq!(kek.len(), 32);
        secrets.push(kek);
    }
    // The tokens the plugin was issued are not visible here: look for anything shaped like an
    // OpenBao token (s.… / hvs.…) or a JWT (eyJ…).
    for line in logs.lines() {
        assert!(!line.contains("eyJ"), "JWT-like string in logs: {line}");
        for prefix in ["hvs.", "s."] {
            for (at, _) in line.match_indices(prefix) {
                let rest: String = line[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect();
                assert!(rest.len() < 20, "token-like string in logs: {line}");
            }
        }
    }
    crate::common::leaks::assert_no_leaks(&logs, &secrets);
}
