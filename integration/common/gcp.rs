//! The Google Cloud KMS emulation (integration/emulators/gcp_kms.py, written from the public
//! REST reference) as a process on 127.0.0.1, started per test: HTTPS for KMS and STS with its
//! own test CA, plain HTTP for the metadata server and the tests' admin calls.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Dir;

pub const PROJECT: &str = "projects/kms-plugin-test/locations/global/keyRings/ring";

pub struct GcpKms {
    child: Option<Child>,
    pub state: PathBuf,
    pub port: u16,
    pub mds_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn python() -> String {
    std::env::var("KMS_TEST_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python").to_string())
}

impl GcpKms {
    /// Starts the emulator with its state under `dir/gcp`.
    pub async fn start(dir: &Dir) -> GcpKms {
        let mut kms = GcpKms {
            child: None,
            state: dir.path("gcp"),
            port: free_port(),
            mds_port: free_port(),
        };
        kms.restart().await;
        kms
    }

    /// (Re)starts the process on the same ports and state.
    pub async fn restart(&mut self) {
        let _ = std::fs::remove_file(self.state.join("ready"));
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/integration/emulators/gcp_kms.py");
        let child = Command::new(python())
            .arg(script)
            .arg(&self.state)
            .args([self.port.to_string(), self.mds_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Cloud KMS emulator");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(self.state.join("ready").exists() && self.try_admin("/admin/calls", &[]).is_some()) {
            assert!(Instant::now() < deadline, "the Cloud KMS emulator did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process; its state stays on disk.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn try_admin(&self, path: &str, body: &[u8]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.mds_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(body).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (status, rest) = out.split_once("\r\n")?;
        assert!(status.contains(" 200 "), "admin {path}: {out}");
        Some(rest.split_once("\r\n\r\n")?.1.to_string())
    }

    /// An admin call; its answer's body.
    pub fn admin(&self, path: &str, body: &[u8]) -> String {
        self.try_admin(path, body)
            .unwrap_or_else(|| panic!("admin {path}: no answer"))
    }

    /// Creates `cryptoKeys/{name}` with one version; returns the key's name.
    pub fn create_key(&self, name: &str) -> String {
        let key = format!("{PROJECT}/cryptoKeys/{name}");
        self.admin(&format!("/admin/create?key={key}"), &[]);
        key
    }

    /// A new primary version of `key`; returns its name.
    pub fn rotate(&self, key: &str) -> String {
        let answer = self.admin(&format!("/admin/rotate?key={key}"), &[]);
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        v["version"].as_str().unwrap().to_string()
    }

    /// Sets a version's state (`ENABLED`, `DISABLED`, `DESTROYED`).
    pub fn set_state(&self, version: &str, state: &str) {
        self.admin(&format!("/admin/state?version={version}&state={state}"), &[]);
    }

    /// Takes away (or gives back) every caller's permission on every key.
    pub fn deny(&self, denied: bool) {
        self.admin(if denied { "/admin/deny" } else { "/admin/allow" }, &[]);
    }

    /// The service's call counts: `encrypt`, `decrypt`, `get`, `token`.
    pub fn calls(&self, op: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(&self.admin("/admin/calls", &[])).unwrap();
        v[op].as_u64().unwrap()
    }

    /// The plaintext of a wrapped KEK, as the key's administrator could recover it.
    pub fn unwrap(&self, version: &str, blob: &[u8]) -> Vec<u8> {
        hex::decode(self.admin(&format!("/admin/unwrap?version={version}"), blob).trim()).unwrap()
    }

    pub fn ca(&self) -> PathBuf {
        self.state.join("ca.pem")
    }

    pub fn service_account(&self) -> PathBuf {
        self.state.join("service-account.json")
    }

    /// Every bearer credential the service has seen or issued so far.
    pub fn tokens(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.join("tokens.txt"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The environment the plugin needs: trust in the test CA, the metadata server's address.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SSL_CERT_FILE", self.ca().display().to_string()),
            ("GCE_METADATA_HOST", format!("127.0.0.1:{}", self.mds_port)),
        ]
    }

    /// A plugin config for `key` with `credentials` (a line, or empty for ADC).
    pub fn config(&self, dir: &Dir, key: &str, old: &[&str], credentials: &str, extra: &str) -> String {
        let old: Vec<String> = old.iter().map(|k| format!("{k:?}")).collect();
        format!(
            "{extra}\n[socket]\npath = {:?}\n[backend]\ntype = \"gcp\"\nkey = {key:?}\nendpoint = \"https://127.0.0.1:{}\"\n{credentials}\ndecrypt_only_keys = [{}]\ncall_timeout = \"1s\"\nattempt_timeout = \"400ms\"\n",
            dir.socket(),
            self.port,
            old.join(", ")
        )
    }

    /// The `credentials_file` line for the emulator's service account.
    pub fn service_account_line(&self) -> String {
        format!("credentials_file = {:?}", self.service_account().display().to_string())
    }
}

impl Drop for GcpKms {
    fn drop(&mut self) {
        self.stop();
    }
}
