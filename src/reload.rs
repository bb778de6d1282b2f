//! Live configuration reload: on SIGHUP, or when the config file or any file it names (key
//! files, PIN file, credential and CA files) changes, noticed within `reload.interval`.
//!
//! Changes are noticed by content hash, polled: kubelet-mounted ConfigMaps and Secrets change by
//! swapping symlinks, which a watch on the file itself would miss. A reload reads and checks the
//! whole new configuration and builds a new backend beside the old one, which must answer a
//! probe, a wrap and an unwrap under its current key. Only then is it put in force: one
//! [`Running`] value, built from the new settings by [`Running::new`] (as at start-up), is
//! swapped whole (under `Keys::replace`), so no call sees the new backend with the old peer
//! lists or policies; calls already running finish on the old one; cached KEKs of root keys
//! still configured stay cached, those of removed keys are purged. Anything less leaves the old
//! configuration serving, logs why (naming the field) and counts a failure. Files are read,
//! hashed and parsed off the async worker, and none over `secret_file::MAX_FILE_BYTES` is read:
//! a file over it refuses the reload, naming the file and its size.
//!
//! Settings a live process cannot change (the socket, the backend type, the metrics endpoint,
//! threads, mlock, the Status version, the KEK cache size, the log format and shutdown_grace)
//! refuse the whole reload: the plugin never runs half of a configuration. Everything else
//! applies: the backend's settings and keys, `[kek]` lifetimes, `[probe]`, `[reload]`, the
//! peer allow-lists and `log.level` (unless RUST_LOG is set).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use ring::digest;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::keys::{Active, ActiveSource, Keys};
use crate::logging::LevelHandle;
use crate::secret_file::{self, MAX_FILE_BYTES};
use crate::server::{PeerPolicy, PeerSource};
use crate::settings::Settings;

/// What the process runs with: the settings in force, the hierarchy's backend and policies, and
/// the peer allow-lists (the log level is `settings.log.level`). Built by one function,
/// [`Running::new`], at start-up and for every reload, and replaced whole.
pub struct Running {
    pub settings: Settings,
    pub active: Arc<Active>,
    pub peers: Arc<PeerPolicy>,
}

/// The [`Running`] value in force, shared by everything that reads it; only a reload stores.
pub type SharedRunning = Arc<ArcSwap<Running>>;

impl Running {
    /// Everything the process runs with, from `settings` and the backend built from them.
    pub fn new(settings: Settings, backend: Arc<dyn Backend>) -> Self {
        Self {
            active: Arc::new(Active {
                backend,
                policy: settings.policy(),
                max_outage: settings.probe.max_outage,
            }),
            peers: Arc::new(PeerPolicy {
                uids: settings.socket.allowed_uids.clone(),
                gids: settings.socket.allowed_gids.clone(),
            }),
            settings,
        }
    }

    /// Puts `running` in force: the one place a [`SharedRunning`] starts.
    pub fn shared(self) -> SharedRunning {
        Arc::new(ArcSwap::from_pointee(self))
    }
}

/// What [`Keys`] reads on every call: the hierarchy part of the running value.
pub fn active_source(running: &SharedRunning) -> ActiveSource {
    let running = Arc::clone(running);
    Box::new(move || Arc::clone(&running.load().active))
}

/// What the server reads on every accepted connection: the peer lists of the running value.
pub fn peer_source(running: &SharedRunning) -> PeerSource {
    let running = Arc::clone(running);
    Box::new(move || Arc::clone(&running.load().peers))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// `config_reloads_total{outcome}` and the time of the last success.
#[derive(Clone, Default)]
pub struct ReloadMetrics {
    reloads: Family<Outcome, Counter>,
    last_success: Gauge,
}

impl ReloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome (success, failure)",
            self.reloads.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration put in force (start-up counts)",
            self.last_success.clone(),
        );
        self.mark_success();
    }

    fn mark_success(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_success.set(now.as_secs() as i64);
    }

    fn count(&self, outcome: &'static str) {
        self.reloads.get_or_create(&Outcome { outcome }).inc();
    }
}

/// What a reload changes in the running process.
pub struct Reloader {
    path: PathBuf,
    running: SharedRunning,
    keys: Arc<Keys>,
    log: LevelHandle,
    metrics: ReloadMetrics,
    fingerprint: Vec<u8>,
}

impl Reloader {
    /// `running` is in force, its settings loaded from `path`; `keys` reads it. Its files are
    /// fingerprinted now (off the async worker), so a change made from here on is noticed.
    pub async fn new(
        path: PathBuf,
        running: SharedRunning,
        keys: Arc<Keys>,
        log: LevelHandle,
        metrics: ReloadMetrics,
    ) -> Self {
        let mut reloader = Self {
            path,
            running,
            keys,
            log,
            metrics,
            fingerprint: Vec::new(),
        };
        reloader.fingerprint = reloader.current_fingerprint().await.unwrap_or_default();
        reloader
    }

    /// Reloads on SIGHUP and on changes, until `shutdown` fires.
    pub async fn run(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
                None
            }
        };
        loop {
            let interval = self.running.load().settings.reload.interval;
            let by_signal = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                Some(()) = async { hup.as_mut()?.recv().await } => true,
                _ = shutdown.changed() => return,
            };
            let Some(now) = self.current_fingerprint().await else {
                continue;
            };
            if !by_signal && now == self.fingerprint {
                continue;
            }
            // Tried once per change: a broken edit is not retried every interval.
            self.fingerprint = now;
            let trigger = if by_signal { "SIGHUP" } else { "file change" };
            match self.reload().await {
                Ok(summary) => {
                    self.metrics.count("success");
                    self.metrics.mark_success();
                    info!(trigger, %summary, "configuration reloaded");
                }
                Err(why) => {
                    self.metrics.count("failure");
                    warn!(trigger, error = %why, "configuration reload refused; the previous configuration keeps serving");
                }
            }
        }
    }

    /// The fingerprint of the files in force now, taken off the async worker.
    async fn current_fingerprint(&self) -> Option<Vec<u8>> {
        let (path, files) = (self.path.clone(), self.running.load().settings.backend.files());
        match off_thread(move || fingerprint(&path, &files)).await {
            Ok(now) => Some(now),
            Err(why) => {
                warn!(error = %why, "could not check the configuration files for changes");
                None
            }
        }
    }

    /// Builds and checks the new configuration, then puts it in force.
    async fn reload(&mut self) -> Result<String, String> {
        let path = self.path.clone();
        let (new, loaded) = off_thread(move || {
            let new = Settings::load(Some(&path)).map_err(|e| e.to_string())?;
            // What was loaded, taken now: a change while the backend is built is noticed next time.
            let loaded = fingerprint(&path, &new.backend.files());
            Ok::<_, String>((new, loaded))
        })
        .await??;
        fixed_fields_unchanged(&self.running.load().settings, &new)?;
        let backend = tokio::time::timeout(crate::keys::BACKEND_CALL_TIMEOUT, crate::startup::build_backend(&new))
            .await
            .map_err(|_| "building the backend timed out".to_string())?
            .map_err(|e| e.to_string())?;
        // Keys the running backend learned on its own (a moved alias or name) stay known.
        backend.remember(self.keys.backend().remembered());
        // The new backend must work before anything depends on it.
        let passed = crate::keys::self_test::self_test(backend.as_ref()).await?;
        let first = (passed.kek, passed.wrapped);
        let key_id_hash = crate::logging::KeyIdHash(&first.1.key_id).to_string();
        let decrypt_only = crate::logging::key_list(&backend.decrypt_only());
        let next = Arc::new(Running::new(new, backend));
        let swap = || {
            self.running.store(Arc::clone(&next));
            // The process-wide log filter cannot live in the swapped value: set at the swap.
            self.log.set(&next.settings.log.level);
        };
        let purged = self.keys.replace(swap, first).await;
        self.fingerprint = loaded;
        Ok(format!(
            "current key_id_hash {key_id_hash}, decrypt-only keys: {decrypt_only}, {} of removed keys purged",
            crate::logging::counted(purged as u64, "cached KEK")
        ))
    }
}

/// Without a config file to reload: logs each SIGHUP (whose default action would end the
/// process) until `shutdown` fires.
pub async fn ignore_hangups(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => warn!("SIGHUP ignored: nothing to reload (started with --dev or --socket)"),
            _ = shutdown.changed() => return,
        }
    }
}

/// Refuses a reload that changes what a live process cannot, naming the first such field.
fn fixed_fields_unchanged(old: &Settings, new: &Settings) -> Result<(), String> {
    let backend_type = |s: &Settings| s.backend.type_name();
    let fixed: [(&str, bool); 12] = [
        ("shutdown_grace", old.shutdown_grace != new.shutdown_grace),
        ("socket.path", old.socket.path != new.socket.path),
        ("socket.mode", old.socket.mode != new.socket.mode),
        ("socket.group", old.socket.group != new.socket.group),
        (
            "socket.directory_private_to_pod",
            old.socket.directory_private_to_pod != new.socket.directory_private_to_pod,
        ),
        (
            "socket.max_connections",
            old.socket.max_connections != new.socket.max_connections,
        ),
        ("backend.type", backend_type(old) != backend_type(new)),
        (
            "metrics",
            old.metrics.enabled != new.metrics.enabled || old.metrics.address != new.metrics.address,
        ),
        (
            "process",
            old.process.worker_threads != new.process.worker_threads || old.process.mlock != new.process.mlock,
        ),
        ("status.version", old.status.version != new.status.version),
        ("kek.cache_capacity", old.kek.cache_capacity != new.kek.cache_capacity),
        ("log.format", old.log.format != new.log.format),
    ];
    match fixed.iter().find(|(_, changed)| *changed) {
        Some((field, _)) => Err(format!(
            "{field} cannot change in a running plugin; restart it to apply (nothing was reloaded)"
        )),
        None => Ok(()),
    }
}

/// Runs blocking file work (reading, hashing, parsing) on tokio's blocking pool, so the async
/// worker (one by default, `process.worker_threads`) keeps serving calls meanwhile.
async fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("reload task failed: {e}"))
}

/// A hash of the config file and of every file it names, by content (through symlinks).
fn fingerprint(path: &Path, files: &[PathBuf]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for file in std::iter::once(path).chain(files.iter().map(PathBuf::as_path)) {
        ctx.update(file.as_os_str().as_encoded_bytes());
        match file_digest(file) {
            Ok(d) => ctx.update(&d),
            Err(e) => ctx.update(format!("error: {:?}", e.kind()).as_bytes()),
        }
    }
    ctx.finish().as_ref().to_vec()
}

/// The hash of a file's content, opened without blocking on a FIFO. A file over the cap is
/// not read: it stands for its identity, size and mtime, so a change is still noticed and the
/// reload it triggers is refused, naming the file.
fn file_digest(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let (file, meta) = secret_file::open_nonblocking(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > MAX_FILE_BYTES {
        let id = (meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec());
        return Ok(format!("over the cap: {id:?}").into_bytes());
    }
    // Key files are hashed too: the buffer is wiped after.
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut buf)?;
    Ok(digest::digest(&digest::SHA256, &buf).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::local::LocalBackend;
    use crate::secret::Kek;
    use std::time::Duration;

    fn settings(uid: u32, max_outage: &str) -> Settings {
        Settings::from_toml(&format!(
            "[socket]\nallowed_uids = [{uid}]\n[probe]\nmax_outage = \"{max_outage}\"\n[backend]\ntype = \"local\"\ncurrent_key_file = \"/k\"\n"
        ))
        .unwrap()
    }

    fn backend(byte: u8) -> Arc<dyn Backend> {
        Arc::new(LocalBackend::from_keys(
            Kek::from_bytes(&[byte; 32]).unwrap(),
            Vec::new(),
        ))
    }

    #[test]
    fn one_value_from_the_settings_and_every_reader_sees_the_swap() {
        let (old, new) = (backend(1), backend(2));
        let running = Running::new(settings(1, "1m"), Arc::clone(&old)).shared();
        let (active, peers) = (active_source(&running), peer_source(&running));
        assert_eq!(peers().uids, [1]);
        assert_eq!(active().max_outage, Duration::from_secs(60));
        assert!(Arc::ptr_eq(&active().backend, &old));

        running.store(Arc::new(Running::new(settings(2, "2m"), Arc::clone(&new))));
        assert_eq!(peers().uids, [2]);
        assert_eq!(active().max_outage, Duration::from_secs(120));
        assert!(Arc::ptr_eq(&active().backend, &new));
        assert_eq!(running.load().settings.socket.allowed_uids, [2]);
        // One load, one value: a reader holding it keeps the old one whole.
        let held = running.load_full();
        running.store(Arc::new(Running::new(settings(3, "3m"), old)));
        assert_eq!(
            (held.peers.uids.as_slice(), held.active.max_outage),
            (&[2][..], Duration::from_secs(120))
        );
    }
}
