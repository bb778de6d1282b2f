//! Test harness: runs the built `kms-plugin` binary on a temporary directory and talks to it over
//! its real socket with the real gRPC client.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kms_plugin::client::{self, Client};
use kms_plugin::proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};
use kms_plugin::server::socket::SocketAddress;
use ring::rand::{SecureRandom, SystemRandom};

#[cfg(feature = "azure")]
pub mod azure;
pub mod etcd;
pub mod fake_kmip;
pub mod fake_vault;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod kmip;
pub mod leaks;
pub mod moto;
pub mod openbao;
pub mod raw;
pub mod softhsm;

pub const BIN: &str = env!("CARGO_BIN_EXE_kms-plugin");

/// A scratch directory with root keys in it.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Creates `name` as a root key (if missing) and returns its path.
    pub fn key(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        if !p.exists() {
            kms_plugin::backend::local::generate_key_file(&p).unwrap();
        }
        p
    }

    pub fn socket(&self) -> String {
        self.path("run/kms.sock").display().to_string()
    }

    /// Writes a config file with `text` and returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        let path = self.path(&format!("config-{}.toml", rand_hex(4)));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A config for the local backend with `current` and `old` keys plus extra TOML.
    pub fn config(&self, socket: &str, current: &str, old: &[&str], extra: &str) -> PathBuf {
        let old: Vec<String> = old
            .iter()
            .map(|k| format!("{:?}", self.key(k).display().to_string()))
            .collect();
        let text = format!(
            "{extra}\n[socket]\npath = {socket:?}\n[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\ndecrypt_only_key_files = [{}]\n",
            self.key(current).display().to_string(),
            old.join(", ")
        );
        // Sections in `extra` must come before [socket]; keep top-level keys first.
        let path = self.path(&format!("config-{}.toml", rand_hex(4)));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A running plugin process and the log lines it wrote.
pub struct Plugin {
    pub child: Child,
    pub socket: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Plugin {
    /// Starts `kms-plugin serve --config <config>` and waits until Status answers.
    pub async fn start(config: &Path) -> Plugin {
        Self::start_env::<&str>(config, &[]).await
    }

    /// Like [`Plugin::start`], with extra environment variables.
    pub async fn start_env<V: AsRef<std::ffi::OsStr>>(config: &Path, env: &[(&str, V)]) -> Plugin {
        let text = std::fs::read_to_string(config).unwrap();
        let socket = text
            .lines()
            .find_map(|l| l.strip_prefix("path = "))
            .map(|s| s.trim_matches('"').to_string())
            .expect("socket path in config");
        let plugin = Self::spawn_env(&["serve", "--config", config.to_str().unwrap()], &socket, env);
        plugin.wait_ready().await;
        plugin
    }

    /// Starts `serve --config <config>` logging at trace level (for the secret scans).
    pub async fn start_traced(config: &Path) -> Plugin {
        Self::start_env(config, &[("RUST_LOG", "trace")]).await
    }

    /// SIGTERM, a clean exit, and everything the plugin logged.
    pub async fn stop_with_logs(mut self) -> String {
        self.signal("TERM");
        let status = self.wait_exit().await;
        assert!(status.success(), "exit {status:?}; logs:\n{}", self.logs());
        self.logs()
    }

    /// Spawns the binary with `args`, capturing stderr; does not wait.
    pub fn spawn(args: &[&str], socket: &str) -> Plugin {
        Self::spawn_env::<&str>(args, socket, &[])
    }

    /// Spawns the binary with `args` and extra environment variables.
    pub fn spawn_env<V: AsRef<std::ffi::OsStr>>(args: &[&str], socket: &str, env: &[(&str, V)]) -> Plugin {
        let mut child = Command::new(BIN)
            .args(args)
            // Many plugins run at once: each takes a free port for its HTTP endpoint.
            .env("KMS_PLUGIN_METRICS__ADDRESS", "127.0.0.1:0")
            .env("RUST_LOG", "info,kms_plugin=debug")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Plugin {
            child,
            socket: socket.to_string(),
            logs,
        }
    }

    /// Whether `needle` appears in the log within a bounded wait.
    pub async fn wait_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = self.try_client().await
                && c.status(StatusRequest {}).await.is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "plugin not ready; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn try_client(&self) -> Result<Client, tonic::transport::Error> {
        let addr: SocketAddress = self.socket.parse().unwrap();
        client::connect(&addr, Duration::from_secs(10)).await
    }

    pub async fn client(&self) -> Client {
        self.try_client().await.unwrap()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Backend calls of `op` ("wrap", "unwrap", "probe", "verify") so far, any outcome, from
    /// the plugin's metrics (updated before the reply is sent, unlike the log, which a
    /// reader thread picks up a moment later).
    pub async fn backend_calls(&self, op: &str) -> u64 {
        let (_, metrics) = self.http_get("/metrics").await;
        let prefix = format!("kms_plugin_backend_calls_total{{op=\"{op}\",");
        metrics
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The address of the loopback HTTP endpoint, from the start-up log line.
    pub async fn http_address(&self) -> String {
        assert!(self.wait_log("serving /metrics").await, "{}", self.logs());
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains("serving /metrics")).unwrap();
        line.split("address=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    /// GET `path` from the HTTP endpoint: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.http_address().await).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// Waits until the plugin has started a backend unwrap for a Decrypt (a cache miss), so a
    /// signal sent next finds a call in flight.
    pub async fn wait_unwrap_in_flight(&self) {
        eventually("an unwrap to start", || async {
            let (_, metrics) = self.http_get("/metrics").await;
            metrics.contains("kms_plugin_kek_cache_misses_total 1")
        })
        .await;
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (bounded) and returns its status. Async so the test's
    /// runtime keeps driving its client connections (HTTP/2 GOAWAY/PING) meanwhile.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "plugin did not exit; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then asserts a clean exit.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit().await;
        assert!(status.success(), "exit {status:?}; logs:\n{}", self.logs());
    }
}

impl Plugin {
    /// The plugin process's resident and peak resident memory, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// A counter or gauge from /metrics (the sum over its label sets matching `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let (_, metrics) = self.http_get("/metrics").await;
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rand_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    SystemRandom::new().fill(&mut v).unwrap();
    v
}

pub fn rand_hex(n: usize) -> String {
    hex::encode(rand_bytes(n))
}

pub async fn status(c: &mut Client) -> StatusResponse {
    c.status(StatusRequest {}).await.unwrap().into_inner()
}

pub async fn encrypt(c: &mut Client, plaintext: &[u8]) -> EncryptResponse {
    c.encrypt(EncryptRequest {
        plaintext: plaintext.to_vec().into(),
        uid: rand_hex(8),
    })
    .await
    .unwrap()
    .into_inner()
}

/// The Decrypt request the apiserver would send for an Encrypt response.
pub fn decrypt_request(e: &EncryptResponse) -> DecryptRequest {
    DecryptRequest {
        ciphertext: e.ciphertext.clone(),
        uid: rand_hex(8),
        key_id: e.key_id.clone(),
        annotations: e.annotations.clone(),
    }
}

pub async fn decrypt(c: &mut Client, e: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    c.decrypt(decrypt_request(e))
        .await
        .map(|r| r.into_inner().plaintext.to_vec())
}

/// Asserts an Encrypt response is one the apiserver accepts (contract §2).
pub fn assert_contract(e: &EncryptResponse, status_key_id: &str) {
    assert_eq!(
        e.key_id, status_key_id,
        "Encrypt key_id must match the Status before it"
    );
    kms_plugin::contract::check_key_id(&e.key_id).unwrap();
    assert!(!e.ciphertext.is_empty() && e.ciphertext.len() <= 1024);
    let map: HashMap<String, Vec<u8>> = e.annotations.iter().map(|(k, v)| (k.clone(), v.to_vec())).collect();
    kms_plugin::contract::check_annotations(&map).unwrap();
}

/// Polls `check` every 20 ms until it holds, for at most 30 s; the one polling loop of the tests.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(what, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Polls `get` every 20 ms until it returns a value, for at most 30 s, and returns it.
pub async fn eventually_some<T, F, Fut>(what: &str, get: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(value) = get().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `kms-plugin check --config <config>`: (success, stdout and stderr).
pub fn check(config: &Path) -> (bool, String) {
    check_env::<&str>(config, &[])
}

/// [`check`] with extra environment variables (a server's CA, its credentials).
pub fn check_env<V: AsRef<std::ffi::OsStr>>(config: &Path, env: &[(&str, V)]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    outcome(&out)
}

/// A finished command's (success, stdout then stderr).
pub fn outcome(out: &std::process::Output) -> (bool, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `n` seeds and their ciphertexts under distinct KEKs, made by other plugin instances with
/// `config`, so a plugin started next must unwrap each cold.
pub async fn cold_ciphertexts(config: &Path, n: usize) -> Vec<(Vec<u8>, EncryptResponse)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let maker = Plugin::start(config).await;
        let seed = rand_bytes(32);
        out.push((seed.clone(), encrypt(&mut maker.client().await, &seed).await));
        maker.stop().await;
    }
    out
}
