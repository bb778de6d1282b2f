//! The proof: one read-only pass over etcd that finds every object not yet under the current
//! key. Run before the migration (to plan it, and to skip what is already done) and after it
//! (the verdict).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use crate::inventory::etcd::{self, Connection, Pager};
use crate::inventory::format::{self, Stored};
use crate::logging::KeyIdHash;

/// Remaining objects listed by key (all are counted).
pub const LISTED: usize = 20;

/// Where to look and what counts as done.
pub struct Target<'a> {
    pub connection: &'a Connection,
    /// The apiserver's `--etcd-prefix`, ending in `/`.
    pub prefix: &'a str,
    pub page_size: i64,
    pub provider: &'a str,
    /// `sha256:<hex>` of the current key_id.
    pub key_id_hash: &'a str,
    /// etcd key prefixes (`/registry/secrets/`) of the resources the provider writes: there,
    /// an object not encrypted, or encrypted otherwise, remains too.
    pub covered: &'a [String],
}

/// What one pass found.
#[derive(Default)]
pub struct Scan {
    pub revision: i64,
    pub scanned: u64,
    /// Objects under the provider and the current key.
    pub current: u64,
    /// Objects that still need a rewrite, by resource (the path segment after the prefix).
    pub remaining: BTreeMap<String, u64>,
    /// The first [`LISTED`] of them: (etcd key, what it is under now).
    pub listed: Vec<(String, String)>,
    /// etcd keys under `covered` already current: a rewrite may skip them.
    current_keys: HashSet<String>,
}

impl Scan {
    /// Objects that still need a rewrite.
    pub fn remaining_count(&self) -> u64 {
        self.remaining.values().sum()
    }

    /// Whether the object at etcd key `key` was already under the current key.
    pub fn is_current(&self, key: &str) -> bool {
        self.current_keys.contains(key)
    }

    /// The remaining objects as report lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (resource, n) in &self.remaining {
            let _ = writeln!(out, "  {resource:<24} {n} object(s) not under the current key");
        }
        for (key, what) in &self.listed {
            let _ = writeln!(out, "    {}  ({what})", key.escape_debug());
        }
        let more = self.remaining_count().saturating_sub(self.listed.len() as u64);
        if more > 0 {
            let _ = writeln!(out, "    … and {more} more");
        }
        out
    }
}

/// Reads every key under the prefix once (at one revision) and classifies it.
pub async fn scan(t: &Target<'_>) -> Result<Scan, String> {
    let client = etcd::connect(t.connection).await?;
    let mut pager = Pager::new(client, t.prefix.as_bytes(), t.page_size);
    let mut scan = Scan::default();
    while let Some(page) = pager.next_page().await? {
        for kv in page {
            scan.scanned += 1;
            let key = String::from_utf8_lossy(&kv.key);
            let covered = t.covered.iter().any(|c| key.starts_with(c.as_str()));
            let stale = match format::parse(&kv.value) {
                Stored::KmsV2 { provider, object } if provider == t.provider => {
                    let hash = KeyIdHash(&object.key_id).to_string();
                    match hash == t.key_id_hash {
                        true => None,
                        false => Some(format!("key_id {hash}")),
                    }
                }
                _ if !covered => continue,
                Stored::KmsV2 { provider, .. } => Some(format!("provider {provider:?}")),
                Stored::Other(f) => Some(f.name().to_string()),
                Stored::Identity(_) => Some("not encrypted".to_string()),
                Stored::Unknown(why) => Some(why.to_string()),
            };
            match stale {
                None => {
                    scan.current += 1;
                    if covered {
                        scan.current_keys.insert(key.into_owned());
                    }
                }
                Some(what) => {
                    let resource = format::resource(t.prefix.as_bytes(), &kv.key)
                        .map_or_else(String::new, |r| String::from_utf8_lossy(r).into_owned());
                    *scan.remaining.entry(resource).or_default() += 1;
                    if scan.listed.len() < LISTED {
                        scan.listed.push((key.into_owned(), what));
                    }
                }
            }
        }
    }
    scan.revision = pager.revision();
    Ok(scan)
}
