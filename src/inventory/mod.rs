//! `kms-plugin inventory`: reads etcd (read-only), reports what is stored under which keys, and
//! whether a root key may be retired. `format` parses stored values, `etcd` pages through
//! etcd, `report` aggregates and renders, `shown` bounds and escapes what is printed; this
//! module runs the scan.

pub mod etcd;
pub mod format;
pub mod key_id;
pub mod report;
pub mod shown;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::contract::KEK_ANNOTATION;
use crate::error::Error;
use crate::keys::Keys;
use crate::settings::Settings;
use format::{EncryptedObject, Stored};
use report::Report;

/// Exit codes (README "inventory").
pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_NOT_RETIRABLE: u8 = 2;
pub const EXIT_VERIFY_FAILED: u8 = 3;
/// `--require-retirable`: the scan found no KMS v2 object of the provider, so no verdict.
pub const EXIT_NO_EVIDENCE: u8 = 4;

/// Progress goes to stderr this often.
const PROGRESS_EVERY: u64 = 10_000;

/// What the command was asked to do.
pub struct Options {
    pub connection: etcd::Connection,
    pub prefix: String,
    /// `--config FILE`: the configuration `serve` uses; its keys are resolved as `serve` does.
    pub config: Option<Settings>,
    /// `--verify`: open every distinct seed with `config`.
    pub verify: bool,
    pub require_retirable: Option<key_id::Wanted>,
    /// The KMS v2 provider whose objects `--require-retirable` judges.
    pub provider: Option<String>,
    pub json: bool,
    /// KVs per etcd Range.
    pub page_size: i64,
}

/// Opens each distinct (key_id, encryptedDEKSource, annotations) once, in-process.
struct Verifier {
    keys: Arc<Keys>,
    /// Triple hash → outcome; as many entries as distinct seeds, not objects.
    seen: HashMap<[u8; 32], Result<(), String>>,
    /// Seeds actually opened (reported, so a test can tell the cache works).
    opened: usize,
}

impl Verifier {
    async fn open(&mut self, o: &EncryptedObject) -> Result<Result<(), String>, String> {
        let id = report::triple_hash(o);
        if let Some(outcome) = self.seen.get(&id) {
            return Ok(outcome.clone());
        }
        let outcome = self.try_open(o).await?;
        self.opened += 1;
        self.seen.insert(id, outcome.clone());
        Ok(outcome)
    }

    /// Ok(Err(reason)) for an object that does not open; Err for a backend that cannot answer
    /// now (the scan stops rather than call readable data unreadable).
    async fn try_open(&self, o: &EncryptedObject) -> Result<Result<(), String>, String> {
        // Exactly what this plugin's Decrypt accepts: its KEK annotation and nothing else.
        let kek = match o.annotations.get(KEK_ANNOTATION) {
            Some(kek) if o.annotations.len() == 1 && !kek.is_empty() => bytes::Bytes::copy_from_slice(kek),
            _ => return Ok(Err("not sealed by this plugin".into())),
        };
        match self.keys.decrypt(&o.key_id, &kek, &o.encrypted_dek_source, None).await {
            // The seed is wiped as it drops here; only the outcome is kept.
            Ok(_seed) => Ok(Ok(())),
            Err(e) if e.code() == tonic::Code::Unavailable || e.code() == tonic::Code::ResourceExhausted => Err(
                format!("--verify: the backend cannot answer now ({:?}); run again", e.code()),
            ),
            Err(e) => Ok(Err(reason(&e))),
        }
    }
}

/// Why a seed does not open, fit for the report: the plugin's own messages (no key material);
/// for backend refusals only the code, since backend messages may carry server details.
fn reason(e: &Error) -> String {
    match e {
        Error::UnknownKeyId => "key_id not in this configuration".into(),
        Error::Backend(_) => format!("backend refused ({:?})", e.code()),
        other => other.to_string(),
    }
}

/// Runs the scan and prints the report; returns the exit code.
pub async fn run(options: Options) -> Result<u8, String> {
    let keys = match &options.config {
        Some(settings) => Some(resolve(settings).await?),
        None => None,
    };
    let mut verifier = match (&keys, options.verify) {
        (Some(keys), true) => Some(Verifier {
            keys: Arc::clone(keys),
            seen: HashMap::new(),
            opened: 0,
        }),
        _ => None,
    };
    let prefix = normalise_prefix(&options.prefix);
    let client = etcd::connect(&options.connection).await?;
    let mut pager = etcd::Pager::new(client, prefix.as_bytes(), options.page_size);
    let mut report = Report::new(&prefix, verifier.is_some(), options.provider.as_deref());
    let mut next_progress = PROGRESS_EVERY;
    while let Some(page) = pager.next_page().await? {
        for kv in page {
            let key = String::from_utf8_lossy(&kv.key);
            let resource = format::resource(prefix.as_bytes(), &kv.key)
                .map_or_else(String::new, |r| String::from_utf8_lossy(r).into_owned());
            let stored = format::parse(&kv.value);
            let opened = match (&stored, verifier.as_mut()) {
                (Stored::KmsV2 { object, .. }, Some(v)) => Some(v.open(object).await?),
                _ => None,
            };
            report.add(&resource, &key, &stored, opened);
        }
        if report.keys_scanned >= next_progress {
            eprintln!("kms-plugin inventory: {} keys scanned", report.keys_scanned);
            next_progress = (report.keys_scanned / PROGRESS_EVERY + 1) * PROGRESS_EVERY;
        }
    }
    report.revision = pager.revision();
    report.seeds_opened = verifier.as_ref().map_or(0, |v| v.opened);
    report.finish(options.require_retirable.as_ref());
    if let (Some(keys), Some(wanted)) = (&keys, &options.require_retirable) {
        // The full key_id: as given, or from an object that names the hash.
        let full = match wanted {
            key_id::Wanted::KeyId(id) => Some(id.clone()),
            key_id::Wanted::Hash(_) => report
                .key_ids
                .values()
                .find(|k| wanted.matches(&k.key_id, &k.key_id_hash))
                .map(|k| k.key_id.clone()),
        };
        let current = keys
            .current()
            .is_some_and(|c| wanted.matches(c.key_id(), &crate::logging::KeyIdHash(c.key_id()).to_string()));
        report.configured(full.map(|id| keys.backend().knows(&id)), current);
    }
    if options.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(match &report.require_retirable {
        Some(r) if r.verdict == report::Verdict::NoEvidence => EXIT_NO_EVIDENCE,
        Some(r) if !r.retirable => EXIT_NOT_RETIRABLE,
        _ if report.verify_failures() > 0 => EXIT_VERIFY_FAILED,
        _ => EXIT_OK,
    })
}

/// Builds the configured backend and resolves its keys as `serve` does at start (KMIP and AWS
/// learn their key_ids only from the server): a backend that cannot answer now is an error,
/// never a verdict.
async fn resolve(settings: &Settings) -> Result<Arc<Keys>, String> {
    let backend = crate::startup::build_backend(settings)
        .await
        .map_err(|e| e.to_string())?;
    let keys = Keys::new(
        backend,
        settings.policy(),
        settings.kek.cache_capacity,
        settings.probe.max_outage,
    );
    keys.check_and_rotate()
        .await
        .map_err(|e| format!("--config: the backend cannot answer now ({e}); nothing was judged, run again"))?;
    Ok(keys)
}

/// `--prefix` as etcd keys start: with its trailing slash (`/registry` would also match
/// `/registryX/…`, and names nothing the apiserver writes).
pub fn normalise_prefix(prefix: &str) -> String {
    match prefix.ends_with('/') {
        true => prefix.to_string(),
        false => format!("{prefix}/"),
    }
}

/// `--endpoints a,b` as a list.
pub fn endpoints(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Paths as given, for [`etcd::Connection`].
pub fn connection(
    endpoints_arg: &str,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> etcd::Connection {
    etcd::Connection {
        endpoints: endpoints(endpoints_arg),
        cacert,
        cert,
        key,
    }
}
