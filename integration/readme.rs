//! The README's set-up blocks, run as written: for every backend, the ```sh readme-test:<name>
//! block goes through `scripts/try-backend.sh` (which extracts it from README.md and runs it
//! under `set -euo pipefail`) against the real server the deps script installed, with the
//! built `kms-plugin` and `kms-bench` on PATH. A missing block or any failing command fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BACKENDS: [&str; 5] = ["local", "pkcs11", "aws", "vault", "kmip"];
/// Backends behind a cargo feature: their block runs when the test build has the feature.
const FEATURE_BACKENDS: [&str; 2] = ["gcp", "azure"];

/// The body of each ```sh readme-test:<name> block in `readme`, in order.
fn blocks(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in readme.lines() {
        match &mut current {
            Some((_, body)) if !line.starts_with("```") => {
                body.push_str(line);
                body.push('\n');
            }
            Some(_) => out.push(current.take().unwrap()),
            None => {
                if let Some(name) = line.strip_prefix("```sh readme-test:") {
                    current = Some((name.trim().to_string(), String::new()));
                }
            }
        }
    }
    assert!(current.is_none(), "README.md: an unclosed readme-test block");
    out
}

#[test]
fn every_backend_has_one_readme_block() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let blocks = blocks(&readme);
    for backend in BACKENDS.iter().chain(&FEATURE_BACKENDS) {
        let n = blocks.iter().filter(|(name, _)| name == backend).count();
        assert_eq!(n, 1, "README.md needs exactly one ```sh readme-test:{backend} block");
    }
    for (name, body) in &blocks {
        assert!(
            BACKENDS.contains(&name.as_str()) || FEATURE_BACKENDS.contains(&name.as_str()),
            "readme-test:{name} is not run by any test"
        );
        // What the issue asks each set-up to show, end to end.
        for step in [
            "kms-plugin check --config",
            "kms-plugin serve --config",
            "kms-bench decrypt --socket",
        ] {
            assert!(body.contains(step), "readme-test:{name} lacks `{step}`");
        }
    }
}

#[test]
fn try_backend_refuses_a_backend_without_a_block() {
    let dir = Dir::new();
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/try-backend.sh"))
        .args(["nosuch", dir.path("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("README.md has no ```sh readme-test:nosuch block"),
        "{stderr}"
    );
}

/// Where a server binary from integration/deps.sh lives: its `KMS_TEST_*` variable, else .venv.
fn server_dir(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(bin) => Path::new(&bin).parent().unwrap().to_owned(),
        None => Path::new(ROOT).join(".venv/bin"),
    }
}

/// Runs `scripts/try-backend.sh backend` in a fresh directory; panics with its output and the
/// logs it left unless it succeeds. Returns its stdout.
fn try_backend(backend: &str) -> String {
    let dir = Dir::new();
    let work = dir.path("try");
    let home = dir.path("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut path = vec![Path::new(BIN).parent().unwrap().to_owned()];
    for var in ["KMS_TEST_MOTO_SERVER", "KMS_TEST_BAO", "KMS_TEST_PYKMIP"] {
        path.push(server_dir(var));
    }
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/try-backend.sh"))
        .arg(backend)
        .arg(&work)
        .env("PATH", std::env::join_paths(path).unwrap())
        .env("PORT", port.to_string())
        .env(
            "KMS_TEST_AZURE_EMULATOR",
            Path::new(ROOT).join("integration/emulators/azure_keyvault.py"),
        )
        .env("HOME", &home)
        // Every plugin the block starts gets a free port for its HTTP endpoint.
        .env("KMS_PLUGIN_METRICS__ADDRESS", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            // The script's TERM trap stops what the block started.
            let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let mut logs = String::new();
        for entry in std::fs::read_dir(&work).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                logs.push_str(&format!("--- {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    logs.push_str(l);
                    logs.push('\n');
                }
            }
        }
        panic!(
            "readme-test:{backend} failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}\n{logs}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
}

/// The block's `check` passed on `backend` and its one Encrypt and Decrypt succeeded.
fn assert_ran(stdout: &str, backend: &str) {
    assert!(
        stdout.contains(&format!("ok: backend {backend} current key_id")),
        "{stdout}"
    );
    assert!(
        stdout.contains("decrypt: 1 workers") && stdout.contains("calls 1  errors 0"),
        "{stdout}"
    );
}

#[test]
fn readme_local() {
    assert_ran(&try_backend("local"), "local");
}

#[test]
fn readme_pkcs11() {
    assert_ran(&try_backend("pkcs11"), "pkcs11");
}

#[test]
fn readme_aws() {
    assert_ran(&try_backend("aws"), "aws");
}

#[test]
fn readme_vault() {
    assert_ran(&try_backend("vault"), "vault");
}

#[test]
fn readme_kmip() {
    assert_ran(&try_backend("kmip"), "kmip");
}

#[cfg(feature = "gcp")]
#[test]
fn readme_gcp() {
    assert_ran(&try_backend("gcp"), "gcp");
}

#[cfg(feature = "azure")]
#[test]
fn readme_azure() {
    assert_ran(&try_backend("azure"), "azure");
}
