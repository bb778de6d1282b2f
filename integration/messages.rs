//! Messages an operator reads: each names the cause and the fix (issue 19, items 5-12 and 16).
//! Every test runs the built binary, against the real servers where a backend is involved.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use crate::common::kmip::Kmip;
use crate::common::moto::Moto;
use crate::common::openbao::Bao;
use crate::common::*;

/// Runs the binary with exactly `env` (nothing inherited): (success, stdout, stderr).
fn run_clean(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    run_clean(&["check", "--config", config.to_str().unwrap()], env)
}

/// The line of `logs` holding `needle`.
fn line<'a>(logs: &'a str, needle: &str) -> &'a str {
    logs.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{logs}"))
}

#[test]
fn a_base64_key_file_is_told_to_be_raw_bytes() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    // What someone coming from `aescbc` writes: the key in base64 and a newline.
    let path = dir.path("root.key");
    std::fs::write(&path, "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, _, stderr) = check(&config, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("holds 45 bytes; a root key is 32 raw bytes, not base64"),
        "{stderr}"
    );
    assert!(stderr.contains("kms-plugin keygen"), "{stderr}");
}

#[test]
fn keygen_into_a_missing_directory_names_the_directory() {
    let dir = Dir::new();
    let missing = dir.path("no/such/dir");
    let out = missing.join("root.key");
    let (ok, _, stderr) = run_clean(&["keygen", "--out", out.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("directory {} does not exist", missing.display())),
        "{stderr}"
    );
}

#[test]
fn an_environment_override_error_names_the_variable() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let (ok, _, stderr) = check(&config, &[("KMS_PLUGIN_KEK__MAX_AGE", "abc")]);
    assert!(!ok);
    assert!(stderr.contains("kek.max_age"), "{stderr}");
    assert!(
        stderr.contains("set by environment variable KMS_PLUGIN_KEK__MAX_AGE"),
        "{stderr}"
    );
    // The same mistake in the file names no variable.
    let config = dir.config(&dir.socket(), "root.key", &[], "[kek]\nmax_age = \"abc\"");
    let (ok, _, stderr) = check(&config, &[]);
    assert!(!ok && stderr.contains("kek.max_age"), "{stderr}");
    assert!(!stderr.contains("environment variable"), "{stderr}");
}

#[tokio::test]
async fn an_unrecognised_variable_is_warned_about_and_its_value_never_shown() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let env = [
        ("KMS_PLUGIN_KEK_MAX_AGE", "1h"),
        ("KMS_PLUGIN_WHATEVER", "s3cr3t-value"),
    ];
    let (ok, _, stderr) = check(&config, &env);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("KMS_PLUGIN_KEK_MAX_AGE is not a setting and is ignored"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean KMS_PLUGIN_KEK__MAX_AGE?"), "{stderr}");
    assert!(stderr.contains("KMS_PLUGIN_WHATEVER is not a setting"), "{stderr}");
    assert!(!stderr.contains("s3cr3t-value"), "{stderr}");
    // serve logs the same warning.
    let plugin = Plugin::start_env(&config, &env).await;
    assert!(
        plugin.logs().contains("KMS_PLUGIN_KEK_MAX_AGE is not a setting"),
        "{}",
        plugin.logs()
    );
    assert!(!plugin.logs().contains("s3cr3t-value"));
    plugin.stop().await;
}

#[tokio::test]
async fn a_socket_anyone_may_connect_to_is_warned_about() {
    let dir = Dir::new();
    let text = std::fs::read_to_string(dir.config(&dir.socket(), "root.key", &[], "")).unwrap();
    let open = dir.write_config(&text.replacen("[socket]\n", "[socket]\nmode = \"666\"\n", 1));
    let warning =
        "socket.mode 0666 lets every local user connect to the socket, and anyone who can connect can Decrypt";
    let (ok, _, stderr) = check(&open, &[]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains(warning), "{stderr}");
    let plugin = Plugin::start(&open).await;
    assert!(plugin.logs().contains(warning), "{}", plugin.logs());
    plugin.stop().await;
    // The default (0600) says nothing.
    let (ok, _, stderr) = check(&dir.config(&dir.socket(), "root.key", &[], ""), &[]);
    assert!(ok && !stderr.contains("socket.mode"), "{stderr}");
}

#[tokio::test]
async fn decrypt_only_keys_are_listed_by_check_and_reload_and_kek_lines_agree() {
    let dir = Dir::new();
    let config = dir.path("live.toml");
    std::fs::copy(
        dir.config(&dir.socket(), "a.key", &[], "[reload]\ninterval = \"200ms\""),
        &config,
    )
    .unwrap();
    let a = kms_plugin::backend::local::LocalBackend::open(&dir.key("a.key"), &[]).unwrap();
    let a = a.current_key_id().to_string();
    let plugin = Plugin::start(&config).await;
    let first = line(&plugin.logs(), "new local KEK is current").to_string();
    assert!(
        first.contains("reason=\"first\"") || first.contains("reason=first"),
        "{first}"
    );
    assert!(first.contains("previous_key_id_hash=-"), "{first}");
    assert!(!first.contains("root_key_changed="), "{first}");

    // Step 1 of a rotation: b added as decrypt-only. check and the reload both show it.
    let step1 = dir.config(&dir.socket(), "a.key", &["b.key"], "[reload]\ninterval = \"200ms\"");
    let b = kms_plugin::backend::local::LocalBackend::open(&dir.key("b.key"), &[]).unwrap();
    let b = b.current_key_id().to_string();
    let b_hash = kms_plugin::logging::KeyIdHash(&b).to_string();
    let (ok, stdout, stderr) = check(&step1, &[]);
    assert!(ok, "{stderr}");
    let listed = line(&stdout, "decrypt-only keys:");
    assert!(listed.contains(&b) && listed.contains(&b_hash), "{stdout}");
    assert!(listed.contains(&dir.key("b.key").display().to_string()), "{stdout}");
    assert!(!listed.contains(&a), "the current key is not decrypt-only: {stdout}");
    std::fs::copy(&step1, &config).unwrap();
    plugin.signal("HUP");
    assert!(plugin.wait_log("configuration reloaded").await, "{}", plugin.logs());
    let reloaded = line(&plugin.logs(), "configuration reloaded").to_string();
    assert!(reloaded.contains(&b) && reloaded.contains(&b_hash), "{reloaded}");
    assert!(reloaded.contains("0 cached KEKs of removed keys purged"), "{reloaded}");

    // Step 2: b current. The KEK line names the previous root key, and reason agrees.
    let step2 = dir.config(&dir.socket(), "b.key", &["a.key"], "[reload]\ninterval = \"200ms\"");
    std::fs::copy(&step2, &config).unwrap();
    plugin.signal("HUP");
    eventually("the second reload", || async {
        plugin.logs().matches("configuration reloaded").count() >= 2
    })
    .await;
    let logs = plugin.logs();
    let changed = line(&logs, "root_key_changed");
    let a_hash = kms_plugin::logging::KeyIdHash(&a).to_string();
    assert!(changed.contains(&format!("previous_key_id_hash={a_hash}")), "{changed}");
    assert!(changed.contains(&format!("key_id_hash={b_hash}")), "{changed}");
    plugin.stop().await;
}

#[tokio::test]
async fn dev_mode_does_not_suggest_a_variable_already_set() {
    let dir = Dir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dev = dir.path("dev");
    let socket = dev.join("kms.sock").display().to_string();
    let plugin = Plugin::spawn_env(
        &["serve", "--dev", dev.to_str().unwrap()],
        &socket,
        &[("KMS_PLUGIN_METRICS__ADDRESS", address.as_str())],
    );
    plugin.wait_ready().await;
    let logs = plugin.logs();
    assert!(line(&logs, "metrics.address is in use").contains(&address), "{logs}");
    assert!(!logs.contains("set KMS_PLUGIN_METRICS__ADDRESS to choose"), "{logs}");
    plugin.stop().await;
    drop(taken);
}

#[tokio::test]
async fn aws_without_credentials_is_a_configuration_error_in_one_line() {
    let moto = Moto::start().await;
    let dir = Dir::new();
    let key = moto.create_key().await;
    let config = moto.config(&dir, &key, &[], "");
    let home = dir.path("empty-home");
    std::fs::create_dir(&home).unwrap();
    // No AWS_* credentials, an empty HOME (no profile), and no instance metadata service.
    let env = [("HOME", home.to_str().unwrap()), ("AWS_EC2_METADATA_DISABLED", "true")];
    let (ok, _, stderr) = check(&config, &env);
    assert!(!ok);
    assert!(
        stderr.contains("no AWS credentials found (environment, profile, web identity, IMDS)"),
        "{stderr}"
    );
    assert!(stderr.contains("Configuration"), "{stderr}");
    assert!(
        !stderr.contains("Transient") && !stderr.contains("DispatchFailure"),
        "{stderr}"
    );
    assert!(stderr.len() < 600, "{} characters: {stderr}", stderr.len());
    // An instance metadata service that refuses (403, as one with IMDSv2 off-limits does):
    // the same one line, with what it said, and none of the SDK's debug dump.
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let imds_url = format!("http://{}", imds.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in imds.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 9\r\nconnection: close\r\n\r\nforbidden",
            );
        }
    });
    let refused = [
        ("HOME", home.to_str().unwrap()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds_url.as_str()),
    ];
    let (ok, _, stderr) = check(&config, &refused);
    assert!(!ok);
    assert!(
        stderr.contains(
            "Configuration: aws DescribeKey: no AWS credentials found (environment, profile, web identity, IMDS)"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("IMDS session token"), "{stderr}");
    assert!(
        !stderr.contains("DispatchFailure") && !stderr.contains("HeaderValue"),
        "{stderr}"
    );
    assert!(stderr.len() < 800, "{} characters: {stderr}", stderr.len());
    // serve starts anyway (credentials may yet appear) and treats it as an outage, not a
    // revocation. Status fails; its log line shows no key yet as `-`, never the hash of "".
    let plugin = Plugin::spawn_env(&["serve", "--config", config.to_str().unwrap()], &dir.socket(), &env);
    let code = loop {
        if let Ok(mut c) = plugin.try_client().await {
            break c
                .status(kms_plugin::proto::v2::StatusRequest {})
                .await
                .unwrap_err()
                .code();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, tonic::Code::Unavailable);
    assert!(plugin.wait_log("failed").await, "{}", plugin.logs());
    let logs = plugin.logs();
    assert!(line(&logs, "method=\"Status\"").contains("key_id_hash=- "), "{logs}");
    assert!(!logs.contains("e3b0c442"), "the hash of an empty key_id: {logs}");
    assert!(!logs.contains("root key unusable"), "{logs}");
    let (_, metrics) = plugin.http_get("/metrics").await;
    assert!(metrics.contains("outcome=\"configuration\""), "{metrics}");
    plugin.stop().await;
    // With credentials the same configuration passes: the message was about them alone.
    let creds: Vec<(&str, String)> = Moto::env();
    let mut with: Vec<(&str, &str)> = creds.iter().map(|(k, v)| (*k, v.as_str())).collect();
    with.push(("HOME", home.to_str().unwrap()));
    let (ok, _, stderr) = check(&config, &with);
    assert!(ok, "{stderr}");
}

#[tokio::test]
async fn vault_denied_and_unreachable_say_what_to_look_at() {
    let dir = Dir::new();
    let mut bao = Bao::dev(&dir);
    bao.cli(&["write", "-f", "transit/keys/k"]);
    bao.plugin_policy("kms", "k");
    let auth = bao.token_auth(&dir, &bao.token("kms", "1h"));
    // A typo in the key name: a least-privilege token gets a 403, not a 404.
    let typo = bao.config(&dir, "kk", &[], &auth, "", "");
    let (ok, _, stderr) = check(&typo, &[]);
    assert!(!ok);
    assert!(stderr.contains("HTTP 403"), "{stderr}");
    assert!(
        stderr.contains("the key does not exist, or the token's policy does not cover transit/keys/kk"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // The right name passes.
    let good = bao.config(&dir, "k", &[], &auth, "", "");
    let (ok, _, stderr) = check(&good, &[]);
    assert!(ok, "{stderr}");
    // The server gone: the message names the address it tried.
    bao.stop();
    let (ok, _, stderr) = check(&good, &[]);
    assert!(!ok);
    assert!(stderr.contains(&format!("at {}", bao.addr)), "{stderr}");
}

#[tokio::test]
async fn kmip_rotation_logs_the_old_and_new_unique_identifiers() {
    let dir = Dir::new();
    let kmip = Kmip::start(&dir);
    let old = kmip.create_key("kms-root");
    let plugin = Plugin::start(&kmip.config(&dir, "kms-root", "", "[probe]\ninterval = \"200ms\"")).await;
    assert!(
        line(&plugin.logs(), "kmip: current key located").contains(&old),
        "{}",
        plugin.logs()
    );
    // Initial Date has a resolution of one second: the new key must be strictly newer.
    std::thread::sleep(Duration::from_millis(1100));
    let new = kmip.create_key("kms-root");
    assert!(plugin.wait_log("now locates another key").await, "{}", plugin.logs());
    let logs = plugin.logs();
    let moved = line(&logs, "now locates another key");
    assert!(moved.contains(&format!("old_uid={old}")), "{moved}");
    assert!(moved.contains(&format!("new_uid={new}")), "{moved}");
    plugin.stop().await;
}

#[test]
fn pkcs11_check_lists_a_decrypt_only_label() {
    let dir = Dir::new();
    let hsm = crate::common::softhsm::SoftHsm::new(&dir);
    hsm.keygen("root-1");
    hsm.keygen("root-2");
    let env = hsm.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (ok, stdout, stderr) = check(&hsm.config(&dir, "root-2", &["root-1"], &hsm.pin_file, ""), &env);
    assert!(ok, "{stderr}");
    let listed = line(&stdout, "decrypt-only keys:");
    assert!(
        listed.contains("pkcs11:") && listed.contains("label \"root-1\""),
        "{stdout}"
    );
    assert!(!listed.contains("root-2"), "{stdout}");
    let (ok, stdout, stderr) = check(&hsm.config(&dir, "root-2", &[], &hsm.pin_file, ""), &env);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("decrypt-only keys: none"), "{stdout}");
}
