//! Running the plugin binary for the cold-start and start-up scenarios: a scratch directory,
//! configs, a child process whose stderr is read for backend-call lines, readiness and stop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kms_plugin::proto::v2::StatusRequest;

use crate::grpc::connect_all;

/// A scratch directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("kms-bench-{tag}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes a local root key with `kms-plugin keygen` (mode 0600, 32 random bytes).
pub fn keygen(binary: &Path, out: &Path) -> Result<(), String> {
    let output = Command::new(binary)
        .args(["keygen", "--out"])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} keygen failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Where the root key is: a local key file, or a `[backend]` table of the caller's (any backend).
pub enum Root {
    Local(PathBuf),
    Backend(String),
}

impl Root {
    fn table(&self) -> String {
        match self {
            Root::Local(key) => format!(
                "[backend]\ntype = \"local\"\ncurrent_key_file = {:?}\n",
                key.display().to_string()
            ),
            Root::Backend(text) => text.clone(),
        }
    }
}

/// A config serving on `socket` with the root key `root`; `sections` is extra TOML tables
/// appended at the end (e.g. `[bench]`).
pub fn write_config(dir: &Path, name: &str, socket: &Path, root: &Root, sections: &str) -> Result<PathBuf, String> {
    let text = format!(
        "[socket]\npath = {:?}\n\n{}\n{sections}",
        socket.display().to_string(),
        root.table(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// What the plugin's stderr showed: backend calls counted, the last lines kept for errors.
#[derive(Default)]
pub struct LogStats {
    pub unwraps: u64,
    pub wraps: u64,
    tail: VecDeque<String>,
}

/// A plugin process started by the benchmark.
pub struct Proc {
    child: Child,
    pub socket: PathBuf,
    log: Arc<Mutex<LogStats>>,
    reader: Option<JoinHandle<()>>,
}

impl Proc {
    /// `binary serve --config config` with RUST_LOG=info, stderr captured.
    pub fn spawn(binary: &Path, config: &Path, socket: &Path) -> Result<Self, String> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", binary.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(LogStats::default()));
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut stats = sink.lock().unwrap_or_else(|e| e.into_inner());
                if line.contains("backend call") {
                    if line.contains("op=\"unwrap\"") {
                        stats.unwraps += 1;
                    } else if line.contains("op=\"wrap\"") {
                        stats.wraps += 1;
                    }
                }
                if stats.tail.len() == 20 {
                    stats.tail.pop_front();
                }
                stats.tail.push_back(line);
            }
        });
        Ok(Self {
            child,
            socket: socket.to_owned(),
            log,
            reader: Some(reader),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last log lines, for error messages (the plugin never logs key material).
    pub fn log_tail(&self) -> String {
        let stats = self.log.lock().unwrap_or_else(|e| e.into_inner());
        stats.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Polls Status until it answers `ok`; returns the time since `since`.
    pub async fn wait_ready(&mut self, since: Instant, limit: Duration) -> Result<Duration, String> {
        let socket = self.socket.display().to_string();
        loop {
            if let Ok(mut clients) = connect_all(&socket, 1, Duration::from_secs(2)).await
                && let Ok(r) = clients[0].status(StatusRequest {}).await
                && r.get_ref().healthz == "ok"
            {
                return Ok(since.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "plugin exited with {status} before it was ready:\n{}",
                    self.log_tail()
                ));
            }
            if since.elapsed() > limit {
                return Err(format!("plugin not ready after {limit:?}:\n{}", self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGTERM, wait for the exit (killing after 10 s) and for the log reader; returns counts.
    pub async fn stop(mut self) -> Result<LogStats, String> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(5)).await,
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        let mut stats = self.log.lock().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::take(&mut *stats))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only reached on an error path; `stop` leaves an exited child.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
