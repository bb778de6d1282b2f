//! A fake Vault: just enough of the HTTP API the `vault` backend calls (token lookup, AppRole
//! login, read key, Transit encrypt and decrypt) to give the plugin the answers no real server
//! gives: an ingress's HTML pages, malformed JSON, a success without the fields, bodies that
//! echo the request. It is not an emulation of Vault: the real-server tests use OpenBao.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::eventually;

/// How the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A working Transit key `k` (version 1).
    Normal,
    /// Reads of the key: an ingress's HTML 404 page.
    Html404,
    /// Reads of the key: an HTML 200 page.
    Html200,
    /// Reads of the key: 200 with JSON cut short.
    MalformedJson,
    /// Reads of the key: 200 with JSON without `type`.
    NoType,
    /// Reads of the key: Vault's own "not found" (404, `{"errors":[]}`), authoritative.
    NotFound,
    /// Like `NotFound` for one read, then `Normal`.
    NotFoundOnce,
    /// Decrypt: 200 with a plaintext one byte short of a KEK.
    DecryptWrongLength,
    /// Decrypt: 200 with a plaintext that is not base64.
    DecryptNotBase64,
    /// Login and encrypt: 400 whose error text is the request body, verbatim.
    Echo,
    /// Encrypt only: 400 whose error text is the request body, verbatim.
    EchoEncrypt,
    /// Encrypt: a 3 KiB ciphertext (padded after a ':'), which decrypt still opens.
    HugeCiphertext,
}

/// A running fake Vault on loopback.
pub struct FakeVault {
    pub addr: String,
    mode: Arc<Mutex<Mode>>,
    /// Reads of the key so far (the plugin's probes).
    key_reads: Arc<AtomicUsize>,
    /// Every `plaintext` field the plugin sent to encrypt (base64 KEKs), to scan logs for.
    pub sent_plaintexts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeVault {
    pub async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let mode = Arc::new(Mutex::new(mode));
        let key_reads = Arc::new(AtomicUsize::new(0));
        let sent_plaintexts = Arc::new(Mutex::new(Vec::new()));
        let state = (Arc::clone(&mode), Arc::clone(&key_reads), Arc::clone(&sent_plaintexts));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Self {
            addr,
            mode,
            key_reads,
            sent_plaintexts,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn key_reads(&self) -> usize {
        self.key_reads.load(Relaxed)
    }

    /// Waits until the plugin has read the key `n` more times (its probes).
    pub async fn wait_reads(&self, n: usize) {
        let target = self.key_reads() + n;
        eventually("the plugin's probes to read the key", || async {
            self.key_reads() >= target
        })
        .await;
    }
}

impl Drop for FakeVault {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type State = (Arc<Mutex<Mode>>, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>);

/// HTTP/1.1 with keep-alive, one request at a time.
async fn serve(stream: tokio::net::TcpStream, (mode, key_reads, sent): State) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut length = 0;
        loop {
            let mut header = String::new();
            read.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let current = {
            let mut m = mode.lock().unwrap();
            let current = *m;
            if current == Mode::NotFoundOnce && path.ends_with("/keys/k") {
                *m = Mode::Normal;
            }
            current
        };
        if path.ends_with("/keys/k") {
            key_reads.fetch_add(1, Relaxed);
        }
        if path.ends_with("/encrypt/k")
            && let Ok(v) = serde_json::from_str::<Value>(&body)
            && let Some(p) = v["plaintext"].as_str()
        {
            sent.lock().unwrap().push(p.to_string());
        }
        let (status, content_type, text) = answer(current, &method, &path, &body);
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        write.write_all(response.as_bytes()).await?;
    }
}

const JSON: &str = "application/json";
const HTML: &str = "text/html";

fn answer(mode: Mode, method: &str, path: &str, body: &str) -> (u16, &'static str, String) {
    let key = json!({"data": {"type": "aes256-gcm96", "latest_version": 1, "min_decryption_version": 1,
        "keys": {"1": 1700000000}}});
    let page = "<html><body><h1>404 Not Found</h1>nginx</body></html>".to_string();
    match (mode, method, path.trim_start_matches("/v1/")) {
        (_, "GET", "auth/token/lookup-self") => (200, JSON, json!({"data": {"ttl": 0, "renewable": false}}).to_string()),
        (Mode::Echo, "POST", "auth/approle/login") => (400, JSON, json!({"errors": [body]}).to_string()),
        (_, "POST", "auth/approle/login") => (
            200,
            JSON,
            json!({"auth": {"client_token": "fake-client-token-0123456789", "lease_duration": 3600, "renewable": false}})
                .to_string(),
        ),
        (Mode::Html404, "GET", "transit/keys/k") => (404, HTML, page),
        (Mode::Html200, "GET", "transit/keys/k") => (200, HTML, page),
        (Mode::MalformedJson, "GET", "transit/keys/k") => (200, JSON, r#"{"data": {"type": "aes256"#.into()),
        (Mode::NoType, "GET", "transit/keys/k") => (
            200,
            JSON,
            json!({"data": {"latest_version": 1, "keys": {"1": 1700000000}}}).to_string(),
        ),
        (Mode::NotFound | Mode::NotFoundOnce, "GET", "transit/keys/k") => (404, JSON, json!({"errors": []}).to_string()),
        (_, "GET", "transit/keys/k") => (200, JSON, key.to_string()),
        (Mode::Echo | Mode::EchoEncrypt, "POST", "transit/encrypt/k") => {
            (400, JSON, json!({"errors": [format!("cannot encrypt {body}")]}).to_string())
        }
        (_, "POST", "transit/encrypt/k") => {
            let v: Value = serde_json::from_str(body).unwrap_or_default();
            let plaintext = v["plaintext"].as_str().unwrap_or("");
            let padding = match mode {
                Mode::HugeCiphertext => format!(":{}", "p".repeat(3 * 1024)),
                _ => String::new(),
            };
            (200, JSON, json!({"data": {"ciphertext": format!("vault:v1:{plaintext}{padding}")}}).to_string())
        }
        (Mode::DecryptWrongLength, "POST", "transit/decrypt/k") => (
            200,
            JSON,
            json!({"data": {"plaintext": B64.encode([7u8; 31])}}).to_string(),
        ),
        (Mode::DecryptNotBase64, "POST", "transit/decrypt/k") => {
            (200, JSON, json!({"data": {"plaintext": "*** not base64 ***"}}).to_string())
        }
        (_, "POST", "transit/decrypt/k") => {
            let v: Value = serde_json::from_str(body).unwrap_or_default();
            let ciphertext = v["ciphertext"].as_str().unwrap_or("");
            let plaintext = ciphertext.strip_prefix("vault:v1:").unwrap_or("");
            let plaintext = plaintext.split(':').next().unwrap_or("");
            (200, JSON, json!({"data": {"plaintext": plaintext}}).to_string())
        }
        _ => (404, JSON, json!({"errors": ["no handler for route"]}).to_string()),
    }
}
