//! Configuration: a TOML file, then `KMS_PLUGIN_*` environment overrides, then CLI flags.
//!
//! Every section rejects unknown keys, and every error names the field, so a typo stops the
//! plugin before it binds anything.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::keys::rotation::RotationPolicy;
use crate::logging::LogFormat;
use crate::secret_file;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub socket: SocketSettings,
    #[serde(default)]
    pub kek: KekSettings,
    /// Read in a second pass (by `type`), so errors name the backend's fields.
    #[serde(rename = "backend")]
    _backend: serde::de::IgnoredAny,
    #[serde(skip, default = "unset_backend")]
    pub backend: BackendSettings,
    #[serde(default)]
    pub probe: ProbeSettings,
    #[serde(default)]
    pub status: StatusSettings,
    #[serde(default)]
    pub log: LogSettings,
    /// How long in-flight calls may take to finish after SIGTERM.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// The loopback HTTP endpoint for metrics and health.
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Process hardening.
    #[serde(default)]
    pub process: ProcessSettings,
    /// Live reload of this file and the files it names.
    #[serde(default)]
    pub reload: ReloadSettings,
    /// Benchmark-only knobs; never set them on a real control plane.
    #[serde(default)]
    pub bench: BenchSettings,
    /// `serve --dev`: a taken metrics port falls back to a free one, and start-up says what
    /// to try next. Not settable from a file.
    #[serde(skip)]
    pub dev_mode: bool,
    /// `KMS_PLUGIN_*` variables that are not settings (a typo such as a single underscore),
    /// found by [`Settings::load_with`]; reported by [`Settings::warnings`].
    #[serde(skip)]
    ignored_env: Vec<String>,
}

/// `/metrics`, `/livez`, `/readyz`, `/healthz` over plain HTTP on a loopback address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    pub enabled: bool,
    pub address: std::net::SocketAddr,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// The process: hardening beyond the defaults (core dumps are always disabled) and threads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessSettings {
    /// mlockall(): keep every page, keys included, out of swap. Needs CAP_IPC_LOCK.
    pub mlock: bool,
    /// Async worker threads. One is the fastest measured (BENCHMARKS.md): the work per call is
    /// tiny and a second worker mostly adds contention on HTTP/2 connection state. PKCS#11
    /// calls run on a separate blocking pool either way.
    pub worker_threads: usize,
}

impl Default for ProcessSettings {
    fn default() -> Self {
        Self {
            mlock: false,
            worker_threads: 1,
        }
    }
}

/// `[reload]`: how often the config file and the files it names are checked for changes
/// (SIGHUP reloads at once).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSettings {
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        Self {
            interval: default_reload_interval(),
        }
    }
}

/// Where and how the gRPC socket is created.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketSettings {
    /// Absolute path, `unix:///path`, or `@name` for an abstract socket.
    pub path: String,
    /// Permission bits of the socket file, as an octal string ("0600") or a number.
    #[serde(deserialize_with = "octal_mode")]
    pub mode: u32,
    /// Group (name or numeric gid) to own the socket, for a non-root apiserver.
    pub group: Option<String>,
    /// With `allowed_gids`: when either is non-empty, a peer may connect only if its uid is in
    /// `allowed_uids` or its primary gid in `allowed_gids` (SO_PEERCRED).
    pub allowed_uids: Vec<u32>,
    /// See `allowed_uids`.
    pub allowed_gids: Vec<u32>,
    /// Most open connections; when full, the idlest connection makes room for a new one.
    pub max_connections: usize,
    /// Accept a socket directory that group or others may write (still owned by the plugin's
    /// user or root). Only for a directory no other user can reach: a pod's `emptyDir`, which
    /// the kubelet creates mode 0777, shared by the apiserver and plugin containers (OpenShift's
    /// one-socket-per-key sidecars). Anyone who can write there could bind the socket's name
    /// first or remove the socket.
    pub directory_private_to_pod: bool,
}

impl Default for SocketSettings {
    fn default() -> Self {
        Self {
            path: "/var/run/kmsplugin/kms.sock".into(),
            mode: 0o600,
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_connections: 64,
            directory_private_to_pod: false,
        }
    }
}

/// Local KEK lifetime and cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KekSettings {
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    pub max_uses: u64,
    pub cache_capacity: NonZeroUsize,
}

impl Default for KekSettings {
    fn default() -> Self {
        let p = RotationPolicy::default();
        Self {
            max_age: p.max_age,
            max_uses: p.max_uses,
            cache_capacity: NonZeroUsize::new(1000).expect("non-zero"),
        }
    }
}

impl Settings {
    /// The local KEK policy; the backend is re-checked at every probe.
    pub fn policy(&self) -> RotationPolicy {
        RotationPolicy {
            max_age: self.kek.max_age,
            max_uses: self.kek.max_uses,
            check_interval: self.probe.interval,
        }
    }
}

/// Every backend, once: its `type` name, its variant, and the settings type its own module
/// owns (with that type's `files()` and `build()`). Adding a backend is its folder under
/// `src/backend/` plus one line here.
macro_rules! backends {
    ($($(#[cfg($on:meta)])? $name:literal => $variant:ident($settings:ty)),+ $(,)?) => {
        /// Which remote KMS holds the root key: `[backend]` with `type` and that backend's
        /// fields beside it.
        #[derive(Debug, Clone)]
        pub enum BackendSettings {
            $($(#[cfg($on)])? $variant(Box<$settings>)),+
        }

        /// The `type` names, as messages list them (also those of backends left out of this
        /// build by a cargo feature, so their settings get a precise refusal).
        pub const BACKEND_TYPES: &[&str] = &[$($name),+];

        impl BackendSettings {
            /// The `type` this section was read with.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $($(#[cfg($on)])? Self::$variant(_) => $name),+
                }
            }

            /// Every file this backend's settings name, for change detection.
            pub fn files(&self) -> Vec<PathBuf> {
                match self {
                    $($(#[cfg($on)])? Self::$variant(s) => s.files()),+
                }
            }

            /// Builds the backend these settings describe (files are read off the async
            /// workers).
            pub async fn build(&self) -> Result<std::sync::Arc<dyn crate::backend::Backend>, String> {
                match self {
                    $($(#[cfg($on)])? Self::$variant(s) => s.build().await),+
                }
            }

            /// Reads the `[backend]` table (without its `type`) as the settings of `kind`.
            fn parse(kind: &str, table: &::config::Config) -> Result<Self, SettingsError> {
                match kind {
                    $($(#[cfg($on)])? $name => Ok(Self::$variant(Box::new(backend_table(table)?))),)+
                    other if BACKEND_TYPES.contains(&other) => Err(SettingsError(format!(
                        "backend.type: {other:?} is not in this build (it was built without the \
                         cargo feature {other:?}; the release binary and image have it)"
                    ))),
                    other => Err(SettingsError(format!(
                        "backend.type: unknown backend {other:?} ({})",
                        backend_types(false)
                    ))),
                }
            }
        }
    };
}

backends! {
    "local" => Local(crate::backend::local::LocalSettings),
    "pkcs11" => Pkcs11(crate::backend::pkcs11::Pkcs11Settings),
    "aws" => Aws(crate::backend::aws::AwsSettings),
    "vault" => Vault(crate::backend::vault::VaultSettings),
    "kmip" => Kmip(crate::backend::kmip::KmipSettings),
    #[cfg(feature = "gcp")] "gcp" => Gcp(crate::backend::gcp::GcpSettings),
    #[cfg(feature = "azure")] "azure" => Azure(crate::backend::azure::AzureSettings),
}

/// Deserialises the `backend` table of `table` (errors carry the field's path).
fn backend_table<T: serde::de::DeserializeOwned>(table: &::config::Config) -> Result<T, SettingsError> {
    #[derive(Deserialize)]
    struct Wrap<T> {
        backend: T,
    }
    table
        .clone()
        .try_deserialize::<Wrap<T>>()
        .map(|w| w.backend)
        .map_err(|e| SettingsError(e.to_string()))
}

/// `"local", "pkcs11" … or "kmip"` (quoted) or `local, pkcs11 … or kmip`.
fn backend_types(quoted: bool) -> String {
    let names: Vec<String> = BACKEND_TYPES
        .iter()
        .map(|n| if quoted { format!("{n:?}") } else { n.to_string() })
        .collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn unset_backend() -> BackendSettings {
    BackendSettings::Local(Box::default())
}

/// The background probe of the backend, and what Status does with its result.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    /// How often the backend is probed (health, revocation, current root key).
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// How long a transient outage may last before Status fails.
    #[serde(deserialize_with = "duration")]
    pub max_outage: Duration,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            max_outage: Duration::from_secs(3600),
        }
    }
}

/// What Status reports.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusSettings {
    pub version: ApiVersion,
}

pub use crate::service::ApiVersion;

/// Log level and format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A level (error, warn, info, debug, trace, off) or directives (`info,kms_plugin=debug`).
    #[serde(deserialize_with = "log_level")]
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Benchmark-only settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchSettings {
    /// Added to every backend call, to model a remote KMS's round trip.
    #[serde(deserialize_with = "opt_duration")]
    pub backend_latency: Option<Duration>,
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    crate::logging::check_level(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

/// Default `reload.interval`.
pub fn default_reload_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

use crate::parse::duration;

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn octal_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Num(u32),
        Text(String),
    }
    let mode = match Mode::deserialize(d)? {
        // A TOML integer: 0o600 arrives as 384; a plain 600 is decimal, not a permission.
        Mode::Num(n) if n > 0o777 => {
            return Err(serde::de::Error::custom(format!(
                "mode {n} is a decimal number above 0o777; write the octal mode as a string (\"0600\") or as TOML octal (0o600)"
            )));
        }
        Mode::Num(n) => n,
        Mode::Text(s) => {
            let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| serde::de::Error::custom(format!("invalid octal mode {s:?} (e.g. \"0600\")")))?;
            if mode & !0o777 != 0 {
                return Err(serde::de::Error::custom(format!("mode {s:?} has bits outside 0777")));
            }
            mode
        }
    };
    Ok(mode)
}

/// Environment variables that override the file: `KMS_PLUGIN_SECTION__FIELD`.
const ENV_PREFIX: &str = "KMS_PLUGIN_";

/// Top-level keys that are not sections.
const TOP_LEVEL_KEYS: &[&str] = &["shutdown_grace"];

/// The sections of the file, to suggest the right spelling of a mistyped variable.
const SECTIONS: &[&str] = &[
    "socket", "kek", "backend", "probe", "status", "log", "metrics", "process", "reload", "bench",
];

/// Why `name`, a `KMS_PLUGIN_*` variable that is no setting, was ignored. Only the name is
/// shown: the value may be a secret.
fn ignored_env_warning(name: &str) -> String {
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name).to_ascii_lowercase();
    let hint = SECTIONS
        .iter()
        .find_map(|s| rest.strip_prefix(&format!("{s}_")).map(|field| (s, field)))
        .filter(|(_, field)| !field.is_empty())
        .map(|(s, field)| {
            format!(
                " (did you mean {ENV_PREFIX}{}__{}?)",
                s.to_ascii_uppercase(),
                field.to_ascii_uppercase()
            )
        })
        .unwrap_or_default();
    format!(
        "environment variable {name} is not a setting and is ignored: settings are {ENV_PREFIX}<SECTION>__<FIELD>, with two underscores{hint}"
    )
}

/// Adds the environment variable to an error about a setting it gave, so the operator looks
/// at the environment rather than the file.
fn name_env_variable(e: SettingsError, from_env: &[(String, String)]) -> SettingsError {
    let msg = &e.0;
    let named = from_env.iter().find(|(key, _)| {
        let field = key.rsplit('.').next().unwrap_or(key);
        msg.contains(&format!("`{key}`"))
            || msg.starts_with(&format!("{key} "))
            || msg.starts_with(&format!("{key}:"))
            || msg.contains(&format!("unknown field `{field}`"))
    });
    match named {
        Some((_, name)) => SettingsError(format!("{msg} (set by environment variable {name})")),
        None => e,
    }
}

/// Settings that are lists; from the environment they are comma-separated.
const LIST_KEYS: &[&str] = &[
    "socket.allowed_uids",
    "socket.allowed_gids",
    "backend.decrypt_only_key_files",
    "backend.decrypt_only_key_labels",
    "backend.decrypt_only_keys",
];

/// Reads a config file, saying precisely why it cannot be used.
fn read_config_file(path: &Path) -> Result<String, SettingsError> {
    let bytes = secret_file::read_capped("config file", path).map_err(SettingsError)?;
    String::from_utf8(bytes).map_err(|_| SettingsError(format!("config file {}: is not UTF-8 text", path.display())))
}

/// Refuses a file the settings name that is over [`secret_file::MAX_FILE_BYTES`], from its
/// size alone. Anything else wrong with it (missing, unreadable, too open) is left for its
/// reader, which says more; the readers stop at the cap too, should it grow meanwhile.
fn check_named_file_size(path: &Path) -> Result<(), SettingsError> {
    match secret_file::open_nonblocking(path) {
        Ok((_, meta)) if meta.is_file() && meta.len() > secret_file::MAX_FILE_BYTES => {
            Err(SettingsError(secret_file::too_large("file", path, meta.len())))
        }
        _ => Ok(()),
    }
}

/// A configuration error, with the field it concerns where known.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct SettingsError(String);

impl Settings {
    /// Loads `file` (if any), then environment variables `KMS_PLUGIN_<SECTION>__<FIELD>`
    /// (e.g. `KMS_PLUGIN_SOCKET__PATH`, `KMS_PLUGIN_KEK__MAX_AGE`). The file, and every file
    /// the result names, must be at most [`secret_file::MAX_FILE_BYTES`]. Blocking file reads:
    /// a running plugin calls this off its async workers.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let text = match file {
            Some(file) => Some(read_config_file(file)?),
            None => None,
        };
        let settings = Self::load_with(text.as_deref(), std::env::vars())?;
        for file in settings.backend.files() {
            check_named_file_size(&file)?;
        }
        Ok(settings)
    }

    /// Like [`Settings::load`], with the file's text and the environment given (tests).
    /// `base` is TOML; the `KMS_PLUGIN_*` entries of `env` override it. List settings take
    /// comma-separated values (`KMS_PLUGIN_SOCKET__ALLOWED_UIDS=0,1000`).
    pub fn load_with(
        base: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let mut builder = ::config::Config::builder();
        let mut from_env = Vec::new();
        let mut ignored_env = Vec::new();
        if let Some(text) = base {
            builder = builder.add_source(::config::File::from_str(text, ::config::FileFormat::Toml));
        }
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            // Settings are SECTION__FIELD, or a top-level key; other KMS_PLUGIN_* variables
            // (a PIN in `pin_env = "KMS_PLUGIN_PIN"`, say) are not settings.
            if !rest.contains("__") && !TOP_LEVEL_KEYS.contains(&rest.to_ascii_lowercase().as_str()) {
                ignored_env.push(name);
                continue;
            }
            let key = rest.to_ascii_lowercase().replace("__", ".");
            from_env.push((key.clone(), name.clone()));
            // Values stay strings (the config crate converts them to numbers on
            // deserialisation), so an octal "0600" is never read as decimal 600.
            builder = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                builder.set_override(key, items)
            } else {
                builder.set_override(key, value)
            }
            .map_err(|e| SettingsError(format!("{name}: {e}")))?;
        }
        // Environment-only configuration must at least name the backend; a stray variable such
        // as a metrics address alone is not a configuration.
        if base.is_none() && !from_env.iter().any(|(key, _)| key == "backend.type") {
            return Err(SettingsError(
                "no configuration: pass --config FILE (see deploy/config.toml), set KMS_PLUGIN_BACKEND__TYPE \
                 and the backend's settings in the environment, or try `serve --dev DIR`"
                    .into(),
            ));
        }
        let mut settings = Self::from_config(builder).map_err(|e| name_env_variable(e, &from_env))?;
        // A PIN variable the settings name is no typo.
        let pin_env = match &settings.backend {
            BackendSettings::Pkcs11(p) => p.pin_env.clone(),
            _ => None,
        };
        ignored_env.retain(|name| Some(name) != pin_env.as_ref());
        ignored_env.sort();
        settings.ignored_env = ignored_env;
        Ok(settings)
    }

    /// What is accepted but probably not meant: `KMS_PLUGIN_*` variables that are no setting,
    /// and a socket any local user may connect to. `serve` logs them, `check` prints them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.ignored_env.iter().map(|n| ignored_env_warning(n)).collect();
        if self.socket.mode & 0o002 != 0 {
            out.push(format!(
                "socket.mode {:04o} lets every local user connect to the socket, and anyone who can connect can Decrypt; use 0600 (or 0660 with socket.group)",
                self.socket.mode
            ));
        }
        if self.socket.directory_private_to_pod {
            out.push(
                "socket.directory_private_to_pod is set: a socket directory others may write is accepted; only safe in a pod's own emptyDir that no other user can reach".into(),
            );
        }
        out
    }

    /// Parses a TOML string (tests, `check`).
    pub fn from_toml(text: &str) -> Result<Self, SettingsError> {
        Self::from_config(
            ::config::Config::builder().add_source(::config::File::from_str(text, ::config::FileFormat::Toml)),
        )
    }

    fn from_config(builder: ::config::ConfigBuilder<::config::builder::DefaultState>) -> Result<Self, SettingsError> {
        let config = builder.build().map_err(|e| SettingsError(e.to_string()))?;
        if config.get_table("backend").is_err() {
            return Err(SettingsError(format!(
                "backend: missing; add a [backend] section with type = {}",
                backend_types(true)
            )));
        }
        let mut settings: Settings = config
            .clone()
            .try_deserialize()
            .map_err(|e| SettingsError(e.to_string()))?;
        let kind = config.get_string("backend.type").map_err(|_| {
            SettingsError(format!(
                "backend.type: missing; add a [backend] section with type = {}",
                backend_types(true)
            ))
        })?;
        // A config of its own for the backend table, so errors carry the field's path; `type`
        // chose the settings type and is not one of its fields.
        let mut table = config.get_table("backend").map_err(|e| SettingsError(e.to_string()))?;
        table.remove("type");
        let sub = ::config::Config::builder()
            .set_override("backend", ::config::Value::from(table))
            .and_then(|b| b.build())
            .map_err(|e| SettingsError(e.to_string()))?;
        settings.backend = BackendSettings::parse(&kind, &sub)?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let err = |s: &str| Err(SettingsError(s.to_string()));
        if self.kek.max_uses == 0 || self.kek.max_uses > 1 << 30 {
            return err("kek.max_uses must be 1..=2^30 (random 96-bit nonces: stay far below 2^32)");
        }
        if self.kek.max_age.is_zero() {
            return err("kek.max_age must be positive");
        }
        if self.socket.max_connections == 0 {
            return err("socket.max_connections must be at least 1");
        }
        if self.probe.interval.is_zero() {
            return err("probe.interval must be positive");
        }
        if self.reload.interval < Duration::from_millis(100) {
            return err("reload.interval must be at least 100ms");
        }
        if let BackendSettings::Pkcs11(p) = &self.backend
            && p.pin_file.is_some() == p.pin_env.is_some()
        {
            return err("backend: set exactly one of pin_file and pin_env");
        }
        if let Err(e) = self.socket.path.parse::<crate::server::socket::SocketAddress>() {
            return Err(SettingsError(format!("socket.path: {e}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[backend]\ntype = \"local\"\ncurrent_key_file = \"/k\"\n";

    #[test]
    fn defaults() {
        let s = Settings::from_toml(MIN).unwrap();
        assert_eq!(s.socket.mode, 0o600);
        assert_eq!(s.kek.max_uses, 1 << 21);
        assert_eq!(s.kek.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(s.kek.cache_capacity.get(), 1000);
        assert_eq!(s.status.version, ApiVersion::V2);
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn full_file() {
        let s = Settings::from_toml(
            r#"
            shutdown_grace = "3s"
            [socket]
            path = "@kms"
            mode = "0660"
            group = "kube"
            [kek]
            max_age = "1h"
            max_uses = 10
            cache_capacity = 5
            [probe]
            interval = "5s"
            max_outage = "10m"
            [status]
            version = "v2beta1"
            [backend]
            type = "local"
            current_key_file = "/b"
            decrypt_only_key_files = ["/a"]
            "#,
        )
        .unwrap();
        assert_eq!(s.socket.mode, 0o660);
        assert_eq!(s.kek.max_age, Duration::from_secs(3600));
        assert_eq!(s.status.version.as_str(), "v2beta1");
        let BackendSettings::Local(local) = &s.backend else {
            panic!("local backend expected");
        };
        assert_eq!(local.decrypt_only_key_files, &[PathBuf::from("/a")]);
        assert_eq!(s.policy().check_interval, Duration::from_secs(5));
        assert_eq!(s.probe.max_outage, Duration::from_secs(600));
    }

    #[test]
    fn vault_and_kmip_read_the_same_tls_settings() {
        let tls = "ca_file = \"/ca.pem\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\"\ntls_server_name = \"kms.example\"\n";
        let vault = format!(
            "[backend]\ntype = \"vault\"\naddress = \"https://v:8200\"\nkey = \"k\"\n{tls}[backend.auth]\nmethod = \"token\"\ntoken_file = \"/t\"\n"
        );
        let kmip = format!("[backend]\ntype = \"kmip\"\naddress = \"kms:5696\"\nkey_name = \"k\"\n{tls}");
        let vault = match Settings::from_toml(&vault).unwrap().backend {
            BackendSettings::Vault(v) => v,
            _ => panic!("vault backend expected"),
        };
        let kmip = match Settings::from_toml(&kmip).unwrap().backend {
            BackendSettings::Kmip(k) => k,
            _ => panic!("kmip backend expected"),
        };
        let expected = crate::backend::tls::TlsSettings {
            ca_file: Some("/ca.pem".into()),
            client_cert_file: Some("/c.pem".into()),
            client_key_file: Some("/c.key".into()),
            server_name: Some("kms.example".into()),
        };
        assert_eq!(vault.tls(), expected);
        assert_eq!(kmip.tls(), expected);
        // Reload watches the TLS files of both, in the same order, before their own files.
        let tls_files: Vec<PathBuf> = ["/ca.pem", "/c.pem", "/c.key"].map(PathBuf::from).into();
        assert_eq!(vault.files()[..3], tls_files[..]);
        assert_eq!(kmip.files(), tls_files);
    }

    #[test]
    fn tls_fields_of_network_backends_still_refuse_unknown_fields() {
        let cases = [
            "[backend]\ntype = \"vault\"\naddress = \"https://v:8200\"\nkey = \"k\"\nca_fil = \"/ca.pem\"\n[backend.auth]\nmethod = \"token\"\ntoken_file = \"/t\"\n",
            "[backend]\ntype = \"kmip\"\naddress = \"kms:5696\"\nkey_name = \"k\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\"\nca_fil = \"/ca.pem\"\n",
            // The shared type's own name for the server name is not a setting.
            "[backend]\ntype = \"kmip\"\naddress = \"kms:5696\"\nkey_name = \"k\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/c.key\"\nserver_name = \"x\"\n",
        ];
        for text in cases {
            let e = Settings::from_toml(text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text}"))
                .to_string();
            assert!(e.contains("unknown field"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (format!("{MIN}typo = 1\n"), "typo"),
            (format!("[kek]\nmax_agee = \"1h\"\n{MIN}"), "max_agee"),
            (format!("[kek]\nmax_age = \"soon\"\n{MIN}"), "kek.max_age"),
            (format!("[socket]\nmode = \"999\"\n{MIN}"), "socket.mode"),
            (format!("[socket]\npath = \"relative.sock\"\n{MIN}"), "socket.path"),
            (format!("[status]\nversion = \"v3\"\n{MIN}"), "status.version"),
            (format!("[kek]\nmax_uses = 0\n{MIN}"), "kek.max_uses"),
            (format!("[kek]\ncache_capacity = 0\n{MIN}"), "kek.cache_capacity"),
            ("[backend]\ntype = \"nope\"\n".to_string(), "nope"),
            (
                "[probe]\ninterval = \"0s\"\n[backend]\ntype = \"local\"\ncurrent_key_file = \"/k\"\n".to_string(),
                "probe.interval",
            ),
            (
                "[backend]\ntype = \"pkcs11\"\nmodule = \"/m\"\ntoken_label = \"t\"\ncurrent_key_label = \"k\"\n"
                    .to_string(),
                "pin_file",
            ),
            (
                "[backend]\ntype = \"aws\"\nkey = \"alias/k\"\ncall_timeout = \"x\"\n".to_string(),
                "backend.call_timeout",
            ),
            (format!("{MIN}current_key_fle = \"/x\"\n"), "current_key_fle"),
            (String::new(), "backend"),
        ];
        for (text, field) in cases {
            let e = Settings::from_toml(&text)
                .err()
                .unwrap_or_else(|| panic!("accepted {text}"))
                .to_string();
            assert!(e.contains(field), "{e:?} does not name {field}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unrecognised_variables_and_open_sockets_are_warned_about() {
        let pkcs11 = "[backend]\ntype = \"pkcs11\"\nmodule = \"/m.so\"\ntoken_label = \"t\"\npin_env = \"KMS_PLUGIN_PIN\"\ncurrent_key_label = \"k\"\n";
        let s = Settings::load_with(
            Some(pkcs11),
            env(&[
                ("KMS_PLUGIN_KEK_MAX_AGE", "1h"),
                ("KMS_PLUGIN_PIN", "1234"),
                ("KMS_PLUGIN_SOCKET__MODE", "666"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        let w = s.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("KMS_PLUGIN_KEK_MAX_AGE is not a setting") && w[0].contains("KMS_PLUGIN_KEK__MAX_AGE?"));
        assert!(
            w[1].starts_with("socket.mode 0666 lets every local user connect"),
            "{w:?}"
        );
        assert!(!w.iter().any(|w| w.contains("KMS_PLUGIN_PIN") || w.contains("1234")));
        // No section prefix: no suggestion.
        assert!(!ignored_env_warning("KMS_PLUGIN_FOO").contains("did you mean"));
        let quiet = Settings::load_with(Some(MIN), env(&[("KMS_PLUGIN_SOCKET__MODE", "0660")])).unwrap();
        assert!(quiet.warnings().is_empty());
    }

    #[test]
    fn an_error_from_the_environment_names_the_variable() {
        for (name, value, field) in [
            ("KMS_PLUGIN_KEK__MAX_AGE", "abc", "kek.max_age"),
            ("KMS_PLUGIN_KEK__MAX_USES", "0", "kek.max_uses"),
            ("KMS_PLUGIN_KEK__MAXAGE", "1h", "maxage"),
        ] {
            let e = Settings::load_with(Some(MIN), env(&[(name, value)]))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(field) && e.contains(&format!("set by environment variable {name}")),
                "{e}"
            );
        }
        let e = Settings::load_with(Some(&format!("[kek]\nmax_age = \"abc\"\n{MIN}")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("environment variable"), "{e}");
    }

    #[test]
    fn every_list_setting_from_the_environment() {
        let s = Settings::load_with(
            Some(MIN),
            env(&[
                ("KMS_PLUGIN_SOCKET__ALLOWED_UIDS", "0"),
                ("KMS_PLUGIN_SOCKET__ALLOWED_GIDS", "0, 1000,"),
                ("KMS_PLUGIN_BACKEND__DECRYPT_ONLY_KEY_FILES", "/a.key,/b.key"),
                ("KMS_PLUGIN_SOCKET__MODE", "0660"),
                ("KMS_PLUGIN_KEK__MAX_USES", "10"),
                ("KMS_PLUGIN_SHUTDOWN_GRACE", "3s"),
                // A PIN variable (pin_env) is not a setting.
                ("KMS_PLUGIN_PIN", "1234"),
                ("KMS_PLUGIN_PKCS11_PIN", "1234"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.socket.allowed_uids, [0]);
        assert_eq!(s.socket.allowed_gids, [0, 1000]);
        assert_eq!(s.socket.mode, 0o660, "an octal string from the environment stays octal");
        assert_eq!(s.kek.max_uses, 10);
        let BackendSettings::Local(local) = &s.backend else {
            panic!()
        };
        assert_eq!(
            local.decrypt_only_key_files,
            [PathBuf::from("/a.key"), PathBuf::from("/b.key")]
        );

        let hsm = "[backend]\ntype = \"pkcs11\"\nmodule = \"/m\"\ntoken_label = \"t\"\npin_file = \"/p\"\ncurrent_key_label = \"a\"\n";
        let s = Settings::load_with(
            Some(hsm),
            env(&[("KMS_PLUGIN_BACKEND__DECRYPT_ONLY_KEY_LABELS", "b,c")]),
        )
        .unwrap();
        let BackendSettings::Pkcs11(p) = &s.backend else {
            panic!()
        };
        assert_eq!(p.decrypt_only_key_labels, ["b", "c"]);

        let aws = "[backend]\ntype = \"aws\"\nkey = \"alias/k\"\n";
        let s = Settings::load_with(
            Some(aws),
            env(&[("KMS_PLUGIN_BACKEND__DECRYPT_ONLY_KEYS", "arn:1,arn:2")]),
        )
        .unwrap();
        let BackendSettings::Aws(a) = &s.backend else { panic!() };
        assert_eq!(a.decrypt_only_keys, ["arn:1", "arn:2"]);

        // The environment alone is a configuration; nothing at all is refused with a hint.
        let e = Settings::load_with(None, env(&[])).unwrap_err().to_string();
        assert!(e.contains("--config"), "{e}");
        let e = Settings::load_with(Some(MIN), env(&[("KMS_PLUGIN_SOCKET__ALLOWED_UIDS", "root")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed_uids"), "{e}");
    }

    #[test]
    fn errors_list_the_valid_values() {
        let cases = [
            ("[log]\nlevel = \"warning\"\n", "log.level"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[log]\nlevel = \"info,kms_plugin\"\n", "log.level"),
            ("[log]\nformat = \"xml\"\n", "text, json"),
            ("[status]\nversion = \"v3\"\n", "v2, v2beta1"),
            ("[socket]\nmode = 600\n", "0o600"),
        ];
        for (text, needle) in cases {
            let e = Settings::from_toml(&format!("{text}{MIN}")).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(!e.contains("variant"), "{text}: {e}");
        }
        for ok in ["debug", "info,kms_plugin=debug", "WARN", "off"] {
            Settings::from_toml(&format!("[log]\nlevel = {ok:?}\n{MIN}")).unwrap();
        }
        assert_eq!(
            Settings::from_toml(&format!("[socket]\nmode = 0o640\n{MIN}"))
                .unwrap()
                .socket
                .mode,
            0o640
        );
        let e = Settings::from_toml("").unwrap_err().to_string();
        assert!(e.contains("[backend]"), "{e}");
    }

    #[test]
    fn config_file_errors_say_what_is_wrong() {
        let e = Settings::load(Some(Path::new("/tmp"))).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = Settings::load(Some(Path::new("/dev/null"))).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = Settings::load(Some(Path::new("/no/such/file.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
        // One byte over the cap: refused from its size (sparse, it reads as zeros).
        let big = tempfile::NamedTempFile::new().unwrap();
        big.as_file().set_len(secret_file::MAX_FILE_BYTES + 1).unwrap();
        let e = Settings::load(Some(big.path())).unwrap_err().to_string();
        assert!(
            e.contains(&format!("is {} bytes, over the limit", secret_file::MAX_FILE_BYTES + 1)),
            "{e}"
        );
    }
}
