//! The command line: keygen, check, status, and configuration errors, as an operator runs them.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn keygen_writes_a_private_key_and_never_overwrites() {
    let dir = Dir::new();
    let path = dir.path("k.key");
    let (ok, stdout, _) = run(&["keygen", "--out", path.to_str().unwrap()], &[]);
    assert!(ok);
    assert!(stdout.contains("key_id local:"), "{stdout}");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));
    let before = std::fs::read(&path).unwrap();
    let (ok, _, stderr) = run(&["keygen", "--out", path.to_str().unwrap()], &[]);
    assert!(!ok && stderr.contains("exists"), "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn check_probes_the_backend_and_names_what_is_wrong() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "");
    let (ok, stdout, stderr) = run(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("wrap/unwrap round trip succeeded"), "{stdout}");

    std::fs::set_permissions(dir.key("root.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, stderr) = run(&["check", "--config", config.to_str().unwrap()], &[]);
    assert!(
        !ok && stderr.contains("must not be readable or writable by group or others"),
        "{stderr}"
    );

    let bad = dir.write_config("[kek]\nmax_uses = \"many\"\n[backend]\ntype = \"local\"\ncurrent_key_file = \"/k\"\n");
    let (ok, _, stderr) = run(&["check", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok && stderr.contains("kek.max_uses"), "{stderr}");
}

#[tokio::test]
async fn serve_refuses_a_bad_config_before_binding() {
    let dir = Dir::new();
    let config = dir.config(&dir.socket(), "root.key", &[], "unknown_setting = 1");
    let (ok, _, stderr) = run(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert!(!ok && stderr.contains("unknown_setting"), "{stderr}");
    assert!(!std::path::Path::new(&dir.socket()).exists());
}

/// A sparse file of `len` bytes starting with `text`: huge, yet nothing to write to disk.
fn sparse(path: &std::path::Path, text: &str, len: u64) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut &file, text.as_bytes()).unwrap();
    file.set_len(len).unwrap();
}

#[test]
fn an_oversize_config_or_named_file_is_refused_before_it_is_read() {
    const BIG: u64 = 300 << 20;
    let limit = "over the limit of 1048576 bytes";
    let dir = Dir::new();
    let good = std::fs::read_to_string(dir.config(&dir.socket(), "root.key", &[], "")).unwrap();
    // The good config, then zeros to 300 MiB: read whole, it would take 300 MiB and more.
    let big = dir.path("big.toml");
    sparse(&big, &good, BIG);
    for command in ["check", "serve"] {
        let started = std::time::Instant::now();
        let (ok, _, stderr) = run(&[command, "--config", big.to_str().unwrap()], &[]);
        let why = format!("config file {} is {BIG} bytes, {limit}", big.display());
        assert!(!ok && stderr.contains(&why), "{command}: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{command} was slow"
        );
        assert!(!std::path::Path::new(&dir.socket()).exists());
    }

    // Files the config names: a root key, and a Vault CA bundle (refused before any connection).
    let key = dir.key("big.key");
    sparse(&key, "", BIG);
    let with_key = dir.config(&dir.socket(), "root.key", &["big.key"], "");
    let ca = dir.path("ca.pem");
    sparse(&ca, "-----BEGIN CERTIFICATE-----\n", BIG);
    let token = dir.key("token");
    let with_ca = dir.write_config(&format!(
        "[socket]\npath = {:?}\n[backend]\ntype = \"vault\"\naddress = \"https://127.0.0.1:1\"\nkey = \"k\"\nca_file = {ca:?}\n[backend.auth]\nmethod = \"token\"\ntoken_file = {token:?}\n",
        dir.socket()
    ));
    for (config, file) in [(&with_key, &key), (&with_ca, &ca)] {
        for command in ["check", "serve"] {
            let (ok, _, stderr) = run(&[command, "--config", config.to_str().unwrap()], &[]);
            let why = format!("file {} is {BIG} bytes, {limit}", file.display());
            assert!(!ok && stderr.contains(&why), "{command}: {stderr}");
            assert!(!std::path::Path::new(&dir.socket()).exists());
        }
    }
}

#[tokio::test]
async fn status_command_is_an_exec_probe() {
    let dir = Dir::new();
    let (ok, _, stderr) = run(&["status", "--socket", &dir.socket(), "--timeout", "1s"], &[]);
    assert!(!ok, "no server: must fail");
    assert!(stderr.contains("kms-plugin:"), "{stderr}");

    // The socket comes from the environment, overriding the file.
    let config = dir.config("/nonexistent/ignored.sock", "root.key", &[], "");
    let socket = dir.socket();
    let plugin = Plugin::spawn_env(
        &["serve", "--config", config.to_str().unwrap()],
        &socket,
        &[("KMS_PLUGIN_SOCKET__PATH", &socket)],
    );
    plugin.wait_ready().await;
    let (ok, stdout, stderr) = run(&["status", "--socket", &socket], &[]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("healthz=ok") && stdout.contains("version=v2"),
        "{stdout}"
    );
    plugin.stop().await;
}

#[test]
fn every_example_config_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            match kms_plugin::settings::Settings::from_toml(&text) {
                Ok(_) => {}
                // A backend behind a cargo feature this test build was made without.
                Err(e) if e.to_string().contains("is not in this build") => {}
                Err(e) => panic!("{}: {e}", path.display()),
            }
            seen.push(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    seen.sort();
    for backend in ["aws", "kmip", "pkcs11", "vault"] {
        assert!(
            seen.iter().any(|s| s == backend),
            "deploy/examples/{backend}.toml missing; have {seen:?}"
        );
    }
}
